"""Sparse dictionary learning of the neurons' temporal responses (method.md section 3).

The problem
-----------
Given ``X`` (``T`` frames x ``N`` neurons, every column z-scored), find ``D``
(``T x K``, unit-norm columns: the *atoms*, temporal patterns) and ``A``
(``K x N``, sparse loadings) minimising

.. math::

    f(D, A) = \\tfrac12 \\lVert X - D A \\rVert_F^2 + \\alpha \\lVert A \\rVert_{1,1},
    \\qquad \\lVert d_k \\rVert_2 = 1 .

This is exactly the objective of scikit-learn's ``DictionaryLearning`` applied
to ``X.T`` (samples = neurons, features = frames): its ``components_`` are our
``D.T`` and its code is our ``A.T``, with the same ``alpha`` and the same
scaling (no division by ``T`` or ``N``), so objective values can be compared
directly.

The penalty
-----------
``alpha`` is tied to the data through :func:`alpha_from_sparsity`:
``alpha = sparsity * sqrt(mean_j ||x_j||^2)``. For z-scored columns
``||x_j|| = sqrt(T)``, and the lasso optimality conditions say that neuron
``j`` loads on atom ``k`` only if ``|<d_k, r_j>| = alpha``, i.e. only if the
correlation-like quantity ``<d_k, r_j> / ||x_j||`` reaches ``sparsity``
(``r_j``: what the other atoms leave of ``x_j``). ``sparsity`` is therefore a
number in ``[0, 1)`` that means the same for any ``T`` and ``N`` (``> 1``
gives ``A = 0``). See docs/patterns.md for the default and the R^2 it gives.

The solver
----------
Alternating minimisation (Mairal et al., JMLR 2010), deterministic given the seed:

(a) sparse coding: a batched FISTA lasso solver (Beck & Teboulle 2009, with
    gradient-based adaptive restart) on ``G = D^T D`` and ``C = D^T X_b`` for
    batches of neurons, warm-started from the previous ``A``, run until the
    duality gap of the batch is below ``lasso_tol`` times its primal value;
(b) dictionary update: one pass of block coordinate descent over the atoms
    using ``B = X A^T`` and ``E = A A^T`` (columns projected back to the unit
    sphere); an atom that no neuron uses is re-initialised with the
    normalised residual of the worst-reconstructed neuron.

Memory is ``O(T N + K N + T K)``: ``X`` once, ``A`` and one batch of ``C``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import DataError, UsageError
from ..records import Dictionary

log = logging.getLogger(__name__)

#: Default relative sparsity (see :func:`alpha_from_sparsity` and docs/patterns.md).
DEFAULT_SPARSITY = 0.15

ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _check_device(device: Union[str, torch.device]) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def _as_tensor(X: ArrayLike, name: str, device: torch.device, dtype: torch.dtype,
               check_finite: bool = True) -> torch.Tensor:
    """Check that ``X`` is a finite 2-D array and return it as a tensor on device/dtype.

    ``check_finite=False`` leaves the finiteness to the caller (:func:`learn_dictionary`
    reads it from the column sums of squares, without a pass over ``X``).
    """
    if sp.issparse(X):
        raise DataError(f"{name} must be a dense array, got a sparse matrix")
    t = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
    if t.ndim != 2:
        raise DataError(f"{name} must be 2-D (frames x neurons), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {tuple(t.shape)})")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise DataError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(device=device, dtype=dtype)
    if check_finite and not bool(torch.isfinite(t).all()):
        _not_finite(t, name)
    return t


def _not_finite(t: torch.Tensor, name: str, columns: Optional[torch.Tensor] = None):
    """Raise the DataError of non-finite input (``columns``: where to count them, all by default)."""
    part = t if columns is None else t[:, columns]
    bad = int((~torch.isfinite(part)).sum())
    raise DataError(f"{name} holds {bad} non-finite values (NaN or inf); "
                    "z-score the responses and drop constant or missing neurons first")


def _dsum(t: torch.Tensor) -> float:
    """A full sum that does not depend on the number of threads.

    torch splits a full reduction between its threads, so ``float(t.sum())``
    changes in the last bits with ``--nprocs``; in the solver such a sum decides
    restarts and stopping, and the dictionary then differed (atoms by 4e-7,
    loadings by 5e-5, z maps by 0.04). Per-column sums (one thread each) and a
    float64 numpy sum of those are the same for any thread count. On a GPU the
    thread count plays no part and the sum stays on the device.
    """
    if t.device.type != "cpu":
        return float(t.sum())
    v = t.sum(0) if t.ndim == 2 else t.reshape(-1)
    return float(np.sum(v.detach().double().numpy()))


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """LAPACK (``eigh``) on one CPU thread: its result depends on the thread count otherwise."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _soft(x: torch.Tensor, thr: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - thr, min=0.0)


