"""Organization metrics on a hand-made case with known answers, and their chance levels
against brute force (every subset of a small dictionary enumerated)."""

import json
import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.errors import DataError
from bids_llm_encode.networks.metrics import (PER_NETWORK_COLUMNS, assignment_entropy, linkable_atoms,
                                              organization_metrics)


@pytest.fixture
def case():
    t = np.linspace(0, 6 * np.pi, 200)
    s, c = np.sin(t), np.cos(t)  # orthogonal over whole periods: r(s, c) ~ 0
    atoms = np.column_stack([s, s, -s, c])  # r01 = 1, r02 = r12 = -1, r.3 = 0
    links = pd.DataFrame({
        "atom": [0, 1, 2, 3, 3],
        "network": ["Auditory", "Auditory", "Auditory", "Visual", "Language"],
        "sign": ["activation", "activation", "deactivation", "activation", "activation"],
    })
    layers = pd.DataFrame({"atom": [0, 1, 2, 3], "size": [3, 2, 1, 4],
                           "layer_00": [1, 0, 1, 4], "layer_01": [2, 2, 0, 0]})
    enc = np.array([0.0, 0.01, 0.02, 0.03, np.nan, 0.1])
    return atoms, links, layers, enc


def test_known_answers(case):
    atoms, links, layers, enc = case
    summary, per = organization_metrics(links, atoms, layers, 0.55, enc,
                                        networks=["Auditory", "Visual", "Language", "Default"])
    per = per.set_index("network")
    aud = per.loc["Auditory"]
    assert (aud.n_atoms_activate, aud.n_atoms_deactivate, aud.n_atoms_linked) == (2, 1, 3)
    # |r| of pairs (0,1), (0,2), (1,2) = 1: atom 2 (-s) deactivates what s activates, consistently
    assert aud.consistency_r == pytest.approx(1.0, abs=1e-6) and aud.consistency_n == 3
    # all C(4, 3) = 4 sets enumerated: {0,1,2} -> 1, the three sets with atom 3 -> 1/3
    assert aud.consistency_null_sets == 4
    assert aud.consistency_p == pytest.approx(1 / 4)
    assert aud.consistency_chance_mean == pytest.approx(0.5, abs=1e-6)
    assert aud.consistency_chance_lo == pytest.approx(1 / 3, abs=1e-6)
    assert aud.consistency_chance_hi == pytest.approx(1 / 3 + 0.925 * 2 / 3, abs=1e-6)  # numpy's linear
    assert (aud.layer_00, aud.layer_01) == (2, 4)
    assert math.isnan(per.loc["Visual", "consistency_r"]) and per.loc["Visual", "consistency_n"] == 1
    assert math.isnan(per.loc["Visual", "consistency_p"]) and per.loc["Visual", "consistency_null_sets"] == 0
    assert summary["consistency_r"] == pytest.approx(1.0, abs=1e-6)
    assert summary["consistency_networks"] == 1 and summary["consistency_n_mean"] == 3
    assert summary["consistency_pool_atoms"] == 4
    assert per.loc["Default", "n_atoms_linked"] == 0 and per.loc["Default", "layer_00"] == 0
    # diversity: pairs 01:0, 02:0, 03:1, 12:0, 13:1, 23:1 -> 1 - |r| mean = 0.5
    assert summary["diversity_1_minus_abs_r"] == pytest.approx(0.5, abs=1e-3)
    # assignment: atoms 0,1,2 -> Auditory (3); atom 3 -> 0.5 Visual, 0.5 Language
    p = np.array([3, 0.5, 0.5]) / 4
    assert summary["assignment_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert summary["assignment_entropy_max_bits"] == pytest.approx(2.0)
    assert summary["n_linked_atoms"] == 4 and summary["n_links"] == 5
    assert summary["encoding_r2"]["median"] == pytest.approx(0.02)
    assert summary["encoding_r2"]["max"] == pytest.approx(0.1)
    assert summary["encoding_r2"]["n_voxels"] == 5
    assert summary["dictionary_r2"] == 0.55
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became None


def test_full_correspondence_table_uses_linked_rows_only(case):
    atoms, links, layers, enc = case
    full = links.assign(linked=[True, True, True, True, False])
    s, per = organization_metrics(full, atoms, layers, 0.5, enc)
    assert "Language" not in set(per.network)
    assert s["assignment_entropy_bits"] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))


