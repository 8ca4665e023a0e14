"""Stages that depend only on the story and the model, never on a participant.

Their results are cached (content-addressed), so the next participant who heard
the same story, or a rerun after a crash, reads them instead of computing them.
Both the participant workflow and the demo's model-atoms plant go through here,
so that the demo plants exactly the atoms the pipeline learns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp

from ..cache import Cache, digest
from ..config import Config
from ..records import Dictionary, RunInputs, Story, WordActivations

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def _model_source(spec: str, device: str, dtype: str, cache_root: str):
    from ..lm.models import resolve_model

    return resolve_model(spec, device=device, dtype=dtype, cache_dir=cache_root)


@lru_cache(maxsize=2)
def _load_model(spec: str, device: str, dtype: str, cache_root: str):
    from ..lm.models import load_model

    return load_model(_model_source(spec, device, dtype, cache_root))


def get_model(config: Config, cache: Cache):
    """The language model of the run (loaded once per process, when first needed)."""
    return _load_model(config.model, config.device, config.dtype, str(cache.root))


def reference_frame_times(story: Story, atom_tr: float) -> np.ndarray:
    """Audio-relative times (s) of the grid atoms are learned on: story start to last word + 20 s.

    The 20 s tail holds the HRF's response to the last words. Frames sit at the
    middle of each ``atom_tr`` bin, as a slice-time-corrected acquisition.
    """
    end = float(np.nanmax(story.ends)) + 20.0
    return (np.arange(int(np.ceil(end / atom_tr))) + 0.5) * atom_tr


def story_activations(story: Story, config: Config, cache: Cache) -> WordActivations:
    from ..lm.neurons import story_activations as _acts

    """A story's word activations; the model's weights are loaded only when they are not cached."""
    source = _model_source(config.model, config.device, config.dtype, str(cache.root))
    return _acts(source, story, config, cache, load=lambda: get_model(config, cache))


def centring(config: Config) -> bool:
    """Whether the neurons' activations are centred over the story's words (``--an-centering``).

    ``mean`` (default) removes each neuron's mean over the story's words: a raw
    activation is its mean times a unit impulse per word plus a fluctuation, so
    without centring every neuron's frame series carries the HRF-convolved word
    rate (on the demo story the dictionary's atoms then correlate up to |r| 0.9
    with it, docs/patterns.md). Centred, the word-rate carrier belongs to the
    word-rate baseline and the atoms describe how neurons differ across words.
    ``none`` keeps the raw activations.
    """
    return config.an_centering == "mean"


def neuron_series(story: Story, activations: WordActivations, frame_times_audio: np.ndarray,
                  config: Config) -> np.ndarray:
    """The neurons' z-scored frame series X at the given audio-relative frame times, (frames, neurons).

    ``signal.frames.frame_series`` of the activations, centred per :func:`centring`,
    in memory proportional to X.
    """
    from ..signal.frames import frame_series

    return frame_series(story.starts, activations.values, np.asarray(frame_times_audio), hrf=config.hrf,
                        center=centring(config))


#: The precision :func:`story_dictionary` learns in (``learn_dictionary``'s ``dtype``); in the cache key.
DICTIONARY_DTYPE = "float32"


def story_dictionary(story: Story, config: Config, cache: Cache) -> tuple[WordActivations, Dictionary]:
    """Word activations and the sparse dictionary of a story, computed once and cached.

    The key holds the resolved device (``cpu`` or ``cuda``, ``--device auto``
    resolved) and the learning's dtype besides the story and the settings: a
    dictionary learned on a GPU differs from the CPU's in the last bits, so a
    CPU run never reads atoms a GPU run left in a shared cache (or the reverse).
    The thread count is not in the key: the CPU result is the same for any
    ``--nprocs`` (tests/test_determinism.py). The dictionary is the consensus of
    ``config.restarts`` fits (``patterns.consensus.learn_consensus_dictionary``;
    1 = the single SVD-started fit).
    """
    from ..patterns.consensus import learn_consensus_dictionary

    acts = story_activations(story, config, cache)
    grid = reference_frame_times(story, config.atom_tr)
    device = torch_device(config.device)
    key = _dictionary_key(story, acts, grid, config)

    def create(folder):
        import torch

        from ..patterns.consensus import check_memory

        need = check_memory(len(grid), acts.values.shape[1], config.n_atoms, config.mem_mb,
                            f"story {story.name}", restarts=config.restarts)  # exit 64 before learning
        log.info("story %s: learning %d atoms from %d neurons x %d frames, %d restart%s (about %d MB)",
                 story.name, config.n_atoms, acts.values.shape[1], len(grid), config.restarts,
                 "s" if config.restarts != 1 else "", need // 2**20)
        X = neuron_series(story, acts, grid, config)
        d = learn_consensus_dictionary(X, n_atoms=config.n_atoms, sparsity=config.sparsity,
                                       restarts=config.restarts, seed=config.seed, device=device,
                                       dtype=getattr(torch, DICTIONARY_DTYPE), frame_times=grid)
        np.save(folder / "atoms.npy", d.atoms)
        np.save(folder / "frame_times.npy", d.frame_times)
        sp.save_npz(folder / "loadings.npz", d.loadings.tocsr())
        (folder / "dictionary.json").write_text(json.dumps(
            {"r2": d.r2, "objective": d.objective, "alpha": d.alpha, "info": d.info}, default=float))

    folder = cache.get_or_create("dictionary", key, create)
    meta = json.loads((folder / "dictionary.json").read_text())
    dictionary = Dictionary(atoms=np.load(folder / "atoms.npy"),
                            loadings=sp.load_npz(folder / "loadings.npz").tocsr(),
                            frame_times=np.load(folder / "frame_times.npy"),
                            r2=meta["r2"], objective=meta["objective"], alpha=meta["alpha"],
                            info=meta["info"])
    log.info("story %s: dictionary R^2 = %.3f (%d atoms)", story.name, dictionary.r2, dictionary.n_atoms)
    return acts, dictionary


def _dictionary_key(story: Story, acts: WordActivations, grid: np.ndarray, config: Config) -> str:
    from ..patterns.consensus import consensus_settings

    return digest("dictionary", acts.card.get("identity"), acts.card.get("cache_key"), story.words,
                  story.starts.tolist(), grid.tolist(), config.hrf, config.n_atoms, config.sparsity,
                  config.seed, config.an_centering, torch_device(config.device), DICTIONARY_DTYPE,
                  *([] if config.restarts == 1 else [consensus_settings(config.restarts)]))


def activations_key(story: Story, config: Config, cache: Cache) -> str:
    """The cache key of a story's activations (``lm.neurons.activations_key``), without computing them
    (nor loading the model: the key needs only its identity)."""
    from ..lm.neurons import activations_key as _key

    return _key(_model_source(config.model, config.device, config.dtype, str(cache.root)), story.words,
                site=config.neurons, layers=config.layers,
                context_tokens=config.context_tokens, window_tokens=config.window_tokens,
                pooling=config.word_pooling)


def model_dictionary_key(stories: list[Story], config: Config, cache: Cache) -> str:
    """The cache key of the model-level dictionary of ``stories`` (:func:`model_dictionary`).

    Every story's identity (name, words, onsets, reference grid and its activations' key, which
    holds the model's identity and the neuron settings) and the settings :func:`_dictionary_key`
    holds. One story: that story's :func:`_dictionary_key` itself (the same dictionary, so the
    same cache entry as ``--dictionary-scope story``).
    """
    from ..patterns.consensus import consensus_settings

    if len(stories) == 1:
        acts = story_activations(stories[0], config, cache)
        return _dictionary_key(stories[0], acts, reference_frame_times(stories[0], config.atom_tr), config)
    parts = [(s.name, activations_key(s, config, cache), s.words, s.starts.tolist(),
              reference_frame_times(s, config.atom_tr).tolist()) for s in stories]
    return digest("model-dictionary", parts, config.hrf, config.n_atoms, config.sparsity, config.seed,
                  config.an_centering, torch_device(config.device), DICTIONARY_DTYPE,
                  *([] if config.restarts == 1 else [consensus_settings(config.restarts)]))


def story_index(stories: list[Story], atom_tr: float) -> list[dict]:
    """Where each story's frames lie in the model-level dictionary: name, first frame, frames, words."""
    out, first = [], 0
    for s in stories:
        n = len(reference_frame_times(s, atom_tr))
        out.append({"story": s.name, "first_frame": first, "n_frames": n, "n_words": s.n_words,
                    "source": str(s.source)})
        first += n
    return out


