"""Statistics on data the pipeline did not make: null calibration and recovery (reduced size).

``bids_llm_encode-simulate`` writes 2 null participants (one heard the story
twice) and 1 planted participant (twice) on a 6 mm grid; the app's own
participant stage runs on each (``demo.validation.evaluate``). The tolerances
come from the simulation's own spread: rates are compared per spatial block
(8 slabs along x), and a rate's standard error is the spread of its 8 block
rates / sqrt(8) (spatially smooth noise makes neighbouring voxels dependent,
so a binomial error would be too small).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_llm_encode.demo.simulate import PLANTS, TRUTH_FILE, simulate_dataset
from bids_llm_encode.demo.validation import Z_NOMINAL, evaluate

N_BLOCKS = 8


@pytest.fixture(scope="module")
def validation(tmp_path_factory, session_cache):
    root = tmp_path_factory.mktemp("validation")
    data = simulate_dataset(root / "data", n_null=2, n_planted=1, voxel_mm=6.0, seed=0,
                            cache_dir=session_cache)
    ev = evaluate(data, root / "out", n_permutations=40, seed=0)
    ev["root"], ev["out"] = data, root / "out"
    ev["truth"] = json.loads((data / TRUTH_FILE).read_text())
    return ev


def _maps(ev, sub, desc, stat):
    func = ev["out"] / f"sub-{sub}" / "func"
    paths = sorted(func.glob(f"sub-{sub}_task-lighthouse_space-*_desc-{desc}_stat-{stat}_statmap.nii.gz"))
    assert len(paths) == 1, paths
    return nib.load(paths[0])


def _mask_and_blocks(ev, sub):
    img = _maps(ev, sub, "cv", "p")
    mask = np.asarray(img.dataobj) < 1.0  # p is 1 outside the mask
    x = np.argwhere(mask)[:, 0]
    edges = np.quantile(x, np.linspace(0, 1, N_BLOCKS + 1))
    block = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, N_BLOCKS - 1)
    return mask, block


def _rate_and_se(hits: np.ndarray, block: np.ndarray) -> tuple[float, float]:
    rates = np.array([hits[..., block == b].mean() for b in range(N_BLOCKS)])
    return float(hits.mean()), float(rates.std(ddof=1) / np.sqrt(N_BLOCKS))


def test_null_atom_z_maps_are_calibrated(validation):
    for sub in ("01", "02"):
        mask, block = _mask_and_blocks(validation, sub)
        z = np.stack([np.asarray(_maps(validation, sub, f"atom{k:02d}", "z").dataobj)[mask]
                      for k in range(64)])
        rate, se = _rate_and_se(np.abs(z) > 3.1, block)
        assert rate <= 2 * Z_NOMINAL[3.1] + 3 * se, (sub, rate, se)
        rate, se = _rate_and_se(np.abs(z) > 1.96, block)
        assert abs(rate - 0.05) <= 0.01 + 3 * se, (sub, rate, se)
        assert 0.9 < z.std() < 1.1


def test_null_cv_p_values_are_calibrated_and_fdr_calls_none(validation):
    for sub in ("01", "02"):
        mask, block = _mask_and_blocks(validation, sub)
        p = np.asarray(_maps(validation, sub, "cv", "p").dataobj)[mask]
        rate, se = _rate_and_se(p < 0.05, block)
        assert 0.03 - 3 * se <= rate <= 0.07 + 3 * se, (sub, rate, se)
    assert (validation["null"]["fdr_calls"] == 0).all()


def test_null_participants_have_no_links_and_overlap_p_is_calibrated(validation):
    null = validation["null"]
    for atlas in ("CA12", "Yeo7"):
        assert (null[f"{atlas}_links"] == 0).all()
        assert (null[f"{atlas}_p05"] <= 0.07).all()  # thousands of tests per participant


def test_in_sample_r2_is_written_beside_its_chance_level(validation):
    null = validation["null"]
    # 64 atoms on ~290 frames: a large in-sample R^2 with no signal, equal to its chance level
    assert (null["r2_insample"] > 0.2).all()
    assert np.allclose(null["r2_insample"], null["r2_chance"], atol=0.01)
    for sub in ("01", "03"):
        assert _maps(validation, sub, "insamplechance", "rsquared") is not None


def test_planted_signals_are_found_where_they_were_planted(validation):
    planted = validation["planted"].iloc[0]
    # the oracle (true latents, same CV and null) finds planted voxels, and nothing else is called
    assert planted["sens_oracle"] > 0.05
    assert planted["false_call_share"] <= 0.05
    # the noise ceiling sees the planted signal (heard twice) and not the noise
    sub = planted["participant"]
    mask, _ = _mask_and_blocks(validation, sub)
    ceiling = np.asarray(_maps(validation, sub, "noiseceiling", "r").dataobj)[mask]
    truth_r = np.asarray(nib.load(validation["root"] / validation["truth"]["maps"]).dataobj)[mask].max(axis=1)
    assert np.median(ceiling[truth_r >= 0.3]) > 2 * np.median(ceiling[truth_r == 0]) + 0.05


def test_planted_word_rate_goes_to_the_baselines_and_links_are_true(validation):
    """Word rate planted alone is explained by the word-rate baseline, not by the atoms: the
    baselines' CV R^2 is clearly positive in its core, the atoms' unique part is significant in
    at most 10 % of its voxels, no atom's z map (the baselines in its model) lights its core up,
    and any link the planted participant gets is a true one."""
    truth, sub = validation["truth"], "03"
    mask, _ = _mask_and_blocks(validation, sub)
    maps = np.asarray(nib.load(validation["root"] / truth["maps"]).dataobj)[mask]
    j = [p.name for p in PLANTS].index("word_rate")
    own = (maps[:, j] > 0) & (np.delete(maps, j, axis=1) == 0).all(axis=1)
    core = own & (maps[:, j] >= 0.3)
    r2_base = np.asarray(_maps(validation, sub, "cvbaseline", "rsquared").dataobj)[mask]
    r2_base_null = r2_base[(maps == 0).all(axis=1)]
    assert np.median(r2_base[core]) > np.quantile(r2_base_null, 0.95)
    func = validation["out"] / f"sub-{sub}" / "func"
    unique = np.asarray(nib.load(next(func.glob("*_desc-uniquefdr_mask.nii.gz"))).dataobj)[mask] > 0
    assert unique[own].mean() <= 0.10
    z = np.stack([np.asarray(_maps(validation, sub, f"atom{k:02d}", "z").dataobj)[mask] for k in range(64)])
    assert (np.abs(z[:, core]).max(axis=0) > 3.1).mean() < 0.2
    n_true = sum(v[0] for v in validation["links"].values())
    n_links = sum(v[1] for v in validation["links"].values())
    assert n_true == n_links, validation["links"]


def test_null_unique_part_is_calibrated(validation):
    null = validation["null"]
    assert (null["unique_fdr_calls"] == 0).all()
    assert 0.02 <= null["unique_p05"].mean() <= 0.09


def test_truth_file_names_the_planted_neurons_and_networks(validation):
    truth = validation["truth"]
    groups = [p for p in truth["plants"] if p["kind"] == "an-group"]
    assert len(groups) == 2 and all(len(p["neurons"]) == 300 for p in groups)
    assert set(truth["truth_networks"]) == {p.name for p in PLANTS}
    kinds = {r["subject"]: r["kind"] for r in truth["runs"]}
    assert kinds == {"01": "null", "02": "null", "03": "planted"}


def test_simulate_command_line_errors(tmp_path):
    from bids_llm_encode.demo.simulate import main

    assert main([str(tmp_path / "a"), "--null", "-1"]) == 64
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main([str(full), "--null", "1", "--planted", "0"]) == 73
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # nothing half-written