def test_entropy_extremes():
    one = pd.DataFrame({"atom": [0, 1, 2], "network": ["A"] * 3})
    even = pd.DataFrame({"atom": [0, 1, 2, 3], "network": ["A", "B", "C", "D"]})
    assert assignment_entropy(one) == 0.0
    assert assignment_entropy(even) == pytest.approx(2.0)
    assert math.isnan(assignment_entropy(one.iloc[:0]))


def test_bad_inputs(case):
    atoms, links, layers, enc = case
    with pytest.raises(DataError, match="outside"):
        organization_metrics(links.assign(atom=[0, 1, 2, 9, 3]), atoms, layers, 0.5, enc)
    with pytest.raises(DataError, match="signs"):
        organization_metrics(links.assign(sign="up"), atoms, layers, 0.5, enc)
    with pytest.raises(DataError, match="layer"):
        organization_metrics(links, atoms, layers[["atom", "size"]], 0.5, enc)


# --------------------------------------------------------------- chance levels
def smooth_atoms(n_frames=150, K=12, seed=0):
    """Autocorrelated atoms (smoothed random walks), unit norm, as a dictionary's are."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_frames, K)).cumsum(axis=0)
    x -= x.mean(axis=0)
    return x / np.linalg.norm(x, axis=0)


def layers_for(K):
    return pd.DataFrame({"atom": np.arange(K), "layer_00": np.ones(K, int)})


def brute_force(atoms, linked, pool):
    """Exact chance of the mean pairwise |r|: every subset of the pool of the linked set's size."""
    def stat(idx):
        r = np.corrcoef(atoms[:, list(idx)].T)
        return np.mean([abs(r[i, j]) for i, j in combinations(range(len(idx)), 2)])

    obs = stat(linked)
    null = np.array([stat(c) for c in combinations(pool, len(linked))])
    return obs, null, np.mean(null >= obs - 1e-12)


def links_of(sets: dict) -> pd.DataFrame:
    rows = [(a, net, "activation" if k % 2 == 0 else "deactivation")
            for net, atoms in sets.items() for k, a in enumerate(atoms)]
    return pd.DataFrame(rows, columns=["atom", "network", "sign"])


def test_permutation_p_matches_brute_force_enumeration():
    K = 12
    atoms = smooth_atoms(K=K)
    eligible = np.ones(K, bool)
    eligible[[4, 9]] = False  # two atoms that could not be linked
    pool = np.flatnonzero(eligible)
    sets = {"A": [0, 1], "B": [2, 3, 5], "C": [0, 6, 7, 8], "D": [1, 2, 3, 5, 6, 10]}
    s, per = organization_metrics(links_of(sets), atoms, layers_for(K), 0.5, np.zeros(3),
                                  eligible=eligible, n_null=1000, seed=3)
    per = per.set_index("network")
    for net, linked in sets.items():  # C(10, k) <= 1000 for these k: the app enumerates too
        obs, null, p = brute_force(atoms, linked, pool)
        row = per.loc[net]
        assert row.consistency_null_sets == math.comb(10, len(linked))
        assert row.consistency_r == pytest.approx(obs, abs=1e-12)
        assert row.consistency_p == pytest.approx(p, abs=1e-12)
        assert row.consistency_chance_mean == pytest.approx(null.mean(), abs=1e-12)
        assert row.consistency_chance_lo == pytest.approx(np.quantile(null, 0.025), abs=1e-12)
        assert row.consistency_chance_hi == pytest.approx(np.quantile(null, 0.975), abs=1e-12)
    # random draws (fewer sets than subsets) agree with the enumeration within their error
    s2, per2 = organization_metrics(links_of(sets), atoms, layers_for(K), 0.5, np.zeros(3),
                                    eligible=eligible, n_null=150, seed=3)
    per2 = per2.set_index("network")
    for net in ("C", "D"):  # C(10, 4) = 210 and C(10, 6) = 210 > 150
        obs, null, p = brute_force(atoms, sets[net], pool)
        row = per2.loc[net]
        assert row.consistency_null_sets == 150
        ge = round(row.consistency_p * 151) - 1  # p = (1 + #{null >= obs}) / (1 + n)
        assert row.consistency_p == pytest.approx((1 + ge) / 151)
        assert abs(ge / 150 - p) < 4 * math.sqrt(max(p * (1 - p), 1e-3) / 150)
        assert abs(row.consistency_chance_mean - null.mean()) < 4 * null.std() / math.sqrt(150)
    # the summary's chance: the mean over networks of independent random sets, so its mean is the
    # mean of the networks' chance means
    assert s["consistency_chance_mean"] == pytest.approx(per["consistency_chance_mean"].mean(), abs=0.02)
    assert s["consistency_r"] == pytest.approx(per["consistency_r"].mean())
    assert s["consistency_networks"] == 4 and s["consistency_n_mean"] == pytest.approx(15 / 4)
    assert s["consistency_chance_lo"] < s["consistency_chance_mean"] < s["consistency_chance_hi"]


