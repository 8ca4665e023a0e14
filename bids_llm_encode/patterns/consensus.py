"""A consensus dictionary from restarts, and how stable each of its atoms is.

Why
---
The objective of :func:`~bids_llm_encode.patterns.dictionary.learn_dictionary`
is nearly flat along rotations of the atoms inside the signal subspace (HRF-smooth
series of ~300 frames hold ~64-128 dimensions; K = 64 atoms span them): fits
from other starts reach the same objective (0.01 % apart) with atoms that match
at a median |r| of 0.55 (SmolLM2-135M) to 0.70 (MiniLM) on the demo story, and
the SVD start gives one of them for every ``--seed``. A single fit is therefore
one solver path; its sub-groups are not a property of the model.

What
----
:func:`learn_consensus_dictionary`:

1. the reference fit: ``learn_dictionary(X, init="svd")`` (the old single-fit
   path; with ``restarts=1`` it is the result, unchanged);
2. ``restarts`` fits from random starts (``init="random"``), each on one half of
   the neurons (``split="half"``: restarts ``2i`` and ``2i+1`` take the two
   halves of one random permutation, so every neuron is in half of them) or on
   all of them (``split="none"``); seeds derived from ``seed``
   (:func:`restart_seeds`);
3. matching: each restart's atoms are assigned one-to-one to the reference atoms
   (Hungarian algorithm on |r|, :func:`match_atoms`) and sign-aligned; the
   reference only labels the clusters (its deterministic start makes the
   labelling the same for every seed) and is not averaged in;
4. consensus atom ``k`` = the normalised mean of the restarts' atoms assigned to
   ``k``;
5. final dictionary: ``learn_dictionary`` warm-started from the consensus atoms
   (``refine_iter`` alternations at most, to ``tol``; 0 gives the lasso loadings
   on the consensus atoms themselves), same ``alpha``;
6. sign convention (:func:`orient`): each atom and its loadings row are flipped
   so that the atom correlates positively with the neurons' mean series; the
   same on every seed for 97-98 % of the atoms (the sum of the loadings, balanced
   in every sub-group, agreed for 70 %).

Per atom, in ``info["consensus"]``:

``stability``
    the median over restarts ``r`` of ``max_j |r(d_rj, c_k^(-r))|``, where
    ``c_k^(-r)`` is the consensus atom built without restart ``r`` (leave-one-out:
    with ``r`` in the mean the score is inflated, to 0.81 for two restarts that
    correlate at 0.3). How well single fits find the atom. The network stage
    links an atom only when it reaches ``--min-stability`` (:func:`linkable_atoms`).
``reproducibility``
    the |r| expected between this consensus atom and the one another seed would
    give (:func:`split_half_reproducibility`). Averaging makes it grow with the
    restarts even for atoms of pure noise (median 0.83-0.85 there with 24
    restarts, against a stability of at most 0.49), which is why it is reported
    but does not decide linking.
``jaccard``
    the median Jaccard index between the atom's sub-group in the final
    dictionary (non-zero loadings, restricted to the restart's neurons) and that
    of restart ``r``'s best-matching atom.
``consensus_r``
    |r| of the final atom with its consensus mean (how far the refinement moved it).

Measurements and defaults: docs/patterns.md ("Stable atoms").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import DataError, UsageError
from ..records import Dictionary
from . import dictionary as dl

log = logging.getLogger(__name__)

#: Restarts of the consensus (``--restarts``; docs/patterns.md, "Stable atoms").
DEFAULT_RESTARTS = 24
#: Stability an atom needs to be linked to networks (``--min-stability``).
DEFAULT_MIN_STABILITY = 0.6
#: How the restarts see the neurons: ``"half"`` (complementary halves) or ``"none"`` (all).
DEFAULT_SPLIT = "half"
#: Alternations of the final fit, warm-started from the consensus atoms.
DEFAULT_REFINE_ITER = 100
#: The restarts' stopping rule (relative objective change) and lasso tolerance during their
#: alternations; the single fit's are 1e-4 and 1e-3. Restarts so stopped take 7-12 alternations
#: instead of 39-50 on the demo story and give as reproducible a consensus (docs/patterns.md).
RESTART_TOL = 1e-3
RESTART_LASSO_TOL = 1e-2
SPLITS = ("half", "none")


def consensus_settings(restarts: int = DEFAULT_RESTARTS, split: str = DEFAULT_SPLIT,
                       refine_iter: int = DEFAULT_REFINE_ITER,
                       restart_tol: float = RESTART_TOL, restart_lasso_tol: float = RESTART_LASSO_TOL) -> dict:
    """What, besides the data and the dictionary's own settings, the consensus depends on (cache keys)."""
    if restarts <= 1:
        return {"restarts": 1}
    return {"restarts": int(restarts), "split": split, "refine_iter": int(refine_iter),
            "restart_tol": float(restart_tol), "restart_lasso_tol": float(restart_lasso_tol), "version": 1}


