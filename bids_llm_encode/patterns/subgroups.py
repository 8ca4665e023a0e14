"""Artificial-neuron sub-groups of the atoms (method.md section 3).

The sub-group of atom ``k`` is the set of neurons that load on it: the
non-zero entries of row ``k`` of the loadings ``A`` (``mode="nonzero"``), or
only the ``q`` largest in magnitude (``mode="top-<q>"``, ``q`` a fraction of
the neurons such as ``top-0.01`` or a count such as ``top-100``; ties and
zero loadings never enter). The outputs writer saves the loadings as a scipy
``.npz`` and :func:`loadings_table` as a TSV.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import DataError, UsageError


def _check(loadings, layer) -> tuple[sp.csr_matrix, np.ndarray]:
    if not sp.issparse(loadings):
        arr = np.asarray(loadings)
        if arr.ndim != 2:
            raise DataError(f"loadings must be 2-D (atoms x neurons), got shape {arr.shape}")
        loadings = sp.csr_matrix(arr)
    A = sp.csr_matrix(loadings)
    A.eliminate_zeros()
    layer = np.asarray(layer)
    if layer.shape != (A.shape[1],):
        raise DataError(f"layer has shape {layer.shape} but the loadings have {A.shape[1]} neurons")
    if layer.size and (not np.issubdtype(layer.dtype, np.integer) or layer.min() < 0):
        raise DataError("layer must hold non-negative integers (0-based transformer layer of each neuron)")
    return A, layer.astype(np.int64)


def parse_mode(mode: str, n_neurons: int) -> int | None:
    """Number of neurons kept per atom for ``mode`` (None = every non-zero loading).

    Parameters
    ----------
    mode : str
        ``"nonzero"``, ``"top-<fraction>"`` (``0 < fraction < 1``; rounded up)
        or ``"top-<count>"`` (an integer >= 1).
    n_neurons : int
    """
    if mode == "nonzero":
        return None
    if isinstance(mode, str) and mode.startswith("top-"):
        text = mode[4:]
        try:
            q = float(text)
        except ValueError:
            q = float("nan")
        if 0 < q < 1:
            return max(1, math.ceil(q * n_neurons))
        if q >= 1 and float(q).is_integer() and "." not in text:
            return int(q)
    raise UsageError(f"subgroup mode must be 'nonzero', 'top-<fraction in (0,1)>' or "
                     f"'top-<count>', got {mode!r}")


def membership(loadings, mode: str = "nonzero") -> sp.csr_matrix:
    """Boolean sub-group membership.

    Parameters
    ----------
    loadings : scipy.sparse matrix or ndarray, shape (n_atoms, n_neurons)
    mode : str
        See :func:`parse_mode`.

    Returns
    -------
    csr_matrix of bool, shape (n_atoms, n_neurons)
        Entry ``(k, j)`` is True when neuron ``j`` is in atom ``k``'s sub-group.
        In top-q mode the ``q`` largest ``|loading|`` (non-zero only; ties broken
        by the lower neuron index) are kept.
    """
    A = sp.csr_matrix(loadings)
    A.eliminate_zeros()
    q = parse_mode(mode, A.shape[1])
    rows, cols = [], []
    for k in range(A.shape[0]):
        idx = A.indices[A.indptr[k]:A.indptr[k + 1]]
        val = np.abs(A.data[A.indptr[k]:A.indptr[k + 1]])
        if q is not None and idx.size > q:
            order = np.lexsort((idx, -val))[:q]
            idx = idx[order]
        rows.append(np.full(idx.size, k))
        cols.append(np.sort(idx))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    return sp.csr_matrix((np.ones(r.size, dtype=bool), (r, c)), shape=A.shape)


def subgroups(loadings, layer, mode: str = "nonzero", n_layers: int | None = None) -> pd.DataFrame:
    """One row per atom describing its neuron sub-group.

    Parameters
    ----------
    loadings : scipy.sparse matrix or ndarray, shape (n_atoms, n_neurons)
        The dictionary's loadings ``A``.
    layer : ndarray of int, shape (n_neurons,)
        0-based transformer layer of each neuron.
    mode : str
        ``"nonzero"`` or ``"top-<q>"`` (see :func:`parse_mode`).
    n_layers : int, optional
        Number of histogram columns (default ``max(layer) + 1``).

    Returns
    -------
    pandas.DataFrame
        Columns ``atom`` (0-based), ``size`` (neurons in the sub-group),
        ``n_positive``, ``n_negative`` (by sign of the loading), ``fraction``
        (size / n_neurons), ``mean_abs_loading``, then ``layer_00``,
        ``layer_01``, ... : how many of the sub-group's neurons lie in each
        layer (they sum to ``size``).
    """
    A, layer = _check(loadings, layer)
    K, N = A.shape
    L = int(n_layers) if n_layers is not None else (int(layer.max()) + 1 if N else 0)
    if N and layer.max() >= L:
        raise DataError(f"layer holds {layer.max()} but n_layers={L}")
    M = membership(A, mode)
    S = A.multiply(M).tocsr()  # loadings restricted to the sub-groups
    S.eliminate_zeros()
    sizes = np.diff(M.indptr)
    pos = np.asarray((S > 0).sum(1)).ravel()
    neg = np.asarray((S < 0).sum(1)).ravel()
    absum = np.asarray(abs(S).sum(1)).ravel()
    width = max(2, len(str(max(L - 1, 0))))
    hist = np.zeros((K, L), dtype=np.int64)
    for k in range(K):
        cols = M.indices[M.indptr[k]:M.indptr[k + 1]]
        hist[k] = np.bincount(layer[cols], minlength=L)[:L]
    df = pd.DataFrame({
        "atom": np.arange(K), "size": sizes.astype(np.int64),
        "n_positive": pos.astype(np.int64), "n_negative": neg.astype(np.int64),
        "fraction": sizes / float(N) if N else np.zeros(K),
        "mean_abs_loading": np.divide(absum, sizes, out=np.zeros(K), where=sizes > 0),
    })
    for li in range(L):
        df[f"layer_{li:0{width}d}"] = hist[:, li]
    return df


def loadings_table(loadings, layer, unit) -> pd.DataFrame:
    """The non-zero loadings in long format, for a TSV.

    Parameters
    ----------
    loadings : scipy.sparse matrix or ndarray, shape (n_atoms, n_neurons)
    layer : ndarray of int, shape (n_neurons,)
        0-based transformer layer of each neuron.
    unit : ndarray of int, shape (n_neurons,)
        Index of each neuron within its layer.

    Returns
    -------
    pandas.DataFrame
        Columns ``atom``, ``neuron`` (column index in X), ``layer``, ``unit``,
        ``loading``; one row per non-zero entry, sorted by atom then
        decreasing ``|loading|``.
    """
    A, layer = _check(loadings, layer)
    unit = np.asarray(unit)
    if unit.shape != layer.shape:
        raise DataError(f"unit has shape {unit.shape} but the loadings have {A.shape[1]} neurons")
    coo = A.tocoo()
    df = pd.DataFrame({"atom": coo.row.astype(np.int64), "neuron": coo.col.astype(np.int64),
                       "layer": layer[coo.col], "unit": unit[coo.col].astype(np.int64),
                       "loading": coo.data.astype(np.float64)})
    df["_abs"] = -df["loading"].abs()
    df = df.sort_values(["atom", "_abs", "neuron"], kind="mergesort").drop(columns="_abs")
    return df.reset_index(drop=True)
