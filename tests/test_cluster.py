"""bids_llm_encode-slurm: the generated SLURM scripts, checked without SLURM (a fake sbatch)."""

import os
import subprocess
from pathlib import Path

import pytest

from bids_llm_encode.cluster import find_participants, main
from bids_llm_encode.errors import NoMatchError, UsageError


def _bids(tmp_path, subs=("01", "02", "03"), tsv=True, folders=True):
    ds = tmp_path / "ds"
    ds.mkdir()
    if folders:
        for s in subs:
            (ds / f"sub-{s}").mkdir()
    if tsv:
        (ds / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-{s}\t30\n" for s in subs))
    return ds


def _sbatch_lines(path):
    return [ln for ln in Path(path).read_text().splitlines() if ln.startswith("#SBATCH")]


def test_participants_from_labels_folders_or_tsv(tmp_path):
    ds = _bids(tmp_path, subs=("01", "02"), tsv=False)
    assert find_participants(ds) == ["sub-01", "sub-02"]
    assert find_participants(ds, ["02", "sub-07,08"]) == ["sub-02", "sub-07", "sub-08"]
    f = tmp_path / "labels.txt"
    f.write_text("sub-05  # a comment\n\n06\n")
    assert find_participants(ds, [str(f)]) == ["sub-05", "sub-06"]
    (tmp_path / "t").mkdir()
    only_tsv = _bids(tmp_path / "t", subs=("a1", "b2"), folders=False)
    assert find_participants(only_tsv) == ["sub-a1", "sub-b2"]
    with pytest.raises(UsageError):
        find_participants(ds, ["0_1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoMatchError):
        find_participants(tmp_path / "empty")


def test_venv_scripts_array_dependencies_and_labels(tmp_path, capsys):
    ds = _bids(tmp_path)
    out, scripts, venv = tmp_path / "out", tmp_path / "slurm", tmp_path / "venv"
    assert main([str(ds), str(out), "--venv", str(venv), "--script-dir", str(scripts), "--cpus-per-task", "2",
                 "--mem-mb", "3000", "--time", "00:30:00", "--partition", "debug", "--max-parallel", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--sbatch-arg=--qos=low",
                 "--", "--group-model", "fixed", "--model", "minilm-l6"]) == 0
    assert "3 participants" in capsys.readouterr().out
    assert (scripts / "participants.txt").read_text() == "sub-01\nsub-02\nsub-03\n"

    part = (scripts / "participant.sbatch").read_text()
    head = _sbatch_lines(scripts / "participant.sbatch")
    assert "#SBATCH --array=1-3%2" in head and "#SBATCH --cpus-per-task=2" in head
    assert {"#SBATCH --mem=3000M", "#SBATCH --time=00:30:00", "#SBATCH --partition=debug",
            "#SBATCH --qos=low"} <= set(head)
    assert f"source {venv}/bin/activate" in part
    assert f"export BIDS_LLM_ENCODE_CACHE={tmp_path / 'cache'}" in part
    assert 'sed -n "${SLURM_ARRAY_TASK_ID}p"' in part
    run = part.splitlines()[-1]
    assert run.startswith(f'"${{APP[@]}}" {ds} {out} participant --participant-label "$label" --skip-bids-validation')
    db = scripts / "bidsdb"  # one PyBIDS index for every job
    assert (f'--nprocs "${{SLURM_CPUS_PER_TASK:-1}}" --mem-mb 3000 --bids-database-dir {db} --group-model fixed '
            '--model minilm-l6') in run
    assert f"mkdir -p {out} {tmp_path / 'cache'} {db}" in part

    group = (scripts / "group.sbatch").read_text().splitlines()
    assert "#SBATCH --array" not in "\n".join(group)
    assert group[-1].startswith(f'"${{APP[@]}}" {ds} {out} group ') and group[-1].endswith(
        f"--bids-database-dir {db} --group-model fixed --model minilm-l6")
    prep = (scripts / "prepare.sbatch").read_text().splitlines()[-1]
    assert prep == (f'"${{PREPARE[@]}}" --prepare-only {ds} {out} -- --nprocs "${{SLURM_CPUS_PER_TASK:-1}}" '
                    f'--mem-mb 3000 --bids-database-dir {db} --group-model fixed --model minilm-l6')
    for name in ("prepare.sbatch", "participant.sbatch", "group.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(scripts / name)], check=True)

    # submit.sh with a fake sbatch: each job depends on the id the previous sbatch printed
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nn=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 101 ))\n'
                                    'echo "$*" >> "$SBATCH_LOG"\necho "$n;cluster1"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch.log"))
    res = subprocess.run(["bash", str(scripts / "submit.sh")], env=env, capture_output=True, text=True, check=True)
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls == ["--parsable prepare.sbatch",
                     "--parsable --kill-on-invalid-dep=yes --dependency=afterok:101 participant.sbatch",
                     "--parsable --kill-on-invalid-dep=yes --dependency=afterok:102 group.sbatch"]
    assert "participant array job: 102 (3 tasks: sub-01 sub-02 sub-03)" in res.stdout
    assert (scripts / "last_submitted.txt").read_text().split() == ["101", "102", "103"]


def test_container_gpu_labels_and_no_prepare(tmp_path):
    ds = _bids(tmp_path)
    sif, scripts = tmp_path / "app.sif", tmp_path / "s"
    assert main([str(ds), str(tmp_path / "out"), "--container", str(sif), "--container-cmd", "apptainer", "--gpu",
                 "--participant-label", "03", "sub-01", "--script-dir", str(scripts), "--no-prepare",
                 "--", "--skip-bids-validation"]) == 0
    assert (scripts / "participants.txt").read_text() == "sub-03\nsub-01\n"
    assert not (scripts / "prepare.sbatch").exists()
    part = (scripts / "participant.sbatch").read_text()
    assert "#SBATCH --array=1-2" in part and "#SBATCH --gres=gpu:1" in part
    assert f"APP=(apptainer run --cleanenv --nv -B {ds}:{ds}:ro -B {tmp_path / 'out'} " in part and str(sif) in part
    assert "APPTAINERENV_BIDS_LLM_ENCODE_CACHE=" in part
    assert f"mkdir -p {tmp_path / 'out'} " in part  # bind sources must exist
    # validation was asked to be skipped by the user, so it is not added a second time
    assert part.splitlines()[-1].count("--skip-bids-validation") == 1
    calls = subprocess.run(["grep", "-c", "afterok", str(scripts / "submit.sh")], capture_output=True, text=True)
    assert calls.stdout.strip() == "1"  # only the group job waits (on the array)


def test_a_database_dir_given_to_the_app_is_not_added_twice(tmp_path):
    ds = _bids(tmp_path)
    scripts = tmp_path / "s"
    assert main([str(ds), str(tmp_path / "out"), "--script-dir", str(scripts), "--no-prepare",
                 "--", "--bids-database-dir", str(tmp_path / "mine")]) == 0
    run = (scripts / "participant.sbatch").read_text().splitlines()[-1]
    assert run.count("--bids-database-dir") == 1 and str(tmp_path / "mine") in run


def test_prepare_learns_the_model_level_dictionary_and_indexes_once(tmp_path):
    """The prepare job's step: the array's participant jobs then find the index and the dictionary."""
    import json

    from bids_llm_encode.cli import run

    from layouts import make_layout

    root = make_layout(tmp_path / "ds", subjects=("01", "02"), n_frames=80)
    out, db, cache = tmp_path / "out", tmp_path / "db", tmp_path / "cache"
    app = ["--model", "minilm-l6", "--n-atoms", "3", "--restarts", "1", "--cache-dir", str(cache),
           "--bids-database-dir", str(db), "--nprocs", "1"]
    assert main(["--prepare-only", "--no-validate", str(root), str(out), "--", *app]) == 0
    card = json.loads((out / "stimuli" / "model-minilm-l6" / "modelcard.json").read_text())
    assert [s["story"] for s in card["stories"]] == ["pieman"]
    assert (db / "raw" / "layout_index.sqlite").is_file() and (db / "derivatives" / "layout_index.sqlite").is_file()
    entries = [p for p in (cache / "dictionary").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    # a participant job afterwards: the same entry (nothing learned again), the same key in its record
    import nibabel as nib
    import numpy as np

    mask = next((root / "derivatives" / "fmriprep").rglob("*brain_mask.nii.gz"))
    labels = np.zeros((4, 4, 4), np.int16)
    labels[1:3, 1:3, 1:2], labels[1:3, 1:3, 2:3] = 1, 2
    nib.save(nib.Nifti1Image(labels, nib.load(mask).affine), tmp_path / "atlas.nii.gz")
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tA\n2\tB\n")
    before = {p: p.stat().st_mtime_ns for p in entries}
    assert run([str(root), str(out), "participant", "--participant-label", "01", "--skip-bids-validation",
                "--n-permutations", "20", "--cv-folds", "2", "--baselines", "none", "--fbn-atlas",
                str(tmp_path / "atlas.nii.gz"), "--n-spatial-null", "20", "--n-consistency-null", "100", *app]) == 0
    assert {p: p.stat().st_mtime_ns for p in (cache / "dictionary").iterdir()
            if not p.name.startswith(".")} == before
    record = json.loads((out / "sub-01" / "sub-01_completion.json").read_text())
    assert record["dictionary"] == card["dictionary_key"]
