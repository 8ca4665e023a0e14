"""A Narratives-shaped demo: three stories, a run holding two of them, sessions, multi-echo, a 4D mask.

``bids_llm_encode-demo DIR --layout narratives`` writes what the single-story demo
writes (raw BIDS, fMRIPrep-style derivatives, Gentle alignments, the truth in
``code/demo_truth.json``), in the shapes that whole-dataset studies of Narratives meet:

- three stories cut from the demo's prose at paragraph boundaries: ``keeper``
  (paragraphs 1-4), ``storm`` (5-8) and ``letters`` (9-12), each with its own
  alignment, transcript and audio under ``stimuli/``;
- task ``keeper`` (one story per run) and task ``schema``, whose runs hold two
  stories, as Narratives' task-schema runs do: ``storm``, then a movie segment
  (``stim_file`` n/a, no speech, no input), then ``letters``;
- eight participants who heard different subsets (:data:`PARTICIPANTS`): sub-04
  in two sessions (``ses-1`` keeper, ``ses-2`` schema), sub-05 with a 4D brain mask
  (x, y, z, 1), sub-06 multi-echo (raw ``echo-1..3``; fMRIPrep's optimally combined
  ``desc-preproc_bold`` beside each echo's series), sub-08 with fMRIPrep 20.0.x names.

The BOLD of a run is driven, in every story segment, by the plant's signals for that
story (for the model-atoms plant: atoms of the model-level dictionary learned on the
three stories, as ``--dictionary-scope model`` learns it), summed over the run's
stories and z-scored over the run, with the single-story demo's noise model and gains.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from ..records import Atlas
from .generate import (NOISE, TAIL_S, TR, TRUTH_FILE, DemoRun, _synth_run, _write_json, _write_tsv, _zscore,
                       align_story, plant_signals, planted_weights, story_events, story_text, story_truth, truth_skeleton,
                       write_dataset, write_dataset_top,
                       write_fmriprep_description, write_run, write_story_files, write_voxel_maps)
from .plants import make_plant

log = logging.getLogger(__name__)

#: (story, first paragraph, last paragraph + 1) of ``demo/story.txt``.
STORIES = (("keeper", 0, 4), ("storm", 4, 8), ("letters", 8, 12))
#: Task -> the stories of its runs, in the order they are heard.
TASKS = {"keeper": ("keeper",), "schema": ("storm", "letters")}
MOVIE_S = 8.0  # the movie segment between a schema run's two stories
#: Multi-echo EchoTimes (s).
ECHO_TIMES = (0.0142, 0.0348, 0.0554)


@dataclass(frozen=True)
class Participant:
    """Who heard what: ``scans`` are (session or None, task) in the order scanned."""

    label: str
    scans: tuple
    onset: float = 6.0  # scan time of the first story's audio
    mask_4d: bool = False
    echo_times: tuple = ()
    legacy: bool = False  # fMRIPrep 20.0.x names

    @property
    def stories(self) -> list[str]:
        return [s for _, task in self.scans for s in TASKS[task]]


PARTICIPANTS = (
    Participant("01", ((None, "keeper"),)),
    Participant("02", ((None, "keeper"), (None, "schema"))),
    Participant("03", ((None, "schema"),), onset=7.5),
    Participant("04", (("1", "keeper"), ("2", "schema"))),
    Participant("05", ((None, "keeper"),), mask_4d=True),
    Participant("06", ((None, "schema"),), echo_times=ECHO_TIMES),
    Participant("07", ((None, "keeper"), (None, "schema")), onset=7.5),
    Participant("08", ((None, "schema"),), legacy=True),
)

README = (
    "A SYNTHETIC naturalistic-listening fMRI dataset in the shape of Narratives (ds002345), written "
    "by `bids_llm_encode-demo --layout narratives`. Three original short stories (keeper, storm, "
    "letters; stimuli/) are heard under two tasks: task-keeper runs hold one story; task-schema runs "
    "hold two (storm, a silent movie segment, then letters), as Narratives' task-schema runs do. "
    "Participants heard different subsets; sub-04 in two sessions, sub-05's brain masks are 4D, "
    "sub-06 is multi-echo, sub-08's derivatives use fMRIPrep 20.0.x names. BOLD responses driven by "
    "known signals are planted in chosen functional brain networks; no human data is contained. The "
    "ground truth is in code/demo_truth.json. The raw BOLD files are coarse (12 mm) and only carry the "
    "right number of frames; analyses use the derivatives.\n")


def story_texts() -> dict[str, str]:
    """The three stories' texts: the demo's prose cut at paragraph boundaries (:data:`STORIES`)."""
    paragraphs = [p for p in story_text().split("\n") if p.strip()]
    if len(paragraphs) < STORIES[-1][2]:
        raise DataError(f"the demo story has {len(paragraphs)} paragraphs; the narratives layout needs "
                        f"{STORIES[-1][2]}")
    return {name: "\n".join(paragraphs[a:b]) for name, a, b in STORIES}


def generate_demo(out_dir, plant="model-atoms", seed: int = 0, cache_dir: Optional[os.PathLike] = None,
                  overwrite: bool = False, atlas: Optional[Atlas] = None,
                  model_options: Optional[dict] = None) -> Path:
    """Write the narratives layout into ``out_dir`` and return its path.

    The parameters are those of :func:`bids_llm_encode.demo.generate.generate_demo` (its
    participants are :data:`PARTICIPANTS`; no CIFTI twin). All or nothing: built in a
    temporary folder and renamed into place (``generate.write_dataset``).
    """
    t0 = time.time()
    out_dir = Path(out_dir).absolute()
    write_dataset(out_dir, overwrite, lambda root: _generate(root, plant, int(seed), cache_dir, atlas, model_options))
    log.info("narratives-layout demo written to %s in %.1f s", out_dir, time.time() - t0)
    return out_dir


def _generate(root: Path, plant, seed: int, cache_dir, atlas: Optional[Atlas] = None,
              model_options: Optional[dict] = None) -> None:
    from threadpoolctl import threadpool_limits

    from ..bids.stimuli import read_gentle_csv

    plant = make_plant(plant, cache_dir=Path(cache_dir) if cache_dir else None, config_overrides=model_options)
    texts = story_texts()
    aligned = {name: align_story(text, seed=seed + 100 * (i + 1)) for i, (name, text) in enumerate(texts.items())}
    write_dataset_top(root, "bids_llm_encode demo: synthetic naturalistic listening, Narratives' shape", README,
                      [(p.label, ",".join(p.stories)) for p in PARTICIPANTS], plant.kind, seed)
    stories = {}
    for name, al in aligned.items():
        write_story_files(root, name, al, seed)
        # read back with the pipeline's reader: the plant sees the words and times the app will
        stories[name] = read_gentle_csv(root / "stimuli" / "gentle" / name / "align.csv", name=name)
        log.info("story %r: %d words, %.1f s of audio", name, len(al.words), al.duration)

    grid, atlas, couplings, weights = planted_weights(plant, seed, atlas)
    work = root / "code" / ".work"
    plant.prepare(list(stories.values()), work)
    write_fmriprep_description(root, "bids_llm_encode demo, Narratives' shape", "bids_llm_encode-demo")
    write_voxel_maps(root / "code" / "demo_truth_maps.nii.gz", grid, weights)

    runs_truth = []
    with threadpool_limits(limits=1, user_api="blas"):  # small dense algebra: one BLAS thread
        for si, p in enumerate(PARTICIPANTS):
            rng = np.random.default_rng([seed, 1000 + si])
            jitter = np.exp(rng.normal(0.0, NOISE["subject_gain_jitter_sd"], len(couplings)))
            for ses, task in p.scans:
                runs_truth.append(_write_scan(root, plant, stories, aligned, p, ses, task, grid, couplings,
                                              weights * jitter[:, None].astype(np.float32), rng,
                                              [round(float(c.gain * jitter[j]), 4) for j, c in enumerate(couplings)]))
    shutil.rmtree(work, ignore_errors=True)

    truth = truth_skeleton(plant, grid, atlas, couplings, weights, seed, len(PARTICIPANTS))
    truth["layout"] = "narratives"
    truth["stories"] = [story_truth(name, al) for name, al in aligned.items()]
    truth["tasks"] = {task: list(names) for task, names in TASKS.items()}
    truth["participants"] = {p.label: {"stories": p.stories, "sessions": sorted({s for s, _ in p.scans if s}),
                                       "mask_4d": p.mask_4d, "echo_times": list(p.echo_times),
                                       "fmriprep_naming": "20.0.x" if p.legacy else "20.2.x"}
                             for p in PARTICIPANTS}
    truth["runs"] = runs_truth
    _write_json(root / TRUTH_FILE, truth)


def _write_scan(root: Path, plant, stories: dict, aligned: dict, p: Participant, ses: Optional[str], task: str,
                grid, couplings: list, weights: np.ndarray, rng, gains: list) -> dict:
    """Synthesize and write one run of ``task``; returns its truth entry."""
    import pandas as pd

    names = TASKS[task]
    onsets, t = [], p.onset
    for name in names:
        onsets.append(round(t, 2))
        t += aligned[name].duration + MOVIE_S
    n_frames = int(np.ceil((onsets[-1] + aligned[names[-1]].duration + TAIL_S) / TR))
    sig, sig_names = None, None
    for name, onset in zip(names, onsets):  # each story drives the run at its own onset
        drun = DemoRun(subject=p.label, run=None, tr=TR, n_frames=n_frames, story_onset=onset)
        s, sig_names = plant_signals(plant, stories[name], drun)
        sig = s if sig is None else sig + s
    z = _zscore(sig)
    zc = np.column_stack([z[:, sig_names.index(c.signal)] for c in couplings])
    bold, motion = _synth_run(rng, grid, zc @ weights, n_frames)
    sub = f"sub-{p.label}"
    folder = f"{sub}/ses-{ses}" if ses else sub
    ent = sub + (f"_ses-{ses}" if ses else "") + f"_task-{task}"
    events = story_events([(name, onset, aligned[name].duration) for name, onset in zip(names, onsets)],
                          movie_s=MOVIE_S)
    files = write_run(root, sub, ent, bold, motion, grid, onsets[0], aligned[names[0]].duration, rng, p.legacy,
                      task=task, events=events, folder=folder, echo_times=p.echo_times, mask_4d=p.mask_4d)
    sig_tsv = root / "code" / "demo_truth_signals" / f"{ent}_signals.tsv"
    _write_tsv(sig_tsv, pd.DataFrame(z, columns=sig_names))
    log.info("wrote %s (%d frames; %s)", ent, n_frames, ", ".join(names))
    return {"subject": p.label, "session": ses, "run": None, "task": task, "tr": TR, "n_frames": n_frames,
            "stories": [{"name": n, "onset": o} for n, o in zip(names, onsets)], "slice_time_ref": 0.5,
            "preproc_bold": files["preproc_bold"], "confounds": files["confounds"],
            "signals_tsv": str(sig_tsv.relative_to(root)), "fmriprep_naming": files["fmriprep_naming"],
            "gains": gains}
