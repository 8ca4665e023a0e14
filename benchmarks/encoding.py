"""Benchmark: whole-brain voxel-wise encoding at 2 mm.

Synthetic data of the size of the MNI152 2 mm brain mask (nilearn's, ~235,000
voxels), 600 frames, 64 HRF-convolved atoms, AR(1) noise (rho 0.2-0.7), 5% of
voxels driven. Runs the full ``fit_encoding`` at the app's defaults (atom maps
calibrated by the circular-shift null, nested ridge CV, 100 circular shifts,
FDR) and then checks, on a voxel subset, that the normal-null p agrees with an
empirical p from 1000 circular shifts.

The fit's achieved floating-point rate (the matrix products of the solver, the
atom maps and the null, as ``fit_encoding`` counts them in
``info['matmul_flops']``) is printed as a fraction of a float32 matrix
product's rate (2048 x 2048) measured in the same run: absolute seconds differ
by 2x between machines of one kind, the ratio much less.

    python benchmarks/encoding.py            # full: whole brain
    python benchmarks/encoding.py --quick    # 20,000 voxels, no null agreement check (< 1 min)

Last line: ``seconds=<s> peak_mb=<m> voxels=<v> gflops=<g> flops_ratio=<r>``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nilearn.datasets import load_mni152_brain_mask  # noqa: E402
from nilearn.glm.first_level import glover_hrf  # noqa: E402

from bids_llm_encode.encoding.fit import RunData, fit_encoding  # noqa: E402


def matmul_gflops(n: int = 2048, repeat: int = 5) -> float:
    """float32 GFLOP/s of an n x n matrix product (best of ``repeat``)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulate(T, V, K, seed=0, frac_driven=0.05):
    rng = np.random.default_rng(seed)
    h = glover_hrf(1.5, oversampling=1, time_length=30)
    ev = rng.standard_normal((T, K)) * (rng.random((T, K)) < 0.3)
    D = np.stack([np.convolve(ev[:, k], h)[:T] for k in range(K)], 1)
    D = ((D - D.mean(0)) / D.std(0)).astype(np.float32)
    n_drv = int(frac_driven * V)
    Y = np.empty((T, V), np.float32)
    rho = rng.uniform(0.2, 0.7, V).astype(np.float32)
    scale = np.sqrt(1 - rho**2)
    Y[0] = rng.standard_normal(V)
    for t in range(1, T):
        Y[t] = rho * Y[t - 1] + scale * rng.standard_normal(V, dtype=np.float32)
    B = rng.standard_normal((K, n_drv)).astype(np.float32) * (0.5 / np.sqrt(K))
    Y[:, :n_drv] += D @ B
    return Y, D, n_drv


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 voxels and 100 shifts")
    ap.add_argument("--voxels", type=int, default=None)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--permutations", type=int, default=None)
    ap.add_argument("--batch", type=int, default=20000)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--subset", type=int, default=None,
                    help="voxels for the null agreement check (default 2000; 0, the --quick default: skip)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n_mask = int(np.asarray(load_mni152_brain_mask(resolution=2).dataobj).astype(bool).sum())
    V = args.voxels or (20000 if args.quick else n_mask)
    if args.subset is None:
        args.subset = 0 if args.quick else 2000
    P = args.permutations or 100
    rows = []
    t0 = time.perf_counter()
    t = time.perf_counter()
    Y, D, n_drv = simulate(args.frames, V, args.atoms)
    rows.append(("simulate", time.perf_counter() - t, peak_mb()))
    t = time.perf_counter()
    res = fit_encoding([RunData(Y, D, name="synthetic")], n_permutations=P, backend=args.backend,
                       n_targets_batch=args.batch)
    fit_s = time.perf_counter() - t
    for stage, s in res.info["seconds_by_stage"].items():
        rows.append((f"  fit: {stage}", s, float("nan")))
    rows.append(("fit_encoding (total)", fit_s, peak_mb()))
    ref_gflops = matmul_gflops()
    fit_flops = sum(res.info["matmul_flops"].values())
    gflops = fit_flops / fit_s / 1e9
    extra = []
    if args.subset:
        t = time.perf_counter()
        sub = np.r_[np.arange(min(args.subset // 4, n_drv)), n_drv + np.arange(args.subset - min(args.subset // 4, n_drv))]
        ref = fit_encoding([RunData(Y[:, sub], D)], n_permutations=1000, null="empirical", seed=7)
        pe, pn = ref.p, res.p[sub]
        mid = (pe > 2e-3)
        extra = [
            f"null check on {len(sub)} voxels: 1000-shift empirical p vs normal-tail p ({P} shifts):",
            f"  corr={np.corrcoef(pe, pn)[0, 1]:.4f} median|dp| (p_emp>0.002)={np.median(np.abs(pe[mid] - pn[mid])):.4f} "
            f"agree at p<0.05: {np.mean((pe < 0.05) == (pn < 0.05)):.4f}",
        ]
        rows.append(("null check (subset)", time.perf_counter() - t, peak_mb()))
    total = time.perf_counter() - t0
    print(f"voxels={V} frames={args.frames} atoms={args.atoms} permutations={P} backend={res.info['backend']} "
          f"batch={args.batch}")
    print(f"{'stage':<24}{'seconds':>10}{'peak MB':>10}")
    for name, s, m in rows:
        print(f"{name:<24}{s:>10.1f}{m:>10.0f}")
    null = np.arange(V) >= n_drv
    print(f"driven: mean cv_r={res.cv_r[~null].mean():.3f} significant={res.significant[~null].mean():.3f}; "
          f"null: FDR calls={res.significant[null].mean():.4f} p<0.05={np.mean(res.p[null] < 0.05):.4f} "
          f"(empirical {np.mean(res.info['p_empirical'][null] < 0.05):.4f})")
    for line in extra:
        print(line)
    print(f"matrix products: {fit_flops / 1e12:.2f} TFLOP in {fit_s:.1f} s = {gflops:.1f} GFLOP/s; "
          f"float32 2048^2 product in the same run: {ref_gflops:.1f} GFLOP/s")
    print(f"seconds={total:.1f} peak_mb={peak_mb():.0f} voxels={V} gflops={gflops:.1f} "
          f"flops_ratio={gflops / ref_gflops:.2f}")


if __name__ == "__main__":
    main()
