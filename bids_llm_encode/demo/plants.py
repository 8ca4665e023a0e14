"""Pluggable "plants": the known signals that drive the demo dataset's BOLD.

A plant says *what* drives the synthetic brain (time courses computed from the
story, one per signal) and *where* (each signal drives one or more functional
brain networks of an atlas with a known gain and sign). The generator in
``generate.py`` turns that into BOLD and writes it down as the ground truth
(``code/demo_truth.json``, format in ``docs/demo.md``).

Two plants ship:

- :class:`WordFeaturesPlant` (``"word-features"``): signals from the story
  alone (word rate, word length, sentence ends, commas), HRF-convolved at the
  run's frame times. Needs no language model; fast; used by tests.
- :class:`ModelAtomsPlant` (``"model-atoms"``): signals are atoms of the
  embedded language model's sparse dictionary, computed on the dataset's stories by
  the project's own participant-workflow code
  (``bids_llm_encode.workflows.stimulus``), so that the pipeline can recover them.

To plug a new plant, write a class with the attributes and methods of
:class:`Plant` and pass an instance to ``generate_demo(plant=...)``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from ..errors import DataError, UsageError
from ..records import Story

log = logging.getLogger(__name__)


#: Units of :attr:`Coupling.gain`.
GAIN_UNITS = "percent signal change of the voxel's baseline per standard deviation of the signal"


@dataclass(frozen=True)
class Coupling:
    """One planted link: ``signal`` drives ``network`` with ``gain``.

    Attributes
    ----------
    signal : str
        Name of a signal returned by the plant's ``signals``.
    network : str
        A label of the atlas (``CA12`` by default: e.g. ``Language``, ``Auditory``).
    gain : float
        Signed, in :data:`GAIN_UNITS`. Positive = activation, negative = deactivation.
    """

    signal: str
    network: str
    gain: float

    @property
    def sign(self) -> str:
        return "activation" if self.gain > 0 else "deactivation"

    def as_dict(self) -> dict:
        return {**asdict(self), "sign": self.sign}


@dataclass(frozen=True)
class DemoRun:
    """Timing of one synthetic BOLD run (what a plant needs to sample its signals).

    Attributes
    ----------
    subject : str
    run : int or None
    tr : float
        Repetition time (s).
    n_frames : int
    story_onset : float
        Scan time (s) at which the story's audio file starts.
    slice_time_ref : float
        Fraction of the TR at which each frame is sampled (0.5: fMRIPrep after slice-timing correction).
    """

    subject: str
    run: Optional[int]
    tr: float
    n_frames: int
    story_onset: float
    slice_time_ref: float = 0.5

    @property
    def frame_times(self) -> np.ndarray:
        """Scan times (s) of the frames, shape (n_frames,)."""
        return (np.arange(self.n_frames) + self.slice_time_ref) * self.tr

    @property
    def audio_frame_times(self) -> np.ndarray:
        """Frame times relative to the start of the audio file (s), shape (n_frames,)."""
        return self.frame_times - self.story_onset


@runtime_checkable
class Plant(Protocol):
    """What the generator needs from a plant.

    Attributes
    ----------
    kind : str
        Short name written in the truth file.
    atlas : str
        Atlas whose labels the couplings name (given to ``networks.atlases.load_atlas``).
    couplings : tuple of Coupling
    """

    kind: str
    atlas: str
    couplings: tuple[Coupling, ...]

    def prepare(self, stories: list[Story], work_dir: Path) -> None:
        """Do once-per-dataset work (e.g. fit the model's dictionary on the stories) before ``signals``."""

    def signals(self, story: Story, run: DemoRun) -> tuple[np.ndarray, list[str]]:
        """Time courses at the run's frames, shape (n_frames, P), and their P names."""

    def describe(self) -> dict:
        """JSON-ready description: model and settings, each signal's meaning."""


def _check_couplings(couplings, names) -> None:
    unknown = sorted({c.signal for c in couplings} - set(names))
    if unknown:
        raise UsageError(f"plant couplings name signals {unknown} that the plant does not produce "
                         f"(it produces {list(names)})")


# ----------------------------------------------------------------------------- word features

@dataclass
class WordFeaturesPlant:
    """Signals computed from the story's words and timing alone (no language model).

    Signals (each an HRF-convolved impulse train at word onsets):

    - ``word_rate``: one impulse per word (tracks speech vs. silence and pauses).
    - ``word_length``: impulse scaled by the word's letter count minus the story's mean.
    - ``sentence_end``: impulse at words that end with ``.``, ``!`` or ``?``.
    - ``comma``: impulse at words that end with ``,`` or ``;``.

    Default couplings: word_rate -> Auditory (+2.0), word_length -> Language (+1.5),
    sentence_end -> Default (-1.5), comma -> Visual1 (+1.2).
    """

    couplings: tuple[Coupling, ...] = (
        Coupling("word_rate", "Auditory", 2.0),
        Coupling("word_length", "Language", 1.5),
        Coupling("sentence_end", "Default", -1.5),
        Coupling("comma", "Visual1", 1.2),
    )
    hrf: str = "spm"
    atlas: str = "CA12"
    kind: str = "word-features"

    SIGNALS = ("word_rate", "word_length", "sentence_end", "comma")

    def __post_init__(self):
        self.couplings = tuple(self.couplings)
        _check_couplings(self.couplings, self.SIGNALS)

    def prepare(self, stories: list[Story], work_dir: Path) -> None:  # nothing to precompute
        return None

    def signals(self, story: Story, run: DemoRun) -> tuple[np.ndarray, list[str]]:
        """See :meth:`Plant.signals`. Shape (run.n_frames, 4)."""
        onsets = np.asarray(story.starts, float)
        if onsets.shape != (story.n_words,) or not np.all(np.isfinite(onsets)):
            raise DataError(f"story {story.name!r} from {story.source}: word starts must be finite, "
                            f"one per word")
        letters = np.array([sum(ch.isalpha() for ch in w) for w in story.words], float)
        ends_sentence = np.array([w.rstrip("\"')").endswith((".", "!", "?")) for w in story.words], float)
        comma = np.array([w.rstrip("\"')").endswith((",", ";")) for w in story.words], float)
        amps = {
            "word_rate": np.ones_like(onsets),
            "word_length": letters - letters.mean(),
            "sentence_end": ends_sentence,
            "comma": comma,
        }
        from ..signal.frames import frame_series  # the pipeline's own word -> HRF -> frames step

        values = np.column_stack([amps[n] for n in self.SIGNALS])
        return frame_series(onsets, values, run.audio_frame_times, hrf=self.hrf, zscore=False), \
            list(self.SIGNALS)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model": None,
            "settings": {"hrf": self.hrf},
            "signals": {
                "word_rate": "one impulse per word onset, HRF-convolved",
                "word_length": "impulse at each word onset scaled by (letters - mean letters), HRF-convolved",
                "sentence_end": "impulse at words ending a sentence (. ! ?), HRF-convolved",
                "comma": "impulse at words followed by a comma or semicolon, HRF-convolved",
            },
        }