def alpha_from_sparsity(X: ArrayLike, sparsity: float) -> float:
    """The absolute penalty ``alpha`` for a relative ``sparsity``.

    Parameters
    ----------
    X : array, shape (n_frames, n_neurons)
        Column z-scored responses.
    sparsity : float
        In ``[0, 1)``: the correlation a neuron's residual must reach with an
        atom for the neuron to load on it.

    Returns
    -------
    alpha : float
        ``sparsity * sqrt(mean_j ||x_j||^2)`` (``= sparsity * sqrt(T)`` for
        z-scored columns).
    """
    if not np.isfinite(sparsity) or sparsity < 0:
        raise UsageError(f"sparsity must be a finite number >= 0, got {sparsity}")
    if isinstance(X, torch.Tensor):
        ms = _dsum(_column_stats(X, 16384)[0]) / X.shape[1]  # thread-independent, no float64 copy of X
    else:
        Xa = np.asarray(X)
        ms = float(np.einsum("ij,ij->", Xa, Xa, dtype=np.float64)) / Xa.shape[1]
    return float(sparsity) * math.sqrt(ms)


def _lasso_fista(G: torch.Tensor, C: torch.Tensor, A0: torch.Tensor, xsq: torch.Tensor,
                 alpha: float, L: float, max_iter: int, tol: float,
                 check_every: int = 5) -> tuple[torch.Tensor, int, float]:
    """Batched lasso ``min_a 0.5||x - D a||^2 + alpha ||a||_1`` for every column.

    Parameters
    ----------
    G : tensor, shape (K, K)
        ``D^T D``.
    C : tensor, shape (K, n)
        ``D^T X`` for a batch of ``n`` neurons.
    A0 : tensor, shape (K, n)
        Warm start.
    xsq : tensor, shape (n,)
        ``||x_j||^2`` (float64).
    L : float
        Lipschitz constant of the gradient (largest eigenvalue of ``G``).
    tol : float
        Stop when the batch duality gap <= ``tol`` * batch primal value.

    Returns
    -------
    A : tensor, shape (K, n)
    n_iter : int
    rel_gap : float
    """
    A = A0.clone()
    Y = A.clone()
    t = 1.0
    thr = alpha / L
    rel_gap = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        A_new = _soft(Y - (G @ Y - C) / L, thr)
        # adaptive restart (O'Donoghue & Candes 2015): momentum points uphill -> reset
        if _dsum((Y - A_new) * (A_new - A)) > 0:
            t = 1.0
            Y = A_new
        else:
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            Y = A_new + ((t - 1.0) / t_new) * (A_new - A)
            t = t_new
        A = A_new
        if it % check_every == 0 or it == max_iter:
            primal, gap = _primal_gap(G, C, A, xsq, alpha)
            rel_gap = _dsum(gap) / max(_dsum(primal), 1e-300)
            if rel_gap <= tol:
                break
    return A, it, rel_gap


