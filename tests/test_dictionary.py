"""Sparse dictionary learning: agreement with scikit-learn, recovery, determinism, devices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import DictionaryLearning, MiniBatchDictionaryLearning
from sklearn.decomposition import sparse_encode as sk_sparse_encode

from bids_llm_encode.errors import DataError, UsageError
from bids_llm_encode.patterns.dictionary import (alpha_from_sparsity, learn_dictionary,
                                                 objective, project_atoms, sparse_encode)
from bids_llm_encode.records import Dictionary


def _zscore(X):
    return (X - X.mean(0)) / X.std(0)


def _synthetic(T=100, N=600, K=8, density=0.2, noise=0.3, seed=0):
    """X = D0 A0 + noise, z-scored. Returns X, D0 (T x K unit columns), A0, SNR (power ratio)."""
    rng = np.random.default_rng(seed)
    D0 = rng.standard_normal((T, K))
    D0 /= np.linalg.norm(D0, axis=0)
    A0 = rng.standard_normal((K, N)) * (rng.random((K, N)) < density)
    A0 *= np.sqrt(T)  # each atom contributes at the scale of a z-scored column
    S = D0 @ A0
    E = noise * np.sqrt(S.var()) * rng.standard_normal((T, N))
    snr = S.var() / E.var()
    return _zscore(S + E), D0, A0, snr


def _best_abs_corr(D, D0):
    c = np.abs(np.corrcoef(D.T, D0.T)[:D.shape[1], D.shape[1]:])
    return c.max(0)  # for each true atom, its best match among the learned ones


@pytest.fixture(scope="module")
def small():
    X, D0, A0, snr = _synthetic(T=80, N=400, K=10, density=0.2, noise=0.5, seed=1)
    return X


def test_objective_matches_sklearn_dictionary_learning(small):
    X = small
    alpha = alpha_from_sparsity(X, 0.2)
    ours = learn_dictionary(X, 10, alpha, dtype=torch.float64, progress=False)
    assert isinstance(ours, Dictionary)
    # the stored objective is the objective of the stored atoms and loadings
    assert ours.objective == pytest.approx(objective(X, ours.atoms, ours.loadings, alpha), rel=1e-6)
    dl = DictionaryLearning(n_components=10, alpha=alpha, fit_algorithm="cd",
                            transform_algorithm="lasso_cd", max_iter=300, random_state=0)
    code = dl.fit_transform(X.T)
    sk_obj = objective(X, dl.components_.T, code.T, alpha)
    assert ours.objective <= 1.01 * sk_obj
    np.testing.assert_allclose(np.linalg.norm(ours.atoms, axis=0), 1.0, atol=1e-6)
    assert 0 < ours.r2 < 1
    R = X - ours.atoms @ ours.loadings.toarray()
    assert ours.r2 == pytest.approx(1 - (R ** 2).sum() / ((X - X.mean(0)) ** 2).sum(), rel=1e-6)


def test_objective_no_worse_than_minibatch(small):
    X = small
    alpha = alpha_from_sparsity(X, 0.2)
    ours = learn_dictionary(X, 10, alpha, progress=False)  # float32
    mb = MiniBatchDictionaryLearning(n_components=10, alpha=alpha, batch_size=64, max_iter=50,
                                     random_state=0, transform_algorithm="lasso_cd",
                                     transform_alpha=alpha)
    code = mb.fit_transform(X.T)
    sk_obj = objective(X, mb.components_.T, code.T, alpha)
    assert ours.objective <= 1.01 * sk_obj


def test_sparse_encode_matches_sklearn(small):
    X = small
    rng = np.random.default_rng(3)
    D = rng.standard_normal((X.shape[0], 12))
    D /= np.linalg.norm(D, axis=0)
    alpha = alpha_from_sparsity(X, 0.15)
    A = sparse_encode(X, D, alpha)
    assert A.shape == (12, X.shape[1]) and isinstance(A, np.ndarray)
    A_sk = sk_sparse_encode(X.T, D.T, algorithm="lasso_cd", alpha=alpha).T
    o, o_sk = objective(X, D, A, alpha), objective(X, D, A_sk, alpha)
    assert o <= 1.01 * o_sk and o_sk <= 1.01 * o
    assert 0.02 < (A != 0).mean() < 0.98  # a genuinely sparse, non-trivial code
    # a tensor in, a tensor out; warm start from the solution stays at the solution
    At = sparse_encode(torch.from_numpy(X), torch.from_numpy(D), alpha, init=A)
    assert isinstance(At, torch.Tensor)
    assert objective(X, D, At.numpy(), alpha) == pytest.approx(o, rel=1e-4)


def test_sparsity_one_gives_zero_loadings(small):
    # |<d, x>| <= ||x|| = sqrt(T) for z-scored columns: nothing can pass alpha = sqrt(T)
    # (at exactly 1.0 a neuron identical to an atom sits on the threshold: float rounding)
    d = learn_dictionary(small, 5, sparsity=1.001, n_iter=3, progress=False)
    assert d.loadings.nnz == 0
    assert d.alpha == pytest.approx(1.001 * np.sqrt(small.shape[0]), rel=1e-6)
    dense = learn_dictionary(small, 5, sparsity=0.05, n_iter=20, progress=False)
    sparse = learn_dictionary(small, 5, sparsity=0.4, n_iter=20, progress=False)
    assert sparse.loadings.nnz < dense.loadings.nnz and sparse.r2 < dense.r2


@pytest.mark.parametrize("init", ["svd", "random"])
def test_recovers_known_atoms(init):
    # SNR (signal variance / noise variance) = 1 / 0.3^2 ~ 11
    X, D0, A0, snr = _synthetic(T=100, N=800, K=8, density=0.2, noise=0.3, seed=0)
    assert 9 < snr < 13
    d = learn_dictionary(X, 8, sparsity=0.1, init=init, n_iter=200, tol=1e-6, progress=False)
    best = _best_abs_corr(d.atoms, D0)
    assert best.mean() >= 0.9, best


def test_deterministic_with_seed(small):
    a = learn_dictionary(small, 6, sparsity=0.2, init="random", seed=7, n_iter=20, progress=False)
    b = learn_dictionary(small, 6, sparsity=0.2, init="random", seed=7, n_iter=20, progress=False)
    c = learn_dictionary(small, 6, sparsity=0.2, init="random", seed=8, n_iter=20, progress=False)
    np.testing.assert_array_equal(a.atoms, b.atoms)
    assert (a.loadings != b.loadings).nnz == 0
    assert not np.allclose(a.atoms, c.atoms)


def test_float64_and_float32_agree(small):
    d64 = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float64, n_iter=30, progress=False)
    d32 = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float32, n_iter=30, progress=False)
    assert d64.info["dtype"] == "float64" and d32.info["dtype"] == "float32"
    assert d64.objective == pytest.approx(d32.objective, rel=1e-3)


def test_frame_times_and_input_checks(small):
    ft = 0.75 + 1.5 * np.arange(small.shape[0])
    d = learn_dictionary(small, 4, sparsity=0.2, frame_times=ft, n_iter=5, progress=False)
    np.testing.assert_array_equal(d.frame_times, ft)
    assert d.atoms.shape == (small.shape[0], 4) and d.loadings.shape == (4, small.shape[1])
    assert sp.isspmatrix_csr(d.loadings)
    with pytest.raises(DataError, match="frame_times"):
        learn_dictionary(small, 4, frame_times=ft[:-1], progress=False)
    bad = small.copy()
    bad[3, 5] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        learn_dictionary(bad, 4, progress=False)
    with pytest.raises(DataError, match="n_atoms"):
        learn_dictionary(small[:, :3], 4, progress=False)
    with pytest.raises(DataError, match="2-D"):
        learn_dictionary(small[0], 4, progress=False)
    with pytest.raises(UsageError, match="init"):
        learn_dictionary(small, 4, init="pca", progress=False)


def test_device_argument_is_honoured(small):
    d = learn_dictionary(small, 4, sparsity=0.2, device=torch.device("cpu"), n_iter=3, progress=False)
    assert d.info["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            learn_dictionary(small, 4, device="cuda", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(small):
    cpu = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float64, n_iter=30, progress=False)
    gpu = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float64, device="cuda", n_iter=30,
                           progress=False)
    assert gpu.info["device"].startswith("cuda")
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-4)


def test_batches_do_not_change_the_result(small):
    a = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float64, batch_neurons=64, n_iter=10,
                         progress=False)
    b = learn_dictionary(small, 6, sparsity=0.2, dtype=torch.float64, batch_neurons=100000,
                         n_iter=10, progress=False)
    assert a.objective == pytest.approx(b.objective, rel=1e-5)


def test_project_atoms_recovers_reference_and_other_grid():
    X, D0, A0, _ = _synthetic(T=120, N=800, K=8, density=0.2, noise=0.3, seed=2)
    d = learn_dictionary(X, 8, sparsity=0.1, n_iter=100, progress=False)
    D_ref = project_atoms(X, d.loadings)
    assert D_ref.shape == d.atoms.shape
    np.testing.assert_allclose(np.linalg.norm(D_ref, axis=0), 1.0, atol=1e-9)
    r = np.array([np.corrcoef(D_ref[:, k], d.atoms[:, k])[0, 1] for k in range(8)])
    assert r.min() > 0.95, r  # same atoms, same order, same sign
    # another grid: the same neurons seen at every other frame
    D_half = project_atoms(X[::2], d.loadings)
    r2 = np.array([np.corrcoef(D_half[:, k], d.atoms[::2, k])[0, 1] for k in range(8)])
    assert r2.min() > 0.9, r2
    with pytest.raises(DataError, match="neurons"):
        project_atoms(X[:, :-1], d.loadings)
