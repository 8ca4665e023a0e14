"""Correspondence between atom z maps and functional brain networks, with a spatial null.

For each atom, the positive part (``z > threshold``, "activation") and the
negative part (``z < -threshold``, "deactivation") of its map are thresholded
separately and compared with each network of an :class:`~bids_llm_encode.records.Atlas`:

- ``dice`` = 2 |M & N| / (|M| + |N|), ``jaccard`` = |M & N| / |M | N|,
- ``overlap_rate`` = |M & N| / |M|: the fraction of the map's supra-threshold
  voxels that lie in the network (the "overlap rate" of the paper's Fig. 3 read
  as a precision; 0 for an empty map).

Spatial null: circular 3D shifts
--------------------------------
The thresholded map is embedded in the bounding box of the brain mask (padded
to FFT-friendly lengths, zero outside the mask) and shifted circularly by a
random 3D offset, keeping its shape, size and smoothness; the part that falls
inside the mask is compared with the network. All offsets are evaluated at
once with FFT cross-correlations (``|shift(M) & N|`` and ``|shift(M) & mask|``
for every offset), and ``n_null`` offsets are drawn among those that keep at
least ``min_kept`` (default half) of the map inside the brain. Because a shifted
map loses voxels at the brain's edge and covers a region with more or less of
each network, the statistic is the overlap in excess of chance in binomial
units (:func:`_excess`), and the one-sided p-value is
``(1 + #{null >= observed}) / (1 + n_null)``; for the observed map the
statistic is monotone in the Dice, so this is a test of the Dice.
The same offsets serve every network, and the p-values are BH-FDR corrected
over atoms x networks x signs. ``docs/networks.md`` shows the calibration.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy.stats import false_discovery_control

from ..errors import DataError, UsageError
from ..records import Atlas
from .atlases import _as_mask

log = logging.getLogger(__name__)

SIGNS = ("activation", "deactivation")
COLUMNS = ["atom", "network", "sign", "n_map_voxels", "n_network_voxels", "n_overlap", "dice",
           "jaccard", "overlap_rate", "p", "q", "stable", "linked"]


# --------------------------------------------------------------------------- overlap helpers


def overlap_counts(maps: np.ndarray, networks: np.ndarray) -> np.ndarray:
    """Number of voxels shared by every map and every network.

    Parameters
    ----------
    maps : ndarray of bool, shape (n_maps, n_voxels)
    networks : ndarray of bool, shape (n_networks, n_voxels)

    Returns
    -------
    ndarray of int64, shape (n_maps, n_networks)
    """
    a = np.atleast_2d(np.asarray(maps, bool)).astype(np.float64)
    b = np.atleast_2d(np.asarray(networks, bool)).astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise DataError(f"maps have {a.shape[1]} voxels but networks have {b.shape[1]}")
    return np.rint(a @ b.T).astype(np.int64)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|a & b| / (|a| + |b|) of two boolean maps (0 when both are empty).

    Parameters
    ----------
    a, b : array_like of bool, same shape
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"dice: shapes differ, {a.shape} vs {b.shape}")
    den = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / den) if den else 0.0


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index |a & b| / |a | b| of two boolean maps (0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"jaccard: shapes differ, {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def overlap_rate(map_: np.ndarray, network: np.ndarray) -> float:
    """Fraction of the map's voxels that lie in the network, |map & network| / |map| (0 if empty)."""
    m, n = np.asarray(map_, bool), np.asarray(network, bool)
    k = m.sum()
    return float(np.logical_and(m, n).sum() / k) if k else 0.0