def model_dictionary(stories: list[Story], config: Config, cache: Cache) -> Dictionary:
    """One dictionary for the model over ``stories`` (``--dictionary-scope model``), computed once, cached.

    Each story's neuron series X_s is built on its own reference grid
    (:func:`reference_frame_times`, :func:`neuron_series`: centred and z-scored per story), and
    the series are concatenated along frames (in the order of ``stories``, sorted by name by
    ``bids.inputs.dataset_stories``): X = [X_1; X_2; ...], learned as one (the consensus of
    ``config.restarts`` fits). The atoms (rows: every story's frames) and the loadings are shared
    by every participant and story; a run's design is the projection of its own neuron series
    on the loadings (:func:`run_design`), as with one story. ``info["stories"]`` says which rows
    are whose (:func:`story_index`; :func:`story_part` cuts one out).

    ``Cache.get_or_create`` holds a per-key file lock: of participant jobs started at once, one
    learns while the others wait on the lock and then read the entry. With one story this is
    :func:`story_dictionary` (the same entry).
    """
    from ..patterns.consensus import learn_consensus_dictionary

    index = story_index(stories, config.atom_tr)
    if len(stories) == 1:
        _, dic = story_dictionary(stories[0], config, cache)
        return replace(dic, info=dict(dic.info, stories=index))
    device = torch_device(config.device)
    key = model_dictionary_key(stories, config, cache)
    names = ", ".join(s.name for s in stories)

    def create(folder):
        import torch

        from ..patterns.consensus import check_memory

        T = sum(i["n_frames"] for i in index)
        X = None
        for s, where in zip(stories, index):
            acts = story_activations(s, config, cache)
            if X is None:
                need = check_memory(T, acts.values.shape[1], config.n_atoms, config.mem_mb,
                                    f"the model-level dictionary of {len(stories)} stories",
                                    restarts=config.restarts)  # exit 64 before learning
                log.info("model-level dictionary: learning %d atoms from %d neurons x %d frames of %d "
                         "stories (%s), %d restart%s (about %d MB)", config.n_atoms, acts.values.shape[1],
                         T, len(stories), names, config.restarts, "s" if config.restarts != 1 else "",
                         need // 2**20)
                X = np.empty((T, acts.values.shape[1]), dtype=np.float32)
            grid = reference_frame_times(s, config.atom_tr)
            X[where["first_frame"]:where["first_frame"] + where["n_frames"]] = neuron_series(s, acts, grid, config)
            del acts
        d = learn_consensus_dictionary(X, n_atoms=config.n_atoms, sparsity=config.sparsity,
                                       restarts=config.restarts, seed=config.seed, device=device,
                                       dtype=getattr(torch, DICTIONARY_DTYPE))
        del X
        np.save(folder / "atoms.npy", d.atoms)
        # each story's audio-relative grid, one after the other (not increasing: see info["stories"])
        np.save(folder / "frame_times.npy", np.concatenate([reference_frame_times(s, config.atom_tr)
                                                            for s in stories]))
        sp.save_npz(folder / "loadings.npz", d.loadings.tocsr())
        (folder / "dictionary.json").write_text(json.dumps(
            {"r2": d.r2, "objective": d.objective, "alpha": d.alpha, "info": d.info}, default=float))

    folder = cache.get_or_create("dictionary", key, create)
    meta = json.loads((folder / "dictionary.json").read_text())
    dic = Dictionary(atoms=np.load(folder / "atoms.npy"), loadings=sp.load_npz(folder / "loadings.npz").tocsr(),
                     frame_times=np.load(folder / "frame_times.npy"), r2=meta["r2"],
                     objective=meta["objective"], alpha=meta["alpha"], info=dict(meta["info"], stories=index))
    log.info("model-level dictionary of %d stories: R^2 = %.3f (%d atoms)", len(stories), dic.r2, dic.n_atoms)
    return dic


def story_part(dictionary: Dictionary, story: str) -> Optional[Dictionary]:
    """The rows of a model-level dictionary that are ``story``'s frames (None: not one of its stories).

    Atoms and frame times of that story's reference grid; the loadings and the rest are shared.
    """
    for where in dictionary.info.get("stories", []):
        if where["story"] == story:
            rows = slice(where["first_frame"], where["first_frame"] + where["n_frames"])
            return replace(dictionary, atoms=dictionary.atoms[rows], frame_times=dictionary.frame_times[rows])
    return None


#: Neurons (at most) the diversity's chance dictionary is learned from, for cost.
DIVERSITY_CHANCE_NEURONS = 4096
#: Each neuron's circular shift is drawn uniformly in [f T, (1 - f) T] frames.
DIVERSITY_MIN_SHIFT_FRACTION = 0.1


def chance_neurons(n_neurons: int, seed: int, max_neurons: int = DIVERSITY_CHANCE_NEURONS) -> np.ndarray:
    """The (sorted) neurons the diversity's chance dictionary is learned from: all, or a random subset."""
    if n_neurons <= max_neurons:
        return np.arange(n_neurons)
    return np.sort(np.random.default_rng([int(seed), 7919]).choice(n_neurons, size=int(max_neurons),
                                                                     replace=False))


def diversity_chance_from_series(X: np.ndarray, n_atoms: int, sparsity: float, *, seed: int = 0,
                                 max_neurons: int = DIVERSITY_CHANCE_NEURONS,
                                 min_shift_fraction: float = DIVERSITY_MIN_SHIFT_FRACTION,
                                 device: str = "cpu", frame_times=None,
                                 n_neurons_total: Optional[int] = None) -> dict:
    """Chance level of the atoms' diversity for these frames, atoms and sparsity.

    The diversity (mean ``1 - |r|`` over atom pairs) of a dictionary of the same
    ``n_atoms`` and ``sparsity`` learned from the same neurons' series after
    each neuron is circularly shifted by its own random lag (uniform in
    ``[f T, (1 - f) T]``): each series keeps its values and autocorrelation,
    the structure the neurons share (what the real atoms capture, e.g. the
    word rate) is gone. For cost, on at most ``max_neurons`` neurons
    (:func:`chance_neurons`); on SmolLM2-135M's 17,280 ANs x 291 frames an
    unshifted 4,096-neuron subset gave a diversity of 0.860-0.862 (3 subsets)
    against 0.858 with all neurons (docs/networks.md).

    Parameters
    ----------
    X : ndarray, shape (n_frames, n_neurons)
        The z-scored neuron series the real dictionary was learned from (or
        the subset :func:`chance_neurons` picks, with ``n_neurons_total``).
    n_atoms, sparsity, seed, device
        As given to ``patterns.dictionary.learn_dictionary``; ``seed`` also
        draws the subset and the lags.

    Returns
    -------
    dict
        ``diversity_1_minus_abs_r``, ``dictionary_r2`` (of the shifted
        dictionary, on the subset), ``n_neurons`` (used), ``n_neurons_total``,
        ``n_frames``, ``min_shift_fraction``, ``seed``, ``definition``, ``seconds``.
    """
    import time

    from ..patterns.dictionary import learn_dictionary

    t0 = time.perf_counter()
    X = np.asarray(X)
    total = int(n_neurons_total or X.shape[1])
    if X.shape[1] > max_neurons:
        X = X[:, chance_neurons(X.shape[1], seed, max_neurons)]
    T, n = X.shape
    lo = max(1, int(np.ceil(min_shift_fraction * T)))
    hi = max(lo, int(np.floor((1 - min_shift_fraction) * T)))
    lags = np.random.default_rng([int(seed), 7920]).integers(lo, hi + 1, size=n)
    rows = (np.arange(T)[:, None] - lags[None, :]) % T
    Xs = np.take_along_axis(X, rows, axis=0).astype(np.float32)
    d = learn_dictionary(Xs, n_atoms=n_atoms, sparsity=sparsity, seed=seed, device=device,
                         frame_times=frame_times, progress=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.nan_to_num(np.atleast_2d(np.corrcoef(d.atoms.T)), nan=0.0)
    iu = np.triu_indices(d.atoms.shape[1], 1)
    div = float(np.mean(1.0 - np.abs(r[iu]))) if iu[0].size else float("nan")
    return {"diversity_1_minus_abs_r": div, "dictionary_r2": float(d.r2), "n_neurons": int(n),
            "n_neurons_total": total, "n_frames": int(T),
            "min_shift_fraction": float(min_shift_fraction), "seed": int(seed),
            "seconds": round(time.perf_counter() - t0, 2),
            "definition": "diversity of a dictionary of the same atoms and sparsity learned from the "
                          "same neurons' series, each circularly shifted by its own random lag"}


def diversity_chance(story: Story, activations: WordActivations, config: Config, cache: Cache) -> dict:
    """:func:`diversity_chance_from_series` for a story's dictionary, computed once and cached."""
    grid = reference_frame_times(story, config.atom_tr)
    key = digest("diversity-chance", _dictionary_key(story, activations, grid, config),
                 DIVERSITY_CHANCE_NEURONS, DIVERSITY_MIN_SHIFT_FRACTION)

    def create(folder):
        from ..signal.frames import frame_series

        N = activations.values.shape[1]
        cols = chance_neurons(N, config.seed)
        log.info("story %s: chance level of the diversity: %d atoms from %d of %d neurons, each "
                 "circularly shifted", story.name, config.n_atoms, cols.size, N)
        X = frame_series(story.starts, activations.values[:, cols], grid, hrf=config.hrf,
                         center=centring(config))
        out = diversity_chance_from_series(X, config.n_atoms, config.sparsity, seed=config.seed,
                                           device=torch_device(config.device), frame_times=grid,
                                           n_neurons_total=N)
        (folder / "diversity_chance.json").write_text(json.dumps(out))

    folder = cache.get_or_create("diversity_chance", key, create)
    out = json.loads((folder / "diversity_chance.json").read_text())
    log.info("story %s: diversity's chance level %.3f (%.1f s)", story.name,
             out["diversity_1_minus_abs_r"], out["seconds"])
    return out


def model_diversity_chance(stories: list[Story], config: Config, cache: Cache) -> dict:
    """:func:`diversity_chance` of the model-level dictionary: the same neurons' series of every
    story (concatenated as :func:`model_dictionary` does), each neuron circularly shifted over the
    whole concatenation; computed once and cached. One story: :func:`diversity_chance` itself."""
    if len(stories) == 1:
        return diversity_chance(stories[0], story_activations(stories[0], config, cache), config, cache)
    key = digest("diversity-chance", model_dictionary_key(stories, config, cache), DIVERSITY_CHANCE_NEURONS,
                 DIVERSITY_MIN_SHIFT_FRACTION)

    def create(folder):
        parts, N = [], None
        for s in stories:
            acts = story_activations(s, config, cache)
            N = acts.values.shape[1]
            cols = chance_neurons(N, config.seed)
            sub = WordActivations(values=acts.values[:, cols], layer=acts.layer[cols], unit=acts.unit[cols],
                                  card=acts.card)
            del acts
            parts.append(neuron_series(s, sub, reference_frame_times(s, config.atom_tr), config))
        X = np.concatenate(parts)
        log.info("model-level dictionary: chance level of the diversity: %d atoms from %d of %d neurons x "
                 "%d frames, each circularly shifted", config.n_atoms, X.shape[1], N, X.shape[0])
        out = diversity_chance_from_series(X, config.n_atoms, config.sparsity, seed=config.seed,
                                           device=torch_device(config.device), n_neurons_total=N)
        (folder / "diversity_chance.json").write_text(json.dumps(out))

    folder = cache.get_or_create("diversity_chance", key, create)
    out = json.loads((folder / "diversity_chance.json").read_text())
    log.info("model-level dictionary: diversity's chance level %.3f (%.1f s)", out["diversity_1_minus_abs_r"],
             out["seconds"])
    return out


def run_design(frame_times_audio: np.ndarray, story: Story, activations: WordActivations,
               dictionary: Dictionary, config: Config) -> np.ndarray:
    """The atoms' time courses at one run's frames, shape (n_frames, n_atoms).

    ``frame_times_audio`` are the run's frame times relative to the start of the
    story's audio. The run's neuron series are built at exactly those times and
    projected on the fixed loadings (``patterns.dictionary.project_atoms``).
    """
    from ..patterns.dictionary import project_atoms

    return project_atoms(neuron_series(story, activations, frame_times_audio, config), dictionary.loadings)


def run_baselines(run: RunInputs | Story, frame_times_audio: Optional[np.ndarray], config: Config,
                  audio_path: Optional[Path] = None) -> tuple[np.ndarray, list[str]]:
    """The low-level baseline regressors of one run: the second feature space of the encoding.

    Parameters
    ----------
    run : RunInputs or Story
        A run: its story, and its audio ``config.bids_dir / "stimuli" / run.stim_file``
        (for the envelope). A bare Story has no audio unless ``audio_path`` is given.
    frame_times_audio : ndarray, shape (n_frames,), or None
        The run's frame times relative to the start of the story's audio, as
        :func:`run_design`; None = ``run.frame_times - run.story_onset``.
    config : Config
        ``baselines``, ``baseline_regressors``, ``hrf``, ``bids_dir``.
    audio_path : Path, optional
        Overrides the audio file found from the run.

    Returns
    -------
    X : ndarray, shape (n_frames, n_baselines), float64
        Each column HRF-convolved and z-scored over the frames; columns constant
        at these frames are dropped (warning).
    names : list of str
        ``word_rate``, ``phoneme_rate``, ``envelope`` (those ``--baselines`` asks
        for and the inputs allow), then the ``--baseline-regressors`` columns.
    """
    from ..bids.inputs import stim_path
    from ..signal.baselines import baseline_design

    if isinstance(run, RunInputs):
        story = run.story
        if audio_path is None:
            audio_path = stim_path(config.bids_dir, run.stim_file)
        if frame_times_audio is None:
            frame_times_audio = run.frame_times - run.story_onset
    else:
        story = run
        if frame_times_audio is None:
            raise TypeError("run_baselines(story, ...) needs the frame times (audio-relative)")
    return baseline_design(story, frame_times_audio, config, audio_path)


def torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