def test_chance_interval_narrows_with_more_atoms():
    K = 64
    atoms = smooth_atoms(n_frames=300, K=K, seed=1)
    sizes = [2, 3, 6, 12, 24]
    sets = {f"n{n}": list(range(n)) for n in sizes}
    _, per = organization_metrics(links_of(sets), atoms, layers_for(K), 0.5, np.zeros(3), seed=0)
    width = (per["consistency_chance_hi"] - per["consistency_chance_lo"]).to_numpy()
    assert np.all(np.diff(width) < 0), width
    assert width[-1] < 0.5 * width[1]  # 24 atoms: less than half the range of 3
    # the chance mean stays about the same: it is the mean |r| of a random pair whatever n
    assert np.ptp(per["consistency_chance_mean"]) < 0.05


def test_sign_invariance():
    """Flipping atoms (D A = (-D)(-A): their maps and so their link signs flip) changes nothing."""
    K = 12
    atoms = smooth_atoms(K=K, seed=2)
    links = links_of({"A": [0, 1, 2], "B": [3, 4, 5, 6], "C": [7, 8]})
    base_s, base = organization_metrics(links, atoms, layers_for(K), 0.5, np.zeros(3), n_null=200,
                                        seed=5)
    flip = np.array([0, 3, 4, 8, 11])
    flipped = atoms.copy()
    flipped[:, flip] *= -1
    other = {"activation": "deactivation", "deactivation": "activation"}
    links2 = links.assign(sign=[other[s] if a in flip else s for a, s in zip(links.atom, links.sign)])
    s, per = organization_metrics(links2, flipped, layers_for(K), 0.5, np.zeros(3), n_null=200, seed=5)
    cols = [c for c in PER_NETWORK_COLUMNS if c.startswith("consistency")]
    pd.testing.assert_frame_equal(per[cols], base[cols], check_exact=False, rtol=1e-12, atol=1e-12)
    assert s["diversity_1_minus_abs_r"] == pytest.approx(base_s["diversity_1_minus_abs_r"], abs=1e-12)
    assert s["consistency_p"] == base_s["consistency_p"]
    # the signed r of the old metric was not: (0, 1, 2) gave another mean after the flip
    r0 = np.corrcoef(atoms[:, :3].T)[np.triu_indices(3, 1)].mean()
    r1 = np.corrcoef(flipped[:, :3].T)[np.triu_indices(3, 1)].mean()
    assert abs(r0 - r1) > 0.01


def test_deterministic_given_the_seed():
    K = 40
    atoms = smooth_atoms(K=K, seed=4)
    links = links_of({"A": [0, 1, 2], "B": [3, 4, 5, 6, 7], "C": [8, 9]})
    run = lambda seed: organization_metrics(links, atoms, layers_for(K), 0.5, np.zeros(3), seed=seed)
    (s1, p1), (s2, p2), (s3, p3) = run(7), run(7), run(8)
    pd.testing.assert_frame_equal(p1, p2)
    assert json.dumps(s1) == json.dumps(s2)
    assert not np.allclose(p1["consistency_chance_lo"], p3["consistency_chance_lo"])  # other draws
    assert np.allclose(p1["consistency_r"], p3["consistency_r"])  # same observation
    assert s1["consistency_r"] == s3["consistency_r"] and s1["consistency_chance_lo"] != s3["consistency_chance_lo"]


