"""Tests of bids/outputs.py: names, sidecars, atomic writes, the shared files under concurrency, the validator."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bids_llm_encode import __version__
from bids_llm_encode.bids.outputs import BIDSIGNORE_PATTERNS, DerivativesWriter
from bids_llm_encode.config import Config
from bids_llm_encode.errors import CantCreateError, DataError, UsageError

N_PROCS = 8


# --------------------------------------------------------------------------- fixtures


def _make_raw(root: Path, doi: str | None = None, description: dict | None = None) -> Path:
    """A small raw dataset with a fMRIPrep derivatives folder inside it."""
    (root / "sub-01" / "func").mkdir(parents=True)
    (root / "derivatives" / "fmriprep" / "sub-01" / "func").mkdir(parents=True)
    desc = dict(description or {"Name": "raw", "BIDSVersion": "1.2.1"})
    if doi:
        desc["DatasetDOI"] = doi
    (root / "dataset_description.json").write_text(json.dumps(desc))
    (root / "sub-01" / "func" / "sub-01_task-pieman_events.tsv").write_text("onset\tduration\n0\t1\n")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)),
             root / "derivatives" / "fmriprep" / "sub-01" / "func"
             / "sub-01_task-pieman_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
    return root


@pytest.fixture
def raw(tmp_path) -> Path:
    return _make_raw(tmp_path / "raw", doi="10.18112/openneuro.ds002345.v1.1.4")


def _config(raw: Path, out: Path) -> Config:
    return Config(bids_dir=raw, output_dir=out, analysis_level="participant")


@pytest.fixture
def writer(raw, tmp_path) -> DerivativesWriter:
    out = tmp_path / "out"
    return DerivativesWriter(out, _config(raw, out))


def _img(shape=(4, 5, 6), seed=0) -> nib.Nifti1Image:
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))


def _temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" in p.name]


def _validator() -> str:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    found = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if not found:
        pytest.skip("bids-validator-deno is not installed")
    return found


def _validate(folder: Path) -> list[dict]:
    proc = subprocess.run([_validator(), "--datasetTypes", "derivative", "--format", "json", str(folder)],
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout)["issues"]["issues"]


# --------------------------------------------------------------------------- names


def test_path_entity_order_long_names_and_folders(writer):
    out = writer.output_dir
    p = writer.path({"stat": "z", "desc": "atom07", "space": "MNI152NLin2009cAsym", "task": "pieman",
                     "subject": "01", "run": None, "acquisition": None}, "statmap", ".nii.gz")
    assert p == (out / "sub-01" / "func"
                 / "sub-01_task-pieman_space-MNI152NLin2009cAsym_desc-atom07_stat-z_statmap.nii.gz")
    p = writer.path({"run": 2, "ses": "b", "task": "x", "sub": "sub-003", "res": "2", "den": "91k",
                     "label": "GM", "echo": "1", "rec": "r", "dir": "AP", "ce": "c", "acq": "a"},
                    "summary", "tsv")
    assert p == (out / "sub-003" / "ses-b" / "func"
                 / "sub-003_ses-b_task-x_acq-a_ce-c_rec-r_dir-AP_run-2_echo-1_res-2_den-91k_label-GM_summary.tsv")
    # run written as given: the zero padding of the input is kept
    assert writer.path({"sub": "01", "task": "t", "run": "01"}, "bold", ".nii.gz").name == \
        "sub-01_task-t_run-01_bold.nii.gz"
    assert writer.path({"sub": "01"}, "links", ".tsv", datatype=None).parent == out / "sub-01"


@pytest.mark.parametrize("entities, suffix, ext", [
    ({"task": "x"}, "statmap", ".nii.gz"),                  # no subject
    ({"sub": "0_1"}, "statmap", ".nii.gz"),                 # bad label
    ({"sub": "01", "desc": "a-b"}, "statmap", ".nii.gz"),   # bad label
    ({"sub": "01", "run": "1a"}, "statmap", ".nii.gz"),     # bad index
    ({"sub": "01", "contrast": "x"}, "statmap", ".nii.gz"),  # unknown entity
    ({"sub": "01", "desc": "a", "description": "b"}, "statmap", ".nii.gz"),  # twice
    ({"sub": "01"}, "stat_map", ".nii.gz"),                 # bad suffix
    ({"sub": "01"}, "statmap", "nii/gz"),                   # bad extension
])
def test_path_rejects_bad_names(writer, entities, suffix, ext):
    with pytest.raises(ValueError):
        writer.path(entities, suffix, ext)


def test_new_suffix_goes_into_bidsignore(writer):
    ignore = writer.output_dir / ".bidsignore"
    assert "*_coupling.*" not in ignore.read_text().splitlines()
    writer.path({"sub": "01"}, "coupling", ".tsv")
    writer.path({"sub": "02"}, "coupling", ".tsv")
    lines = ignore.read_text().splitlines()
    assert lines.count("*_coupling.*") == 1
    writer.path({"sub": "01"}, "mask", ".nii.gz")  # a BIDS suffix is validated, not ignored
    assert "*_mask.*" not in ignore.read_text().splitlines()


def test_story_group_report_and_config_paths(writer):
    out = writer.output_dir
    assert writer.story_path("pieman", "smollm2-135m", "atoms.tsv") == \
        out / "stimuli" / "pieman" / "model-smollm2-135m" / "atoms.tsv"
    assert writer.group_path("links.tsv") == out / "group" / "links.tsv"
    assert writer.group_path("links.tsv", story="pieman") == out / "group" / "pieman" / "links.tsv"
    assert writer.report_path("sub-01") == writer.report_path("01") == out / "sub-01.html"
    assert writer.group_report_path() == out / "group.html"
    cfg = writer.write_config(writer.config.resolved(), "participant", "01")
    assert cfg == out / "logs" / "config_participant_sub-01.json"
    assert json.loads(cfg.read_text())["config"]["model"] == writer.config.model
    assert writer.config_path("group") == out / "logs" / "config_group.json"
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError):
            writer.story_path(bad, "m", "atoms.tsv")
        with pytest.raises(ValueError):
            writer.group_path(bad)


def test_never_writes_outside_output_dir(writer, tmp_path):
    with pytest.raises(ValueError, match="outside"):
        writer.write_text("x", tmp_path / "elsewhere.html")
    with pytest.raises(ValueError, match="outside"):
        writer.write_json({}, writer.output_dir / ".." / "escape.json")
    assert not (tmp_path / "elsewhere.html").exists() and not (tmp_path / "escape.json").exists()
    (writer.output_dir / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        writer.write_text("x", writer.output_dir / "link" / "through.html")
    assert not (tmp_path / "through.html").exists()


# --------------------------------------------------------------------------- writers and sidecars


def test_nifti_sidecar_sources_resolve_through_dataset_links(writer, raw):
    out = writer.output_dir
    bold = (raw / "derivatives" / "fmriprep" / "sub-01" / "func"
            / "sub-01_task-pieman_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
    events = raw / "sub-01" / "func" / "sub-01_task-pieman_events.tsv"
    atoms = writer.write_tsv(pd.DataFrame({"atom": [1, 2]}),
                             writer.story_path("pieman", "smollm2-135m", "atoms.tsv"), {"Description": "atoms"})
    outside = raw.parent / "stimulus.wav"
    outside.write_bytes(b"RIFF")
    img = _img()
    p = writer.path({"sub": "01", "task": "pieman", "space": "MNI152NLin2009cAsym", "desc": "atom07",
                     "stat": "z"}, "statmap", ".nii.gz")
    ret = writer.write_nifti(img, p, {"Description": "z of atom 7", "Atom": np.int64(7), "Threshold": 3.1},
                             sources=[bold, events, atoms, outside, "doi:10.1/x"])
    assert ret == p and p.is_file()
    back = nib.load(p)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), img.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(back.affine, img.affine)
    assert back.header.get_xyzt_units()[0] == "mm"
    side = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
    assert side["Description"] == "z of atom 7" and side["Atom"] == 7 and side["Threshold"] == 3.1
    assert side["Sources"] == [
        "bids:fmriprep:sub-01/func/sub-01_task-pieman_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz",
        "bids:raw:sub-01/func/sub-01_task-pieman_events.tsv",
        "bids::stimuli/pieman/model-smollm2-135m/atoms.tsv",
        str(outside),
        "doi:10.1/x",
    ]
    # every bids: URI resolves, through DatasetLinks, to the file it came from
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    for uri, original in zip(side["Sources"][:3], [bold, events, atoms]):
        _, name, rel = uri.split(":", 2)
        base = out if name == "" else Path(links[name].removeprefix("file://"))
        assert (base / rel).samefile(original)


def test_tsv_npz_npy_json_text_roundtrip(writer):
    df = pd.DataFrame({"atom": [1, 2, 3], "r": [0.25, np.nan, -0.5], "network": ["Auditory", None, "Default"]})
    p = writer.write_tsv(df, writer.path({"sub": "01", "task": "pieman"}, "summary", ".tsv"),
                         {"Description": "per atom", "r": {"Description": "CV correlation"}})
    text = p.read_text()
    assert text.splitlines()[0] == "atom\tr\tnetwork"
    assert text.splitlines()[2] == "2\tn/a\tn/a"
    back = pd.read_csv(p, sep="\t", na_values="n/a")
    pd.testing.assert_frame_equal(back, df)
    assert json.loads(p.with_suffix(".json").read_text())["r"] == {"Description": "CV correlation"}
    with pytest.raises(ValueError, match="lacks"):
        writer.write_tsv(df, p, {"Description": "x", "nope": {"Description": "no such column"}})
    with pytest.raises(ValueError, match="Description"):
        writer.write_tsv(df, p, {"Units": "none"})

    A = sp.random(8, 50, density=0.1, format="csr", random_state=0)
    pz = writer.write_npz(A, writer.story_path("pieman", "m", "loadings.npz"), {"Description": "A"})
    assert (sp.load_npz(pz) != A).nnz == 0
    arrays = {"D": np.arange(12.0).reshape(6, 2), "lam": np.array(0.5)}
    pz2 = writer.write_npz(arrays, writer.story_path("pieman", "m", "atoms.npz"), {"Description": "D"})
    with np.load(pz2) as z:
        np.testing.assert_array_equal(z["D"], arrays["D"])
    pn = writer.write_npy(np.eye(3), writer.group_path("consistency.npy"), {"Description": "c"})
    np.testing.assert_array_equal(np.load(pn), np.eye(3))
    assert json.loads(writer.sidecar_path(pn).read_text())["Sources"] == []

    pj = writer.write_json({"n": np.int32(3), "path": Path("/x")}, writer.story_path("pieman", "m", "modelcard.json"),
                           sources=[pz])
    assert json.loads(pj.read_text()) == {"n": 3, "path": "/x", "Sources": ["bids::stimuli/pieman/model-m/loadings.npz"]}
    assert not (pj.parent / "modelcard.json.json").exists()
    ph = writer.write_text("<html><body>é</body></html>", writer.report_path("01"))
    assert ph.read_text(encoding="utf-8").endswith("é</body></html>")
    assert not writer.sidecar_path(ph).exists()
    assert _temp_leftovers(writer.output_dir) == []
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH, "outputs must be readable by others, not 0600"


def test_failed_writes_leave_no_partial_or_temp_file(writer, tmp_path):
    target = writer.path({"sub": "01", "task": "pieman", "desc": "atom01", "stat": "z"}, "statmap", ".nii.gz")
    good = _img(seed=1)
    writer.write_nifti(good, target, {"Description": "first"})
    before = target.read_bytes()
    # an image whose data file is truncated: nibabel fails in the middle of writing
    src = tmp_path / "broken.nii"
    nib.save(_img(shape=(30, 30, 30), seed=2), src)
    lazy = nib.load(src)
    with open(src, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(Exception):
        writer.write_nifti(lazy, target, {"Description": "second"})
    assert target.read_bytes() == before, "a failed write must leave the old file intact"
    new = target.with_name(target.name.replace("atom01", "atom02"))
    with pytest.raises(Exception):
        writer.write_nifti(lazy, new, {"Description": "second"})
    assert not new.exists() and not writer.sidecar_path(new).exists()
    # JSON that cannot be serialised (NaN, objects)
    pj = writer.group_path("x.json")
    for bad in ({"a": float("nan")}, {"a": object()}):
        with pytest.raises((ValueError, TypeError)):
            writer.write_json(bad, pj)
    assert not pj.exists()
    with pytest.raises(ValueError):
        writer.write_npy(np.array([{}, 1], dtype=object), writer.group_path("o.npy"), {"Description": "o"})
    assert not writer.group_path("o.npy").exists()
    assert _temp_leftovers(writer.output_dir) == []


# --------------------------------------------------------------------------- dataset_description.json


def test_dataset_description_with_doi_from_real_raw(narratives, tmp_path, monkeypatch):
    raw = _make_raw(tmp_path / "raw", description=json.loads((narratives / "dataset_description.json").read_text()))
    monkeypatch.setenv("BIDS_LLM_ENCODE_CONTAINER", "singularity:bids_llm_encode-0.1.0.sif")
    out = tmp_path / "out"
    DerivativesWriter(out, _config(raw, out))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == "1.10.0" and desc["Name"]
    assert desc["GeneratedBy"] == [{"Name": "bids_llm_encode", "Version": __version__,
                                    "CodeURL": "https://github.com/bids-llm-encode/bids_llm_encode",
                                    "Container": {"Type": "singularity", "Tag": "bids_llm_encode-0.1.0.sif"}}]
    assert desc["SourceDatasets"][0]["DOI"] == "doi:10.18112/openneuro.ds002345.v1.1.4"
    assert desc["DatasetLinks"] == {"raw": raw.as_uri(),
                                    "fmriprep": (raw / "derivatives" / "fmriprep").as_uri()}


def test_dataset_description_without_doi_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDS_LLM_ENCODE_CONTAINER", "docker:example/bids_llm_encode:0.1.0")
    raw = _make_raw(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "kept", "BIDSVersion": "1.8.0", "DatasetType": "derivative", "Authors": ["A", "B"],
        "GeneratedBy": [{"Name": "other-tool", "Version": "1"}]}))
    (out / ".bidsignore").write_text("extra/\n")
    for _ in range(2):
        w = DerivativesWriter(out, _config(raw, out))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["Name"] == "kept" and desc["Authors"] == ["A", "B"]
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["bids_llm_encode", "other-tool"]
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "example/bids_llm_encode:0.1.0"}
    assert desc["SourceDatasets"] == [{"URL": raw.as_uri()}]
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines[0] == "extra/" and all(lines.count(p) == 1 for p in BIDSIGNORE_PATTERNS)
    assert w.output_dir == out


def test_refuses_raw_dataset_corrupt_description_and_input_folder(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    with pytest.raises(UsageError):
        DerivativesWriter(raw, _config(raw, raw))
    other_raw = _make_raw(tmp_path / "other")
    with pytest.raises(UsageError, match="raw"):
        DerivativesWriter(other_raw, _config(raw, other_raw))
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text('{"Name": "half')
    with pytest.raises(DataError, match="dataset_description.json") as info:
        DerivativesWriter(out, _config(raw, out))
    assert info.value.exit_code == 65


def test_cant_create_output_dir(tmp_path):
    raw = _make_raw(tmp_path / "raw")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(CantCreateError, match=str(out)) as info:
            DerivativesWriter(out, _config(raw, out))
        assert info.value.exit_code == 73
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(CantCreateError):
                DerivativesWriter(ro / "out", _config(raw, ro / "out"))
        finally:
            ro.chmod(0o700)


# --------------------------------------------------------------------------- parallel participant runs


def _parallel_worker(raw: str, out: str, index: int, barrier) -> list[str]:
    """One participant-level process: create a writer at the same moment as the others and write."""
    barrier.wait(timeout=120)
    cfg = Config(bids_dir=Path(raw), output_dir=Path(out), analysis_level="participant")
    w = DerivativesWriter(Path(out), cfg)
    sub = f"{index:02d}"
    written = [
        w.write_nifti(_img(seed=index), w.path({"sub": sub, "task": "pieman", "desc": "atom01", "stat": "z"},
                                               "statmap", ".nii.gz"), {"Description": "z"}),
        w.write_tsv(pd.DataFrame({"i": [index]}), w.path({"sub": sub, "task": "pieman"}, f"custom{index}", ".tsv"),
                    {"Description": "t"}),
        # the same shared file from every process: one complete version must win
        w.write_npz({"D": np.full((50, 20), index, float)}, w.story_path("pieman", "m", "atoms.npz"),
                    {"Description": "atoms", "Writer": index}),
        w.write_text(f"<html>{sub}</html>", w.report_path(sub)),
        w.write_config(cfg.resolved(), "participant", sub),
    ]
    return [str(p) for p in written]


def test_parallel_writers_on_one_output_dir(raw, tmp_path):
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(N_PROCS)
    with ctx.Pool(N_PROCS) as pool:
        results = pool.starmap(_parallel_worker, [(str(raw), str(out), i, barrier) for i in range(N_PROCS)])
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["bids_llm_encode"]
    assert len(desc["SourceDatasets"]) == 1
    lines = (out / ".bidsignore").read_text().splitlines()
    for pattern in [*BIDSIGNORE_PATTERNS, *(f"*_custom{i}.*" for i in range(N_PROCS))]:
        assert lines.count(pattern) == 1, f"{pattern} lost or duplicated in .bidsignore"
    for paths in results:
        for p in map(Path, paths):
            assert p.is_file(), p
    with np.load(out / "stimuli" / "pieman" / "model-m" / "atoms.npz") as z:
        d = z["D"]
        assert d.shape == (50, 20) and np.unique(d).size == 1
    assert len(list(out.glob("sub-*/func/*_statmap.nii.gz"))) == N_PROCS
    assert _temp_leftovers(out) == []


# --------------------------------------------------------------------------- the validator


def test_validator_passes_on_written_folder(writer, raw):
    w = writer
    w.write_nifti(_img(), w.path({"sub": "01", "task": "pieman", "space": "MNI152NLin2009cAsym", "desc": "atom07",
                                  "stat": "z"}, "statmap", ".nii.gz"), {"Description": "z"})
    w.write_tsv(pd.DataFrame({"atom": [1], "network": ["Auditory"], "dice": [0.3]}),
                w.path({"sub": "01", "task": "pieman", "desc": "CA12"}, "overlap", ".tsv"), {"Description": "o"})
    w.write_json({"a": 1}, w.path({"sub": "01", "task": "pieman"}, "metrics", ".json"))
    w.write_text("<html></html>", w.report_path("01"))
    w.write_text("<html></html>", w.group_report_path())
    w.write_npz(sp.eye(3, format="csr"), w.story_path("pieman", "smollm2-135m", "loadings.npz"), {"Description": "A"})
    w.write_tsv(pd.DataFrame({"a": [1]}), w.story_path("pieman", "smollm2-135m", "atoms.tsv"), {"Description": "D"})
    w.write_tsv(pd.DataFrame({"a": [1]}), w.group_path("links.tsv", "pieman"), {"Description": "L"})
    w.write_npy(np.zeros(3), w.group_path("consistency.npy"), {"Description": "c"})
    w.write_config({"x": 1}, "participant", "01")
    issues = _validate(w.output_dir)
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []
    # the same folder without our .bidsignore fails: the check above is not vacuous
    (w.output_dir / ".bidsignore").unlink()
    errors = [i.get("location") for i in _validate(w.output_dir) if i["severity"] == "error"]
    assert any("statmap" in (loc or "") for loc in errors) and any("/group" in (loc or "") for loc in errors)


def test_run_inputs_entities_name_outputs(writer, raw):
    """The entities that records.RunInputs gives (PyBIDS long names) name its outputs."""
    from bids_llm_encode.records import RunInputs, Story

    story = Story(name="pieman", words=("a", "b"), starts=np.array([0.0, 0.5]), ends=np.array([0.4, 0.9]),
                  aligned=np.array([True, True]), source=raw / "stimuli" / "pieman.csv")
    f = raw / "sub-01" / "func" / "sub-01_task-pieman_events.tsv"
    run = RunInputs(subject="001", session="1", task="pieman", run=3, bold=f, mask=f, confounds=f, bold_json=None,
                    events=f, raw_bold=None, tr=1.5, n_frames=10, slice_time_ref=0.5, story=story,
                    story_onset=3.0, stim_file="pieman_audio.wav")
    p = writer.path({**run.entities, "space": "MNI152NLin2009cAsym", "desc": "atom07", "stat": "effect"},
                    "statmap", ".nii.gz")
    assert p.relative_to(writer.output_dir).as_posix() == (
        "sub-001/ses-1/func/sub-001_ses-1_task-pieman_run-3_space-MNI152NLin2009cAsym_desc-atom07_stat-effect"
        "_statmap.nii.gz")


def test_no_container_claim_without_the_apps_image(monkeypatch):
    """Another container (/.dockerenv, SINGULARITY_CONTAINER) is not this app's image."""
    from bids_llm_encode.bids.outputs import detect_container

    monkeypatch.delenv("BIDS_LLM_ENCODE_CONTAINER", raising=False)
    monkeypatch.setenv("SINGULARITY_CONTAINER", "/some/other.sif")
    assert detect_container() is None
    monkeypatch.setenv("BIDS_LLM_ENCODE_CONTAINER", "singularity:bids_llm_encode")
    assert detect_container() == {"Type": "singularity", "Tag": "bids_llm_encode"}


