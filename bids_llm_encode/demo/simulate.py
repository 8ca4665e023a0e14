"""A validation simulator whose truth the pipeline's own stages never produce.

``bids_llm_encode-simulate DIR [--null 10] [--planted 4] [--seed 0] [--voxel-mm 4]``
writes a BIDS dataset with fMRIPrep-style derivatives (the demo's layout and
story, "lighthouse", with its Gentle alignment) in which:

- **null participants** carry no stimulus signal at all: their noise is
  temporally autocorrelated (an AR(1) part whose coefficient varies smoothly
  over voxels in [0.2, 0.6], mixed with 1/f noise in a proportion that also
  varies over voxels), spatially smooth (Gaussian, FWHM 6-8 mm drawn per
  participant, smoothed in the whole box and kept inside nilearn's MNI152
  brain mask), plus head-motion signal near the mask's edge that the motion
  confounds carry, physiological noise that aCompCor carries, and drifts;
- **planted participants** (who hear the story twice, as every second null
  participant does) have the same noise plus BOLD driven by latent
  time courses computed here with nilearn's ``compute_regressor`` (not the
  pipeline's ``signal.frames``), from the embedded model's real word
  activations: (a) the mean response of 300 artificial neurons drawn from
  early-middle layers, (b) the same for 300 neurons of late layers, with a
  negative sign, and (c) word rate alone (HRF-convolved word onsets). Each
  drives a smooth partial map grown from a Yeo 17 network (an atlas the app
  does not score with by default), which crosses that network's borders;
  single-voxel true r between latent and BOLD runs from 0.1 at a map's edge
  to 0.4 at its core.

Word activations come from the app's language-model stage (the same real
model the pipeline runs, cached); the latent signals are the mean of the
neurons' word-level activations, each neuron z-scored over the story's words
(so that the signal is how the group's response varies across words, not
its carrier at word rate). Nothing here calls the pipeline's dictionary,
design or HRF code.

The truth is in ``code/simulation_truth.json`` (participants and their kind,
noise parameters, planted neuron groups by layer and index, map files,
latent time courses per run, and the networks each map overlaps in CA12,
Yeo 7 and Yeo 17), ``code/simulation_maps.nii.gz`` (true r per voxel, one
volume per plant) and ``code/simulation_signals/<run>_latent.tsv``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from threadpoolctl import threadpool_limits

from .. import __version__
from ..errors import UsageError
from ..signal.frames import cosine_basis
from .generate import (
    STORY, TR, _smooth_walk, _write_json, _write_raw_top, _write_text, _write_tsv,
    align_story, dataset_main, make_grid, story_text, write_dataset, write_fmriprep_description,
    write_run, write_voxel_maps,
)

log = logging.getLogger(__name__)

TRUTH_FILE = "code/simulation_truth.json"
SCORING_ATLASES = ("CA12", "Yeo7", "Yeo17")

SIM_NOISE = {
    "sd_percent": 1.0,
    "ar1_phi_range": [0.2, 0.6],
    "pink_fraction_range": [0.2, 0.8],
    "pink_exponent": 1.0,
    "fwhm_mm_range": [6.0, 8.0],
    "physiological_sd_percent": {"csf": 1.5, "white_matter": 0.8, "grey": 0.3},
    "motion_percent_per_mm": 3.0,
    "drift_percent": {"linear": 1.0, "cosine": 0.5},
    "non_steady_state_scale": [1.3, 1.1],
}
R_RANGE = (0.1, 0.4)  # true single-voxel r at a map's edge and core
MAP_THRESHOLD = 0.25  # smoothed partial map (max 1) above this is planted
MAP_CORE = 0.6  # ... and from this value up it has the largest r
TRUTH_OVERLAP = 0.25  # a network is a plant's truth when it holds this share of the map's voxels


@dataclass(frozen=True)
class PlantSpec:
    """One planted latent signal and where it drives BOLD.

    ``depth`` gives the layers of an AN group as fractions of the model's depth
    (e.g. (0.1, 0.22) is layers 3-6 of SmolLM2's 30); ``None`` for word rate.
    """

    name: str
    kind: str  # "an-group" | "word-rate"
    yeo17: str  # Yeo 17 network the map grows from
    seed_mni: tuple  # the map grows around the network's voxel nearest to this point (mm)
    sign: float
    depth: Optional[tuple] = None
    n_neurons: int = 300


PLANTS = (
    # lateral temporal cortex (Yeo 17 network 17, default B), activation
    PlantSpec("an_group_a", "an-group", "network_17", (-56.0, -36.0, 4.0), +1.0, depth=(0.1, 0.22)),
    # lateral prefrontal cortex (Yeo 17 network 12, control A), deactivation
    PlantSpec("an_group_b", "an-group", "network_12", (44.0, 32.0, 32.0), -1.0, depth=(0.66, 0.85)),
    # auditory cortex (Yeo 17 network 4, somatomotor B, around Heschl's gyrus)
    PlantSpec("word_rate", "word-rate", "network_4", (-52.0, -18.0, 8.0), +1.0),
)


# ============================================================================ noise

def _gaussian_sigma_vox(fwhm_mm: float, voxel_mm: float) -> float:
    return fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / voxel_mm


def smooth_white(rng, grid, n_frames: int, fwhm_mm: float) -> np.ndarray:
    """White noise smoothed in space (whole box, then the mask), unit variance per voxel, (T, V)."""
    from scipy.ndimage import gaussian_filter

    sigma = _gaussian_sigma_vox(fwhm_mm, float(abs(grid.affine[0, 0])))
    out = np.empty((n_frames, grid.n_vox), np.float32)
    for t in range(n_frames):
        vol = rng.standard_normal(grid.shape).astype(np.float32)
        out[t] = gaussian_filter(vol, sigma, mode="constant")[grid.mask]
    out /= out.std(axis=0, keepdims=True) + 1e-12
    return out


def smooth_map(rng, grid, fwhm_mm: float, lo: float, hi: float) -> np.ndarray:
    """A spatially smooth field over the mask voxels, scaled into [lo, hi]."""
    from scipy.ndimage import gaussian_filter

    sigma = _gaussian_sigma_vox(fwhm_mm, float(abs(grid.affine[0, 0])))
    f = gaussian_filter(rng.standard_normal(grid.shape), sigma)[grid.mask]
    f = (f - f.min()) / max(np.ptp(f), 1e-12)
    return lo + (hi - lo) * f


def ar1_filter(e: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """AR(1) recursion with a coefficient per column, unit stationary variance, (T, V)."""
    out = np.empty_like(e)
    out[0] = e[0]
    scale = np.sqrt(1.0 - phi**2).astype(e.dtype)
    phi = phi.astype(e.dtype)
    for t in range(1, e.shape[0]):
        out[t] = phi * out[t - 1] + scale * e[t]
    return out


def pink_filter(e: np.ndarray, exponent: float = 1.0) -> np.ndarray:
    """1/f^exponent noise from white noise along axis 0 (FFT shaping), unit variance per column."""
    n = e.shape[0]
    f = np.fft.rfftfreq(n)
    gain = np.zeros_like(f)
    gain[1:] = f[1:] ** (-exponent / 2.0)
    x = np.fft.irfft(np.fft.rfft(e, axis=0) * gain[:, None], n=n, axis=0)
    x -= x.mean(axis=0)
    return (x / (x.std(axis=0) + 1e-12)).astype(np.float32)


def noise_params(rng, grid) -> dict:
    """Per-participant noise parameters: the smoothing and the voxel maps of AR(1) and 1/f mixing."""
    fwhm = float(rng.uniform(*SIM_NOISE["fwhm_mm_range"]))
    return {"fwhm_mm": fwhm,
            "phi": smooth_map(rng, grid, 20.0, *SIM_NOISE["ar1_phi_range"]).astype(np.float32),
            "pink": smooth_map(rng, grid, 20.0, *SIM_NOISE["pink_fraction_range"]).astype(np.float32)}


def synth_bold(rng, grid, n_frames: int, signal_sd_units: Optional[np.ndarray], params: dict):
    """BOLD (T, V) float32 and head motion (T, 6) of one run.

    ``signal_sd_units`` (T, V): planted signal in units of the noise's sd (or None).
    """
    ar = ar1_filter(smooth_white(rng, grid, n_frames, params["fwhm_mm"]), params["phi"])
    pink = pink_filter(smooth_white(rng, grid, n_frames, params["fwhm_mm"]), SIM_NOISE["pink_exponent"])
    w = params["pink"]
    y = (np.sqrt(1.0 - w) * ar + np.sqrt(w) * pink).astype(np.float32)
    if signal_sd_units is not None:
        y += signal_sd_units.astype(np.float32)
    y *= SIM_NOISE["sd_percent"]
    phys = _smooth_walk(rng, n_frames, 3, 1.0).astype(np.float32)
    sd = SIM_NOISE["physiological_sd_percent"]
    amp = np.where(grid.tissue == 2, sd["csf"], np.where(grid.tissue == 1, sd["white_matter"], sd["grey"]))
    load = rng.standard_normal((3, grid.n_vox)).astype(np.float32) / np.sqrt(3)
    y += phys @ (load * amp.astype(np.float32))
    t = np.linspace(-1, 1, n_frames, dtype=np.float32)
    cos = cosine_basis(n_frames, TR)[:, :3].astype(np.float32) * np.sqrt(n_frames / 2)
    y += np.outer(t, rng.normal(0, SIM_NOISE["drift_percent"]["linear"], grid.n_vox).astype(np.float32))
    y += cos @ rng.normal(0, SIM_NOISE["drift_percent"]["cosine"], (cos.shape[1], grid.n_vox)).astype(np.float32)
    motion = np.hstack([_smooth_walk(rng, n_frames, 3, 0.15), _smooth_walk(rng, n_frames, 3, 0.002)])
    mot_mm = np.hstack([motion[:, :3], motion[:, 3:] * 50.0])
    edge = np.flatnonzero(grid.edge)
    mw = rng.standard_normal((6, edge.size)).astype(np.float32) * SIM_NOISE["motion_percent_per_mm"] / np.sqrt(6)
    y[:, edge] += (mot_mm - mot_mm.mean(axis=0)).astype(np.float32) @ mw
    bold = grid.baseline.astype(np.float32) * (1.0 + y / 100.0)
    for k, sc in enumerate(SIM_NOISE["non_steady_state_scale"]):
        bold[k] *= sc
    return bold, motion


# ============================================================================ truth

def planted_maps(rng, grid, yeo17) -> np.ndarray:
    """True single-voxel r of each plant, shape (n_plants, V): smooth partial maps around a seed.

    A plant's map: the voxels of its Yeo 17 network within 30 mm of the
    network's voxel nearest to the plant's ``seed_mni`` (jittered by up to 6 mm), smoothed (FWHM 10 mm, so that the map crosses the
    network's borders), scaled to a maximum of 1, planted where above
    ``MAP_THRESHOLD``, with r rising linearly from ``R_RANGE[0]`` there to
    ``R_RANGE[1]`` at ``MAP_CORE`` and staying there in the core.
    """
    from scipy.ndimage import gaussian_filter

    ijk = np.argwhere(grid.mask)
    xyz = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    labels = list(yeo17.labels)
    out = np.zeros((len(PLANTS), grid.n_vox), np.float32)
    for j, plant in enumerate(PLANTS):
        member = np.asarray(yeo17.maps[labels.index(plant.yeo17)], bool)
        cand = np.flatnonzero(member)
        target = np.asarray(plant.seed_mni) + rng.uniform(-6.0, 6.0, 3)
        seed = cand[np.argmin(np.linalg.norm(xyz[cand] - target, axis=1))]
        near = member & (np.linalg.norm(xyz - xyz[seed], axis=1) <= 30.0)
        vol = np.zeros(grid.shape)
        vol[grid.mask] = near
        sm = gaussian_filter(vol, _gaussian_sigma_vox(10.0, float(abs(grid.affine[0, 0]))))[grid.mask]
        sm /= sm.max()
        on = sm > MAP_THRESHOLD
        ramp = np.clip((sm[on] - MAP_THRESHOLD) / (MAP_CORE - MAP_THRESHOLD), 0.0, 1.0)
        out[j, on] = R_RANGE[0] + (R_RANGE[1] - R_RANGE[0]) * ramp
    return out


def truth_networks(maps: np.ndarray, atlases: dict) -> dict:
    """For each plant and atlas: networks holding >= TRUTH_OVERLAP of the map's voxels, with shares."""
    out = {}
    for j, plant in enumerate(PLANTS):
        on = maps[j] > 0
        out[plant.name] = {}
        for name, atlas in atlases.items():
            share = {lab: float((np.asarray(atlas.maps[i], bool) & on).sum() / max(on.sum(), 1))
                     for i, lab in enumerate(atlas.labels)}
            out[plant.name][name] = {lab: round(v, 3) for lab, v in share.items() if v >= TRUTH_OVERLAP}
    return out


def choose_neurons(rng, layer: np.ndarray, depth: tuple, n: int) -> np.ndarray:
    """``n`` neurons drawn without replacement from the layers in ``depth`` (fractions of the depth)."""
    n_layers = int(layer.max()) + 1
    lo = int(np.floor(depth[0] * n_layers))
    hi = max(lo, int(np.ceil(depth[1] * n_layers)) - 1)
    pool = np.flatnonzero((layer >= lo) & (layer <= hi))
    return np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))


