"""Null check of the organization metrics' chance levels (networks/metrics.py).

Usage::

    python benchmarks/metrics.py                   # full: 2,000 null atlases of 12 networks
    python benchmarks/metrics.py --quick           # < 1 min: 150 null atlases
    python benchmarks/metrics.py --atoms atoms.tsv # a real dictionary (stimuli/<story>/model-<m>/atoms.tsv)

The dictionary: K = 64 atoms learned by the app's own ``learn_dictionary``
(sparsity 0.15) from synthetic neuron series of story length (300 frames at
TR 1.5 s, 4,096 neurons; 2,048 with ``--quick``) made as the app makes them:
word activations (a per-neuron mean, the word-rate carrier, + low-rank
factors + noise) as impulses at the word onsets, HRF-convolved, z-scored
(:func:`synthetic_neurons`). Its atoms are autocorrelated and correlated
with each other as a real dictionary's are. Or a real one (``--atoms``).

Null: per replicate, an atlas of 12 networks, each linked to a random set of
2-8 atoms (random signs) drawn from the eligible atoms (all, and in a second
half of the replicates a random 48 of the 64); ``organization_metrics`` with
its own seed. Under this null every consistency p (per network, and the
summary's mean over networks) should fall below 0.05 in 5 % of the tests.
Also printed: the 95 % chance range of the consistency by number of atoms
(mean |r|, and the signed mean r it replaced), and the diversity of the
dictionary against its chance level (the same K and sparsity on the neurons
circularly shifted one by one, ``workflows.stimulus.diversity_chance_from_series``).

The last line is ``key=value`` pairs: ``consistency_fpr05`` (per-network p <=
0.05 under the null), ``summary_fpr05`` (the summary's p), ``nominal=0.05``,
their counts of tests, ``consistency_fpr01``, ``diversity``,
``diversity_chance``, ``seconds``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bids_llm_encode.networks.metrics import organization_metrics  # noqa: E402

TR = 1.5


def synthetic_neurons(n_frames: int = 300, n_neurons: int = 4096, rank: int = 40,
                      mean_sd: float = 0.3, seed: int = 0) -> np.ndarray:
    """Story-like neuron series, made as the app makes them (``signal.frames.frame_series``).

    Words at 2.5 per second; each neuron's activation per word = its own mean
    (N(0, mean_sd): the word-rate carrier every real model has) + a mix of
    ``rank`` word-level factors (scales 1/sqrt(k), 30 % of the weights
    non-zero) + unit noise; impulses at the word onsets, SPM HRF, sampled at
    TR 1.5 s, z-scored. With mean_sd 0.3 the dictionary's diversity (0.85),
    R^2 (0.52) and atoms' lag-1 autocorrelation (0.91) are close to SmolLM2-135M's
    on the demo story (0.86, 0.44, 0.94).
    """
    from bids_llm_encode.signal.frames import frame_series

    rng = np.random.default_rng(seed)
    dur = n_frames * TR - 20.0  # the story's last word 20 s before the grid's end, as the app's
    onsets = np.sort(rng.uniform(0, dur, int(dur * 2.5)))
    F = rng.standard_normal((onsets.size, rank))
    W = rng.standard_normal((rank, n_neurons)) / np.sqrt(np.arange(1, rank + 1))[:, None]
    W *= rng.random((rank, n_neurons)) < 0.3
    V = rng.normal(0, mean_sd, n_neurons) + F @ W + rng.standard_normal((onsets.size, n_neurons))
    return frame_series(onsets, V, (np.arange(n_frames) + 0.5) * TR)


def diversity(atoms: np.ndarray) -> float:
    r = np.corrcoef(atoms.T)
    return float(np.mean(1 - np.abs(r[np.triu_indices(atoms.shape[1], 1)])))


def chance_by_size(atoms: np.ndarray, sizes, n_sets: int, seed: int) -> list[tuple]:
    """95 % range of the mean pairwise |r| and of the signed mean r of random atom sets."""
    rng = np.random.default_rng(seed)
    r = np.corrcoef(atoms.T)
    out = []
    for n in sizes:
        absr, signed = [], []
        for _ in range(n_sets):
            idx = rng.choice(atoms.shape[1], n, replace=False)
            pairs = [r[i, j] for i, j in combinations(idx, 2)]
            absr.append(np.mean(np.abs(pairs)))
            signed.append(np.mean(pairs))
        out.append((n, *np.quantile(absr, [0.025, 0.5, 0.975]), np.mean(absr),
                    *np.quantile(signed, [0.025, 0.975])))
    return out


def null_replicates(atoms: np.ndarray, n_rep: int, n_null: int, seed: int):
    K = atoms.shape[1]
    layers = pd.DataFrame({"atom": np.arange(K), "layer_00": np.ones(K, int)})
    rng = np.random.default_rng(seed)
    per_p, sum_p, sizes, seconds = [], [], [], []
    for b in range(n_rep):
        eligible = np.ones(K, bool)
        if b >= n_rep // 2:  # the second half: links drawn from a linkable subset of 48
            eligible[:] = False
            eligible[rng.choice(K, min(K, 48), replace=False)] = True
        pool = np.flatnonzero(eligible)
        rows = []
        for net in range(12):
            n = int(rng.integers(2, 9))
            for a in rng.choice(pool, n, replace=False):
                rows.append((int(a), f"net{net:02d}", "activation" if rng.random() < 0.5 else "deactivation"))
        links = pd.DataFrame(rows, columns=["atom", "network", "sign"])
        t = time.perf_counter()
        s, per = organization_metrics(links, atoms, layers, 0.5, np.zeros(1), eligible=eligible,
                                      n_null=n_null, seed=seed * 100003 + b)
        seconds.append(time.perf_counter() - t)
        per_p.extend(per["consistency_p"].tolist())
        sizes.extend(per["consistency_n"].tolist())
        sum_p.append(s["consistency_p"])
    return np.array(per_p), np.array(sum_p), np.array(sizes), float(np.median(seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="finish within a minute (150 null atlases)")
    ap.add_argument("--atoms", type=Path, default=None, help="atoms.tsv of a real dictionary")
    ap.add_argument("--replicates", type=int, default=None, help="null atlases (default 2000, quick 150)")
    ap.add_argument("--n-null", type=int, default=1000, help="random sets per network (the app's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    n_rep = args.replicates or (150 if args.quick else 2000)

    div = div_chance = float("nan")
    if args.atoms is not None:
        atoms = pd.read_csv(args.atoms, sep="\t").filter(like="atom").to_numpy(float)
        print(f"dictionary: {args.atoms} ({atoms.shape[0]} frames x {atoms.shape[1]} atoms)")
    else:
        from bids_llm_encode.patterns.dictionary import learn_dictionary
        from bids_llm_encode.workflows.stimulus import diversity_chance_from_series

        X = synthetic_neurons(n_neurons=2048 if args.quick else 4096, seed=args.seed)
        t = time.perf_counter()
        d = learn_dictionary(X, n_atoms=64, sparsity=0.15, seed=args.seed, progress=False)
        atoms = d.atoms
        print(f"dictionary: synthetic, {X.shape[0]} frames x {X.shape[1]} neurons -> 64 atoms, "
              f"R^2 {d.r2:.3f} ({time.perf_counter() - t:.1f} s)")
        chance = diversity_chance_from_series(X, 64, 0.15, seed=args.seed)
        div, div_chance = diversity(atoms), chance["diversity_1_minus_abs_r"]
        print(f"diversity (mean 1 - |r|): {div:.3f}; chance (neurons circularly shifted): "
              f"{div_chance:.3f} ({chance['seconds']:.1f} s)")
    lag1 = np.mean([np.corrcoef(a[:-1], a[1:])[0, 1] for a in atoms.T])
    print(f"atoms' mean lag-1 autocorrelation: {lag1:.2f}")

    print("\nchance of the consistency of random atom sets (1,000 sets each)")
    print(f"{'n':>3s} {'|r| 2.5%':>9s} {'median':>7s} {'97.5%':>7s} {'mean':>6s} {'signed r 2.5%':>14s} {'97.5%':>7s}")
    for n, lo, med, hi, mean, slo, shi in chance_by_size(atoms, (2, 3, 4, 6, 10, 20), 1000, args.seed):
        print(f"{n:3d} {lo:9.3f} {med:7.3f} {hi:7.3f} {mean:6.3f} {slo:14.3f} {shi:7.3f}")

    per_p, sum_p, sizes, sec = null_replicates(atoms, n_rep, args.n_null, args.seed)
    print(f"\nnull: {n_rep} atlases x 12 networks, 2-8 random atoms each, {args.n_null} random sets per "
          f"network; {sec * 1000:.0f} ms per organization_metrics call")
    print(f"{'test':28s} {'tests':>7s} {'p <= 0.05':>10s} {'p <= 0.01':>10s}")
    print(f"{'per network, all':28s} {per_p.size:7d} {np.mean(per_p <= 0.05):10.4f} {np.mean(per_p <= 0.01):10.4f}")
    for n in (2, 3, 5, 8):
        sel = sizes == n
        print(f"{'per network, n = ' + str(n):28s} {sel.sum():7d} {np.mean(per_p[sel] <= 0.05):10.4f} "
              f"{np.mean(per_p[sel] <= 0.01):10.4f}")
    print(f"{'summary (mean over networks)':28s} {sum_p.size:7d} {np.mean(sum_p <= 0.05):10.4f} "
          f"{np.mean(sum_p <= 0.01):10.4f}")
    print(f"{'nominal':28s} {'':7s} {0.05:10.4f} {0.01:10.4f}")
    print(f"consistency_fpr05={np.mean(per_p <= 0.05):.4f} summary_fpr05={np.mean(sum_p <= 0.05):.4f} "
          f"nominal=0.05 n_tests={per_p.size} n_summary={sum_p.size} "
          f"consistency_fpr01={np.mean(per_p <= 0.01):.4f} diversity={div:.3f} "
          f"diversity_chance={div_chance:.3f} seconds={time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