def _primal_gap(G: torch.Tensor, C: torch.Tensor, A: torch.Tensor, xsq: torch.Tensor,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron primal value and duality gap of the lasso, from ``G``, ``C``, ``||x||^2``.

    With ``r = x - D a`` and the dual point ``theta = s r``,
    ``s = min(1, alpha / ||D^T r||_inf)``, the dual value is
    ``s x^T r - s^2 ||r||^2 / 2``.

    Returns
    -------
    primal, gap : tensor, shape (n,), float64
    """
    GA = G @ A
    p = (A * C).sum(0).double()
    q = (A * GA).sum(0).double()
    rsq = torch.clamp(xsq - 2 * p + q, min=0.0)
    l1 = A.abs().sum(0).double()
    primal = 0.5 * rsq + alpha * l1
    corr = (C - GA).abs().amax(0).double()
    s = torch.clamp(alpha / torch.clamp(corr, min=1e-300), max=1.0)
    dual = s * (xsq - p) - 0.5 * s * s * rsq
    return primal, torch.clamp(primal - dual, min=0.0)


def _lipschitz(G: torch.Tensor) -> float:
    with _one_thread(G.device):
        return float(torch.linalg.eigvalsh(G.double()).max()) * 1.0001 + 1e-12


def _column_stats(X: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """``||x_j||^2`` per neuron (float64) and the total sum of squares of the centred columns.

    In column batches of at most 2,048 neurons, with one float64 temporary
    besides the batch (``8 T min(batch, 4096)`` bytes, the estimate's term): a
    float64 copy of the whole ``X`` is never made (with the solver's batch of
    16,384 this held 5 GB at 13,347 frames, beyond the estimate:
    benchmarks/memory.py). The centred sum is ``||x_j||^2 - T mean_j^2``
    (float64: 5e-16 from the two-pass value on z-scored columns, in half the
    time). A non-finite value of ``X`` makes its column's ``||x_j||^2`` non-finite.
    """
    T, N = X.shape
    b = max(1, min(int(batch), 2048))
    xsq = torch.empty(N, dtype=torch.float64, device=X.device)
    css = torch.empty(N, dtype=torch.float64, device=X.device)
    for s in range(0, N, b):
        Xb = X[:, s:s + b].double()
        xsq[s:s + b] = (Xb * Xb).sum(0)
        m = Xb.mean(0)
        css[s:s + b] = torch.clamp(xsq[s:s + b] - T * m * m, min=0.0)
    return xsq, _dsum(css)


def _encode_all(X: torch.Tensor, D: torch.Tensor, A: torch.Tensor, xsq: torch.Tensor, alpha: float,
                batch: int, max_iter: int, tol: float, want_stats: bool = True):
    """Sparse-code all neurons in batches (in place on ``A``).

    Returns the objective, the residual sum of squares, per-neuron residual
    norms^2, ``B = X A^T`` and ``E = A A^T`` (the latter two only when ``want_stats``),
    and lasso iteration statistics.
    """
    G = D.T @ D
    L = _lipschitz(G)
    K, N = A.shape
    T = X.shape[0]
    B = torch.zeros((T, K), dtype=X.dtype, device=X.device) if want_stats else None
    E = torch.zeros((K, K), dtype=X.dtype, device=X.device) if want_stats else None
    rss = torch.zeros(N, dtype=torch.float64, device=X.device)
    obj = 0.0
    iters = []
    gaps = []
    for s in range(0, N, batch):
        e = min(N, s + batch)
        Xb = X[:, s:e]
        C = D.T @ Xb
        Ab, n_it, g = _lasso_fista(G, C, A[:, s:e], xsq[s:e], alpha, L, max_iter, tol)
        A[:, s:e] = Ab
        primal, _ = _primal_gap(G, C, Ab, xsq[s:e], alpha)
        obj += _dsum(primal)
        p = (Ab * C).sum(0).double()
        q = (Ab * (G @ Ab)).sum(0).double()
        rss[s:e] = torch.clamp(xsq[s:e] - 2 * p + q, min=0.0)
        iters.append(n_it)
        gaps.append(g)
        if want_stats:
            B += Xb @ Ab.T
            E += Ab @ Ab.T
    return obj, rss, B, E, {"lasso_iter_max": max(iters), "lasso_rel_gap_max": max(gaps)}


def _update_dict(D: torch.Tensor, B: torch.Tensor, E: torch.Tensor, X: torch.Tensor,
                 A: torch.Tensor, rss: torch.Tensor) -> int:
    """One block-coordinate pass over the atoms (in place). Returns the number re-initialised."""
    K = D.shape[1]
    eps = 1e-10 * max(float(torch.diagonal(E).max()), 1e-30)
    n_reinit = 0
    taken = torch.zeros_like(rss, dtype=torch.bool)
    for k in range(K):
        ekk = float(E[k, k])
        if ekk <= eps:
            # unused atom: restart it from the residual of the worst-reconstructed neuron
            score = rss.masked_fill(taken, -1.0)
            j = int(torch.argmax(score))
            taken[j] = True
            r = X[:, j] - D @ A[:, j]
            nr = float(torch.linalg.vector_norm(r))
            if nr <= 1e-12:
                r = X[:, j]
                nr = float(torch.linalg.vector_norm(r))
            if nr > 1e-12:
                D[:, k] = r / nr
            n_reinit += 1
            continue
        d = D[:, k] + (B[:, k] - D @ E[:, k]) / ekk
        nd = float(torch.linalg.vector_norm(d))
        if nd > 1e-12:
            D[:, k] = d / nd
    return n_reinit


def _init_dict(X: torch.Tensor, K: int, init, seed: int) -> torch.Tensor:
    T, N = X.shape
    if not isinstance(init, str):
        # given atoms (a warm start, e.g. the consensus of patterns/consensus.py)
        D = _as_tensor(init, "init (atoms)", X.device, X.dtype).clone()
        if tuple(D.shape) != (T, K):
            raise DataError(f"init atoms have shape {tuple(D.shape)}, expected {(T, K)} (frames x atoms)")
        norms = torch.linalg.vector_norm(D, dim=0)
        if not bool((norms > 1e-12).all()):
            raise DataError("init atoms include an all-zero column")
        return D / norms
    if init == "svd":
        if T <= 4096:
            # the leading eigenvectors of X X^T (T x T), accumulated in batches, in float64
            S = torch.zeros((T, T), dtype=torch.float64, device=X.device)
            for s in range(0, N, 16384):
                Xb = X[:, s:s + 16384].double()
                S += Xb @ Xb.T
            with _one_thread(S.device):
                w, V = torch.linalg.eigh(S)
            D = V[:, torch.argsort(w, descending=True)[:K]].to(X.dtype)
        else:
            g = torch.Generator(device="cpu").manual_seed(seed)
            torch.manual_seed(seed)  # svd_lowrank draws from the global generator
            U, _, _ = torch.svd_lowrank(X, q=min(K + 10, min(T, N)), niter=4)
            D = U[:, :K].contiguous()
            del g
        # a deterministic sign: the largest |entry| of each atom is positive
        idx = D.abs().argmax(0)
        sign = torch.sign(D[idx, torch.arange(K, device=D.device)])
        sign[sign == 0] = 1
        D = D * sign
    elif init == "random":
        g = torch.Generator(device="cpu").manual_seed(seed)
        cols = torch.randperm(N, generator=g)[:K].to(X.device)
        D = X[:, cols].clone()
        noise = torch.randn((T, K), generator=g, dtype=torch.float64).to(X.device, X.dtype)
        norms = torch.linalg.vector_norm(D, dim=0)
        D[:, norms <= 1e-12] = noise[:, norms <= 1e-12]
    else:
        raise UsageError(f"init must be 'svd' or 'random', got {init!r}")
    return D / torch.clamp(torch.linalg.vector_norm(D, dim=0), min=1e-12)


# --------------------------------------------------------------------------- memory

#: Bytes per frame x neuron that dictionary learning holds at most, besides the
#: terms in K (see :func:`dictionary_memory_bytes`): the float32 ``X`` (4), and
#: head room for the caller's copy of ``X`` while it is handed over (4).
MEMORY_FACTOR = 8


def dictionary_memory_bytes(n_frames: int, n_neurons: int, n_atoms: int, batch_neurons: int = 16384) -> int:
    """Peak memory (bytes) of :func:`learn_dictionary` in float32 on a CPU, estimated.

    ``MEMORY_FACTOR * T * N`` (X, and its producer's copy) ``+ 24 K N`` (A in
    float32, its float64 copy for the result, and the CSR loadings, at most
    dense) ``+ 48 K b`` (the solver's batch of b neurons: C, Y, A_new, G Y and
    temporaries) ``+ max(8 T min(b, 4096), svd)`` (column statistics in float64,
    or the SVD start: for T <= 4,096, ``svd = 8 T min(16384, N) + 16 T^2``, a
    float64 batch of 16,384 neurons, X X^T and its product; measured at 1,361
    frames x 17,280 ANs, where the earlier estimate fell 135 MB short)
    ``+ 32 T K + 8 N`` (D, B, residuals) ``+ 16 MB`` (interpreter, torch
    workspaces). Proportional to frames x neurons; the language model and the
    word activations are not counted.
    """
    T, N, K = int(n_frames), int(n_neurons), int(n_atoms)
    b = min(int(batch_neurons), N)
    svd = 8 * T * min(16384, N) + 16 * T * T if T <= 4096 else 0
    return MEMORY_FACTOR * T * N + 24 * K * N + 48 * K * b + max(8 * T * min(b, 4096), svd) + 32 * T * K \
        + 8 * N + 16 * 2**20


def check_memory(n_frames: int, n_neurons: int, n_atoms: int, mem_mb: Optional[int], what: str,
                 batch_neurons: int = 16384) -> int:
    """Refuse (exit 64) when ``--mem-mb`` cannot hold the dictionary learning; returns the estimate.

    Raises
    ------
    UsageError
    """
    need = dictionary_memory_bytes(n_frames, n_neurons, n_atoms, batch_neurons)
    if mem_mb and need > int(mem_mb) * 2**20:
        raise UsageError(
            f"{what}: dictionary learning of {n_frames} frames x {n_neurons} neurons ({n_atoms} atoms) "
            f"needs about {math.ceil(need / 2**20)} MB, more than --mem-mb {mem_mb}. Raise --mem-mb (and "
            "the job's memory), or record fewer neurons (--layers) or a coarser grid (--atom-tr).")
    return need


# --------------------------------------------------------------------------- public API


def sparse_encode(X: ArrayLike, D: ArrayLike, alpha: float, *, init: Optional[ArrayLike] = None,
                  max_iter: int = 2000, tol: float = 1e-6, batch_neurons: int = 16384,
                  device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float64) -> ArrayLike:
    """Lasso codes of the columns of ``X`` on a fixed dictionary ``D``.

    Solves, for every neuron ``j``,
    ``min_a 0.5 ||x_j - D a||^2 + alpha ||a||_1``, the same problem (and
    scaling) as ``sklearn.decomposition.sparse_encode(X.T, D.T,
    algorithm="lasso_cd", alpha=alpha)``.

    Parameters
    ----------
    X : ndarray or tensor, shape (n_frames, n_neurons)
    D : ndarray or tensor, shape (n_frames, n_atoms)
    alpha : float
        Absolute penalty (>= 0).
    init : array, shape (n_atoms, n_neurons), optional
        Warm start.
    max_iter : int
        FISTA iterations per batch at most.
    tol : float
        Stop when the duality gap of a batch is below ``tol`` x its primal value.
    batch_neurons : int
        Neurons coded at once (memory knob).
    device, dtype
        Where and in which precision to compute.

    Returns
    -------
    A : same kind as ``X`` (ndarray or tensor on ``X``'s device), shape (n_atoms, n_neurons)
    """
    dev = _check_device(device)
    Xt = _as_tensor(X, "X", dev, dtype)
    Dt = _as_tensor(D, "D", dev, dtype)
    if Dt.shape[0] != Xt.shape[0]:
        raise DataError(f"D has {Dt.shape[0]} frames but X has {Xt.shape[0]}")
    if alpha < 0 or not np.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number >= 0, got {alpha}")
    K, N = Dt.shape[1], Xt.shape[1]
    if init is None:
        A = torch.zeros((K, N), dtype=dtype, device=dev)
    else:
        A = _as_tensor(init, "init", dev, dtype).clone()
        if tuple(A.shape) != (K, N):
            raise DataError(f"init has shape {tuple(A.shape)}, expected {(K, N)}")
    xsq = (Xt.double() ** 2).sum(0)
    _encode_all(Xt, Dt, A, xsq, float(alpha), int(batch_neurons), int(max_iter), float(tol),
                want_stats=False)
    if isinstance(X, torch.Tensor):
        return A.to(X.device)
    return A.cpu().numpy()


def learn_dictionary(X: ArrayLike, n_atoms: int = 64, alpha: Optional[float] = None, *,
                     sparsity: float = DEFAULT_SPARSITY, frame_times: Optional[np.ndarray] = None,
                     n_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                     device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                     batch_neurons: int = 16384, init: str = "svd", lasso_tol: float = 1e-3,
                     lasso_max_iter: int = 500, progress: bool = True) -> Dictionary:
    """Learn ``X ~ D A`` with unit-norm atoms and L1-sparse loadings.

    Minimises ``0.5 ||X - D A||_F^2 + alpha ||A||_1`` subject to
    ``||d_k||_2 = 1`` (the objective of scikit-learn's ``DictionaryLearning``
    on ``X.T``; see the module docstring).

    Parameters
    ----------
    X : ndarray or tensor, shape (n_frames, n_neurons)
        Neuron responses at the frames, every column z-scored.
    n_atoms : int
        ``K``, the number of atoms (temporal patterns); <= min(n_frames, n_neurons).
    alpha : float, optional
        Absolute penalty. When None (the usual case) it is
        ``alpha_from_sparsity(X, sparsity)``.
    sparsity : float
        Relative penalty in ``[0, 1)`` (the Config's ``sparsity``); ignored when
        ``alpha`` is given.
    frame_times : ndarray, shape (n_frames,), optional
        Times (s) of the frames; stored in the result (default ``arange(T)``).
    n_iter : int
        Alternations (sparse coding + dictionary update) at most. 0 keeps the
        initial atoms: only the final coding pass runs (the lasso loadings of
        all neurons on the given atoms).
    tol : float
        Stop when the objective decreases by less than ``tol`` (relative) in one alternation.
    seed : int
        Seeds the random initialisation (``init="random"``, and the randomized
        SVD when ``n_frames > 4096``). Results are deterministic given the seed.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    dtype : torch.dtype
        ``torch.float32`` (default) or ``torch.float64``.
    batch_neurons : int
        Neurons sparse-coded at once (memory knob).
    init : {"svd", "random"} or array, shape (n_frames, K)
        Initial atoms: the ``K`` leading left singular vectors of ``X``, ``K``
        randomly chosen neurons' responses, or the given atoms (scaled to unit
        norm; a warm start).
    lasso_tol, lasso_max_iter : float, int
        Relative duality-gap tolerance and iteration cap of the lasso solver
        during the alternations; the final coding pass (the returned loadings)
        uses ``lasso_tol / 10``.
    progress : bool
        Log progress at INFO level.

    Returns
    -------
    records.Dictionary
        ``atoms`` (n_frames, K) float64, ``loadings`` csr (K, n_neurons),
        ``r2`` = 1 - RSS / sum of squares of the centred columns, ``objective``,
        ``alpha``, and ``info`` (sparsity, iterations, convergence, timings,
        device, dtype, objective history).
    """
    t0 = time.perf_counter()
    dev = _check_device(device)
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    Xt = _as_tensor(X, "X (neuron responses)", dev, dtype, check_finite=False)  # checked on xsq below
    T, N = Xt.shape
    K = int(n_atoms)
    if K < 1 or K > min(T, N):
        raise DataError(f"n_atoms={n_atoms} must be between 1 and min(n_frames, n_neurons) = "
                        f"min({T}, {N}); use fewer atoms or more frames/neurons")
    if frame_times is None:
        frame_times = np.arange(T, dtype=float)
    frame_times = np.asarray(frame_times, dtype=float)
    if frame_times.shape != (T,):
        raise DataError(f"frame_times has shape {frame_times.shape} but X has {T} frames")
    # one pass over X: ||x_j||^2 give alpha_from_sparsity's scale (the same bits) and the zero columns
    xsq, tss = _column_stats(Xt, batch_neurons)
    finite = torch.isfinite(xsq)
    if not bool(finite.all()):
        _not_finite(Xt, "X (neuron responses)", torch.nonzero(~finite).ravel())
    scale = math.sqrt(_dsum(xsq) / N)  # = alpha_from_sparsity(Xt, 1.0)
    if alpha is None:
        if not np.isfinite(sparsity) or sparsity < 0:
            raise UsageError(f"sparsity must be a finite number >= 0, got {sparsity}")
        alpha = float(sparsity) * scale
        rel = float(sparsity)
    else:
        if alpha < 0 or not np.isfinite(alpha):
            raise UsageError(f"alpha must be a finite number >= 0, got {alpha}")
        rel = float(alpha) / scale if scale > 0 else float("nan")
    alpha = float(alpha)
    if not bool((xsq > 0).all()):
        log.warning("%d of %d neurons have an all-zero response; they get zero loadings",
                    int((xsq == 0).sum()), N)
    D = _init_dict(Xt, K, init, seed)
    A = torch.zeros((K, N), dtype=dtype, device=dev)
    history: list[float] = []
    converged = False
    n_reinit_total = 0
    last_log = time.perf_counter()
    lasso_stats: dict = {}
    if progress:
        log.info("dictionary learning: X %d frames x %d neurons, K=%d, alpha=%.4g (sparsity %.3g), "
                 "%s %s", T, N, K, alpha, rel, dev, str(dtype).replace("torch.", ""))
    it = 0
    for it in range(1, n_iter + 1):
        obj, rss, B, E, lasso_stats = _encode_all(Xt, D, A, xsq, alpha, batch_neurons,
                                                  lasso_max_iter, lasso_tol)
        history.append(obj)
        if len(history) > 1 and abs(history[-2] - obj) <= tol * abs(history[-2]):
            converged = True
            break
        n_reinit_total += _update_dict(D, B, E, Xt, A, rss)
        if progress and (time.perf_counter() - last_log > 5 or it == 1):
            last_log = time.perf_counter()
            log.info("  iteration %d: objective %.6g, R^2 %.4f, %.1f%% non-zero loadings, %.1f s",
                     it, obj, 1 - _dsum(rss) / tss, 100 * float((A != 0).float().mean()),
                     time.perf_counter() - t0)
    last_change = (abs(history[-2] - history[-1]) / abs(history[-2])
                   if len(history) > 1 and history[-2] else float("nan"))
    # final coding pass, tighter: the returned A is the lasso solution for the returned D
    obj, rss, _, _, lasso_stats = _encode_all(Xt, D, A, xsq, alpha, batch_neurons,
                                              4 * lasso_max_iter, lasso_tol / 10, want_stats=False)
    history.append(obj)
    if not converged and n_iter > 0:
        log.warning("dictionary learning stopped after n_iter=%d alternations without reaching "
                    "tol=%g (last relative change %.2g)", n_iter, tol,
                    last_change)
    r2 = 1.0 - _dsum(rss) / tss if tss > 0 else float("nan")
    A_np = A.cpu().double().numpy()
    loadings = sp.csr_matrix(A_np)
    loadings.eliminate_zeros()
    seconds = time.perf_counter() - t0
    info = {
        "sparsity": rel, "n_iter": it, "converged": converged, "tol": tol, "seed": seed,
        "init": init if isinstance(init, str) else "given", "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "n_frames": T, "n_neurons": N, "density": loadings.nnz / float(K * N),
        "n_reinit": n_reinit_total, "seconds": seconds, "objective_history": history,
        **lasso_stats,
    }
    if progress:
        log.info("dictionary learning done: %d alternations (%s), objective %.6g, R^2 %.4f, "
                 "density %.2f%%, %.1f s", it, "converged" if converged else "not converged",
                 obj, r2, 100 * info["density"], seconds)
    return Dictionary(atoms=D.cpu().double().numpy(), loadings=loadings, frame_times=frame_times,
                      r2=r2, objective=float(obj), alpha=alpha, info=info)


def objective(X: np.ndarray, atoms: np.ndarray, loadings, alpha: float) -> float:
    """``0.5 ||X - D A||_F^2 + alpha ||A||_1`` in float64.

    Parameters
    ----------
    X : ndarray, shape (n_frames, n_neurons)
    atoms : ndarray, shape (n_frames, K)
    loadings : ndarray or sparse, shape (K, n_neurons)
    alpha : float
    """
    A = loadings.toarray() if sp.issparse(loadings) else np.asarray(loadings)
    R = np.asarray(X, dtype=np.float64) - np.asarray(atoms, dtype=np.float64) @ A
    return float(0.5 * np.einsum("ij,ij->", R, R) + alpha * np.abs(A).sum())


def project_atoms(X_run: np.ndarray, loadings, *, ridge: float = 1e-6) -> np.ndarray:
    """The atoms' time courses on another frame grid, from their loadings.

    The atoms are *defined* by their loadings: atom ``k`` is the pattern that
    its sub-group of neurons (non-zero entries of row ``k`` of ``A``) share. A
    run whose TR or story onset differs from the reference grid has its own
    frame series ``X_run`` of the same neurons; the least-squares solution of
    ``X_run ~ D_run A`` with ``A`` fixed,

    ``D_run = X_run A^T (A A^T + eps I)^-1``,  ``eps = ridge * trace(A A^T) / K``,

    gives that run its own realisation of the same patterns (on the
    reference grid it returns the learned atoms, up to the small difference
    between a least-squares fit and the unit-norm constrained one). Columns
    are scaled to unit L2 norm, like the learned atoms; an atom with no
    loadings gives a zero column.

    Parameters
    ----------
    X_run : ndarray, shape (n_frames_run, n_neurons)
        The run's column z-scored responses (same neurons, same order).
    loadings : ndarray or scipy.sparse matrix, shape (K, n_neurons)
    ridge : float
        Relative Tikhonov term that keeps nearly collinear loadings stable.

    Returns
    -------
    D_run : ndarray, shape (n_frames_run, K)
    """
    Xr = np.asarray(X_run, dtype=np.float64)
    if Xr.ndim != 2:
        raise DataError(f"X_run must be 2-D (frames x neurons), got shape {Xr.shape}")
    if not np.isfinite(Xr).all():
        raise DataError("X_run holds non-finite values (NaN or inf)")
    A = sp.csr_matrix(loadings, dtype=np.float64)
    K, N = A.shape
    if Xr.shape[1] != N:
        raise DataError(f"X_run has {Xr.shape[1]} neurons but the loadings have {N}")
    XAt = np.asarray((A @ Xr.T).T)          # (T_run, K), sparse x dense
    AAt = np.asarray((A @ A.T).todense())   # (K, K)
    scale = np.trace(AAt) / max(K, 1)
    M = AAt + (ridge * scale if scale > 0 else 1.0) * np.eye(K)
    D = np.linalg.solve(M, XAt.T).T
    norms = np.linalg.norm(D, axis=0)
    D[:, norms > 0] /= norms[norms > 0]
    return D
