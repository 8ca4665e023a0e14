"""Consensus dictionaries from restarts: stable atoms, signs, stability scores, R = 1, memory, options."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from bids_llm_encode.config import Config
from bids_llm_encode.errors import UsageError
from bids_llm_encode.patterns import consensus as cs
from bids_llm_encode.patterns import dictionary as dl

from test_determinism import threads


def _z(X):
    X = X - X.mean(0)
    return X / X.std(0)


def _ar1(rng, T, n, phi):
    e = rng.standard_normal((T + 50, n))
    x = np.zeros_like(e)
    for t in range(1, T + 50):
        x[t] = phi * x[t - 1] + e[t]
    return x[50:]


def planted(T=200, N=2000, K=8, noise=0.7, seed=0):
    """X = D A + noise, built with numpy only (no code under test).

    Atoms: AR(1) series (phi 0.8), unit norm. Codes: every neuron loads on 1 or 2
    atoms, log-normal weights, 3 in 4 positive. Noise: AR(1) too, ``noise`` x the
    scale of one atom's contribution. Returns z-scored float32 X and the atoms.
    """
    rng = np.random.default_rng(seed)
    D = _z(_ar1(rng, T, K, 0.8))
    D /= np.linalg.norm(D, axis=0)
    A = np.zeros((K, N))
    for j in range(N):
        ks = rng.choice(K, size=rng.integers(1, 3), replace=False)
        A[ks, j] = rng.lognormal(0, 0.3, ks.size) * np.where(rng.random(ks.size) < 0.75, 1, -1)
    X = D @ A + noise * _z(_ar1(rng, T, N, 0.8)) / np.sqrt(T)
    return _z(X).astype(np.float32), D


@pytest.fixture(scope="module")
def plant():
    X, D0 = planted()
    fits = {seed: cs.learn_consensus_dictionary(X, 8, restarts=6, seed=seed, progress=False)
            for seed in (0, 1)}
    return X, D0, fits


def test_planted_atoms_are_found_the_same_for_other_seeds(plant):
    X, D0, fits = plant
    a, b = fits[0], fits[1]
    assert a.info["consensus"]["seeds"] != b.info["consensus"]["seeds"]  # disjoint restarts
    assert not set(a.info["consensus"]["seeds"]) & set(b.info["consensus"]["seeds"])
    _, _, r = cs.match_atoms(a.atoms, b.atoms)
    assert r.min() >= 0.9
    _, _, r_true = cs.match_atoms(D0, a.atoms)
    assert r_true.min() >= 0.9
    # the consensus fits as well as a single fit
    single = dl.learn_dictionary(X, 8, progress=False)
    assert a.objective <= single.objective * 1.001


def test_sign_convention_is_the_same_across_seeds(plant):
    X, _, fits = plant
    index, sign, _ = cs.match_atoms(fits[0].atoms, fits[1].atoms)
    assert (sign > 0).all()
    m = cs.mean_series(X)
    for d in fits.values():
        assert (d.atoms.T @ m > 0).all()  # the documented rule
        assert np.allclose(np.linalg.norm(d.atoms, axis=0), 1)
    # flipping an atom and its loadings row gives back the same oriented pair
    d = fits[0]
    flip = np.where(np.arange(8) % 2 == 0, -1.0, 1.0)
    D2, A2, s2 = cs.orient(d.atoms * flip, sp.diags(flip) @ d.loadings, m)
    assert np.allclose(D2, d.atoms) and np.allclose(A2.toarray(), d.loadings.toarray())
    assert np.array_equal(s2, flip)


def test_stability_is_high_for_planted_atoms(plant):
    _, _, fits = plant
    for d in fits.values():
        c = d.info["consensus"]
        assert min(c["stability"]) >= 0.95
        assert min(c["reproducibility"]) >= 0.9
        assert min(c["jaccard"]) >= 0.8
        assert cs.linkable_atoms(d).all()
        t = cs.stability_table(d)
        assert list(t.columns) == list(cs.STABILITY_COLUMNS)
        assert (t["n_agree"] == 6).all() and (t["n_restarts"] == 6).all()
        assert len(c["restart_seconds"]) == 6 and np.isfinite(c["restart_objective"]).all()
        assert np.asarray(c["restart_r"]).shape == (6, 8)


def test_stability_is_low_for_atoms_learned_from_noise():
    X = _z(np.random.default_rng(3).standard_normal((200, 2000))).astype(np.float32)
    d = cs.learn_consensus_dictionary(X, 8, restarts=6, seed=0, progress=False)
    s = cs.atom_stability(d)
    assert s.max() < 0.4
    assert not cs.linkable_atoms(d).any()
    assert cs.linkable_atoms(d, min_stability=0.0).all()


def test_one_restart_is_the_old_single_fit(plant):
    X = plant[0]
    old = dl.learn_dictionary(X, 8, progress=False)
    new = cs.learn_consensus_dictionary(X, 8, restarts=1, seed=5, progress=False)
    assert np.array_equal(old.atoms, new.atoms)
    assert (old.loadings != new.loadings).nnz == 0
    assert old.objective == new.objective and "consensus" not in new.info
    assert cs.atom_stability(new) is None and cs.linkable_atoms(new).all()
    t = cs.stability_table(new)
    assert t["stability"].isna().all() and (t["n_restarts"] == 1).all() and t["linkable"].all()


def test_restart_plan_is_derived_from_the_seed():
    assert cs.restart_seeds(0, 4) == cs.restart_seeds(0, 6)[:4]
    assert not set(cs.restart_seeds(0, 16)) & set(cs.restart_seeds(1, 16))
    cols = cs.restart_neurons(11, 0, 4, "half")
    assert np.array_equal(np.sort(np.concatenate(cols[:2])), np.arange(11))  # complementary halves
    assert not np.array_equal(cols[0], cols[2])
    assert cs.restart_neurons(11, 0, 3, "none") == [None] * 3
    with pytest.raises(UsageError):
        cs.restart_neurons(11, 0, 3, "thirds")


def test_match_atoms_undoes_a_permutation_and_signs():
    rng = np.random.default_rng(0)
    D = rng.standard_normal((50, 6))
    D /= np.linalg.norm(D, axis=0)
    perm = np.array([3, 0, 5, 1, 4, 2])
    sign = np.array([1, -1, 1, -1, -1, 1.0])
    index, s, r = cs.match_atoms(D, D[:, perm] * sign)
    assert np.allclose((D[:, perm] * sign)[:, index] * s, D) and np.allclose(r, 1)


def test_leave_one_out_stability_is_not_inflated_by_few_restarts():
    """Two restarts that correlate at 0.3: each is at 0.81 with their mean, 0.3 with the other."""
    rng = np.random.default_rng(1)
    u, v = np.linalg.qr(rng.standard_normal((40, 2)))[0].T
    a = u
    b = 0.3 * u + np.sqrt(1 - 0.09) * v
    ref = np.stack([a + b], 1)
    c, best_r, _ = cs.consensus_of(ref, [a[:, None], b[:, None]])
    assert np.allclose(best_r, 0.3)
    assert np.allclose(np.abs(c[:, 0] @ a), np.sqrt((1 + 0.3) / 2))


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_consensus_same_bits_with_one_or_two_threads():
    rng = np.random.default_rng(0)
    S = rng.standard_normal((300, 12))
    W = rng.standard_normal((12, 20000)) * (rng.random((12, 20000)) < 0.15)
    X = _z(S @ W + rng.standard_normal((300, 20000))).astype(np.float32)
    out = {}
    for n in (1, 2):
        with threads(n):
            out[n] = cs.learn_consensus_dictionary(X, 8, restarts=4, n_iter=5, refine_iter=3, progress=False)
    assert np.array_equal(out[1].atoms, out[2].atoms)
    assert (out[1].loadings != out[2].loadings).nnz == 0
    assert out[1].info["consensus"]["stability"] == out[2].info["consensus"]["stability"]


def test_refine_iter_zero_keeps_the_consensus_atoms(plant):
    X = plant[0]
    d = cs.learn_consensus_dictionary(X, 8, restarts=4, refine_iter=0, progress=False)
    assert np.allclose(d.info["consensus"]["consensus_r"], 1.0)
    assert d.info["n_iter"] == 0


def test_memory_estimate_counts_the_restarts():
    T, N, K = 1000, 131072, 64
    one = dl.dictionary_memory_bytes(T, N, K)
    assert cs.consensus_memory_bytes(T, N, K, restarts=1) == one
    more = cs.consensus_memory_bytes(T, N, K, restarts=16)
    assert more >= one + 4 * T * (N // 2) + 16 * (8 * T * K + K * N // 8)
    assert cs.consensus_memory_bytes(T, N, K, restarts=32) > more
    with pytest.raises(UsageError, match="16 restarts.*--mem-mb 1000"):
        cs.check_memory(T, N, K, 1000, "story pieman", restarts=16)
    cs.check_memory(T, N, K, more // 2**20 + 1, "story pieman", restarts=16)


def test_options_and_defaults(tmp_path):
    from bids_llm_encode.cli import parse_config

    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant")
    assert cfg.restarts == cs.DEFAULT_RESTARTS and cfg.min_stability == cs.DEFAULT_MIN_STABILITY
    cfg = parse_config([str(tmp_path), str(tmp_path / "o"), "participant", "--restarts", "1",
                        "--min-stability", "0.9"])
    assert cfg.restarts == 1 and cfg.min_stability == 0.9
    for name, value in (("restarts", 0), ("restarts", 2.5), ("min_stability", 1.5), ("min_stability", -0.1)):
        bad = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                     **{name: value})
        with pytest.raises(UsageError, match="--" + name.replace("_", "-")):
            bad.validate()


def test_story_dictionary_caches_by_restarts(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bids_llm_encode.bids.stimuli import read_gentle_csv
    from bids_llm_encode.cache import Cache
    from bids_llm_encode.workflows import stimulus

    p = tmp_path / "align.csv"
    p.write_text("".join(f"w{i},w{i},{i * 0.5},{i * 0.5 + 0.4}\n" for i in range(300)))
    story = read_gentle_csv(p, "s")
    acts = SimpleNamespace(values=np.random.default_rng(0).standard_normal((300, 120)).astype(np.float32),
                           card={"identity": "x", "cache_key": "y"})
    monkeypatch.setattr(stimulus, "story_activations", lambda *a: acts)
    cache = Cache(tmp_path / "cache")
    base = dict(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant", n_atoms=6)
    _, one = stimulus.story_dictionary(story, Config(**base, restarts=1), cache)
    _, four = stimulus.story_dictionary(story, Config(**base, restarts=4), cache)
    assert "consensus" not in one.info and four.info["consensus"]["restarts"] == 4
    assert len(four.info["consensus"]["stability"]) == 6
    _, again = stimulus.story_dictionary(story, Config(**base, restarts=4), cache)  # from the cache
    assert np.array_equal(again.atoms, four.atoms) and again.info == four.info
    assert cs.linkable_atoms(again).shape == (6,)
