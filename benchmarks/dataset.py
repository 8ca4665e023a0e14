"""PyBIDS indexing per participant process, with and without ``--bids-database-dir``.

Usage::

    python benchmarks/dataset.py            # 3 processes of each kind
    python benchmarks/dataset.py --quick    # < 1 min: a third of the tree (115 participants, 300
                                            # runs); 1 process without the index, 2 with it (the
                                            # two that index run side by side, on 2 cores)

Writes a Narratives-shaped tree (ds002345: 345 participants, ~900 BOLD runs of 27
task labels, one to three runs each, ``stimuli/``, fMRIPrep 20.0.5 derivatives: per run
the files the app reads and the boldref, 9 files per run with the raw ones) of tiny files: empty NIfTI (PyBIDS never opens them) and
real JSON sidecars and events (PyBIDS reads the sidecars to index metadata). Then
times what every participant process of the app does first,
``bids.inputs._layouts`` (index the raw dataset and the fMRIPrep derivatives), in
fresh Python processes, the import of PyBIDS not counted:

- without the option: each process indexes the whole tree again;
- with ``--bids-database-dir``: the first process indexes and saves it (``build``), every
  later one loads the saved index (``load``).

The last line is ``key=value`` pairs: ``index_s`` (median seconds per process without
the option; ``index_cpu_s`` its CPU time), ``build_s``, ``load_s`` (median over the later processes),
``index_speedup`` (= index_s / load_s; target >= 10), ``participants``, ``runs``,
``files``. The dictionary timing of issue 11 (a model-level dictionary) is not
measured here: ``dictionary=not-measured``.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Task labels of Narratives (27) with how many runs one participant has of each.
TASKS = {"pieman": 2, "tunnel": 1, "lucy": 1, "prettymouth": 1, "milkyway": 1, "slumlordreach": 1,
         "notthefallintact": 1, "notthefallshortscram": 1, "notthefalllongscram": 1, "merlin": 1,
         "sherlock": 1, "schema": 3, "shapessocial": 1, "shapesphysical": 1, "21styear": 1,
         "piemanpni": 1, "bronx": 1, "black": 1, "forgot": 1, "prettymouth2": 1, "ummm": 1,
         "bigbang": 1, "friends": 1, "nottheend": 1, "thesecretlife": 1, "gentle": 1, "pool": 1}
SPACE = "MNI152NLin2009cAsym"

CHILD = """
import json, sys, time
from pathlib import Path
import bids  # imported before the clock starts: its import is no indexing
from bids_llm_encode.config import Config
from bids_llm_encode.bids.inputs import _layouts
ds, db = Path(sys.argv[1]), (Path(sys.argv[2]) if sys.argv[2] else None)
t, c = time.perf_counter(), time.process_time()
_, _, raw, der = _layouts(Config(bids_dir=ds, output_dir=ds.parent / "out", analysis_level="participant",
                                 bids_database_dir=db))
n = (len(raw.get(suffix="bold", extension=".nii.gz")),
     len(der.get(desc="preproc", suffix="bold", extension=".nii.gz")))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c, "raw_bold": n[0],
                  "preproc_bold": n[1]}))