def pairwise_dice(maps: np.ndarray) -> float:
    """Mean Dice over all pairs of boolean maps (e.g. one map per participant).

    Parameters
    ----------
    maps : ndarray of bool, shape (n_maps, n_voxels)

    Returns
    -------
    float
        NaN when fewer than two maps; pairs of two empty maps count as 0.
    """
    m = np.atleast_2d(np.asarray(maps, bool))
    n = m.shape[0]
    if n < 2:
        return float("nan")
    inter = overlap_counts(m, m).astype(float)
    size = np.diag(inter)
    den = size[:, None] + size[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(den > 0, 2 * inter / np.where(den > 0, den, 1), 0.0)
    iu = np.triu_indices(n, 1)
    return float(d[iu].mean())


def link_agreement(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """How consistently participants agree on each atom -> network link.

    Parameters
    ----------
    tables : sequence of DataFrame
        One :func:`correspondence` table per participant.

    Returns
    -------
    DataFrame
        One row per (atom, network, sign): ``n_participants``, ``n_linked``,
        ``fraction_linked``, ``mean_dice``, ``median_p``.
    """
    if not tables:
        raise UsageError("link_agreement needs at least one correspondence table")
    frames = []
    for i, t in enumerate(tables):
        missing = {"atom", "network", "sign", "dice", "p", "linked"} - set(t.columns)
        if missing:
            raise DataError(f"correspondence table {i} lacks columns {sorted(missing)}")
        frames.append(t.assign(_participant=i))
    allt = pd.concat(frames, ignore_index=True)
    g = allt.groupby(["atom", "network", "sign"], sort=False)
    out = g.agg(n_participants=("_participant", "nunique"), n_linked=("linked", "sum"),
                mean_dice=("dice", "mean"), median_p=("p", "median")).reset_index()
    out["n_linked"] = out["n_linked"].astype(int)
    out["fraction_linked"] = out["n_linked"] / out["n_participants"]
    return out[["atom", "network", "sign", "n_participants", "n_linked", "fraction_linked",
                "mean_dice", "median_p"]]


# --------------------------------------------------------------------------- spatial null


class _ShiftNull:
    """FFT machinery for circular-shift nulls of maps within a mask's bounding box."""

    def __init__(self, mask: np.ndarray, networks: np.ndarray):
        idx = np.nonzero(mask)
        lo = np.array([i.min() for i in idx])
        hi = np.array([i.max() for i in idx]) + 1
        self.shape = tuple(int(sfft.next_fast_len(int(n), real=True)) for n in hi - lo)
        # flat index, in the padded box, of every mask voxel (mask order = C order)
        self.flat = np.ravel_multi_index(tuple(i - o for i, o in zip(idx, lo)), self.shape)
        self.size = int(np.prod(self.shape))
        vols = np.zeros((networks.shape[0] + 1, self.size))
        vols[:-1, self.flat] = networks
        vols[-1, self.flat] = 1.0  # the mask itself: how much of a shifted map stays in the brain
        self.F = sfft.rfftn(vols.reshape((-1,) + self.shape), axes=(1, 2, 3))

    def counts(self, binary_map: np.ndarray) -> np.ndarray:
        """Overlap with each network (rows) and with the mask (last row) for every shift.

        Returns
        -------
        ndarray, shape (n_networks + 1, n_shifts)
        """
        vol = np.zeros(self.size)
        vol[self.flat] = binary_map
        fb = np.conj(sfft.rfftn(vol.reshape(self.shape)))
        out = sfft.irfftn(self.F * fb[None], s=self.shape, axes=(1, 2, 3))
        return np.rint(out.reshape(out.shape[0], -1))


def _excess(overlap, size, share):
    """Overlap in excess of chance, in binomial standard units: (o - n s) / sqrt(n s (1 - s)).

    ``share`` is the network's share of the region the map could fall in: the
    whole mask for the observed map, the mask's overlap with its shifted copy for
    a shifted one. Centring on it and scaling by the map's size makes shifted
    maps (which lose voxels at the brain's edge, and whose covered region holds
    more or less of a network) comparable with the observed map; the plain
    overlap rate left the null 2-3x too heavy-tailed (1.7-3 % at p < 0.05 on
    unrelated smooth maps, 4.7 % with this statistic).
    """
    overlap, size, share = (np.asarray(x, dtype=np.float64) for x in (overlap, size, share))
    var = size * share * (1.0 - share)
    return (overlap - size * share) / np.sqrt(np.maximum(var, 1e-9))


def correspondence(
    z_maps: np.ndarray,
    mask_img,
    atlas: Atlas,
    *,
    threshold: float = 3.1,
    n_null: Optional[int] = 1000,
    seed: int = 0,
    fdr_alpha: float = 0.05,
    min_kept: float = 0.5,
    atom_names: Optional[Sequence] = None,
    map_rule: str = "winner",
    stable: Optional[Sequence[bool]] = None,
) -> pd.DataFrame:
    """Overlap of each atom's thresholded z map with each network, tested against a spatial null.

    Parameters
    ----------
    z_maps : ndarray, shape (n_atoms, n_voxels)
        z maps over the mask voxels, in mask order.
    mask_img : Nifti1Image or path
        The 3D brain mask the maps and the atlas live in.
    atlas : Atlas
        ``maps`` of shape (n_networks, n_voxels).
    threshold : float
        ``z > threshold`` is the activation map, ``z < -threshold`` the deactivation map.
    n_null : int or None
        Circular shifts drawn per map (the same offsets serve all networks).
        ``None`` (or 0) uses every valid shift (typically 10^4 - 10^5 at 4 mm)
        at no extra cost, which gives p-values fine enough for FDR over
        thousands of tests: with ``n_null`` draws the smallest p is
        ``1 / (n_null + 1)``.
    seed : int
    fdr_alpha : float
        ``linked`` means ``q < fdr_alpha`` and ``dice > 0``.
    min_kept : float
        A shift is used only if at least this fraction of the map stays in the mask.
    atom_names : sequence, optional
        Values of the ``atom`` column (default 0 .. n_atoms - 1).
    map_rule : {"winner", "all"}
        "winner" (default): a voxel belongs to the map of the atom with the
        largest |z| there only (:func:`preferred_atom_maps`), so that atoms
        whose time courses are correlated do not all claim the same voxels;
        "all": every atom's map is its own thresholded z.
    stable : sequence of bool, shape (n_atoms,), optional
        Atoms reproducible across the dictionary's restarts
        (``patterns.consensus.linkable_atoms``). The others keep their rows and
        p-values but are never linked, and their q is NaN: the FDR runs over
        the stable atoms' tests only. Default: all stable.

    Returns
    -------
    DataFrame
        One row per atom x network x sign with columns ``atom, network, sign,
        n_map_voxels, n_network_voxels, n_overlap, dice, jaccard, overlap_rate,
        p, q, stable, linked``. A map with no supra-threshold voxel has dice 0 and p 1.
    """
    _, mask = _as_mask(mask_img)
    n_vox = int(mask.sum())
    z = np.asarray(z_maps, dtype=np.float64)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != n_vox:
        raise DataError(f"z maps must have shape (n_atoms, {n_vox}) over the mask voxels; got {z.shape}")
    nets = np.asarray(atlas.maps, bool)
    if nets.ndim != 2 or nets.shape[1] != n_vox:
        raise DataError(f"atlas {atlas.name} has maps of shape {nets.shape}, not (n_networks, {n_vox}); "
                        "was it loaded with the same mask?")
    if not np.all(np.isfinite(z)):
        log.warning("z maps hold %d non-finite values; they count as below threshold",
                    int((~np.isfinite(z)).sum()))
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    if map_rule not in ("winner", "all"):
        raise UsageError(f"map_rule must be 'winner' or 'all', got {map_rule!r}")
    if map_rule == "winner":
        z = preferred_atom_maps(z)
    exhaustive = not n_null
    if (not exhaustive and n_null < 1) or threshold < 0 or not 0 < fdr_alpha < 1 or not 0 < min_kept <= 1:
        raise UsageError(f"correspondence: need n_null >= 1, threshold >= 0, 0 < fdr_alpha < 1, "
                         f"0 < min_kept <= 1; got {n_null}, {threshold}, {fdr_alpha}, {min_kept}")
    n_atoms, n_net = z.shape[0], nets.shape[0]
    names = list(atom_names) if atom_names is not None else list(range(n_atoms))
    if len(names) != n_atoms:
        raise UsageError(f"{len(names)} atom names for {n_atoms} maps")
    net_size = nets.sum(axis=1)
    t0 = time.perf_counter()
    null = _ShiftNull(mask, nets.astype(np.float64))
    # for every shift, the share of each network in the part of the brain a shifted map can cover
    cover = null.counts(np.ones(n_vox))
    cover_share = cover[:-1] / np.maximum(cover[-1], 1)[None]  # (n_net, n_shifts)
    share = net_size / n_vox
    rows = []
    pvals = np.ones((n_atoms, n_net, 2))
    for a in range(n_atoms):
        for s, sign in enumerate(SIGNS):
            m = z[a] > threshold if s == 0 else z[a] < -threshold
            k = int(m.sum())
            inter = overlap_counts(m[None], nets)[0] if k else np.zeros(n_net, np.int64)
            if k:
                c = null.counts(m.astype(np.float64))
                kept = c[-1]
                valid = np.flatnonzero(kept >= min_kept * k)
                valid = valid[valid != 0]  # the identity shift is the observed map
                if valid.size == 0:
                    log.warning("atom %s %s: no shift keeps %.0f%% of its %d voxels in the mask; p = 1",
                                names[a], sign, 100 * min_kept, k)
                else:
                    if exhaustive:
                        pick = valid
                    else:
                        rng = np.random.default_rng([seed, a, s])
                        pick = rng.choice(valid, size=n_null, replace=valid.size < n_null)
                    stat_null = _excess(c[:-1, pick], kept[pick][None], cover_share[:, pick])
                    stat_obs = _excess(inter, k, share)
                    exceed = (stat_null >= stat_obs[:, None] - 1e-9).sum(axis=1)
                    pvals[a, :, s] = (1 + exceed) / (1 + pick.size)
            for n in range(n_net):
                ov = int(inter[n])
                den = k + int(net_size[n])
                union = den - ov
                rows.append((names[a], atlas.labels[n], sign, k, int(net_size[n]), ov,
                             2 * ov / den if den else 0.0, ov / union if union else 0.0,
                             ov / k if k else 0.0, float(pvals[a, n, s])))
        if (a + 1) % 16 == 0:
            log.info("correspondence: %d/%d atoms (%.1f s)", a + 1, n_atoms, time.perf_counter() - t0)
    df = pd.DataFrame(rows, columns=COLUMNS[:10])
    ok = np.ones(n_atoms, bool) if stable is None else np.asarray(stable, bool).ravel()
    if ok.shape != (n_atoms,):
        raise UsageError(f"stable must have one flag per atom ({n_atoms}), got shape {ok.shape}")
    df["stable"] = np.repeat(ok, n_net * 2)  # rows are atom-major
    df["q"] = np.nan
    if df["stable"].any():
        df.loc[df["stable"], "q"] = false_discovery_control(df.loc[df["stable"], "p"].to_numpy(), method="bh")
    df["linked"] = df["stable"] & (df["q"] < fdr_alpha) & (df["dice"] > 0)
    log.info("correspondence with %s: %d atoms x %d networks x 2 signs, %d links, %.1f s",
             atlas.name, n_atoms, n_net, int(df["linked"].sum()), time.perf_counter() - t0)
    df.attrs.update(atlas=atlas.name, threshold=threshold, n_null=n_null, seed=seed, map_rule=map_rule,
                    fdr_alpha=fdr_alpha, min_kept=min_kept, null="circular 3D shifts in the mask box")
    return df[COLUMNS]


def preferred_atom_maps(z: np.ndarray) -> np.ndarray:
    """Each voxel's z kept for the atom with the largest |z| there, 0 for the other atoms.

    Marginal atom maps (``encoding.fit``'s default) of correlated atoms overlap:
    on the demo, a voxel driven by one atom at r 0.85 is also significant for
    atoms that correlate with it at 0.1-0.3. Keeping each voxel for its
    preferred atom (a winner-take-all map, as the "best feature" maps of
    voxel-wise encoding) attributes it once.

    Parameters
    ----------
    z : ndarray, shape (n_atoms, n_voxels)

    Returns
    -------
    ndarray, shape (n_atoms, n_voxels)
    """
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros_like(z)
    if z.size:
        best = np.abs(z).argmax(axis=0)
        cols = np.arange(z.shape[1])
        out[best, cols] = z[best, cols]
    return out


def links_table(corr_df: pd.DataFrame) -> pd.DataFrame:
    """The linked rows of a :func:`correspondence` table.

    Returns
    -------
    DataFrame
        Columns ``atom, network, sign, dice, p, q``, sorted by atom, sign, q.
    """
    missing = set(COLUMNS) - set(corr_df.columns)
    if missing:
        raise DataError(f"not a correspondence table: missing columns {sorted(missing)}")
    out = corr_df.loc[corr_df["linked"].astype(bool), ["atom", "network", "sign", "dice", "p", "q"]]
    return out.sort_values(["atom", "sign", "q"], kind="stable").reset_index(drop=True)
