"""False-positive rates of the map -> network nulls on grey-matter maps, and the spin test's cost.

Usage::

    python benchmarks/networks.py           # full: 200 maps, 1,000 spins (about 4 min on 2 cores)
    python benchmarks/networks.py --quick   # < 1 min: 32 maps, 150 spins

Maps: smooth Gaussian random fields (FWHM ~14 mm) on nilearn's MNI152 mask at
4 mm, set to 0 outside the grey matter (``networks.atlases.grey_matter``: MNI152
GM probability > 0.5), unrelated to any network. Each map's positive and
negative parts (threshold 2, ``map_rule="all"``) are tested against every
network of CA12 and Yeo 7 with ``networks.overlap.correspondence`` under the
three nulls: ``shift`` (the first version's circular shifts in the whole brain
mask), ``volume`` (the shifts cut to the grey matter) and ``spin`` (the maps
projected onto the fsLR 32k cortex, networks rotated on the sphere). Under
this null every p should fall below 0.05 in 5 % and below 0.001 in 0.1 % of
the tests. Also: the Dice of the tests with p < 0.05 (why a link needs a
minimum Dice), and the time of the spin test's counts for 64 atoms x 2 signs
x 12 networks (CA12) with the rotations computed (``rotation_seconds``, done
once and cached by the app) and loaded (``spin_seconds``). Cross-check: the maps
projected onto the cortex tested against these rotations and against neuromaps'
own (``nulls.spins.gen_spinsamples``, via ``surface.neuromaps_spin_indices``):
the false rate under each and the median difference of the p-values.

The last line is ``key=value`` pairs: ``spin_p05_rate``, ``volume_p05_rate``,
``old_p05_rate`` (pooled over both atlases), the same at p < 0.001
(``..._p001_rate``), ``spin_seconds``, ``rotation_seconds``, ``spins``, ``tests``,
``neuromaps_p05_rate``, ``neuromaps_p_absdiff``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from nilearn import datasets, image  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bids_llm_encode.cache import Cache  # noqa: E402
from bids_llm_encode.networks import surface  # noqa: E402
from bids_llm_encode.networks.atlases import grey_matter, load_atlas  # noqa: E402
from bids_llm_encode.networks.overlap import correspondence, preferred_atom_maps  # noqa: E402

THRESHOLD = 2.0


def grid():
    m = datasets.load_mni152_brain_mask(resolution=2)
    return image.resample_img(m, target_affine=np.diag([4, 4, 4]), interpolation="nearest",
                              force_resample=True, copy_header=True)


def grey_matter_maps(mask: np.ndarray, grey: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, int(mask.sum())))
    for i in range(n):
        f = gaussian_filter(rng.standard_normal(mask.shape), 1.5, mode="wrap")[mask]
        out[i] = f / f.std()
    out[:, ~grey] = 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n_maps, n_spins = (32, 150) if args.quick else (200, 1000)
    t_start = time.perf_counter()
    mask_img = grid()
    mask = mask_img.get_fdata() > 0
    grey = grey_matter(mask_img)
    z = grey_matter_maps(mask, grey, n_maps, args.seed)
    print(f"{n_maps} grey-matter maps (GM > 0.5: {grey.sum()} of {grey.size} mask voxels at 4 mm), "
          f"threshold {THRESHOLD}, {n_spins} spins")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(tmp)
        t = time.perf_counter()
        indices = surface.spin_indices(n_spins, args.seed, cache)
        rotation_seconds = time.perf_counter() - t
        rates = {k: [] for k in ("shift", "volume", "spin")}
        dices = {k: [] for k in rates}
        print(f"{'atlas':6s} {'null':7s} {'tests':>6s} {'p<0.05':>7s} {'p<0.01':>7s} {'p<0.001':>8s} "
              f"{'Dice(p<.05) median':>19s} {'90%':>6s} {'share Dice<0.1':>15s}")
        for name in ("CA12", "Yeo7"):
            atlas = load_atlas(name, mask_img)
            for null in rates:
                df = correspondence(z, mask_img, atlas, threshold=THRESHOLD, null=null, n_null=None,
                                    n_spins=n_spins, seed=args.seed, map_rule="all", cache=cache, grey=grey)
                t_ = df[df.n_map_voxels > 0]
                rates[null].append(t_.p.to_numpy())
                d = t_.dice[t_.p < 0.05].to_numpy()
                dices[null].append(d)
                print(f"{name:6s} {null:7s} {len(t_):6d} {np.mean(t_.p < 0.05):7.4f} {np.mean(t_.p < 0.01):7.4f} "
                      f"{np.mean(t_.p < 0.001):8.4f} {np.median(d) if d.size else np.nan:19.3f} "
                      f"{np.quantile(d, 0.9) if d.size else np.nan:6.3f} "
                      f"{np.mean(d < 0.1) if d.size else np.nan:15.3f}")
        # cost: 64 atoms x 2 signs x 12 networks (CA12) against n_spins rotations, winner rule
        atlas = load_atlas("CA12", mask_img)
        codes = surface.cortex_labels(atlas)
        zs = preferred_atom_maps(surface.volume_to_cortex(z[:64] if n_maps >= 64 else
                                                          np.tile(z, (2, 1))[:64], mask_img))
        maps = np.vstack([zs > 1.0, zs < -1.0])
        t = time.perf_counter()
        indices = surface.spin_indices(n_spins, args.seed, cache)  # from the cache
        spun = surface.spin_codes(codes, indices)
        surface.spin_pvalues(maps, codes, len(atlas.labels), spun)
        spin_seconds = time.perf_counter() - t
        # cross-check: the same projected maps against this module's rotations and neuromaps' own
        t = time.perf_counter()
        ref = surface.neuromaps_spin_indices(n_spins, args.seed + 1)
        neuromaps_seconds = time.perf_counter() - t
        zc = surface.volume_to_cortex(z, mask_img)
        cross = {"app": [], "neuromaps": []}
        for name in ("CA12", "Yeo7"):
            atlas = load_atlas(name, mask_img)
            codes = surface.cortex_labels(atlas)
            maps = np.vstack([zc > THRESHOLD / 2, zc < -THRESHOLD / 2])  # projection averages: smaller values
            maps = maps[maps.any(axis=1)]
            for key, idx in (("app", indices), ("neuromaps", ref)):
                cross[key].append(surface.spin_pvalues(maps, codes, len(atlas.labels),
                                                       surface.spin_codes(codes, idx))[2].ravel())
        p_app, p_nm = (np.concatenate(cross[k]) for k in ("app", "neuromaps"))
        absdiff = float(np.median(np.abs(p_app - p_nm)))
        print(f"cross-check on the {n_maps} maps projected onto the cortex (|z| > {THRESHOLD / 2}), "
              f"{p_app.size} tests: p < 0.05 in {np.mean(p_app < 0.05):.4f} with this app's rotations, "
              f"{np.mean(p_nm < 0.05):.4f} with neuromaps' gen_spinsamples ({n_spins} rotations in "
              f"{neuromaps_seconds:.0f} s); r(p) = {np.corrcoef(p_app, p_nm)[0, 1]:.3f}, median |dp| = "
              f"{absdiff:.3f} (Monte Carlo sd of the difference of two p of 0.5: {np.sqrt(0.5 / n_spins):.3f})")
    pooled = {k: np.concatenate(v) for k, v in rates.items()}
    print(f"spin test cost: {n_spins} rotations computed in {rotation_seconds:.1f} s (once; cached); "
          f"64 atoms x 2 signs x 12 networks ({int(maps.sum())} map vertices) against them in "
          f"{spin_seconds:.1f} s; total {time.perf_counter() - t_start:.0f} s")
    print(f"spin_p05_rate={np.mean(pooled['spin'] < 0.05):.4f} volume_p05_rate={np.mean(pooled['volume'] < 0.05):.4f} "
          f"old_p05_rate={np.mean(pooled['shift'] < 0.05):.4f} spin_seconds={spin_seconds:.1f} "
          f"spin_p001_rate={np.mean(pooled['spin'] < 0.001):.4f} "
          f"volume_p001_rate={np.mean(pooled['volume'] < 0.001):.4f} "
          f"old_p001_rate={np.mean(pooled['shift'] < 0.001):.4f} rotation_seconds={rotation_seconds:.1f} "
          f"spins={n_spins} tests={pooled['spin'].size}/{pooled['volume'].size}/{pooled['shift'].size} "
          f"neuromaps_p05_rate={np.mean(p_nm < 0.05):.4f} neuromaps_p_absdiff={absdiff:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
