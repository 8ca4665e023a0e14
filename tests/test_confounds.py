"""Confounds from realistic fMRIPrep TSVs (both file names), through nilearn."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.encoding.confounds import load_confounds
from bids_llm_encode.errors import DataError, MissingInputError

T = 40
PREFIX = "sub-01_task-pieman_run-1"


def write_run(folder, suffix="timeseries", json_sidecar=True, n_rows=T, fd_spike=None, seed=0):
    rng = np.random.default_rng(seed)
    cols = {}
    for name in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
        cols[name] = rng.standard_normal(n_rows) * 0.1
        d = np.diff(cols[name], prepend=np.nan)
        cols[name + "_derivative1"] = d
        cols[name + "_power2"] = cols[name] ** 2
        cols[name + "_derivative1_power2"] = d**2
    cols["global_signal"] = rng.standard_normal(n_rows)
    cols["csf"] = rng.standard_normal(n_rows)
    cols["white_matter"] = rng.standard_normal(n_rows)
    fd = np.abs(rng.standard_normal(n_rows)) * 0.1
    fd[0] = np.nan
    if fd_spike is not None:
        fd[fd_spike] = 1.2
    cols["framewise_displacement"] = fd
    cols["std_dvars"] = np.r_[np.nan, np.abs(rng.standard_normal(n_rows - 1))]
    cols["dvars"] = cols["std_dvars"] * 10
    cols["non_steady_state_outlier00"] = np.eye(n_rows)[0]
    cols["non_steady_state_outlier01"] = np.eye(n_rows)[1]
    for i in range(3):
        cols[f"cosine{i:02d}"] = np.cos(np.pi * (i + 1) * (np.arange(n_rows) + 0.5) / n_rows)
    meta = {}
    for i in range(16):  # 00-05 CSF, 06-11 WM, 12-15 combined, as fMRIPrep 20.x orders them
        cols[f"a_comp_cor_{i:02d}"] = rng.standard_normal(n_rows)
        meta[f"a_comp_cor_{i:02d}"] = {"Method": "aCompCor", "Mask": "CSF" if i < 6 else "WM" if i < 12 else "combined",
                                       "Retained": True, "SingularValue": 10.0 - i,
                                       "VarianceExplained": 0.1, "CumulativeVarianceExplained": 0.5}
    df = pd.DataFrame(cols)
    conf = folder / f"{PREFIX}_desc-confounds_{suffix}.tsv"
    df.to_csv(conf, sep="\t", index=False, na_rep="n/a")
    if json_sidecar:
        conf.with_suffix(".json").write_text(json.dumps(meta))
    bold = folder / f"{PREFIX}_space-MNI152NLin2009cAsym_res-native_desc-preproc_bold.nii.gz"
    nib.save(nib.Nifti1Image(rng.standard_normal((3, 3, 3, T)).astype(np.float32), np.eye(4)), bold)
    return bold, conf, df


@pytest.mark.parametrize("suffix", ["timeseries", "regressors"])
def test_narratives_strategy(tmp_path, suffix):
    bold, conf, raw = write_run(tmp_path, suffix)
    df, mask = load_confounds(bold, conf)
    motion = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    assert set(motion) <= set(df.columns)
    assert {"cosine00", "cosine01", "cosine02"} <= set(df.columns)
    acc = sorted(c for c in df.columns if c.startswith("a_comp_cor"))
    assert acc == [f"a_comp_cor_{i:02d}" for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)]  # 5 CSF + 5 WM
    assert not any(c.endswith("derivative1") or c == "global_signal" for c in df.columns)
    assert len(df) == T and np.isfinite(df.to_numpy()).all()
    np.testing.assert_array_equal(mask, np.arange(2, T))  # non-steady-state volumes left out
    np.testing.assert_allclose(df["trans_x"], raw["trans_x"] - raw["trans_x"].iloc[2:].mean(), atol=1e-10)


def test_missing_json_falls_back_to_first_acompcor(tmp_path, caplog):
    bold, conf, _ = write_run(tmp_path, json_sidecar=False)
    df, _ = load_confounds(bold, conf)
    acc = sorted(c for c in df.columns if c.startswith("a_comp_cor"))
    assert acc == [f"a_comp_cor_{i:02d}" for i in range(5)]
    assert "no JSON sidecar" in caplog.text


def test_presets_and_scrub(tmp_path):
    bold, conf, raw = write_run(tmp_path, fd_spike=20)
    df, mask = load_confounds(bold, conf, strategy="simple")
    assert "trans_x_derivative1" in df.columns and "csf" in df.columns
    # n/a of the first row filled with the second row's value (nilearn), before demeaning
    d = raw["trans_x_derivative1"].to_numpy().copy()
    d[0] = d[1]
    np.testing.assert_allclose(df["trans_x_derivative1"] - df["trans_x_derivative1"].iloc[1],
                               d - d[1], atol=1e-10)
    _, mask = load_confounds(bold, conf, scrub=True)
    assert 20 not in mask and 0 not in mask and len(mask) < T - 2
    df, _ = load_confounds(bold, conf, strategy="compcor")
    assert sorted(c for c in df.columns if c.startswith("a_comp_cor")) == [f"a_comp_cor_{i}" for i in range(12, 16)]


def test_bad_inputs(tmp_path):
    bold, conf, _ = write_run(tmp_path, n_rows=T + 5)
    with pytest.raises(DataError, match=f"{T + 5} rows.*{T} frames"):
        load_confounds(bold, conf)
    with pytest.raises(MissingInputError):
        load_confounds(bold, tmp_path / "nope_desc-confounds_timeseries.tsv")
    broken = tmp_path / "x_desc-confounds_timeseries.tsv"
    pd.DataFrame({"trans_x": np.zeros(T)}).to_csv(broken, sep="\t", index=False)
    with pytest.raises(DataError, match=str(broken.name)):
        load_confounds(bold, broken)