# ----------------------------------------------------------------------------- model atoms

def choose_distinct_atoms(atoms: np.ndarray, n: int, max_abs_r: float = 0.3) -> list[int]:
    """Greedily pick ``n`` atoms with low mutual correlation.

    Starts from the atom with the most variance-explaining power proxy (largest
    standard deviation over frames), then repeatedly adds the atom whose largest
    absolute correlation with those already chosen is smallest.

    Parameters
    ----------
    atoms : ndarray, shape (n_frames, n_atoms)
    n : int
    max_abs_r : float
        Only a warning threshold: when the best remaining atom exceeds it, a
        warning is logged (the pick still proceeds).

    Returns
    -------
    list of int, length n
    """
    atoms = np.asarray(atoms, float)
    if atoms.ndim != 2 or atoms.shape[1] < n:
        raise DataError(f"need a (n_frames, n_atoms>={n}) atom matrix, got shape {atoms.shape}")
    sd = atoms.std(axis=0)
    usable = np.flatnonzero(sd > 1e-12)
    if usable.size < n:
        raise DataError(f"only {usable.size} of {atoms.shape[1]} atoms vary over time; need {n}")
    r = np.abs(np.corrcoef(atoms[:, usable].T))
    chosen = [int(np.argmax(sd[usable]))]
    while len(chosen) < n:
        worst = r[:, chosen].max(axis=1)
        worst[chosen] = np.inf
        nxt = int(np.argmin(worst))
        if worst[nxt] > max_abs_r:
            log.warning("atom %d correlates |r|=%.2f with an atom already chosen", usable[nxt], worst[nxt])
        chosen.append(nxt)
    return [int(usable[i]) for i in chosen]


