"""Config.validate: every option checked once at entry, exit 64 naming the option, nothing read or written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bids_llm_encode.cli import run
from bids_llm_encode.config import CHOICES, Config, check_output_location, normalize_labels
from bids_llm_encode.errors import EXIT_USAGE, UsageError

from layouts import make_layout, tree_checksums

BAD_OPTIONS = [
    (["--fdr-alpha", "1.5"], "--fdr-alpha"),
    (["--fdr-alpha", "0"], "--fdr-alpha"),
    (["--fdr-alpha", "nan"], "--fdr-alpha"),
    (["--cv-folds", "1"], "--cv-folds"),
    (["--n-permutations", "10"], "--n-permutations"),
    (["--n-permutations", "-1"], "--n-permutations"),
    (["--confounds-strategy", "everything"], "--confounds-strategy"),
    (["--n-atoms", "0"], "--n-atoms"),
    (["--sparsity", "0"], "--sparsity"),
    (["--sparsity", "-0.1"], "--sparsity"),
    (["--map-threshold", "0"], "--map-threshold"),
    (["--atom-tr", "0"], "--atom-tr"),
    (["--nprocs", "0"], "--nprocs"),
    (["--mem-mb", "0"], "--mem-mb"),
    (["--n-spatial-null", "0"], "--n-spatial-null"),
    (["--n-spins", "0"], "--n-spins"),
    (["--min-dice", "1.5"], "--min-dice"),
    (["--min-dice", "-0.1"], "--min-dice"),
    (["--fbn-null", "spin", "--fbn-atlas", "CA12", "atlas.nii.gz"], "--fbn-null"),
    (["--n-consistency-null", "50"], "--n-consistency-null"),
    (["--subgroup", "top-0"], "--subgroup"),
    (["--subgroup", "largest"], "--subgroup"),
    (["--seed", "-1"], "--seed"),
    (["--layers", "-1"], "--layers"),
    (["--context-tokens", "1024", "--window-tokens", "1024"], "--context-tokens"),
]


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_layout(tmp_path / "ds")


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
@pytest.mark.parametrize("level", ["participant", "group"])
def test_bad_option_exit_64_before_anything(dataset, tmp_path, capsys, argv, option, level):
    before = tree_checksums(dataset)
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    code = run([str(dataset), str(out), level, "--skip-bids-validation", "--cache-dir", str(cache),
                *argv])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert option in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()  # nothing written, not even a lock
    assert tree_checksums(dataset) == before


@pytest.mark.parametrize("key,value", [
    ("device", "tpu"), ("dtype", "float8"), ("neurons", "attention"), ("word_pooling", "max"),
    ("hrf", "fir"), ("group_model", "mixed"), ("confounds_strategy", "full"), ("atom_model", "both"),
    ("n_atoms", "many"), ("n_atoms", True), ("sparsity", "high"), ("scrub", "yes"),
    ("fbn_atlas", []), ("layers", "all"), ("fbn_null", "rotate"), ("n_spins", 1.5)])
def test_bad_config_file_values_exit_64(tmp_path, capsys, key, value):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({key: value}))
    code = run([str(tmp_path / "ds"), str(tmp_path / "out"), "participant", "--config-file", str(f)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--" + key.replace("_", "-") in err, err
    assert not (tmp_path / "out").exists()


def test_valid_defaults_pass_and_choices_match_the_code():
    from bids_llm_encode.encoding.confounds import STRATEGIES

    from bids_llm_encode.config import SURFACE_ATLASES
    from bids_llm_encode.networks.atlases import list_builtin_atlases
    from bids_llm_encode.networks.overlap import NULLS

    Config(bids_dir=Path("/data/ds"), output_dir=Path("/data/out"), analysis_level="group").validate()
    assert CHOICES["confounds_strategy"] == STRATEGIES
    assert CHOICES["fbn_null"] == NULLS and SURFACE_ATLASES == tuple(list_builtin_atlases())


def test_label_file_content_never_echoed(tmp_path, capsys):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret-words:/root:/bin/bash\nbin:x:1:1::/bin:\n")
    code = run([str(tmp_path / "ds"), str(tmp_path / "out"), "participant",
                "--participant-label", str(secret)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert str(secret) in err and "line 1" in err
    assert "root" not in err.replace(str(tmp_path), "") and "secret-words" not in err


def test_label_file_binary_is_a_usage_error(tmp_path):
    f = tmp_path / "labels.bin"
    f.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UsageError, match="cannot read it as a text file"):
        normalize_labels([str(f)], "sub")


def test_label_file_read(tmp_path):
    f = tmp_path / "subjects.txt"
    f.write_text("sub-01\n# comment\n02, 03\n")
    assert normalize_labels([str(f), "04"], "sub") == ["01", "02", "03", "04"]


# ----------------------------------------------------------------------------- output folder


def _links(tmp_path: Path, dataset: Path) -> dict[str, Path]:
    link = tmp_path / "link-to-ds"
    link.symlink_to(dataset, target_is_directory=True)
    return {"same": dataset, "symlink": link, "inside": dataset / "results",
            "inside-via-link": link / "sub-01" / "out", "contains": tmp_path,
            "fmriprep": dataset / "derivatives" / "fmriprep" / "mine",
            "derivatives-itself": dataset / "derivatives"}


@pytest.mark.parametrize("case", ["same", "symlink", "inside", "inside-via-link", "contains", "fmriprep",
                                  "derivatives-itself"])
@pytest.mark.parametrize("level", ["participant", "group"])
def test_output_folder_in_the_input_refused_before_any_write(dataset, tmp_path, capsys, case, level):
    out = _links(tmp_path, dataset)[case]
    before = tree_checksums(dataset)
    code = run([str(dataset), str(out), level, "--skip-bids-validation",
                "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "output folder" in err and str(out) in err and "Traceback" not in err
    assert tree_checksums(dataset) == before  # no lock, no dataset_description.json, nothing
    assert not list(dataset.rglob(".bids_llm_encode.lock"))
    assert not (tmp_path / "cache").exists()


def test_output_under_derivatives_or_elsewhere_accepted(dataset, tmp_path):
    check_output_location(dataset / "derivatives" / "bids_llm_encode", dataset)
    check_output_location(tmp_path / "elsewhere", dataset)
    other = tmp_path / "fp"
    with pytest.raises(UsageError, match="fMRIPrep"):
        check_output_location(other / "x", dataset, derivatives=other)


def test_writer_refuses_symlinked_input_without_writing(dataset, tmp_path):
    from bids_llm_encode.bids.outputs import DerivativesWriter

    link = tmp_path / "alias"
    link.symlink_to(dataset, target_is_directory=True)
    cfg = Config(bids_dir=dataset, output_dir=link, analysis_level="participant")
    before = tree_checksums(dataset)
    with pytest.raises(UsageError, match="input BIDS dataset"):
        DerivativesWriter(link, cfg)
    assert tree_checksums(dataset) == before
    assert os.path.islink(link)