def test_counts_and_chance_in_the_tables():
    K = 20
    atoms = smooth_atoms(K=K, seed=6)
    corr = pd.DataFrame([(a, n, s, 0 if a in (18, 19) else 10, False)
                         for a in range(K) for n in ("A", "B", "C") for s in ("activation", "deactivation")],
                        columns=["atom", "network", "sign", "n_map_voxels", "linked"])
    linked = {("A", 0), ("A", 1), ("A", 2), ("B", 3), ("B", 4), ("C", 5)}
    corr["linked"] = [(n, a) in linked and s == "activation" for a, n, s in
                      zip(corr.atom, corr.network, corr.sign)]
    eligible = linkable_atoms(corr, K)
    assert eligible.sum() == 18 and not eligible[[18, 19]].any()
    s, per = organization_metrics(corr, atoms, layers_for(K), 0.5, np.zeros(3), networks=["A", "B", "C", "D"],
                                  eligible=eligible, diversity_chance={"diversity_1_minus_abs_r": 0.9, "n_neurons": 7})
    assert list(per.columns[:len(PER_NETWORK_COLUMNS)]) == list(PER_NETWORK_COLUMNS)
    per = per.set_index("network")
    assert per["consistency_n"].tolist() == [3, 2, 1, 0]
    assert per["consistency_null_sets"].tolist() == [816, 153, 0, 0]  # C(18, 3) <= 1000, C(18, 2)
    assert per.loc[["A", "B"], "consistency_p"].between(0, 1).all()
    assert per.loc[["C", "D"], ["consistency_r", "consistency_chance_mean", "consistency_p"]].isna().all().all()
    assert s["consistency_networks"] == 2 and s["consistency_pool_atoms"] == 18
    assert s["diversity_chance_1_minus_abs_r"] == 0.9 and s["diversity_chance_info"]["n_neurons"] == 7
    rec = {r["network"]: r for r in s["per_network"]}
    assert rec["D"]["consistency_p"] is None and rec["A"]["consistency_n"] == 3
    json.dumps(s, allow_nan=False)
    # a linked atom outside the pool cannot be compared with sets drawn from the pool
    with pytest.raises(DataError, match="eligible"):
        organization_metrics(corr, atoms, layers_for(K), 0.5, np.zeros(3), eligible=~eligible)
    no_div, _ = organization_metrics(corr, atoms, layers_for(K), 0.5, np.zeros(3))
    assert no_div["diversity_chance_1_minus_abs_r"] is None


def test_diversity_chance_of_shared_structure():
    """Neurons sharing a few smooth latents give correlated atoms (lower diversity) than the
    same neurons circularly shifted one by one; neurons sharing nothing are at chance."""
    from bids_llm_encode.workflows.stimulus import diversity_chance_from_series

    rng = np.random.default_rng(0)
    T, N, K = 160, 400, 8
    smooth = lambda x: np.apply_along_axis(lambda c: np.convolve(c, np.ones(6) / 6, "same"), 0, x)
    latent = smooth(rng.standard_normal((T, 1)))
    shared = latent @ rng.uniform(0.5, 1.5, (1, N)) + 0.8 * smooth(rng.standard_normal((T, N)))
    alone = smooth(rng.standard_normal((T, N)))
    z = lambda x: (x - x.mean(0)) / x.std(0)
    from bids_llm_encode.patterns.dictionary import learn_dictionary

    def div(X):
        r = np.corrcoef(learn_dictionary(X, n_atoms=K, sparsity=0.15, progress=False).atoms.T)
        return np.mean(1 - np.abs(r[np.triu_indices(K, 1)]))

    a = diversity_chance_from_series(z(shared), K, 0.15, seed=1, max_neurons=300)
    assert a["n_neurons"] == 300 and a["n_neurons_total"] == 400
    assert div(z(shared)) < a["diversity_1_minus_abs_r"] - 0.05
    b = diversity_chance_from_series(z(alone), K, 0.15, seed=1)
    assert abs(div(z(alone)) - b["diversity_1_minus_abs_r"]) < 0.05
    again = diversity_chance_from_series(z(shared), K, 0.15, seed=1, max_neurons=300)
    assert {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in a.items() if k != "seconds"}  # deterministic given the seed
