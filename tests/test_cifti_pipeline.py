"""The app end to end on CIFTI inputs: the demo's CIFTI twin, participant and group with --space fsLR.

The demo (model-atoms plant, 2 participants, a small dictionary so that it stays
fast) writes every run also as fMRIPrep's space-fsLR_den-91k_bold.dtseries.nii,
driven by the same planted atoms in the same CA12 networks (on the 91k
grayordinates). Scored against code/demo_truth.json as tests/test_pipeline.py
scores the volume.
"""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.bids.validate import validate_derivatives
from bids_llm_encode.cli import run
from bids_llm_encode.demo.generate import generate_demo
from truth import found_links, precision_recall, truth_links

SUBJECTS = ("01", "02")
SMALL = ["--n-atoms", "16", "--restarts", "4"]  # the plant's dictionary: the same settings
FAST = ["--space", "fsLR", "--n-permutations", "20", "--n-spins", "200", "--fbn-atlas", "CA12", "--baselines", "none",
        "--skip-bids-validation", *SMALL]


@pytest.fixture(scope="module")
def cifti(tmp_path_factory, session_cache):
    root = tmp_path_factory.mktemp("cifti_pipeline")
    ds = generate_demo(root / "ds", plant="model-atoms", n_subjects=2, cache_dir=session_cache,
                       model_options={"n_atoms": 16, "restarts": 4}, cifti=True)
    out = root / "out"
    assert run([str(ds), str(out), "participant", *FAST]) == 0
    assert run([str(ds), str(out), "group", "--group-model", "fixed", *FAST]) == 0
    truth = json.loads((ds / "code" / "demo_truth.json").read_text())
    return {"ds": ds, "out": out, "truth": truth}


def test_maps_are_dscalar_on_the_91k_grayordinates(cifti):
    func = cifti["out"] / "sub-01" / "func"
    z = func / "sub-01_task-lighthouse_space-fsLR_den-91k_desc-atom00_stat-z_statmap.dscalar.nii"
    img = nib.load(z)
    assert isinstance(img, nib.Cifti2Image) and img.shape == (1, 91282)
    assert json.loads(z.with_name(z.name.replace(".dscalar.nii", ".json")).read_text())["Sources"]
    assert not list(cifti["out"].rglob("*.nii.gz"))  # no volume map anywhere
    group = cifti["out"] / "group"  # the dataset level (--dictionary-scope model); 2 participants: no per-story level
    assert (group / "space-fsLR_den-91k_desc-atom00_stat-z_statmap.dscalar.nii").is_file()
    assert not (group / "lighthouse").exists()


def test_outputs_pass_the_bids_validator(cifti):
    report = validate_derivatives(cifti["out"])
    assert report["errors"] == [], [(i["code"], i["location"]) for i in report["errors"][:5]]


def test_participant_links_match_the_truth(cifti):
    truth = truth_links(cifti["truth"])
    for sub in SUBJECTS:
        links = cifti["out"] / f"sub-{sub}" / "func" / f"sub-{sub}_task-lighthouse_desc-CA12_links.tsv"
        assert set(pd.read_csv(links, sep="\t")["null"]) <= {"spin"}
        precision, recall = precision_recall(found_links(links), truth)
        assert precision >= 0.8 and recall >= 0.8, (sub, precision, recall)


def test_group_links_match_the_truth(cifti):
    links = cifti["out"] / "group" / "desc-CA12_links.tsv"
    precision, recall = precision_recall(found_links(links), truth_links(cifti["truth"]))
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)


def test_driven_grayordinates_are_significant_more_than_the_others(cifti):
    gains = nib.load(cifti["ds"] / "code" / "demo_truth_maps.dscalar.nii").get_fdata()
    driven = (gains != 0).any(axis=0)
    for sub in SUBJECTS:
        func = cifti["out"] / f"sub-{sub}" / "func"
        sig = nib.load(next(func.glob("*_den-91k_desc-cvfdr_mask.dscalar.nii"))).get_fdata()[0] > 0
        assert sig[~driven].mean() <= 0.05 and sig[driven].mean() >= 0.25, (sub, sig[driven].mean(),
                                                                           sig[~driven].mean())


def test_reports_have_surface_figures(cifti):
    html = (cifti["out"] / "sub-01.html").read_text()
    figures = re.findall(r"<img[^>]+>", html)
    assert len(figures) >= 5
    group = (cifti["out"] / "group.html").read_text()
    assert "fraction of participants" in group
    from bids_llm_encode.report.figures import SURFACE_VIEWS, glass_brain
    from bids_llm_encode.bids.images import cifti_grid, unmask

    z = next((cifti["out"] / "sub-01" / "func").glob("*desc-atom00_stat-z_statmap.dscalar.nii"))
    fig = glass_brain(unmask(nib.load(z).get_fdata()[0], cifti_grid(z)), "z", threshold=3.1)
    assert len([ax for ax in fig.axes if ax.get_title()]) == len(SURFACE_VIEWS)  # the 4 cortex views
    assert np.isfinite(nib.load(z).get_fdata()).all()