# --------------------------------------------------------------------------- crash safety (issue 13)


def test_nifti_and_sidecar_land_together(writer, monkeypatch):
    """A kill after the sidecar's temp file is written but before the renames leaves neither file."""
    import bids_llm_encode.bids.outputs as outputs

    target = writer.path({"sub": "01", "task": "pieman", "desc": "atom03", "stat": "z"}, "statmap", ".nii.gz")
    real_replace, seen = os.replace, []

    def killed(src, dst):
        seen.append(Path(dst).name)
        raise KeyboardInterrupt  # as a kill: nothing after this runs

    monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write_nifti(_img(), target, {"Description": "z"})
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert seen == [writer.sidecar_path(target).name]  # the sidecar is renamed first
    assert not target.exists() and not writer.sidecar_path(target).exists()
    assert _temp_leftovers(writer.output_dir) == []
    writer.write_nifti(_img(), target, {"Description": "z"})
    assert target.exists() and writer.sidecar_path(target).exists()


def test_temp_names_are_recognised_and_removed_on_rerun(raw, tmp_path):
    from bids_llm_encode.bids.outputs import STALE_TEMP_AGE_S, is_temp_name

    out = tmp_path / "out"
    w = DerivativesWriter(out, _config(raw, out))
    target = w.path({"sub": "01", "task": "pieman", "desc": "atom00", "stat": "z"}, "statmap", ".nii.gz")
    target.parent.mkdir(parents=True)
    # what a participant killed while writing maps, or while writing a story file, leaves behind
    left = target.parent / f".{target.name}.{os.getpid()}.ab12_x9k.tmp.nii.gz"
    left.write_bytes(b"half")
    story = w.story_path("pieman", "m", "atoms.tsv")
    story.parent.mkdir(parents=True)
    old = story.parent / ".atoms.tsv.123.abcdefgh.tmp"
    young = story.parent / ".atoms.json.124.abcdefgh.tmp"
    old.write_text("x")
    young.write_text("x")
    os.utime(old, (0, os.stat(old).st_mtime - STALE_TEMP_AGE_S - 10))
    assert is_temp_name(left.name) and is_temp_name(old.name) and not is_temp_name(target.name)
    assert not is_temp_name(".bidsignore") and not is_temp_name(".bids_llm_encode.lock")
    w2 = DerivativesWriter(out, _config(raw, out))  # a new run: old leftovers in shared folders go
    assert not old.exists() and young.exists() and left.exists()
    assert w2.remove_temps(w2.subject_dir("01")) == [left] and not left.exists()
    with pytest.raises(ValueError):
        w2.remove_temps(tmp_path)


