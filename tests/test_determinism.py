"""Dictionary learning gives the same bits for any thread count (--nprocs), and bounds its memory."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from bids_llm_encode.patterns import dictionary as dl


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_deterministic_sum_is_thread_independent():
    """A plain full torch sum changes with the thread count; _dsum does not."""
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((700, 40000)))
    with threads(1):
        a = dl._dsum(x)
    with threads(2):
        b = dl._dsum(x)
    assert a == b
    assert dl._dsum(x[0]) == float(np.sum(x[0].numpy()))


def _neurons(T=240, N=40000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((T, 20))
    W = rng.standard_normal((20, N)) * (rng.random((20, N)) < 0.15)
    X = S @ W + rng.standard_normal((T, N))
    return ((X - X.mean(0)) / X.std(0)).astype(np.float32)


@pytest.mark.skipif(torch.get_num_threads() < 2 and (__import__("os").cpu_count() or 1) < 2,
                    reason="needs 2 CPU cores")
def test_dictionary_same_bits_with_one_or_two_threads():
    # 600 frames: the SVD start's eigh and the solver's sums then depend on the thread count
    # without the fix (measured: atoms 4e-8, loadings 8e-6 apart after 8 alternations)
    X = _neurons(T=600, N=20000)
    out = {}
    for n in (1, 2):
        with threads(n):
            out[n] = dl.learn_dictionary(X, n_atoms=16, sparsity=0.15, n_iter=8, progress=False)
    assert np.array_equal(out[1].atoms, out[2].atoms)
    assert (out[1].loadings != out[2].loadings).nnz == 0
    assert out[1].r2 == out[2].r2 and out[1].objective == out[2].objective


def test_memory_estimate_and_refusal():
    T, N, K = 1000, 17280, 64
    need = dl.dictionary_memory_bytes(T, N, K)
    assert need >= 4 * T * N  # X itself
    svd = 8 * T * 16384 + 16 * T * T  # the SVD start's float64 batch and X X^T (T <= 4,096)
    assert need <= dl.MEMORY_FACTOR * T * N + 24 * K * N + svd + 100 * 2**20  # the documented bound
    assert dl.dictionary_memory_bytes(2 * T, N, K) > need  # grows with frames ...
    assert dl.dictionary_memory_bytes(T, 2 * N, K) > need  # ... and neurons
    from bids_llm_encode.errors import UsageError

    with pytest.raises(UsageError, match="--mem-mb 10"):
        dl.check_memory(T, N, K, mem_mb=10, what="story pieman")
    dl.check_memory(T, N, K, mem_mb=need // 2**20 + 1, what="story pieman")
    dl.check_memory(T, N, K, mem_mb=None, what="story pieman")


def test_story_dictionary_refuses_a_too_small_mem_mb_before_learning(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bids_llm_encode.bids.stimuli import read_gentle_csv
    from bids_llm_encode.cache import Cache
    from bids_llm_encode.config import Config
    from bids_llm_encode.errors import UsageError
    from bids_llm_encode.workflows import stimulus

    p = tmp_path / "align.csv"
    p.write_text("".join(f"w{i},w{i},{i * 0.5},{i * 0.5 + 0.4}\n" for i in range(400)))
    story = read_gentle_csv(p, "s")
    acts = SimpleNamespace(values=np.zeros((400, 200000), dtype=np.float16), card={"identity": "x"})
    monkeypatch.setattr(stimulus, "story_activations", lambda *a: acts)
    monkeypatch.setattr(dl, "learn_dictionary", lambda *a, **k: pytest.fail("must refuse first"))
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant", mem_mb=100)
    with pytest.raises(UsageError, match="story s: .* --mem-mb 100"):
        stimulus.story_dictionary(story, cfg, Cache(tmp_path / "cache"))
    assert not Cache(tmp_path / "cache").has("dictionary", "any")


def test_dictionary_cache_key_holds_the_device_and_dtype(tmp_path, monkeypatch):
    """A dictionary learned on cuda is not read by a CPU run (their last bits differ), nor the reverse."""
    from types import SimpleNamespace

    import scipy.sparse as sp

    from bids_llm_encode.bids.stimuli import read_gentle_csv
    from bids_llm_encode.cache import Cache
    from bids_llm_encode.config import Config
    from bids_llm_encode.records import Dictionary
    from bids_llm_encode.workflows import stimulus

    p = tmp_path / "align.csv"
    p.write_text("".join(f"w{i},w{i},{i * 0.5},{i * 0.5 + 0.4}\n" for i in range(40)))
    story = read_gentle_csv(p, "s")
    acts = SimpleNamespace(values=np.ones((40, 30), dtype=np.float32), card={"identity": "x"})
    monkeypatch.setattr(stimulus, "story_activations", lambda *a: acts)
    monkeypatch.setattr(stimulus, "neuron_series", lambda s, a, grid, c: np.zeros((len(grid), 30)))
    learned = []

    def fake_learn(X, n_atoms, device, frame_times, **kw):
        learned.append(device)
        assert str(kw["dtype"]) == "torch.float32"
        return Dictionary(atoms=np.zeros((len(frame_times), n_atoms)), loadings=sp.csr_matrix((n_atoms, 30)),
                          frame_times=frame_times, r2=0.5, objective=1.0, alpha=0.1, info={"device": device})

    from bids_llm_encode.patterns import consensus

    monkeypatch.setattr(consensus, "learn_consensus_dictionary", fake_learn)
    assert stimulus.DICTIONARY_DTYPE == "float32"
    cache = Cache(tmp_path / "cache")
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant", n_atoms=4,
                 device="cpu")
    for device in ("cpu", "cuda", "cpu", "cuda"):
        monkeypatch.setattr(stimulus, "torch_device", lambda d, device=device: device)
        _, d = stimulus.story_dictionary(story, cfg, cache)
        assert d.info["device"] == device  # never the other device's entry
    assert learned == ["cpu", "cuda"]  # each learned once, then read from the cache


# ----------------------------------------------------------------------------- the whole participant level

#: The documented tolerance of --nprocs 1 vs 2 (docs/usage.md, --nprocs): the encoding's BLAS
#: products (OpenBLAS sgemm) round differently with the thread count. Measured on the demo
#: (sub-01, 20 shifts): atom z 7.2e-6, effect 6.6e-7, CV r 0.0020 and CV R^2 0.0015 (3 of 29,398
#: voxels beyond 1e-4: a ridge penalty that flips between two tied ones), CV p 0.0010; FDR masks,
#: overlaps, links, atoms and loadings identical.
NPROCS_TOL = {"effect": 1e-4, "z": 1e-4, "cv_r": 5e-3, "cv_r2": 5e-3, "p": 5e-3}


@contextlib.contextmanager
def all_threads(n: int):
    from threadpoolctl import threadpool_limits

    with threads(n), threadpool_limits(limits=n):
        yield


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_encoding_and_links_within_the_documented_tolerance_with_one_or_two_threads():
    """The stages after the dictionary, as the participant level calls them, at 1 and 2 threads."""
    import nibabel as nib

    from bids_llm_encode.encoding.fit import RunData, fit_encoding
    from bids_llm_encode.networks.overlap import correspondence, links_table
    from bids_llm_encode.records import Atlas

    rng = np.random.default_rng(5)
    T, K = 300, 4
    ijk = np.stack(np.meshgrid(*[np.arange(18)] * 3, indexing="ij"), -1)
    brain = ((ijk - 8.5) ** 2).sum(-1) <= 8**2  # a ball in an 18^3 box
    nets = np.zeros(brain.shape, int)  # four networks: 5^3 cubes inside the ball
    for k, c in enumerate([(3, 6, 6), (9, 3, 9), (6, 11, 5), (11, 9, 11)], 1):
        nets[c[0]:c[0] + 5, c[1]:c[1] + 5, c[2]:c[2] + 5] = k
    net = nets[brain]
    V = int(brain.sum())
    D = rng.standard_normal((T, K)).astype(np.float32)
    D = np.apply_along_axis(lambda x: np.convolve(x, np.hanning(8), "same"), 0, D).astype(np.float32)
    W = np.zeros((K, V), np.float32)
    W[0, net == 1], W[1, net == 3] = 0.5, -0.5  # atom 0 -> A (activation), atom 1 -> C (deactivation)
    Y = D @ W + rng.standard_normal((T, V)).astype(np.float32)
    baseline = rng.standard_normal((T, 2))
    mask_img = nib.Nifti1Image(brain.astype(np.uint8), np.diag([3.0, 3.0, 3.0, 1.0]))
    atlas = Atlas("cubes", np.stack([net == k for k in range(1, 5)]), tuple("ABCD"))
    out = {}
    for n in (1, 2):
        with all_threads(n):
            enc = fit_encoding([RunData(Y=Y, design=D, baseline=baseline, name="r")], cv_folds=5,
                               n_permutations=20, seed=0, n_targets_batch=20000)
            corr = correspondence(enc.z, mask_img, atlas, threshold=3.1, n_null=1000, seed=0)
        out[n] = enc, corr, links_table(corr)
    (e1, c1, l1), (e2, c2, l2) = out[1], out[2]
    for name, tol in NPROCS_TOL.items():
        diff = float(np.max(np.abs(getattr(e1, name).astype(np.float64) - getattr(e2, name))))
        assert diff <= tol, f"{name}: {diff} > {tol}"
    assert np.array_equal(e1.significant, e2.significant)
    assert {(0, "A", "activation"), (1, "C", "deactivation")} <= set(zip(l1["atom"], l1["network"],
                                                                          l1["sign"]))  # found ...
    pd_testing = __import__("pandas").testing
    pd_testing.assert_frame_equal(l1, l2)  # ... and are the same with either thread count
    pd_testing.assert_frame_equal(c1[["atom", "network", "sign", "linked"]], c2[["atom", "network", "sign",
                                                                                 "linked"]])


def test_neuron_series_equals_the_dense_frame_series():
    """neuron_series (frame_series: the word -> frame matrix sparse, by blocks of words and neurons, each
    block centred) gives the values of the dense product, centred and z-scored in float64 at once."""
    from pathlib import Path

    from bids_llm_encode.config import Config
    from bids_llm_encode.records import Story, WordActivations
    from bids_llm_encode.signal.frames import words_to_frame_matrix
    from bids_llm_encode.workflows import stimulus

    rng = np.random.default_rng(0)
    W, N = 2500, 1500  # > one block of words (2,048) and of neurons (1,024)
    vals = (rng.standard_normal((W, N)) + 3).astype(np.float32)
    vals[:, 7] = 2.0  # a constant neuron: zeros after centring and z-scoring
    starts = 0.5 + np.concatenate([[0.0], np.cumsum(rng.gamma(4.0, 0.1, W - 1))])
    story = Story("s", ("w",) * W, starts, starts + 0.3, np.ones(W, bool), Path("s.csv"))
    acts = WordActivations(values=vals, layer=np.zeros(N, int), unit=np.arange(N), card={})
    for centring in ("mean", "none"):
        cfg = Config(bids_dir=Path("."), output_dir=Path("o"), analysis_level="participant",
                     an_centering=centring)
        v = vals.astype(np.float64)
        if centring == "mean":
            v = v - v.mean(axis=0)
        for ft in (stimulus.reference_frame_times(story, 1.5), np.arange(-10.0, 300.0, 1.5)):  # a run's grid
            X = words_to_frame_matrix(starts, ft, cfg.hrf) @ v  # dense, all words and neurons at once
            sd = X.std(axis=0)
            flat = sd <= 1e-9 * np.abs(X).max(axis=0).clip(1.0)
            dense = np.where(flat, 0.0, (X - X.mean(axis=0)) / np.where(flat, 1.0, sd))
            blocks = stimulus.neuron_series(story, acts, ft, cfg)
            assert blocks.dtype == np.float32 and blocks.shape == dense.shape
            np.testing.assert_allclose(blocks, dense, rtol=0, atol=1e-5)
            assert (not blocks[:, 7].any()) == (centring == "mean")  # centred, the constant neuron is 0


def test_dictionary_checks_do_not_copy_the_whole_matrix():
    """The finite and all-zero checks are read from the column statistics, computed by column blocks
    (a whole-matrix isfinite held 6.7 bytes/entry): a NaN is still found and named."""
    X = torch.zeros((5, 5000))
    X[:, :4999] = 1.0
    xsq, _ = dl._column_stats(X, 16384)
    assert bool(torch.isfinite(xsq).all()) and int((xsq == 0).sum()) == 1
    X[2, 4500] = float("nan")
    assert not bool(torch.isfinite(dl._column_stats(X, 16384)[0]).all())
    from bids_llm_encode.errors import DataError

    with pytest.raises(DataError, match="holds 1 non-finite"):
        dl.learn_dictionary(X.numpy(), n_atoms=2, progress=False)
