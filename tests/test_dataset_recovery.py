"""Issue 11's recovery test: a whole dataset in Narratives' shapes, planted with model-level atoms.

The demo's narratives layout (``bids_llm_encode-demo --layout narratives``): three stories,
task-schema runs holding two of them (with a movie segment between), 8 participants who heard
different subsets, sub-04 in two sessions, sub-05 with 4D masks, sub-06 multi-echo, sub-08 with
fMRIPrep 20.0.x names. The BOLD is driven by atoms of the model-level dictionary (one dictionary
over the three stories) in known CA12 networks.

The participant level runs as a cluster array would: one process per participant, two at a
time, sharing the output folder, the PyBIDS database and a cache without the dictionary (so
that the first two processes both need it: one learns it, the other waits and reads). Then the
group level. Scored against code/demo_truth.json with tests/truth.py (not the code under test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest

from bids_llm_encode.bids.validate import run_validator, validate_derivatives
from bids_llm_encode.demo.narratives import generate_demo
from truth import found_links, precision_recall, truth_links

SMALL = ["--n-atoms", "16"]  # the plant's dictionary: the same settings
FAST = ["--n-permutations", "20", "--fbn-atlas", "CA12", "--baselines", "none", "--skip-bids-validation", *SMALL]
SPACE = "MNI152NLin2009cAsym"
SUBJECTS = ("01", "02", "03", "04", "05", "06", "07", "08")


def _cache_without_dictionaries(src: Path, dst: Path) -> None:
    """A copy of the cache (hard links where possible) without its dictionary entries."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for ns in src.iterdir():
        if ns.is_dir() and ns.name not in ("dictionary", "diversity_chance"):
            shutil.copytree(ns, dst / ns.name, copy_function=link, ignore=shutil.ignore_patterns(".*.lock", ".*.tmp"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from bids_llm_encode.cli import main; sys.exit(main())", *args]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, session_cache):
    root = tmp_path_factory.mktemp("dataset_recovery")
    ds = generate_demo(root / "ds", plant="model-atoms", cache_dir=session_cache,
                       model_options={"n_atoms": 16})
    cache = root / "cache"
    _cache_without_dictionaries(session_cache, cache)
    out = root / "out"
    opts = [*FAST, "--cache-dir", str(cache), "--bids-database-dir", str(root / "db"), "--nprocs", "1"]
    logs, codes = {}, {}
    pending = list(SUBJECTS)
    running: dict[str, subprocess.Popen] = {}
    while pending or running:  # two participant processes at a time
        while pending and len(running) < 2:
            sub = pending.pop(0)
            logs[sub] = root / f"sub-{sub}.log"
            with open(logs[sub], "w") as fh:
                running[sub] = subprocess.Popen(_cli(str(ds), str(out), "participant", "--participant-label", sub,
                                                     *opts), stdout=fh, stderr=subprocess.STDOUT)
        sub = next(iter(running))
        codes[sub] = running.pop(sub).wait()
    group = subprocess.run(_cli(str(ds), str(out), "group", *opts), capture_output=True, text=True)
    return {"ds": ds, "out": out, "cache": cache, "logs": logs, "codes": codes, "group": group,
            "truth": json.loads((ds / "code" / "demo_truth.json").read_text())}


def test_every_participant_and_the_group_succeed(dataset):
    bad = {s: logs.read_text()[-2000:] for s, logs in dataset["logs"].items() if dataset["codes"][s] != 0}
    assert not bad, bad
    assert dataset["group"].returncode == 0, dataset["group"].stderr[-3000:]


def test_one_process_learned_the_model_level_dictionary_the_others_read_it(dataset):
    learners = [s for s, log in dataset["logs"].items() if "model-level dictionary: learning" in log.read_text()]
    assert len(learners) == 1, learners
    entries = [p for p in (dataset["cache"] / "dictionary").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    keys = {json.loads((dataset["out"] / f"sub-{s}" / f"sub-{s}_completion.json").read_text())["dictionary"]
            for s in SUBJECTS}
    card = json.loads((dataset["out"] / "stimuli" / "model-smollm2-135m" / "modelcard.json").read_text())
    assert keys == {card["dictionary_key"]}
    assert [s["story"] for s in card["stories"]] == ["keeper", "letters", "storm"]


def test_group_links_of_the_dataset_level_match_the_truth(dataset):
    truth = truth_links(dataset["truth"])
    links = dataset["out"] / "group" / "desc-CA12_links.tsv"
    precision, recall = precision_recall(found_links(links), truth)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall, sorted(found_links(links)), sorted(truth))


def test_participants_are_the_unit_of_the_group_level(dataset):
    """8 participants, each once: sub-04's two sessions and sub-02's two runs are one unit each."""
    group = dataset["out"] / "group"
    side = json.loads((group / f"space-{SPACE}_desc-atom00_stat-z_statmap.json").read_text())
    assert side["Participants"] == list(SUBJECTS)
    assert side["Stories"] == ["keeper", "letters", "storm"]
    assert json.loads((group / "desc-CA12_metrics.json").read_text())["participants"] == 8
    heard = {s: set(p["stories"]) for s, p in dataset["truth"]["participants"].items()}
    for story in ("keeper", "letters", "storm"):  # each heard by >= 3: a per-story level too
        z = group / story / f"task-{story}_space-{SPACE}_desc-atom00_stat-z_statmap.json"
        assert json.loads(z.read_text())["Participants"] == [s for s in SUBJECTS if story in heard[s]], story


def test_runs_with_two_stories_sessions_echoes_and_4d_masks_are_read(dataset):
    out = dataset["out"]
    summary = pd.read_csv(out / "sub-06" / "func" / "sub-06_desc-runs_summary.tsv", sep="\t")
    assert summary["story"].tolist() == ["storm", "letters"]  # one run, two stories at their own onsets
    (run,) = [r for r in dataset["truth"]["runs"] if r["subject"] == "06"]
    assert summary["story_onset"].tolist() == [s["onset"] for s in run["stories"]]
    assert set(summary["bold"]) == {f"sub-06_task-schema_space-{SPACE}_desc-preproc_bold.nii.gz"}  # not an echo
    assert "single-echo desc-preproc_bold file(s) ignored" in dataset["logs"]["06"].read_text()
    ses = pd.read_csv(out / "sub-04" / "func" / "sub-04_desc-runs_summary.tsv", sep="\t", dtype={"session": str})
    assert sorted(zip(ses["session"], ses["story"])) == [("1", "keeper"), ("2", "letters"), ("2", "storm")]
    for ent in ("ses-1/func/sub-04_ses-1_task-keeper", "ses-2/func/sub-04_ses-2_task-storm"):
        assert (out / "sub-04" / f"{ent}_space-{SPACE}_desc-atom00_stat-z_statmap.nii.gz").is_file()
    mask = next((dataset["ds"] / "derivatives" / "fmriprep" / "sub-05" / "func").glob("*_desc-brain_mask.nii.gz"))
    assert nib.load(mask).ndim == 4
    assert (out / "sub-05" / "func" / f"sub-05_task-keeper_space-{SPACE}_desc-atom00_stat-z_statmap.nii.gz").is_file()


def test_inputs_and_outputs_pass_the_bids_validator(dataset):
    raw = run_validator(dataset["ds"])
    assert raw["errors"] == [], [(i["code"], i["location"]) for i in raw["errors"][:5]]
    report = validate_derivatives(dataset["out"])
    assert report["errors"] == [], [(i["code"], i["location"]) for i in report["errors"][:5]]