def test_participant_rerun_removes_its_leftover_temps(tmp_path, monkeypatch):
    """run_participant_level removes sub-X/ leftovers before anything else."""
    from bids_llm_encode.workflows import participant as wp

    from layouts import make_layout

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    func = out / "sub-01" / "func"
    func.mkdir(parents=True)
    left = func / ".sub-01_task-pieman_space-X_desc-atom00_stat-z_statmap.nii.gz.999.q1w2e3r4.tmp.nii.gz"
    left.write_bytes(b"half")
    ran = []
    monkeypatch.setattr(wp.Participant, "run", lambda self: ran.append(left.exists()))
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="participant", skip_bids_validation=True,
                 cache_dir=tmp_path / "cache", dictionary_scope="story")  # model scope learns before the loop
    wp.run_participant_level(cfg)
    assert ran == [False] and not left.exists()


@pytest.mark.parametrize("killed_in", ["dictionary", "maps"])
def test_group_level_after_an_interrupted_participant_exit_66(tmp_path, capsys, caplog, killed_in):
    """Killed during dictionary learning or while writing maps: exit 66 naming what is missing."""
    import logging

    import pandas as pd

    from bids_llm_encode.cli import run
    from bids_llm_encode.workflows.group import GroupStory
    from bids_llm_encode.workflows.participant import ParticipantFiles

    from layouts import make_layout

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="group", cache_dir=tmp_path / "cache")
    w = DerivativesWriter(out, cfg)
    files = ParticipantFiles(w, cfg.space)
    w.write_tsv(pd.DataFrame({"session": ["n/a"], "task": ["pieman"], "story": ["pieman"]}),
                files.summary("01"), {"Description": "runs"})
    # a completion record as if the files below were lost after the run (a killed run has none:
    # tests/test_layouts.py); the group level still checks every file it reads
    w.write_json({"participant": "01", "model": cfg.model, "stories": [{"story": "pieman", "session": None}]},
                 files.completion("01"))
    ent = {"sub": "01", "task": "pieman"}
    if killed_in == "maps":
        w.write_tsv(pd.DataFrame({"time": [0.0], "atom00": [1.0], "atom01": [0.5]}),
                    w.story_path("pieman", "smollm2-135m", "atoms.tsv"), {"Description": "atoms"})
        w.write_json({"dictionary_r2": 0.5}, w.story_path("pieman", "smollm2-135m", "modelcard.json"))
        w.write_tsv(pd.DataFrame({"atom": [0, 1]}), w.story_path("pieman", "smollm2-135m", "subgroups.tsv"),
                    {"Description": "subgroups"})
        story = GroupStory("pieman", [ent], cfg, None, w, None)
        needed = story._needed(ent, ["atom00", "atom01"])
        for f in needed[:2]:  # atom00 effect and z written, then the kill
            w.write_nifti(_img(), f, {"Description": "map"})
        missing = needed[2]
    else:
        missing = w.story_path("pieman", "smollm2-135m", "atoms.tsv")
    with caplog.at_level(logging.WARNING):
        code = run([str(root), str(out), "group", "--cache-dir", str(tmp_path / "cache"),
                    "--dictionary-scope", "story"])  # the files above are a story's
    err = capsys.readouterr().err
    assert code == 66, err
    assert "Traceback" not in err
    assert str(missing) in err + caplog.text


def test_group_level_removes_its_own_temps(tmp_path):
    from layouts import make_layout

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="group", cache_dir=tmp_path / "cache")
    w = DerivativesWriter(out, cfg)
    (out / "group" / "pieman").mkdir(parents=True)
    tmp = out / "group" / "pieman" / ".task-pieman_desc-CA12_links.tsv.77.zzzzzzzz.tmp"
    tmp.write_text("x")
    assert w.remove_temps(out / "group") == [tmp] and not tmp.exists()