"""


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def narratives_tree(root: Path, n_subjects: int = 345, target_runs: int = 900, seed: int = 0) -> dict:
    """A Narratives-shaped raw dataset + fMRIPrep derivatives of tiny files; returns counts."""
    rng = np.random.default_rng(seed)
    names = list(TASKS)
    runs, files = 0, 0
    _touch(root / "dataset_description.json", json.dumps({"Name": "Narratives (shape)", "BIDSVersion": "1.4.0",
                                                          "DatasetType": "raw"}))
    deriv = root / "derivatives" / "fmriprep"
    _touch(deriv / "dataset_description.json", json.dumps({
        "Name": "fMRIPrep", "BIDSVersion": "1.4.0", "DatasetType": "derivative",
        "PipelineDescription": {"Name": "fMRIPrep", "Version": "20.0.5"}}))
    _touch(root / "participants.tsv", "participant_id\n" + "".join(f"sub-{i:03d}\n" for i in range(1, n_subjects + 1)))
    for task in names:
        _touch(root / "stimuli" / "gentle" / task / "align.csv", "a,a,0.1,0.2\n")
        _touch(root / f"task-{task}_bold.json", json.dumps({"TaskName": task, "RepetitionTime": 1.5}))
    per_subject = target_runs / n_subjects
    for i in range(1, n_subjects + 1):
        sub = f"sub-{i:03d}"
        k = int(rng.integers(2, 4)) if per_subject > 2 else 1  # 2-3 tasks: ~2.6 runs per participant
        tasks = rng.choice(names, size=min(k, len(names)), replace=False)
        for anat in ("_T1w.nii.gz", "_T1w.json"):
            _touch(root / sub / "anat" / f"{sub}{anat}", "{}" if anat.endswith("json") else "")
        da = deriv / sub / "anat"
        for f in ("_desc-preproc_T1w.nii.gz", "_desc-brain_mask.nii.gz", f"_space-{SPACE}_desc-preproc_T1w.nii.gz",
                  "_dseg.nii.gz", "_label-GM_probseg.nii.gz"):
            _touch(da / f"{sub}{f}")
        files += 7
        for task in tasks:
            n_runs = TASKS[str(task)]
            for run in range(1, n_runs + 1):
                raw_e = f"{sub}_task-{task}" + (f"_run-{run:02d}" if n_runs > 1 else "")
                der_e = f"{sub}_task-{task}" + (f"_run-{run}" if n_runs > 1 else "")
                func, dfunc = root / sub / "func", deriv / sub / "func"
                _touch(func / f"{raw_e}_bold.nii.gz")
                _touch(func / f"{raw_e}_bold.json", json.dumps({"RepetitionTime": 1.5, "TaskName": str(task),
                                                                "SliceTiming": [0.0, 0.5, 1.0]}))
                _touch(func / f"{raw_e}_events.tsv", "onset\tduration\ttrial_type\tstim_file\n"
                       f"0.0\t300\tstory\t{task}_audio.wav\n")
                sp = f"_space-{SPACE}_res-native"
                for f, text in ((f"{sp}_desc-preproc_bold.nii.gz", ""),
                                (f"{sp}_desc-preproc_bold.json", json.dumps({"RepetitionTime": 1.5,
                                                                              "SkullStripped": False})),
                                (f"{sp}_desc-brain_mask.nii.gz", ""), (f"{sp}_boldref.nii.gz", ""),
                                ("_desc-confounds_regressors.tsv", "trans_x\n0\n"),
                                ("_desc-confounds_regressors.json", "{}")):
                    _touch(dfunc / f"{der_e}{f}", text)
                runs += 1
                files += 9
    return {"participants": n_subjects, "runs": runs, "files": files}


def _start(ds: Path, db) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(ds), str(db) if db else ""],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the indexing process failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _process(ds: Path, db) -> dict:
    return _result(_start(ds, db))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 process without the index, 2 with it (< 1 min)")
    ap.add_argument("--participants", type=int, default=None, help="345 (--quick: 115)")
    ap.add_argument("--runs", type=int, default=None, help="900 (--quick: 300)")
    ap.add_argument("--processes", type=int, default=3, help="processes of each kind (full run)")
    args = ap.parse_args(argv)
    if args.participants is None:
        args.participants = 115 if args.quick else 345
    if args.runs is None:
        args.runs = 300 if args.quick else 900
    n_plain, n_db = (1, 2) if args.quick else (args.processes, args.processes + 1)
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        counts = narratives_tree(tmp / "ds", args.participants, args.runs)
        print(f"tree: {counts['participants']} participants, {counts['runs']} BOLD runs, {counts['files']} files "
              f"({time.perf_counter() - t:.1f} s to write)")
        if args.quick:  # the two that index, side by side (2 cores): within a minute; then the loads
            procs = [_start(tmp / "ds", None), _start(tmp / "ds", tmp / "db")]
            plain, with_db = [_result(procs[0])], [_result(procs[1])]
        else:
            plain = [_process(tmp / "ds", None) for _ in range(n_plain)]
            with_db = [_process(tmp / "ds", tmp / "db")]
        with_db += [_process(tmp / "ds", tmp / "db") for _ in range(n_db - 1)]
    assert all(p["raw_bold"] == counts["runs"] == p["preproc_bold"] for p in plain + with_db), (plain, with_db)
    index_s = statistics.median(p["seconds"] for p in plain)
    build_s = with_db[0]["seconds"]
    load_s = statistics.median(p["seconds"] for p in with_db[1:])
    print(f"{'process':52s} {'seconds':>8s} {'cpu s':>8s}")
    for i, p in enumerate(plain):
        print(f"{'no --bids-database-dir, #' + str(i + 1):52s} {p['seconds']:8.2f} {p['cpu_s']:8.2f}")
    for i, p in enumerate(with_db):
        what = "builds and saves the index" if i == 0 else "loads the saved index"
        print(f"{'--bids-database-dir #' + str(i + 1) + ' (' + what + ')':52s} {p['seconds']:8.2f} "
              f"{p['cpu_s']:8.2f}")
    print("dictionary: not measured here (issue 11 item 1, a model-level dictionary)")
    cpu = statistics.median(p["cpu_s"] for p in plain)
    print(f"index_s={index_s:.2f} index_cpu_s={cpu:.2f} build_s={build_s:.2f} load_s={load_s:.3f} participants={counts['participants']} "
          f"runs={counts['runs']} files={counts['files']} dictionary=not-measured "
          f"index_speedup={index_s / load_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
