"""AN sub-groups of the atoms: sizes, signs, layer histograms, top-q, long table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bids_llm_encode.errors import DataError, UsageError
from bids_llm_encode.patterns.dictionary import learn_dictionary
from bids_llm_encode.patterns.subgroups import loadings_table, membership, parse_mode, subgroups


@pytest.fixture(scope="module")
def learned():
    """Loadings learned from a real (small) dictionary problem, 4 layers x 50 units."""
    rng = np.random.default_rng(0)
    T, N, K = 60, 200, 6
    D0 = rng.standard_normal((T, K))
    A0 = rng.standard_normal((K, N)) * (rng.random((K, N)) < 0.25)
    X = D0 @ A0 + 0.3 * rng.standard_normal((T, N))
    X = (X - X.mean(0)) / X.std(0)
    d = learn_dictionary(X, K, sparsity=0.2, n_iter=30, progress=False)
    layer = np.repeat(np.arange(4), 50)
    unit = np.tile(np.arange(50), 4)
    return d.loadings, layer, unit


def test_nonzero_sizes_signs_and_histogram(learned):
    A, layer, unit = learned
    assert 0 < A.nnz < A.shape[0] * A.shape[1]
    df = subgroups(A, layer)
    dense = A.toarray()
    assert list(df["atom"]) == list(range(A.shape[0]))
    np.testing.assert_array_equal(df["size"], (dense != 0).sum(1))
    np.testing.assert_array_equal(df["n_positive"], (dense > 0).sum(1))
    np.testing.assert_array_equal(df["n_negative"], (dense < 0).sum(1))
    hist_cols = [c for c in df.columns if c.startswith("layer_")]
    assert hist_cols == ["layer_00", "layer_01", "layer_02", "layer_03"]
    np.testing.assert_array_equal(df[hist_cols].sum(axis=1), df["size"])
    for li in range(4):
        np.testing.assert_array_equal(df[f"layer_{li:02d}"], (dense[:, layer == li] != 0).sum(1))


def test_top_q_count_and_fraction(learned):
    A, layer, _ = learned
    dense = A.toarray()
    nnz = (dense != 0).sum(1)
    df = subgroups(A, layer, mode="top-5")
    np.testing.assert_array_equal(df["size"], np.minimum(nnz, 5))
    M = membership(A, "top-5").toarray()
    for k in range(A.shape[0]):
        kept = np.abs(dense[k, M[k]])
        dropped = np.abs(dense[k, ~M[k] & (dense[k] != 0)])
        if dropped.size:
            assert kept.min() >= dropped.max()
    dff = subgroups(A, layer, mode="top-0.01")  # ceil(0.01 * 200) = 2
    np.testing.assert_array_equal(dff["size"], np.minimum(nnz, 2))
    hist_cols = [c for c in dff.columns if c.startswith("layer_")]
    np.testing.assert_array_equal(dff[hist_cols].sum(axis=1), dff["size"])


def test_parse_mode():
    assert parse_mode("nonzero", 1000) is None
    assert parse_mode("top-100", 1000) == 100
    assert parse_mode("top-0.01", 1000) == 10
    assert parse_mode("top-0.0001", 1000) == 1
    for bad in ("top-", "top-0", "top-1.5", "top-abc", "all", "top--3"):
        with pytest.raises(UsageError):
            parse_mode(bad, 1000)


def test_loadings_table(learned):
    A, layer, unit = learned
    tab = loadings_table(A, layer, unit)
    assert list(tab.columns) == ["atom", "neuron", "layer", "unit", "loading"]
    assert len(tab) == A.nnz
    dense = A.toarray()
    np.testing.assert_allclose(tab["loading"], dense[tab["atom"], tab["neuron"]])
    np.testing.assert_array_equal(tab["layer"], layer[tab["neuron"]])
    np.testing.assert_array_equal(tab["unit"], unit[tab["neuron"]])
    for _, g in tab.groupby("atom"):
        assert np.all(np.diff(np.abs(g["loading"].to_numpy())) <= 0)
    # round trip through a TSV and back to the sparse matrix
    back = sp.csr_matrix((tab["loading"], (tab["atom"], tab["neuron"])), shape=A.shape)
    assert abs(back - A).max() == 0


def test_input_checks(learned):
    A, layer, unit = learned
    with pytest.raises(DataError, match="neurons"):
        subgroups(A, layer[:-1])
    with pytest.raises(DataError, match="non-negative integers"):
        subgroups(A, layer.astype(float))
    with pytest.raises(DataError, match="unit"):
        loadings_table(A, layer, unit[:-1])
    # a dense array is accepted as well
    pd.testing.assert_frame_equal(subgroups(A.toarray(), layer), subgroups(A, layer))
