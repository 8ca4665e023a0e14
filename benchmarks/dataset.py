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
``files``.

Then the model-level dictionary of Narratives' size (issue 11, ``--dictionary-scope
model``): ``--dictionary-words`` (default 43,000; ``--quick`` 1,000) words split over
``--dictionary-stories`` (27; ``--quick`` 3) synthetic stories (sizes drawn at random, 2.5 words/s as ``benchmarks/memory.py``'s story),
each with random standard-normal float32 activations of the model's width
(``--dictionary-width``: 17,280 = smollm2-135m's ANs, default; 131,072 = Llama-3-8B's),
made per story when the app asks for that story's activations, as the cache would hand
them over. It runs ``workflows.stimulus.model_dictionary`` itself (every story's neuron
series on its reference grid, concatenated, the consensus of ``--dictionary-restarts``
fits, default the app's 24; ``--quick`` 1) in a fresh process limited to ``--dictionary-threads`` (2)
threads, with an empty cache; the activations' generation is not in the time. Printed:
``dictionary_seconds`` (the call, generation subtracted), ``dictionary_peak_mb`` (the child's
peak resident memory, ``ru_maxrss``), ``dictionary_estimate_mb`` (what ``--mem-mb`` is
checked against), ``dictionary_frames``, ``dictionary_neurons``, ``dictionary_restarts``,
``dictionary_r2``. ``--no-index`` / ``--no-dictionary`` skip one part.
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


DICTIONARY_CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[7])
from bids_llm_encode.cli import set_resources
set_resources(int(sys.argv[5]), None)
from bids_llm_encode.cache import Cache, digest
from bids_llm_encode.config import Config
from bids_llm_encode.patterns.consensus import consensus_memory_bytes
from bids_llm_encode.records import WordActivations
from bids_llm_encode.workflows import stimulus
from memory import synthetic_story
n_words, width, restarts, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
seed, n_stories = int(sys.argv[6]), int(sys.argv[8])
rng = np.random.default_rng(seed)
low = min(100, n_words // (2 * n_stories))  # every story at least this long
sizes = low + (rng.dirichlet(np.full(n_stories, 4.0)) * (n_words - n_stories * low)).astype(int)
sizes[-1] += n_words - sizes.sum()
stories = []
for i, n in enumerate(sizes):
    (work / f"s{i:02d}").mkdir(parents=True, exist_ok=True)
    s = synthetic_story(int(n), seed + i, work / f"s{i:02d}")
    stories.append(type(s)(name=f"story{i:02d}", words=tuple(f"{w}{i}" for w in s.words), starts=s.starts,
                           ends=s.ends, aligned=s.aligned, source=s.source))
by_name = {s.name: i for i, s in enumerate(stories)}
made = [0.0]
def activations(story, config, cache):  # what the cache hands over: float32, one story at a time
    t = time.perf_counter()
    r = np.random.default_rng([seed, by_name[story.name]])
    values = np.empty((story.n_words, width), np.float32)
    for r0 in range(0, story.n_words, 1024):
        values[r0:r0 + 1024] = r.standard_normal((min(1024, story.n_words - r0), width), np.float32)
    made[0] += time.perf_counter() - t
    return WordActivations(values=values, layer=np.repeat(np.arange(width // 512), 512)[:width],
                           unit=np.tile(np.arange(512), width // 512 + 1)[:width],
                           card={"identity": "random", "cache_key": digest("random", story.words, width)})
stimulus.story_activations = activations
stimulus.activations_key = lambda story, config, cache: digest("random", story.words, width)
cfg = Config(bids_dir=work, output_dir=work / "out", analysis_level="participant", cache_dir=work / "cache",
             device="cpu", restarts=restarts)
T = sum(len(stimulus.reference_frame_times(s, cfg.atom_tr)) for s in stories)
t = time.perf_counter()
d = stimulus.model_dictionary(stories, cfg, Cache(work / "cache"))
seconds = time.perf_counter() - t - made[0]
print(json.dumps({"seconds": seconds, "generate_s": made[0],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "estimate_mb": consensus_memory_bytes(T, width, cfg.n_atoms, restarts) / 2**20,
                  "frames": T, "neurons": width, "restarts": restarts, "words": int(sizes.sum()),
                  "stories": len(stories), "largest_story": int(sizes.max()), "r2": d.r2}))
"""


def dictionary_benchmark(work: Path, n_words: int, width: int, restarts: int, threads: int, seed: int = 0,
                         n_stories: int = 27) -> dict:
    """The model-level dictionary of ``n_words`` over ``n_stories`` synthetic stories, in a fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", DICTIONARY_CHILD, str(n_words), str(width), str(restarts),
                           str(work), str(threads), str(seed), str(REPO / "benchmarks"), str(n_stories)],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        raise SystemExit(f"the dictionary process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--dictionary-words", type=int, default=None, help="43,000 (--quick: 1,000)")
    ap.add_argument("--dictionary-width", type=int, default=17280,
                    help="ANs: 17,280 (smollm2-135m, default) or 131,072 (Llama-3-8B)")
    ap.add_argument("--dictionary-restarts", type=int, default=None, help="24, the app's (--quick: 2)")
    ap.add_argument("--dictionary-threads", type=int, default=2)
    ap.add_argument("--dictionary-stories", type=int, default=None, help="27, Narratives' (--quick: 3)")
    ap.add_argument("--no-index", action="store_true", help="the dictionary only")
    ap.add_argument("--no-dictionary", action="store_true", help="the index only")
    args = ap.parse_args(argv)
    if args.dictionary_words is None:
        args.dictionary_words = 1000 if args.quick else 43000
    if args.dictionary_restarts is None:
        args.dictionary_restarts = 1 if args.quick else 24
    if args.dictionary_stories is None:
        args.dictionary_stories = 3 if args.quick else 27
    parts = []
    if not args.no_index:
        parts.append(index_benchmark(args))
    if not args.no_dictionary:
        with tempfile.TemporaryDirectory(prefix="bench-dictionary-") as tmp:
            d = dictionary_benchmark(Path(tmp), args.dictionary_words, args.dictionary_width,
                                     args.dictionary_restarts, args.dictionary_threads,
                                     n_stories=args.dictionary_stories)
        print(f"model-level dictionary: {d['words']:,} words over {d['stories']} stories (largest "
              f"{d['largest_story']:,}), {d['frames']:,} frames x {d['neurons']:,} ANs, {d['restarts']} restart(s), "
              f"{args.dictionary_threads} threads: {d['seconds']:.1f} s (random activations made in "
              f"{d['generate_s']:.1f} s, not counted), peak {d['peak_mb']:.0f} MB (estimate {d['estimate_mb']:.0f} MB), "
              f"R^2 {d['r2']:.3f}")
        parts.append(f"dictionary_seconds={d['seconds']:.1f} dictionary_peak_mb={d['peak_mb']:.0f} "
                     f"dictionary_estimate_mb={d['estimate_mb']:.0f} dictionary_frames={d['frames']} "
                     f"dictionary_neurons={d['neurons']} dictionary_restarts={d['restarts']} "
                     f"dictionary_words={d['words']}")
    print(" ".join(parts))
    return 0


def index_benchmark(args) -> str:
    """The PyBIDS part; returns its key=value pairs."""
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
    cpu = statistics.median(p["cpu_s"] for p in plain)
    return (f"index_s={index_s:.2f} index_cpu_s={cpu:.2f} build_s={build_s:.2f} load_s={load_s:.3f} "
            f"participants={counts['participants']} runs={counts['runs']} files={counts['files']} "
            f"index_speedup={index_s / load_s:.1f}")


if __name__ == "__main__":
    sys.exit(main())