def word_amplitudes(values: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """Mean over the group of each neuron's activation z-scored over the story's words, (n_words,)."""
    x = np.asarray(values[:, neurons], np.float64)
    sd = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return x.mean(axis=1)


def latent_signals(onsets_scan: np.ndarray, amplitudes: dict, frame_times: np.ndarray,
                   hrf: str = "spm") -> dict:
    """HRF-convolved latent signals at the frames (nilearn ``compute_regressor``), z-scored.

    Parameters
    ----------
    onsets_scan : ndarray, shape (n_words,)
        Word onsets in scan time (s).
    amplitudes : dict of name -> ndarray (n_words,)
    frame_times : ndarray, shape (n_frames,)
        Acquisition times (s) of the frames.
    """
    from nilearn.glm.first_level import compute_regressor

    out = {}
    for name, amp in amplitudes.items():
        cond = np.vstack([onsets_scan, np.zeros_like(onsets_scan), amp])
        reg, _ = compute_regressor(cond, hrf, frame_times, con_id=name, oversampling=50)
        x = reg[:, 0]
        out[name] = (x - x.mean()) / x.std()
    return out


# ============================================================================ the dataset

def _participants(n_null: int, n_planted: int, seed: int) -> list:
    rng = np.random.default_rng([seed, 7])
    subs = []
    for i in range(n_null + n_planted):
        kind = "null" if i < n_null else "planted"
        # planted participants hear the story twice (as Narratives' pieman), and so does every
        # second null participant: leave-one-run-out CV and the noise ceiling get checked too
        runs = [1, 2] if kind == "planted" or i % 2 == 1 else [None]
        subs.append({"label": f"{i + 1:02d}", "kind": kind, "runs": runs,
                     "onset": float(np.round(rng.uniform(4.5, 9.0) / 0.5) * 0.5), "legacy": False})
    return subs


def simulate_dataset(out_dir, n_null: int = 10, n_planted: int = 4, seed: int = 0,
                     voxel_mm: float = 4.0, model: str = "smollm2-135m", cache_dir=None,
                     overwrite: bool = False) -> Path:
    """Write the validation dataset into ``out_dir`` (new or empty) and return its path.

    Built in a temporary folder and moved into place at the end
    (:func:`~bids_llm_encode.demo.generate.write_dataset`); deterministic for a seed.
    """
    t0 = time.time()
    out_dir = Path(out_dir).absolute()
    if n_null < 0 or n_planted < 0 or n_null + n_planted < 1:
        raise UsageError("--null and --planted must be >= 0, with at least one participant")
    write_dataset(out_dir, overwrite, lambda root: _simulate(root, n_null, n_planted, seed, voxel_mm, model,
                                                             cache_dir))
    log.info("simulated dataset written to %s in %.1f s", out_dir, time.time() - t0)
    return out_dir


def word_activations(story, model: str, cache_dir=None):
    """The embedded model's word activations of the story (the app's language-model stage, cached)."""
    from ..cache import Cache, cache_root
    from ..config import Config
    from ..workflows.stimulus import story_activations

    cfg = Config(bids_dir=Path("."), output_dir=Path("."), analysis_level="participant",
                 model=model, cache_dir=Path(cache_dir) if cache_dir else None)
    return story_activations(story, cfg, Cache(cache_root(cfg)))


def _simulate(root: Path, n_null: int, n_planted: int, seed: int, voxel_mm: float, model: str,
              cache_dir) -> None:
    import pandas as pd

    from ..bids.stimuli import read_gentle_csv
    from ..networks.atlases import load_atlas

    subs = _participants(n_null, n_planted, seed)
    al = align_story(story_text(), seed=0)
    _write_raw_top(root, al, subs, "simulation", seed)
    _write_json(root / "dataset_description.json", {
        "Name": "bids_llm_encode validation simulation (lighthouse)",
        "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0",
        "Authors": ["bids_llm_encode developers"],
        "GeneratedBy": [{"Name": "bids_llm_encode-simulate", "Version": __version__,
                         "Description": f"{n_null} null + {n_planted} planted participants, seed {seed}"}],
        "HowToAcknowledge": "Synthetic data: no acknowledgement needed.",
    })
    _write_text(root / "README", (
        "bids_llm_encode validation simulation\n=====================================\n\n"
        "SYNTHETIC fMRI of people 'listening' to the story 'lighthouse'. Null participants carry "
        "autocorrelated, spatially smooth noise and no stimulus signal; planted participants also "
        "carry BOLD driven by known latent signals (groups of a language model's neurons, word "
        "rate) in known maps. Truth: code/simulation_truth.json. Derivatives: derivatives/fmriprep.\n"))
    story = read_gentle_csv(root / "stimuli" / "gentle" / STORY / "align.csv", name=STORY)
    grid = make_grid(voxel_mm)
    atlases = {name: load_atlas(name, grid.mask_img()) for name in SCORING_ATLASES}
    rng_truth = np.random.default_rng([seed, 3])
    maps = planted_maps(rng_truth, grid, atlases["Yeo17"])
    amplitudes, groups = {}, {}
    if n_planted:
        acts = word_activations(story, model, cache_dir)
        for plant in PLANTS:
            if plant.kind == "word-rate":
                amplitudes[plant.name] = np.ones(story.n_words)
            else:
                neurons = choose_neurons(rng_truth, acts.layer, plant.depth, plant.n_neurons)
                groups[plant.name] = neurons
                amplitudes[plant.name] = word_amplitudes(acts.values, neurons)
    write_fmriprep_description(root, "bids_llm_encode-simulate", "bids_llm_encode-simulate")
    code = root / "code"
    write_voxel_maps(code / "simulation_maps.nii.gz", grid, maps)
    gain = maps / np.sqrt(1.0 - maps**2)  # signal sd (noise-sd units) giving r with unit-variance noise
    runs_truth = []

    for si, s in enumerate(subs):
        rng = np.random.default_rng([seed, 1000 + si])
        params = noise_params(rng, grid)
        sub = f"sub-{s['label']}"
        n_frames = int(np.ceil((s["onset"] + al.duration + 12.0) / TR))
        frame_times = (np.arange(n_frames) + 0.5) * TR
        lat = latent_signals(s["onset"] + story.starts, amplitudes, frame_times) if s["kind"] == "planted" else None
        for run in s["runs"]:
            ent = f"{sub}_task-{STORY}" + (f"_run-{run}" if run is not None else "")
            signal, lat_rel = None, None
            if lat is not None:
                signal = np.zeros((n_frames, grid.n_vox), np.float32)
                for j, plant in enumerate(PLANTS):
                    signal += plant.sign * np.outer(lat[plant.name], gain[j]).astype(np.float32)
                lat_tsv = code / "simulation_signals" / f"{ent}_latent.tsv"
                _write_tsv(lat_tsv, pd.DataFrame(lat))
                lat_rel = str(lat_tsv.relative_to(root))
            with threadpool_limits(limits=1, user_api="blas"):
                bold, motion = synth_bold(rng, grid, n_frames, signal, params)
            files = write_run(root, sub, ent, bold, motion, grid, s["onset"], al.duration, rng, s["legacy"])
            runs_truth.append({"subject": s["label"], "run": run, "kind": s["kind"], "task": STORY, "tr": TR,
                               "n_frames": n_frames, "story_onset": s["onset"], "slice_time_ref": 0.5,
                               "fwhm_mm": round(params["fwhm_mm"], 3), "latent_tsv": lat_rel, **files})
            log.info("wrote %s (%s, %d frames)", ent, s["kind"], n_frames)
    truth = {
        "SimulationTruthVersion": "1.0",
        "generator": {"name": "bids_llm_encode-simulate", "version": __version__, "seed": seed,
                      "n_null": n_null, "n_planted": n_planted, "voxel_mm": voxel_mm, "model": model},
        "grid": {"shape": list(grid.shape), "affine": grid.affine.round(4).tolist(), "n_mask_voxels": grid.n_vox},
        "noise": SIM_NOISE,
        "plants": [{"name": p.name, "kind": p.kind, "sign": p.sign, "map_from": f"Yeo17 {p.yeo17}",
                    "seed_mni": list(p.seed_mni),
                    "map_volume": j, "n_voxels": int((maps[j] > 0).sum()),
                    "r_range": list(R_RANGE),
                    "neurons": groups[p.name].tolist() if p.name in groups else None,
                    "layers": (sorted(set(acts.layer[groups[p.name]].tolist())) if p.name in groups else None),
                    "signal": ("mean over the neurons of each one's word activation z-scored over words, "
                               "impulses at word onsets, nilearn compute_regressor (spm)"
                               if p.kind == "an-group" else "word onsets (amplitude 1), nilearn "
                               "compute_regressor (spm)")}
                   for j, p in enumerate(PLANTS)],
        "truth_networks": truth_networks(maps, atlases),
        "truth_rule": f"a network is linked to a plant when it holds >= {TRUTH_OVERLAP} of the plant's map voxels",
        "maps": "code/simulation_maps.nii.gz",
        "runs": runs_truth,
    }
    _write_json(root / TRUTH_FILE, truth)


# ============================================================================ command line

def build_parser() -> argparse.ArgumentParser:
    from ..cli import Parser

    p = Parser(prog="bids_llm_encode-simulate",
               description="Write a validation dataset (BIDS + fMRIPrep-style derivatives) with null "
                           "participants (smooth, autocorrelated noise only) and planted participants "
                           "(known neuron groups and word rate in known maps); truth in "
                           f"{TRUTH_FILE}.")
    p.add_argument("out_dir", type=Path, help="folder to create (must be new or empty)")
    p.add_argument("--null", type=int, default=10, help="null participants (default 10)")
    p.add_argument("--planted", type=int, default=4, help="planted participants (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voxel-mm", type=float, default=4.0, help="grid of the derivatives (default 4 mm)")
    p.add_argument("--model", default="smollm2-135m", help="model whose word activations are planted")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    def make(args):
        return simulate_dataset(args.out_dir, n_null=args.null, n_planted=args.planted, seed=args.seed,
                                voxel_mm=args.voxel_mm, model=args.model, cache_dir=args.cache_dir,
                                overwrite=args.overwrite)

    return dataset_main("bids_llm_encode-simulate", build_parser(), make, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
