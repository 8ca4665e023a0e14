"""Stages that depend only on the story and the model, never on a participant.

Their results are cached (content-addressed), so the next participant who heard
the same story, or a rerun after a crash, reads them instead of computing them.
Both the participant workflow and the demo's model-atoms plant go through here,
so that the demo plants exactly the atoms the pipeline learns.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from ..cache import Cache, digest
from ..config import Config
from ..records import Dictionary, Story, WordActivations

log = logging.getLogger(__name__)


@lru_cache(maxsize=2)
def _load_model(spec: str, device: str, dtype: str, cache_root: str):
    from ..lm.models import load_model

    return load_model(spec, device=device, dtype=dtype, cache_dir=cache_root)


def get_model(config: Config, cache: Cache):
    """The language model of the run (loaded once per process)."""
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

    return _acts(get_model(config, cache), story, config, cache)


def neuron_series(story: Story, activations: WordActivations, frame_times_audio: np.ndarray,
                  config: Config) -> np.ndarray:
    """The neurons' z-scored frame series X at the given audio-relative frame times, (frames, neurons)."""
    from ..signal.frames import frame_series

    return frame_series(story.starts, activations.values, np.asarray(frame_times_audio), hrf=config.hrf)


def story_dictionary(story: Story, config: Config, cache: Cache) -> tuple[WordActivations, Dictionary]:
    """Word activations and the sparse dictionary of a story, computed once and cached.

    The dictionary is the consensus of ``config.restarts`` fits
    (``patterns.consensus.learn_consensus_dictionary``; 1 = the single
    SVD-started fit, whose cache entries from before the restarts stay valid).
    """
    from ..patterns.consensus import consensus_settings, learn_consensus_dictionary

    acts = story_activations(story, config, cache)
    grid = reference_frame_times(story, config.atom_tr)
    consensus = [] if config.restarts == 1 else [consensus_settings(config.restarts)]
    key = digest("dictionary", acts.card.get("identity"), acts.card.get("cache_key"), story.words,
                 story.starts.tolist(), grid.tolist(), config.hrf, config.n_atoms, config.sparsity,
                 config.seed, *consensus)

    def create(folder):
        from ..patterns.consensus import check_memory

        need = check_memory(len(grid), acts.values.shape[1], config.n_atoms, config.mem_mb,
                            f"story {story.name}", restarts=config.restarts)  # exit 64 before learning
        log.info("story %s: learning %d atoms from %d neurons x %d frames, %d restart%s (about %d MB)",
                 story.name, config.n_atoms, acts.values.shape[1], len(grid), config.restarts,
                 "s" if config.restarts != 1 else "", need // 2**20)
        X = neuron_series(story, acts, grid, config)
        d = learn_consensus_dictionary(X, n_atoms=config.n_atoms, sparsity=config.sparsity,
                                       restarts=config.restarts, seed=config.seed,
                                       device=torch_device(config.device), frame_times=grid)
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


def run_design(frame_times_audio: np.ndarray, story: Story, activations: WordActivations,
               dictionary: Dictionary, config: Config) -> np.ndarray:
    """The atoms' time courses at one run's frames, shape (n_frames, n_atoms).

    ``frame_times_audio`` are the run's frame times relative to the start of the
    story's audio. The run's neuron series are built at exactly those times and
    projected on the fixed loadings (``patterns.dictionary.project_atoms``).
    """
    from ..patterns.dictionary import project_atoms

    return project_atoms(neuron_series(story, activations, frame_times_audio, config), dictionary.loadings)


def torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