@dataclass
class ModelAtomsPlant:
    """Signals = chosen atoms of the embedded model's dictionary, learned on the dataset's stories.

    Uses ``bids_llm_encode.workflows.stimulus.model_dictionary`` over every story given to
    :meth:`prepare` (``story_dictionary`` of the one story with ``dictionary_scope="story"``)
    and ``run_design`` exactly as the participant workflow does, with a :class:`~bids_llm_encode.config.Config`
    built from ``config_overrides`` (model, n_atoms, sparsity, seed ...). The
    atoms are chosen by :func:`choose_distinct_atoms` unless ``atom_indices`` is given.

    Default couplings (signal names ``atom_a`` .. ``atom_e``, bound to atom
    indices in :meth:`prepare`): atom_a -> Language (+1.5), atom_b -> Auditory (+2.0),
    atom_c -> Default (-1.5), atom_d -> Visual1 (+1.2), atom_d -> Somatomotor (-1.0)
    (one atom driving two networks, with opposite signs).
    """

    couplings: tuple[Coupling, ...] = (
        Coupling("atom_a", "Language", 1.5),
        Coupling("atom_b", "Auditory", 2.0),
        Coupling("atom_c", "Default", -1.5),
        Coupling("atom_d", "Visual1", 1.2),
        Coupling("atom_d", "Somatomotor", -1.0),
    )
    config_overrides: dict = field(default_factory=dict)
    atom_indices: Optional[dict] = None
    cache_dir: Optional[Path] = None
    atlas: str = "CA12"
    kind: str = "model-atoms"

    def __post_init__(self):
        self.couplings = tuple(self.couplings)
        self._names = sorted({c.signal for c in self.couplings})
        self._state = None

    def _config(self, work_dir: Path):
        from ..config import Config

        cfg = Config(bids_dir=Path(work_dir), output_dir=Path(work_dir) / "out",
                     analysis_level="participant", cache_dir=self.cache_dir)
        for k, v in self.config_overrides.items():
            if not hasattr(cfg, k):
                raise UsageError(f"model-atoms plant: unknown Config option {k!r}")
            setattr(cfg, k, v)
        return cfg

    def prepare(self, stories: list[Story], work_dir: Path) -> None:
        """Learn (or read from the cache) the dictionary of the stories and bind signals to atoms.

        ``--dictionary-scope model`` (the default): one dictionary over every story, as the
        participant workflow learns it; ``story`` scope takes one story only.
        """
        from ..cache import Cache, cache_root
        from ..workflows.stimulus import model_dictionary, run_design, story_activations, story_dictionary

        stories = list(stories)
        cfg = self._config(work_dir)
        cache = Cache(cache_root(cfg))
        names = ", ".join(s.name for s in stories)
        log.info("model-atoms plant: computing the %s dictionary of %s (K=%d, --dictionary-scope %s)",
                 cfg.model, names, cfg.n_atoms, cfg.dictionary_scope)
        if cfg.dictionary_scope == "model":  # the dataset's stories: its model-level dictionary
            activations = {s.name: story_activations(s, cfg, cache) for s in stories}
            dictionary = model_dictionary(stories, cfg, cache)
            spans = {r["story"]: (r["first_frame"], r["n_frames"]) for r in dictionary.info["stories"]}
        elif len(stories) == 1:
            acts, dictionary = story_dictionary(stories[0], cfg, cache)
            activations = {stories[0].name: acts}
            spans = {stories[0].name: (0, len(dictionary.frame_times))}
        else:
            raise UsageError("model-atoms plant: --dictionary-scope story plants one story's atoms; "
                             f"this dataset has {len(stories)} stories")
        index = {}
        if self.atom_indices is not None:
            index = {k: int(v) for k, v in self.atom_indices.items()}
            missing = set(self._names) - set(index)
            if missing:
                raise UsageError(f"model-atoms plant: atom_indices lacks {sorted(missing)}")
            bad = [v for v in index.values() if not 0 <= v < dictionary.n_atoms]
            if bad:
                raise UsageError(f"model-atoms plant: atom indices {bad} out of range 0..{dictionary.n_atoms - 1}")
        # Choose among atoms as the pipeline will see them: each story's neurons projected on the
        # loadings at its reference grid (run_design), with a non-empty AN sub-group; and after the
        # drift regressors the participant stage removes (the demo's cosines, high-pass 128 s): the
        # consensus's stable atoms are slower than the rest, and a planted signal the cleaning
        # removes is one no single-run participant can detect.
        from ..signal.frames import cosine_basis

        sizes = np.diff(dictionary.loadings.tocsr().indptr)
        refs, seen = [], []
        for s in stories:
            first, n = spans[s.name]
            ref = np.asarray(run_design(dictionary.frame_times[first:first + n], s, activations[s.name],
                                        dictionary, cfg))
            C = np.column_stack([np.ones(len(ref)), cosine_basis(len(ref), cfg.atom_tr)])
            refs.append(ref)
            seen.append(ref - C @ np.linalg.lstsq(C, ref, rcond=None)[0])
        ref, seen = np.vstack(refs), np.vstack(seen)
        usable = np.flatnonzero((sizes > 0) & (ref.std(axis=0) > 1e-9))
        if self.atom_indices is None:
            if usable.size < len(self._names):
                raise DataError(
                    f"model-atoms plant: the {cfg.model} dictionary of {names} has only "
                    f"{usable.size} atoms with a non-empty neuron sub-group (R^2 {dictionary.r2:.3f}, "
                    f"sparsity {cfg.sparsity}); {len(self._names)} are needed. Lower the sparsity "
                    "(--sparsity) or use --plant word-features.")
            # atoms the network stage may link (stability >= --min-stability), when there are enough
            from ..patterns.consensus import linkable_atoms

            stable = usable[linkable_atoms(dictionary, cfg.min_stability)[usable]]
            if stable.size >= len(self._names):
                usable = stable
            else:
                log.warning("model-atoms plant: only %d usable atoms reach stability %.2f, %d are "
                            "needed; planting less stable atoms too", stable.size, cfg.min_stability,
                            len(self._names))
            picks = choose_distinct_atoms(seen[:, usable], len(self._names))
            index = dict(zip(self._names, (int(usable[i]) for i in picks)))
        elif not set(index.values()) <= set(usable.tolist()):
            raise UsageError(f"model-atoms plant: atoms {sorted(set(index.values()) - set(usable.tolist()))} "
                             "have empty neuron sub-groups and cannot drive anything")
        sub = ref[:, [index[n] for n in self._names]]
        r = np.corrcoef(sub.T) if len(self._names) > 1 else np.ones((1, 1))
        self._state = {"config": cfg, "activations": activations, "dictionary": dictionary,
                       "index": index, "r": r, "subgroup_sizes": {n: int(sizes[index[n]]) for n in self._names}}
        log.info("model-atoms plant: atoms %s (max |r| between them %.2f)", index,
                 float(np.max(np.abs(r - np.eye(len(r))))) if len(r) > 1 else 0.0)

    def signals(self, story: Story, run: DemoRun) -> tuple[np.ndarray, list[str]]:
        """See :meth:`Plant.signals`; shape (run.n_frames, number of distinct atoms)."""
        if self._state is None:
            raise UsageError("ModelAtomsPlant.signals called before prepare()")
        from ..workflows.stimulus import run_design

        st = self._state
        if story.name not in st["activations"]:
            raise UsageError(f"ModelAtomsPlant.signals: story {story.name!r} was not among those prepared "
                             f"({sorted(st['activations'])})")
        design = np.asarray(run_design(run.audio_frame_times, story, st["activations"][story.name],
                                       st["dictionary"], st["config"]))
        if design.shape != (run.n_frames, st["dictionary"].n_atoms):
            raise DataError(f"run_design returned shape {design.shape}, expected "
                            f"({run.n_frames}, {st['dictionary'].n_atoms})")
        cols = [st["index"][n] for n in self._names]
        return design[:, cols], list(self._names)

    def describe(self) -> dict:
        out = {"kind": self.kind, "model": None, "settings": dict(self.config_overrides), "signals": {}}
        if self._state is not None:
            cfg, d = self._state["config"], self._state["dictionary"]
            out["model"] = cfg.model
            out["settings"] = {k: getattr(cfg, k) for k in
                               ("model", "neurons", "layers", "word_pooling", "hrf", "context_tokens",
                                "window_tokens", "n_atoms", "sparsity", "atom_tr", "seed", "restarts",
                                "min_stability", "dtype")}
            first = next(iter(self._state["activations"].values()))
            out["model_card"] = {k: v for k, v in first.card.items()
                                 if isinstance(v, (str, int, float, bool, type(None), list))}
            out["dictionary"] = {"r2": float(d.r2), "alpha": float(d.alpha), "n_atoms": int(d.n_atoms)}
            from ..patterns.consensus import atom_stability

            stab = atom_stability(d)
            out["signals"] = {n: {"atom_index": self._state["index"][n],
                                  "subgroup_size": self._state["subgroup_sizes"][n],
                                  "stability": None if stab is None else float(stab[self._state["index"][n]])}
                              for n in self._names}
            out["atom_correlation"] = {"signals": self._names,
                                       "r": np.round(self._state["r"], 4).tolist()}
        return out


PLANTS = {"word-features": WordFeaturesPlant, "model-atoms": ModelAtomsPlant}


def make_plant(plant, cache_dir: Optional[Path] = None, config_overrides: Optional[dict] = None):
    """A plant instance from a name in :data:`PLANTS` or an object with the :class:`Plant` interface.

    ``config_overrides`` (Config option names -> values, e.g. ``{"sparsity": 0.1}``) go to the
    model-atoms plant's Config.
    """
    if isinstance(plant, str):
        if plant not in PLANTS:
            raise UsageError(f"unknown plant {plant!r}; choose one of {sorted(PLANTS)}")
        if plant == "model-atoms":
            return ModelAtomsPlant(cache_dir=cache_dir, config_overrides=dict(config_overrides or {}))
        return WordFeaturesPlant()
    for attr in ("kind", "atlas", "couplings", "prepare", "signals", "describe"):
        if not hasattr(plant, attr):
            raise UsageError(f"plant {plant!r} lacks {attr!r} (see bids_llm_encode.demo.plants.Plant)")
    return plant
