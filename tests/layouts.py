"""A builder of small, real BIDS datasets (raw + fMRIPrep derivatives) for tests.

``make_layout`` writes a compact raw dataset (tiny 4x4x4xT NIfTI files, real
sidecars, events.tsv with ``stim_file``), the stimulus word timing in one of
the formats ``bids.stimuli`` reads, and an fMRIPrep-like derivatives folder.
Every edge case the input finder handles is one keyword away. Calling it again
on the same root adds subjects/tasks to the same dataset.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import wave
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

SPACE = "MNI152NLin2009cAsym"

# (transcript word, Gentle alignedWord, start, end); None times = not placed by the aligner.
DEFAULT_WORDS: tuple = (
    ("I", "i", 0.10, 0.25),
    ("began", "began", 0.25, 0.60),
    ("my", "my", 0.60, 0.80),
    ("illustrious", "<unk>", 0.80, 1.40),
    ("career", "career", 1.45, 2.00),
    ("in", "in", 2.00, 2.10),
    ("journalism", "journalism", 2.10, 2.90),
    ("back", "", None, None),
    ("in", "in", 3.30, 3.40),
    ("Bronx", "bronx", 3.40, 4.00),
    ("where", "where", 4.20, 4.45),
    ("I", "i", 4.45, 4.55),
    ("toiled", "<unk>", 4.55, 5.10),
    ("as", "as", 5.10, 5.25),
    ("a", "a", 5.25, 5.30),
    ("hunter", "hunter", 5.30, 5.80),
    ("of", "of", 5.80, 5.95),
    ("news", "news", 5.95, 6.50),
    ("then", "then", 8.00, 8.30),
    ("came", "came", 8.30, 8.70),
)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _nifti(path: Path, shape: tuple, zooms: tuple, rng: np.random.Generator, *, mask=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = -np.asarray(shape[:3]) * np.asarray(zooms[:3]) / 2
    if mask:
        data = np.zeros(shape, dtype=np.uint8)
        data[1:3, 1:3, 1:3, ...] = 1
    else:
        data = (100 + rng.standard_normal(shape)).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _wav(path: Path, seconds: float = 0.05, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{int(seconds * rate)}h", *([0] * int(seconds * rate))))


def confounds_table(n_frames: int, rng: np.random.Generator) -> str:
    """An fMRIPrep-like confounds TSV (derivative columns start with ``n/a``)."""
    cols: dict[str, list] = {}
    for name in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
        v = np.cumsum(rng.normal(0, 0.01, n_frames))
        cols[name] = list(v)
        d = np.diff(v, prepend=np.nan)
        cols[f"{name}_derivative1"] = list(d)
        cols[f"{name}_power2"] = list(v ** 2)
    for name in ("global_signal", "csf", "white_matter"):
        cols[name] = list(rng.normal(500, 5, n_frames))
    fd = np.abs(rng.normal(0, 0.1, n_frames))
    fd[0] = np.nan
    cols["framewise_displacement"] = list(fd)
    for name in ("dvars", "std_dvars", "rmsd"):
        v = np.abs(rng.normal(1, 0.1, n_frames))
        v[0] = np.nan
        cols[name] = list(v)
    nss = np.zeros(n_frames)
    nss[0] = 1
    cols["non_steady_state_outlier00"] = list(nss)
    t = np.arange(n_frames)
    for k in range(2):
        cols[f"cosine{k:02d}"] = list(np.cos(np.pi * (k + 1) * (t + 0.5) / n_frames))
    for prefix in ("a_comp_cor", "t_comp_cor", "c_comp_cor", "w_comp_cor"):
        for k in range(5 if prefix in ("c_comp_cor", "w_comp_cor") else 3):
            cols[f"{prefix}_{k:02d}"] = list(rng.normal(0, 0.1, n_frames))
    extra = np.random.default_rng(n_frames)  # its own draws: the other files' data stay as they were
    for name in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
        cols[f"{name}_derivative1_power2"] = list(np.asarray(cols[f"{name}_derivative1"]) ** 2)
    for k in range(3, 10):
        cols[f"a_comp_cor_{k:02d}"] = list(extra.normal(0, 0.1, n_frames))
    out = io.StringIO()
    names = list(cols)
    out.write("\t".join(names) + "\n")
    for i in range(n_frames):
        out.write("\t".join("n/a" if np.isnan(cols[c][i]) else f"{cols[c][i]:.6g}" for c in names) + "\n")
    return out.getvalue()


def confounds_meta() -> dict:
    """The confounds JSON: aCompCor components 0-4 of the CSF mask and 5-9 of the WM (nilearn reads it)."""
    return {f"a_comp_cor_{k:02d}": {"Method": "aCompCor", "Mask": "CSF" if k < 5 else "WM", "Retained": True,
                                    "VarianceExplained": 0.1, "CumulativeVarianceExplained": 0.1 * (k % 5 + 1)}
            for k in range(10)}


def write_alignment(root: Path, story: str, words: Sequence, align: str) -> Optional[Path]:
    """Write ``words`` as Gentle CSV/JSON or a TextGrid under ``root/stimuli``; return the path."""
    if align == "csv":
        path = root / "stimuli" / "gentle" / story / "align.csv"
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        for w, aw, s, e in words:
            wr.writerow([w, aw if s is not None else "", "" if s is None else s, "" if e is None else e])
        _write_text(path, buf.getvalue())
    elif align == "json":
        path = root / "stimuli" / "gentle" / story / "align.json"
        items, offset = [], 0
        for w, aw, s, e in words:
            item = {"word": w, "startOffset": offset, "endOffset": offset + len(w)}
            offset += len(w) + 1
            if s is None:
                item["case"] = "not-found-in-audio"
            else:
                item.update(case="success", alignedWord=aw, start=s, end=e, phones=[])
            items.append(item)
        _write_json(path, {"transcript": " ".join(w[0] for w in words), "words": items})
    elif align == "textgrid":
        path = root / "stimuli" / f"{story}.TextGrid"
        placed = [(w, s, e) for w, _, s, e in words if s is not None]
        intervals, t = [], 0.0
        for w, s, e in placed:
            if s > t + 1e-9:
                intervals.append((t, s, ""))
            intervals.append((s, e, w))
            t = e
        xmax = t + 1.0
        intervals.append((t, xmax, ""))
        lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0",
                 f"xmax = {xmax}", "tiers? <exists>", "size = 2", "item []:",
                 "    item [1]:", '        class = "IntervalTier"', '        name = "phones"',
                 "        xmin = 0", f"        xmax = {xmax}", "        intervals: size = 1",
                 "        intervals [1]:", "            xmin = 0", f"            xmax = {xmax}",
                 '            text = "sil"',
                 "    item [2]:", '        class = "IntervalTier"', '        name = "words"',
                 "        xmin = 0", f"        xmax = {xmax}", f"        intervals: size = {len(intervals)}"]
        for i, (a, b, w) in enumerate(intervals, 1):
            lines += [f"        intervals [{i}]:", f"            xmin = {a}", f"            xmax = {b}",
                      '            text = "{}"'.format(w.replace('"', '""'))]
        _write_text(path, "\n".join(lines) + "\n")
    elif align in ("events", None, "none"):
        return None
    else:
        raise ValueError(f"unknown align format {align!r}")
    return path


def make_layout(
    root: Path,
    *,
    subjects: Sequence[str] = ("01",),
    task: str = "pieman",
    runs: Optional[Sequence[int]] = None,
    session: Optional[str] = None,
    tr: float = 1.5,
    confounds_name: str = "timeseries",
    res: Optional[str] = "2",
    extra_res: Sequence[str] = (),
    space: str = SPACE,
    n_frames: int = 40,
    confound_frames: Optional[int] = None,
    story: str = "pieman",
    story_words: Sequence = DEFAULT_WORDS,
    align: Optional[str] = "csv",
    stim_file: Optional[str] = None,
    story_onset: float = 15.0,
    music_s: Optional[float] = 13.0,
    events_text: Optional[str] = None,
    raw_sidecar: Optional[dict] = None,
    deriv_sidecar: Optional[dict] = None,
    derivatives: bool = True,
    deriv_subjects: Optional[Sequence[str]] = None,
    write_mask: bool = True,
    write_confounds: bool = True,
    seed: int = 0,
    extra_stories: Sequence[tuple[str, float]] = (),
    echoes: int = 0,
    mask_4d: bool = False,
    cifti: bool = False,
) -> Path:
    """Write a small raw BIDS dataset with fMRIPrep derivatives under ``root``.

    Parameters
    ----------
    root : Path
        Dataset root (created). Derivatives go to ``root/derivatives/fmriprep``.
    subjects, task, runs, session
        What to write; ``runs=(1, 2)`` writes ``run-01``/``run-02`` raw files and
        ``run-1``/``run-2`` derivatives (as fMRIPrep does).
    tr : float
        RepetitionTime of the raw and derivative sidecars (and NIfTI header).
    confounds_name : {"timeseries", "regressors"}
        fMRIPrep >= 20.2 or 20.0.x confounds file name.
    res : {"2", "native", None}
        ``res-`` entity of the preprocessed BOLD and mask (None: no ``res-``).
    extra_res : sequence of str
        More resolutions written next to ``res`` (to test the choice among several).
    n_frames : int
        Volumes of every BOLD file; ``confound_frames`` overrides the confounds rows.
    story, story_words, align, stim_file, story_onset, music_s
        The stimulus: ``story_words`` rows (word, alignedWord, start, end), written as
        ``align`` in {"csv", "json", "textgrid", "events", None}; ``stim_file``
        defaults to ``<story>_audio.wav``; events.tsv gets a music row at 0 s of
        ``music_s`` seconds (None: none) and a story row at ``story_onset``.
    events_text, raw_sidecar, deriv_sidecar
        Replace the events.tsv content / raw bold JSON / extend the derivative JSON
        (e.g. with real Narratives files).
    derivatives, deriv_subjects, write_mask, write_confounds
        Switch parts of the derivatives off to build missing-input cases.
    cifti : bool
        Also write fMRIPrep's ``--cifti-output`` BOLD of every run,
        ``space-fsLR_den-91k_bold.dtseries.nii`` (the standard 91k grayordinates of
        ``bids_llm_encode.demo.cifti``) and its sidecar.
    extra_stories : sequence of (story, onset)
        More stories in the same run (Narratives' task-schema): each gets its own alignment
        (``story_words``), WAV and events row at ``onset``, after a movie row whose
        ``stim_file`` is ``n/a``.
    echoes : int
        > 0: a multi-echo run: raw ``echo-<e>`` BOLD files, and in the derivatives the
        optimally combined ``desc-preproc_bold`` (no echo) beside single-echo ones.
    mask_4d : bool
        Brain masks of shape (x, y, z, 1).

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    stim_file = stim_file or f"{story}_audio.wav"
    _write_json(root / "dataset_description.json",
                {"Name": "bids_llm_encode test dataset", "BIDSVersion": "1.8.0",
                 "DatasetType": "raw", "License": "CC0", "Authors": ["Test"]})
    if not (root / "README").exists():
        _write_text(root / "README", "A small dataset written by tests/layouts.py for tests.\n")
    part = root / "participants.tsv"
    have = part.read_text().split("\n")[1:] if part.exists() else []
    ids = [ln.split("\t")[0] for ln in have if ln.strip()]
    ids += [f"sub-{s}" for s in subjects if f"sub-{s}" not in ids]
    _write_text(part, "participant_id\n" + "".join(f"{i}\n" for i in ids))
    if "/" not in stim_file and not stim_file.startswith(".."):
        if not (root / "stimuli" / stim_file).exists():
            _wav(root / "stimuli" / stim_file)
    write_alignment(root, story, story_words, align)
    for extra, _ in extra_stories:
        write_alignment(root, extra, story_words, align)
        if not (root / "stimuli" / f"{extra}_audio.wav").exists():
            _wav(root / "stimuli" / f"{extra}_audio.wav")

    if events_text is None:
        rows = ["onset\tduration\ttrial_type\tstim_file\tword"]
        if music_s is not None:
            rows.append(f"0.0\t{music_s}\tmusic\t{stim_file}\tn/a")
        last = max((e for *_, e in story_words if e is not None), default=1.0)
        rows.append(f"{story_onset}\t{last:.3f}\tstory\t{stim_file}\tn/a")
        for extra, onset in extra_stories:
            rows.append(f"{onset - 4.0}\t4.0\tmovie\tn/a\tn/a")
            rows.append(f"{onset}\t{last:.3f}\tstory\t{extra}_audio.wav\tn/a")
        if align == "events":
            for w, _, s, e in story_words:
                if s is not None:
                    rows.append(f"{story_onset + s:.3f}\t{e - s:.3f}\tword\t{stim_file}\t{w}")
        events_text = "\n".join(rows) + "\n"

    deriv = root / "derivatives" / "fmriprep"
    if derivatives:
        fp_version = "20.2.7" if confounds_name == "timeseries" else "20.0.5"
        desc = {"Name": "fMRIPrep - fMRI PREProcessing workflow", "BIDSVersion": "1.4.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep", "Version": fp_version}]}
        if confounds_name == "regressors":
            desc = {"Name": desc["Name"], "BIDSVersion": "1.1.1", "DatasetType": "derivative",
                    "PipelineDescription": {"Name": "fMRIPrep", "Version": fp_version}}
        _write_json(deriv / "dataset_description.json", desc)

    shape = (4, 4, 4, n_frames)
    for sub in subjects:
        ses_dir = f"ses-{session}" if session else ""
        for run in (runs or [None]):
            ents = f"sub-{sub}" + (f"_ses-{session}" if session else "") + f"_task-{task}"
            raw_ents = ents + (f"_run-{run:02d}" if run is not None else "")
            der_ents = ents + (f"_run-{run}" if run is not None else "")
            func = root / f"sub-{sub}" / ses_dir / "func"
            for e in (range(1, echoes + 1) if echoes else [None]):
                echo = f"_echo-{e}" if e else ""
                _nifti(func / f"{raw_ents}{echo}_bold.nii.gz", shape, (3.0, 3.0, 3.0, tr), rng)
                _write_json(func / f"{raw_ents}{echo}_bold.json",
                            raw_sidecar if raw_sidecar is not None
                            else {"RepetitionTime": tr, "TaskName": task,
                                  **({"EchoTime": 0.012 * e} if e else {})})
            _write_text(func / f"{raw_ents}_events.tsv", events_text)
            if not derivatives or (deriv_subjects is not None and sub not in deriv_subjects):
                continue
            dfunc = deriv / f"sub-{sub}" / ses_dir / "func"
            for r in [res, *extra_res]:
                sp = f"_space-{space}" + (f"_res-{r}" if r else "")
                _nifti(dfunc / f"{der_ents}{sp}_desc-preproc_bold.nii.gz", shape, (2.0, 2.0, 2.0, tr), rng)
                _write_json(dfunc / f"{der_ents}{sp}_desc-preproc_bold.json",
                            {"RepetitionTime": tr, "TaskName": task, "SkullStripped": False,
                             **(deriv_sidecar or {})})
                for e in range(1, echoes + 1):  # fMRIPrep --me-output-echos: never the one to use
                    _nifti(dfunc / f"{der_ents}_echo-{e}{sp}_desc-preproc_bold.nii.gz", shape,
                           (2.0, 2.0, 2.0, tr), rng)
                if write_mask:
                    _nifti(dfunc / f"{der_ents}{sp}_desc-brain_mask.nii.gz",
                           (*shape[:3], 1) if mask_4d else shape[:3],
                           (2.0, 2.0, 2.0, 1.0) if mask_4d else (2.0, 2.0, 2.0), rng, mask=True)
            if cifti:
                from bids_llm_encode.demo.cifti import dtseries

                dfunc.mkdir(parents=True, exist_ok=True)
                nib.save(dtseries(100 + rng.standard_normal((n_frames, 91282)), tr),
                         dfunc / f"{der_ents}_space-fsLR_den-91k_bold.dtseries.nii")
                _write_json(dfunc / f"{der_ents}_space-fsLR_den-91k_bold.json",
                            {"RepetitionTime": tr, "TaskName": task, **(deriv_sidecar or {})})
            if write_confounds:
                _write_text(dfunc / f"{der_ents}_desc-confounds_{confounds_name}.tsv",
                            confounds_table(confound_frames or n_frames, rng))
                _write_json(dfunc / f"{der_ents}_desc-confounds_{confounds_name}.json", confounds_meta())
    return root


def tree_checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest), for read-only checks."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def write_tiny_atlas(root: Path, folder: Path) -> Path:
    """A two-network NIfTI atlas (A, B) on the grid of ``root``'s first brain mask, with its TSV of names."""
    mask = next((root / "derivatives" / "fmriprep").rglob("*brain_mask.nii.gz"))
    data = np.zeros((4, 4, 4), np.int16)
    data[1:3, 1:3, 1:2], data[1:3, 1:3, 2:3] = 1, 2
    path = folder / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(data, nib.load(mask).affine), path)
    (folder / "atlas.tsv").write_text("index\tname\n1\tA\n2\tB\n")
    return path