# --------------------------------------------------------------------------- pieces


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """The seed of each restart's random start, derived from ``seed`` (``numpy.random.SeedSequence``)."""
    return [int(np.random.SeedSequence([int(seed), 1, r]).generate_state(1)[0]) for r in range(restarts)]


def restart_neurons(n_neurons: int, seed: int, restarts: int, split: str) -> list[Optional[np.ndarray]]:
    """The sorted neuron columns each restart learns on (None: all of them).

    ``split="half"``: restarts ``2i`` and ``2i+1`` take the two halves of the
    ``i``-th random permutation (derived from ``seed``).
    """
    if split == "none":
        return [None] * restarts
    if split != "half":
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    out: list[Optional[np.ndarray]] = []
    for r in range(restarts):
        perm = np.random.default_rng(np.random.SeedSequence([int(seed), 2, r // 2])).permutation(n_neurons)
        half = perm[: n_neurons // 2] if r % 2 == 0 else perm[n_neurons // 2:]
        out.append(np.sort(half))
    return out


def _unit(D: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.einsum("tk,tk->k", D, D))
    return D / np.maximum(n, 1e-300)


def _corr(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A^T B`` of unit-norm columns (the atoms are centred, so this is Pearson's r).

    ``einsum`` without BLAS: the same bits for any thread count.
    """
    return np.einsum("tk,tj->kj", A, B)


def match_atoms(reference: np.ndarray, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one assignment of ``atoms`` to ``reference`` maximising the summed |r| (Hungarian).

    Parameters
    ----------
    reference, atoms : ndarray, shape (n_frames, K)
        Unit-norm columns.

    Returns
    -------
    index : ndarray of int, shape (K,)
        ``atoms[:, index[k]]`` is assigned to ``reference[:, k]``.
    sign : ndarray, shape (K,)
        +1 or -1: ``sign[k] * atoms[:, index[k]]`` correlates positively with ``reference[:, k]``.
    r : ndarray, shape (K,)
        The |r| of each assigned pair.
    """
    C = _corr(np.asarray(reference, np.float64), np.asarray(atoms, np.float64))
    rows, cols = linear_sum_assignment(-np.abs(C))
    index = cols[np.argsort(rows)]
    c = C[np.arange(C.shape[0]), index]
    return index, np.where(c < 0, -1.0, 1.0), np.abs(c)


def orient(atoms: np.ndarray, loadings: sp.csr_matrix,
           mean_series: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """The sign convention: flip atom ``k`` (and loadings row ``k``) to correlate positively with the
    neurons' mean series.

    ``(d, a)`` and ``(-d, -a)`` fit equally well. ``mean_series`` is ``X``
    averaged over the neurons (their common response; on the demo story it is
    the word-rate carrier); the atom is oriented so that ``d_k . mean_series > 0``.
    The sum of the sub-group's loadings is no rule: sub-groups hold about as many
    negative as positive loadings (|sum| / sum |a| has a median of 0.04 on MiniLM),
    so its sign agreed between two seeds for only 70 % of the atoms, against 97 %
    for this one (docs/patterns.md). Where ``|d_k . mean_series|`` is below
    ``1e-6 ||mean_series||``, the loadings' sum decides, then the largest |entry|.

    Returns
    -------
    atoms, loadings, sign : the oriented arrays and the +-1 applied to each atom
    """
    A = sp.csr_matrix(loadings, dtype=np.float64)
    m = np.asarray(mean_series, dtype=np.float64).ravel()
    proj = np.einsum("tk,t->k", np.asarray(atoms, np.float64), m)
    proj[np.abs(proj) <= 1e-6 * np.sqrt(np.einsum("t,t->", m, m))] = 0.0
    total = np.asarray(A.sum(axis=1)).ravel()
    peak = atoms[np.abs(atoms).argmax(0), np.arange(atoms.shape[1])]
    sign = np.where(proj != 0, np.sign(proj), np.where(total != 0, np.sign(total), np.where(peak < 0, -1.0, 1.0)))
    A = sp.diags(sign) @ A
    return atoms * sign, sp.csr_matrix(A), sign


def mean_series(X) -> np.ndarray:
    """``X`` averaged over the neurons, float64, shape (n_frames,) (numpy's reduction: thread-independent)."""
    out = np.zeros(X.shape[0])
    for s in range(0, X.shape[1], 16384):
        Xb = X[:, s:s + 16384]
        Xb = Xb.cpu().numpy() if isinstance(Xb, torch.Tensor) else np.asarray(Xb)
        out += Xb.sum(axis=1, dtype=np.float64)
    return out / X.shape[1]


def split_half_reproducibility(reference: np.ndarray, restart_atoms: list[np.ndarray]) -> np.ndarray:
    """Predicted |r| between each consensus atom and the one another set of restarts would give.

    The restarts are split into two halves (pairs of complementary neuron halves
    alternate: restarts 0, 1, 4, 5, ... and 2, 3, 6, 7, ...); both halves'
    consensus atoms carry the reference's labels, so atom ``k`` of one is atom
    ``k`` of the other. Their |r| is stepped up to the full number of restarts
    by the Spearman-Brown formula ``2 r / (1 + r)``. Measured against a second
    consensus from disjoint seeds (docs/patterns.md): mean absolute error 0.04.
    NaN with fewer than 4 restarts.
    """
    R = len(restart_atoms)
    K = np.asarray(reference).shape[1]
    if R < 4:
        return np.full(K, np.nan)
    first = [D for r, D in enumerate(restart_atoms) if (r // 2) % 2 == 0]
    second = [D for r, D in enumerate(restart_atoms) if (r // 2) % 2 == 1]
    c1 = consensus_of(reference, first)[0]
    c2 = consensus_of(reference, second)[0]
    rh = np.abs(np.einsum("tk,tk->k", c1, c2))
    return 2 * rh / (1 + rh)


def consensus_of(reference: np.ndarray, restart_atoms: list[np.ndarray]):
    """Consensus atoms of restarts matched to a reference, with the leave-one-out stability.

    Parameters
    ----------
    reference : ndarray, shape (n_frames, K)
        Labels the clusters (not averaged in).
    restart_atoms : list of ndarray, shape (n_frames, K)
        Unit-norm atoms of each restart (at least 2).

    Returns
    -------
    consensus : ndarray, shape (n_frames, K)
        Unit-norm, sign-aligned means.
    best_r : ndarray, shape (R, K)
        ``max_j |r(d_rj, c_k^(-r))|``: restart ``r``'s best match with atom ``k``'s
        consensus without restart ``r``.
    best_j : ndarray of int, shape (R, K)
        That best-matching atom of each restart.
    """
    R = len(restart_atoms)
    if R < 2:
        raise UsageError("a consensus needs at least 2 restarts")
    ref = _unit(np.asarray(reference, np.float64))
    Ds = [_unit(np.asarray(D, np.float64)) for D in restart_atoms]
    aligned = []
    for D in Ds:
        index, sign, _ = match_atoms(ref, D)
        aligned.append(D[:, index] * sign)
    total = np.sum(aligned, axis=0)
    consensus = _unit(total)
    best_r = np.empty((R, ref.shape[1]))
    best_j = np.empty((R, ref.shape[1]), dtype=np.int64)
    for r, D in enumerate(Ds):
        loo = _unit(total - aligned[r])
        C = np.abs(_corr(loo, D))  # (K consensus, K atoms of restart r)
        best_j[r] = C.argmax(1)
        best_r[r] = C[np.arange(C.shape[0]), best_j[r]]
    return consensus, best_r, best_j


def _support_bits(loadings: sp.csr_matrix, cols: Optional[np.ndarray], n_neurons: int) -> np.ndarray:
    """Non-zero pattern of a restart's loadings in the full neuron space, bit-packed, (K, ceil(N/8))."""
    A = sp.csr_matrix(loadings)
    A.eliminate_zeros()
    mask = np.zeros((A.shape[0], n_neurons), dtype=bool)
    rows = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
    mask[rows, A.indices if cols is None else cols[A.indices]] = True
    return np.packbits(mask, axis=1)


#: Bits set in each byte value (``np.bitwise_count`` needs numpy >= 2).
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _jaccard(final_bits: np.ndarray, restart_bits: np.ndarray, cols_bits: np.ndarray,
             best_j: np.ndarray) -> np.ndarray:
    """Jaccard of the final sub-group ``k`` (on the restart's neurons) and the restart's atom ``best_j[k]``."""
    a = final_bits & cols_bits
    b = restart_bits[best_j]
    inter = _POPCOUNT[a & b].sum(1, dtype=np.int64).astype(np.float64)
    union = _POPCOUNT[a | b].sum(1, dtype=np.int64).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


# --------------------------------------------------------------------------- memory


def consensus_memory_bytes(n_frames: int, n_neurons: int, n_atoms: int, restarts: int = DEFAULT_RESTARTS,
                           split: str = DEFAULT_SPLIT, batch_neurons: int = 16384) -> int:
    """Peak memory (bytes) of :func:`learn_consensus_dictionary`, float32 on a CPU, estimated.

    The fits run one after another, so the peak is one fit's
    (:func:`~bids_llm_encode.patterns.dictionary.dictionary_memory_bytes`) plus
    what the restarts hold at once: with ``split="half"`` the restart's copy of
    half of ``X`` (``4 T ceil(N/2)``); for every restart its atoms
    (``8 T K``) and its bit-packed sub-groups (``K ceil(N/8)``); the reference
    atoms and the consensus (``16 T K``), the final sub-groups (``K ceil(N/8)``)
    and one boolean mask of sub-groups while it is packed (``K N``).
    ``restarts=1`` is the single fit's estimate.
    """
    T, N, K, R = int(n_frames), int(n_neurons), int(n_atoms), int(restarts)
    one = dl.dictionary_memory_bytes(T, N, K, batch_neurons)
    if R <= 1:
        return one
    half = 4 * T * math.ceil(N / 2) if split == "half" else 0
    bits = K * math.ceil(N / 8)
    return one + half + R * (8 * T * K + bits) + 16 * T * K + bits + K * N


def check_memory(n_frames: int, n_neurons: int, n_atoms: int, mem_mb: Optional[int], what: str,
                 restarts: int = DEFAULT_RESTARTS, split: str = DEFAULT_SPLIT,
                 batch_neurons: int = 16384) -> int:
    """Refuse (exit 64) when ``--mem-mb`` cannot hold the consensus dictionary; returns the estimate.

    Raises
    ------
    UsageError
    """
    need = consensus_memory_bytes(n_frames, n_neurons, n_atoms, restarts, split, batch_neurons)
    if mem_mb and need > int(mem_mb) * 2**20:
        raise UsageError(
            f"{what}: dictionary learning of {n_frames} frames x {n_neurons} neurons ({n_atoms} atoms, "
            f"{restarts} restart{'s' if restarts != 1 else ''}) needs about {math.ceil(need / 2**20)} MB, "
            f"more than --mem-mb {mem_mb}. Raise --mem-mb (and the job's memory), or record fewer "
            "neurons (--layers) or a coarser grid (--atom-tr).")
    return need


# --------------------------------------------------------------------------- public API


def _listed(a: np.ndarray) -> list:
    """Nested lists for JSON, NaN as None (the writer refuses NaN; ``np.asarray(..., float)`` reads None as NaN)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return None if not np.isfinite(a) else float(a)
    return [_listed(x) for x in a] if a.ndim > 1 else [float(x) if np.isfinite(x) else None for x in a]


def learn_consensus_dictionary(X, n_atoms: int = 64, alpha: Optional[float] = None, *,
                               sparsity: float = dl.DEFAULT_SPARSITY,
                               frame_times: Optional[np.ndarray] = None,
                               restarts: int = DEFAULT_RESTARTS, seed: int = 0, split: str = DEFAULT_SPLIT,
                               refine_iter: int = DEFAULT_REFINE_ITER,
                               restart_tol: float = RESTART_TOL, restart_lasso_tol: float = RESTART_LASSO_TOL,
                               n_iter: int = 100, tol: float = 1e-4,
                               device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                               batch_neurons: int = 16384, progress: bool = True) -> Dictionary:
    """The consensus dictionary of ``restarts`` fits (see the module docstring).

    Parameters
    ----------
    X : ndarray or tensor, shape (n_frames, n_neurons)
        Column z-scored responses.
    n_atoms, alpha, sparsity, frame_times, n_iter, tol, device, dtype, batch_neurons, progress
        As :func:`~bids_llm_encode.patterns.dictionary.learn_dictionary` (every
        fit gets the same ``alpha``, computed once on the whole ``X``).
    restarts : int
        ``R >= 1``. 1: the single SVD-started fit, exactly as
        ``learn_dictionary(X, init="svd")`` (no stability is measured).
    seed : int
        Derives the restarts' seeds and neuron splits; the result is
        deterministic given it, and does not depend on the thread count.
    split : {"half", "none"}
        Restarts on complementary halves of the neurons, or on all of them.
        "half" falls back to "none" when half the neurons are fewer than ``n_atoms``.
    refine_iter : int
        Alternations of the final fit warm-started from the consensus atoms
        (0: the consensus atoms are kept, with their lasso loadings).
    restart_tol, restart_lasso_tol : float
        The restarts' ``tol`` and ``lasso_tol`` (the reference and the final fit
        use ``tol`` and ``learn_dictionary``'s default ``lasso_tol``).

    Returns
    -------
    records.Dictionary
        The final atoms, loadings, ``r2``, ``objective``, ``alpha``; ``info`` as
        ``learn_dictionary``'s (of the final fit) plus, for ``restarts > 1``,
        ``info["consensus"]``: the settings (``restarts``, ``split``, ``refine_iter``,
        ``restart_tol``, ``restart_lasso_tol``, ``seeds``); the reference fit's
        ``reference_objective``, ``reference_r2``, ``reference_seconds``; the
        refit's ``refine_seconds``, ``refine_n_iter``; per restart
        ``restart_seconds``, ``restart_objective``, ``restart_r2``, ``restart_n_iter``;
        per atom ``stability``, ``reproducibility``, ``jaccard``, ``consensus_r``
        (|r| of the final atom with its consensus mean), ``sign`` (the flip
        applied); and ``restart_r`` / ``restart_jaccard`` (R x K lists: each
        restart's best |r| and Jaccard). NaN is stored as None (JSON).
        ``info["seconds"]`` is the whole consensus's time.
    """
    t0 = time.perf_counter()
    R = int(restarts)
    if R < 1:
        raise UsageError(f"restarts must be >= 1, got {restarts}")
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if refine_iter < 0:
        raise UsageError(f"refine_iter must be >= 0, got {refine_iter}")
    common = dict(n_iter=n_iter, device=device, dtype=dtype, batch_neurons=batch_neurons)
    ref = dl.learn_dictionary(X, n_atoms, alpha, sparsity=sparsity, frame_times=frame_times, seed=seed,
                              init="svd", progress=progress, tol=tol, **common)
    if R == 1:
        return ref
    alpha = ref.alpha
    Xt = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))  # no copy
    T, N = Xt.shape
    K = ref.n_atoms
    if split == "half" and N // 2 < K:
        log.warning("consensus: half of the %d neurons is fewer than %d atoms; the restarts use all "
                    "neurons (split 'none')", N, K)
        split = "none"
    seeds = restart_seeds(seed, R)
    cols = restart_neurons(N, seed, R, split)
    if progress:
        log.info("consensus dictionary: %d restarts (random starts, %s), K=%d", R,
                 "complementary halves of the neurons" if split == "half" else "all neurons", K)
    atoms, bits, stats = [], [], {"restart_seconds": [], "restart_objective": [], "restart_r2": [],
                                  "restart_n_iter": []}
    for r in range(R):
        t = time.perf_counter()
        # torch's gather: 8x faster than numpy's fancy indexing of columns
        Xr = Xt if cols[r] is None else torch.index_select(Xt, 1, torch.from_numpy(cols[r]).to(Xt.device))
        d = dl.learn_dictionary(Xr, K, alpha, seed=seeds[r], init="random", progress=False,
                                tol=restart_tol, lasso_tol=restart_lasso_tol, **common)
        del Xr
        atoms.append(d.atoms)
        bits.append(_support_bits(d.loadings, cols[r], N))
        stats["restart_seconds"].append(time.perf_counter() - t)
        stats["restart_objective"].append(d.objective)
        stats["restart_r2"].append(d.r2)
        stats["restart_n_iter"].append(d.info["n_iter"])
        if progress:
            log.info("  restart %d/%d: %.1f s, %d alternations, objective %.6g, R^2 %.4f", r + 1, R,
                     stats["restart_seconds"][-1], d.info["n_iter"], d.objective, d.r2)
    consensus, best_r, best_j = consensus_of(ref.atoms, atoms)
    reproducibility = split_half_reproducibility(ref.atoms, atoms)
    fin = dl.learn_dictionary(X, K, alpha, frame_times=frame_times, seed=seed, init=consensus,
                              progress=progress, tol=tol, **dict(common, n_iter=int(refine_iter)))
    D, A, sign = orient(fin.atoms, fin.loadings, mean_series(Xt))
    consensus_r = np.abs(np.einsum("tk,tk->k", _unit(D), consensus))
    final_bits = _support_bits(A, None, N)
    jac = np.empty_like(best_r)
    for r in range(R):
        inside = np.zeros(N, dtype=bool)
        inside[slice(None) if cols[r] is None else cols[r]] = True
        jac[r] = _jaccard(final_bits, bits[r], np.packbits(inside)[None, :], best_j[r])
    with np.errstate(all="ignore"):
        jac_med = np.array([np.nanmedian(c) if np.isfinite(c).any() else np.nan for c in jac.T])
    stability = np.median(best_r, axis=0)
    info = dict(fin.info)
    info["seconds"] = time.perf_counter() - t0
    info["consensus"] = {
        "restarts": R, "split": split, "refine_iter": int(refine_iter),
        "restart_tol": float(restart_tol), "restart_lasso_tol": float(restart_lasso_tol), "seeds": seeds,
        "reference_objective": ref.objective, "reference_r2": ref.r2,
        "reference_seconds": ref.info["seconds"], "refine_seconds": fin.info["seconds"],
        "refine_n_iter": fin.info["n_iter"], **stats,
        "stability": _listed(stability), "reproducibility": _listed(reproducibility),
        "jaccard": _listed(jac_med), "consensus_r": _listed(consensus_r),
        "sign": sign.tolist(), "restart_r": _listed(best_r), "restart_jaccard": _listed(jac),
    }
    if progress:
        log.info("consensus dictionary done: %d restarts, objective %.6g (single fit %.6g), R^2 %.4f, "
                 "median stability %.3f, %d of %d atoms >= %.2f, %.1f s", R, fin.objective, ref.objective,
                 fin.r2, float(np.median(stability)), int((stability >= DEFAULT_MIN_STABILITY).sum()), K,
                 DEFAULT_MIN_STABILITY, info["seconds"])
    return replace(fin, atoms=D, loadings=A, info=info)


def atom_stability(dictionary: Dictionary) -> Optional[np.ndarray]:
    """The stability of each atom, shape (K,), or None when it was not measured (one fit)."""
    c = dictionary.info.get("consensus") if dictionary.info else None
    if not c or c.get("stability") is None:
        return None
    return np.asarray(c["stability"], dtype=np.float64)


def linkable_atoms(dictionary: Dictionary, min_stability: float = DEFAULT_MIN_STABILITY) -> np.ndarray:
    """Which atoms the network stage may link: stability >= ``min_stability``.

    Parameters
    ----------
    dictionary : records.Dictionary
        From :func:`learn_consensus_dictionary` (or the cache).
    min_stability : float
        ``--min-stability``.

    Returns
    -------
    ndarray of bool, shape (K,)
        All True when the stability was not measured (``--restarts 1``, the old
        single fit): nothing to flag. An atom with a NaN stability is not linkable.
    """
    s = atom_stability(dictionary)
    if s is None:
        return np.ones(dictionary.n_atoms, dtype=bool)
    if s.shape != (dictionary.n_atoms,):
        raise DataError(f"the dictionary's stability has shape {s.shape}, expected ({dictionary.n_atoms},)")
    with np.errstate(invalid="ignore"):
        return s >= float(min_stability)


def stability_table(dictionary: Dictionary, min_stability: float = DEFAULT_MIN_STABILITY):
    """One row per atom: ``atom``, ``stability``, ``reproducibility``, ``jaccard``, ``n_restarts``,
    ``n_agree``, ``consensus_r``, ``linkable``.

    ``n_agree`` (the cluster's size): restarts whose best match reaches
    ``min_stability``. With one fit (``--restarts 1``) the measures are NaN,
    ``n_restarts`` is 1 and every atom is linkable.
    """
    import pandas as pd

    K = dictionary.n_atoms
    c = (dictionary.info or {}).get("consensus") or {}
    nan = np.full(K, np.nan)
    if c:
        n_agree = (np.asarray(c["restart_r"], dtype=np.float64) >= float(min_stability)).sum(0)
    else:
        n_agree = np.zeros(K, dtype=int)
    return pd.DataFrame({
        "atom": np.arange(K),
        "stability": np.asarray(c.get("stability", nan), dtype=np.float64),
        "reproducibility": np.asarray(c.get("reproducibility", nan), dtype=np.float64),
        "jaccard": np.asarray(c.get("jaccard", nan), dtype=np.float64),
        "n_restarts": np.full(K, int(c.get("restarts", 1))),
        "n_agree": n_agree,
        "consensus_r": np.asarray(c.get("consensus_r", nan), dtype=np.float64),
        "linkable": linkable_atoms(dictionary, min_stability),
    })


#: Column descriptions of :func:`stability_table` (the TSV's JSON sidecar).
STABILITY_COLUMNS = {
    "atom": "atom index (column of atoms.tsv, row of loadings.npz)",
    "stability": "median over restarts of the best |r| between a restart's atoms and this atom's "
                 "consensus built without that restart (leave-one-out); NaN with --restarts 1",
    "reproducibility": "|r| expected between this consensus atom and the one another --seed gives "
                       "(split-half of the restarts, Spearman-Brown); NaN with fewer than 4 restarts",
    "jaccard": "median over restarts of the Jaccard index between this atom's sub-group (non-zero "
               "loadings, on the restart's neurons) and that of the restart's best-matching atom",
    "n_restarts": "restarts of the consensus (--restarts)",
    "n_agree": "restarts whose best match reaches --min-stability (the cluster's size)",
    "consensus_r": "|r| between the final atom and its consensus mean (moved by the warm-started refit)",
    "linkable": "stability >= --min-stability: the network stage may link this atom "
                "(all true with --restarts 1, where nothing was measured)",
}
