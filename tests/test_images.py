"""The checked image reader: broken or mismatched inputs are exit 65 naming the file, before the model."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_llm_encode.bids.images import check_bold, check_mask, load_bold, load_mask, unmask
from bids_llm_encode.bids.inputs import find_runs
from bids_llm_encode.cli import run
from bids_llm_encode.config import Config
from bids_llm_encode.errors import EXIT_DATA, DataError

from layouts import make_layout, tree_checksums

DER = Path("derivatives/fmriprep/sub-01/func")
BOLD = DER / "sub-01_task-pieman_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz"
MASK = DER / "sub-01_task-pieman_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz"


def cfg(root: Path) -> Config:
    return Config(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant")


def _resave(path: Path, data, affine) -> None:
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_nifti(path: Path) -> None:
    path.write_bytes(gzip.compress(b"this is not an image\n" * 50))


def _not_gzip(path: Path) -> None:
    path.write_text("plain text, not even gzip\n")


def _mask_4d(path: Path) -> None:
    img = nib.load(path)
    _resave(path, np.stack([np.asarray(img.dataobj)] * 2, axis=-1), img.affine)


def _mask_scaled(path: Path) -> None:
    img = nib.load(path)
    aff = img.affine.copy()
    aff[:3, :3] *= 0.5
    _resave(path, np.asarray(img.dataobj), aff)


def _mask_shifted(path: Path) -> None:
    img = nib.load(path)
    aff = img.affine.copy()
    aff[0, 3] += 40
    _resave(path, np.asarray(img.dataobj), aff)


def _mask_nan(path: Path) -> None:
    img = nib.load(path)
    _resave(path, np.full(img.shape, np.nan, dtype=np.float32), img.affine)


def _mask_empty(path: Path) -> None:
    img = nib.load(path)
    _resave(path, np.zeros(img.shape, dtype=np.uint8), img.affine)


def _bold_3d(path: Path) -> None:
    img = nib.load(path)
    _resave(path, np.asarray(img.dataobj)[..., 0], img.affine)


CASES = {
    "bold-truncated": (BOLD, _truncate, "truncated", [BOLD]),
    "bold-not-nifti": (BOLD, _not_nifti, "NIfTI", [BOLD]),
    "bold-not-gzip": (BOLD, _not_gzip, "cannot read", [BOLD]),
    "bold-3d": (BOLD, _bold_3d, "4D", [BOLD]),
    "mask-truncated": (MASK, _truncate, "mask", [MASK]),
    "mask-4d": (MASK, _mask_4d, "3D", [MASK]),
    "mask-affine-scaled": (MASK, _mask_scaled, "same grid", [MASK, BOLD]),
    "mask-origin-moved": (MASK, _mask_shifted, "same grid", [MASK, BOLD]),
    "mask-all-nan": (MASK, _mask_nan, "NaN", [MASK]),
    "mask-empty": (MASK, _mask_empty, "empty", [MASK]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_input_is_data_error_naming_the_file(tmp_path, case):
    root = make_layout(tmp_path / "ds")
    target, damage, what, named = CASES[case]
    damage(root / target)
    with pytest.raises(DataError) as info:
        find_runs(cfg(root))
    msg = str(info.value)
    assert what in msg, msg
    for f in named:
        assert str(root / f) in msg


@pytest.mark.parametrize("case", ["bold-truncated", "mask-origin-moved"])
def test_broken_input_exit_65_before_the_model(tmp_path, capsys, case):
    root = make_layout(tmp_path / "ds")
    target, damage, what, _ = CASES[case]
    damage(root / target)
    before = tree_checksums(root)
    cache = tmp_path / "cache"
    code = run([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                "--cache-dir", str(cache), "--model", "minilm-l6"])
    err = capsys.readouterr().err
    assert code == EXIT_DATA, err
    assert str(root / target) in err and "Traceback" not in err
    assert tree_checksums(root) == before
    assert not cache.exists() or not any(cache.iterdir())  # no model, no activations: found first


def test_mask_of_one_volume_is_squeezed(tmp_path):
    root = make_layout(tmp_path / "ds")
    img = nib.load(root / MASK)
    _resave(root / MASK, np.asarray(img.dataobj)[..., None], img.affine)
    (r,) = find_runs(cfg(root))
    mask = check_mask(r.mask, r.bold)
    assert mask.shape == (4, 4, 4) and int(np.asarray(mask.dataobj).sum()) == 8


def test_tiny_affine_difference_accepted(tmp_path):
    root = make_layout(tmp_path / "ds")
    img = nib.load(root / MASK)
    aff = img.affine.copy()
    aff[0, 3] += 1e-5
    _resave(root / MASK, np.asarray(img.dataobj), aff)
    assert len(find_runs(cfg(root))) == 1


def test_load_bold_reads_masked_and_refuses_all_nan(tmp_path):
    root = make_layout(tmp_path / "ds")
    mask = np.asarray(load_mask(root / MASK).dataobj) > 0
    Y = load_bold(root / BOLD, mask)
    assert Y.shape == (40, 8) and Y.dtype == np.float32
    img = nib.load(root / BOLD)
    _resave(root / BOLD, np.full(img.shape, np.nan, dtype=np.float32), img.affine)
    with pytest.raises(DataError, match="NaN"):
        load_bold(root / BOLD, mask)


def test_multi_member_gzip_is_not_called_truncated(tmp_path):
    root = make_layout(tmp_path / "ds")
    raw = gzip.decompress((root / BOLD).read_bytes())
    half = len(raw) // 2
    (root / BOLD).write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    assert check_bold(root / BOLD).shape == (4, 4, 4, 40)


def test_uncompressed_truncated(tmp_path):
    root = make_layout(tmp_path / "ds")
    p = tmp_path / "bold.nii"
    nib.save(nib.load(root / BOLD), p)
    _truncate(p)
    with pytest.raises(DataError, match="truncated"):
        check_bold(p)


def test_unmask_keeps_nan_only_when_asked():
    mask = nib.Nifti1Image(np.ones((2, 1, 1), dtype=np.uint8), np.eye(4))
    vals = np.array([1.0, np.nan])
    assert np.asarray(unmask(vals, mask).dataobj).ravel().tolist() == [1.0, 0.0]
    kept = np.asarray(unmask(vals, mask, nan=None).dataobj).ravel()
    assert kept[0] == 1.0 and np.isnan(kept[1])


# ----------------------------------------------------------------------------- timing and links


def test_word_times_backwards_exit_65_with_the_line(tmp_path, capsys):
    root = make_layout(tmp_path / "ds")
    align = root / "stimuli" / "gentle" / "pieman" / "align.csv"
    lines = align.read_text().splitlines()
    # words of lines 1-10 moved 100 s later: line 11 then goes 100 s backwards (a misordered file)
    for i in range(10):
        w, aw, s, e = lines[i].split(",")
        if s:
            lines[i] = f"{w},{aw},{float(s) + 100},{float(e) + 100}"
    align.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        find_runs(cfg(root))
    assert f"{align}, line 11" in str(info.value) and "backwards" in str(info.value)
    code = run([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                "--cache-dir", str(tmp_path / "cache")])
    assert code == EXIT_DATA and "line 11" in capsys.readouterr().err


def test_small_overlaps_within_tolerance_accepted(tmp_path):
    from bids_llm_encode.bids.stimuli import BACKWARDS_TOLERANCE_S, read_gentle_csv

    p = tmp_path / "align.csv"
    p.write_text(f"a,a,1.0,1.5\nb,b,{1.0 - BACKWARDS_TOLERANCE_S / 2},1.6\nc,,,\nd,d,2.0,2.5\n")
    assert read_gentle_csv(p).n_words == 4
    p.write_text(f"a,a,1.0,1.5\nb,b,{1.0 - 2 * BACKWARDS_TOLERANCE_S},1.6\n")
    with pytest.raises(DataError, match="line 2"):
        read_gentle_csv(p)


def test_directory_cycle_symlink_counts_each_file_once(tmp_path, caplog):
    root = make_layout(tmp_path / "ds")
    os.symlink("..", root / "sub-01" / "func" / "up")
    os.symlink("..", root / DER / "up")
    with caplog.at_level(logging.WARNING, logger="bids_llm_encode.bids.inputs"):
        runs = find_runs(cfg(root))
    assert len(runs) == 1
    assert runs[0].bold == root / BOLD and runs[0].raw_bold.parent == root / "sub-01" / "func"
    assert "counted once" in caplog.text


def test_participant_writes_nan_variance_as_nan(tmp_path):
    """NaN variance means "not estimable": it stays NaN in the map; effect and z write 0 there."""
    from bids_llm_encode.bids.outputs import DerivativesWriter
    from bids_llm_encode.records import EncodingResult
    from bids_llm_encode.workflows.participant import Participant

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    config = Config(bids_dir=root, output_dir=out, analysis_level="participant")
    writer = DerivativesWriter(out, config)
    mask_img = nib.Nifti1Image(np.ones((2, 1, 1), dtype=np.uint8), np.eye(4))
    one = np.array([[0.5, np.nan]])
    enc = EncodingResult(effect=one, variance=one, z=one, cv_r=one[0], cv_r2=one[0], p=one[0],
                         significant=np.array([True, False]), in_sample_r2=one[0], noise_ceiling=None,
                         design=np.zeros((3, 1)), info={})
    p = Participant("01", [], config, None, writer)
    p.write_encoding_maps(enc, mask_img, {"sub": "01", "task": "pieman"}, [])
    var = np.asarray(nib.load(p.files.statmap({"sub": "01", "task": "pieman"}, "atom00", "variance")).dataobj)
    z = np.asarray(nib.load(p.files.statmap({"sub": "01", "task": "pieman"}, "atom00", "z")).dataobj)
    assert var.ravel()[0] == 0.5 and np.isnan(var.ravel()[1])
    assert z.ravel().tolist() == [0.5, 0.0]
