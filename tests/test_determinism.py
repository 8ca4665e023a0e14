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
    assert need <= dl.MEMORY_FACTOR * T * N + 24 * K * N + 100 * 2**20  # the documented bound
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

    monkeypatch.setattr(dl, "learn_dictionary", fake_learn)
    assert stimulus.DICTIONARY_DTYPE == "float32"
    cache = Cache(tmp_path / "cache")
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant", n_atoms=4,
                 device="cpu")
    for device in ("cpu", "cuda", "cpu", "cuda"):
        monkeypatch.setattr(stimulus, "torch_device", lambda d, device=device: device)
        _, d = stimulus.story_dictionary(story, cfg, cache)
        assert d.info["device"] == device  # never the other device's entry
    assert learned == ["cpu", "cuda"]  # each learned once, then read from the cache
