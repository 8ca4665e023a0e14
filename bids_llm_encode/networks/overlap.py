"""Correspondence between atom z maps and functional brain networks, with a spatial null.

For each atom, the positive part (``z > threshold``, "activation") and the
negative part (``z < -threshold``, "deactivation") of its map are thresholded
separately and compared with each network of an :class:`~bids_llm_encode.records.Atlas`:

- ``dice`` = 2 |M & N| / (|M| + |N|), ``jaccard`` = |M & N| / |M | N|,
- ``overlap_rate`` = |M & N| / |M|: the fraction of the map's supra-threshold
  voxels that lie in the network (the "overlap rate" of the paper's Fig. 3 read
  as a precision; 0 for an empty map).

Spatial nulls (``null``, ``--fbn-null``)
----------------------------------------
- ``spin`` (default for the built-in CA12 / Yeo7 / Yeo17 through ``auto``): the
  maps are projected onto the fsLR 32k cortex and tested against rotations of
  the networks on the sphere (:mod:`~bids_llm_encode.networks.surface`).
- ``volume`` (default for TemplateFlow and user atlases): the circular 3D
  shifts below, with maps and networks cut to the grey matter
  (:func:`~bids_llm_encode.networks.atlases.grey_matter`), so that a shifted
  map is compared only where maps can be.
- ``shift``: the same shifts in the whole brain mask (the first version; its
  null is too light for grey-matter maps: 9-10 % at p < 0.05).

Circular 3D shifts: the thresholded map is embedded in the bounding box of the
null's mask (padded to FFT-friendly lengths, zero outside the mask) and
shifted circularly by a random 3D offset, keeping its shape, size and
smoothness; the part that falls inside the mask is compared with the network.
All offsets are evaluated at once with FFT cross-correlations (``|shift(M) & N|``
and ``|shift(M) & mask|`` for every offset), and ``n_null`` offsets are drawn
among those that keep at least ``min_kept`` (default half) of the map inside
the mask. Because a shifted map loses voxels at the edge and covers a region
with more or less of each network, the statistic is the overlap in excess of
chance in binomial units (:func:`_excess`), and the one-sided p-value is
``(1 + #{null >= observed}) / (1 + n_null)``; for the observed map the
statistic is monotone in the Dice, so this is a test of the Dice.

The same offsets (rotations) serve every network, and the p-values are BH-FDR
corrected over atoms x networks x signs. A link needs ``q < fdr_alpha`` and
``dice >= min_dice`` (default 0.1). ``docs/networks.md`` shows the calibration.
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
           "jaccard", "overlap_rate", "p", "q", "stable", "null", "min_dice", "linked"]
#: Columns of :func:`links_table`.
LINK_COLUMNS = ["atom", "network", "sign", "dice", "p", "q", "null", "min_dice"]


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


#: Spatial nulls (``--fbn-null``); "auto" picks "spin" for the built-in surface atlases, else "volume".
NULLS = ("auto", "spin", "volume", "shift")
#: Default minimum Dice of a link (docs/networks.md: why 0.1).
DEFAULT_MIN_DICE = 0.1


def network_codes(nets: np.ndarray) -> np.ndarray:
    """Boolean network maps (n_networks, n) -> codes (n,) uint8: 0 = none, j + 1 = network j (the first)."""
    nets = np.asarray(nets, bool)
    return np.where(nets.any(axis=0), nets.argmax(axis=0) + 1, 0).astype(np.uint8)


def resolve_null(null: str, atlas: Atlas, grayordinates: bool = False) -> str:
    """The null that serves an atlas: ``auto`` -> ``spin`` for CA12 / Yeo7 / Yeo17, ``volume`` otherwise.

    On grayordinates (a CIFTI run) every atlas is on the fsLR cortex: ``spin``;
    the volume nulls need a voxel grid (exit 64).
    """
    from .surface import is_surface_atlas

    if null not in NULLS:
        raise UsageError(f"the spatial null must be one of {', '.join(NULLS)}; got {null!r}")
    if grayordinates:
        if null in ("volume", "shift"):
            raise UsageError(f"--fbn-null {null} needs volume maps; CIFTI inputs (--space fsLR) are tested "
                             "with the spin test: use --fbn-null auto or spin")
        return "spin"
    if null == "auto":
        return "spin" if is_surface_atlas(atlas) else "volume"
    if null == "spin" and not is_surface_atlas(atlas):
        raise UsageError(f"--fbn-null spin needs an atlas defined on the fsLR cortex (CA12, Yeo7, Yeo17); "
                         f"{atlas.name} is a volume atlas: use --fbn-null auto or volume")
    return null


def _shift_pvalues(maps, mask, nets, *, n_null, seed, min_kept, names, what) -> np.ndarray:
    """One-sided shift-null p of every (atom, sign) map with every network.

    Parameters
    ----------
    maps : ndarray of bool, shape (n_atoms, 2, n_support)
        Over the voxels of ``mask`` (3D bool), mask order.
    nets : ndarray of bool, shape (n_networks, n_support)

    Returns
    -------
    ndarray, shape (n_atoms, n_networks, 2)
    """
    n_atoms, n_net, n_vox = maps.shape[0], nets.shape[0], int(mask.sum())
    exhaustive = not n_null
    null = _ShiftNull(mask, nets.astype(np.float64))
    # for every shift, the share of each network in the part of the support a shifted map can cover
    cover = null.counts(np.ones(n_vox))
    cover_share = cover[:-1] / np.maximum(cover[-1], 1)[None]  # (n_net, n_shifts)
    share = nets.sum(axis=1) / n_vox
    pvals = np.ones((n_atoms, n_net, 2))
    t0 = time.perf_counter()
    for a in range(n_atoms):
        for s, sign in enumerate(SIGNS):
            m = maps[a, s]
            k = int(m.sum())
            if not k:
                continue
            inter = overlap_counts(m[None], nets)[0]
            c = null.counts(m.astype(np.float64))
            kept = c[-1]
            valid = np.flatnonzero(kept >= min_kept * k)
            valid = valid[valid != 0]  # the identity shift is the observed map
            if valid.size == 0:
                log.warning("atom %s %s: no shift keeps %.0f%% of its %d voxels in the %s; p = 1",
                            names[a], sign, 100 * min_kept, k, what)
                continue
            if exhaustive:
                pick = valid
            else:
                rng = np.random.default_rng([seed, a, s])
                pick = rng.choice(valid, size=n_null, replace=valid.size < n_null)
            stat_null = _excess(c[:-1, pick], kept[pick][None], cover_share[:, pick])
            stat_obs = _excess(inter, k, share)
            exceed = (stat_null >= stat_obs[:, None] - 1e-9).sum(axis=1)
            pvals[a, :, s] = (1 + exceed) / (1 + pick.size)
        if (a + 1) % 16 == 0:
            log.info("shift null: %d/%d atoms (%.1f s)", a + 1, n_atoms, time.perf_counter() - t0)
    return pvals


def correspondence(
    z_maps: np.ndarray,
    mask_img,
    atlas: Atlas,
    *,
    threshold: float = 3.1,
    null: str = "auto",
    n_null: Optional[int] = 1000,
    n_spins: int = 1000,
    seed: int = 0,
    fdr_alpha: float = 0.05,
    min_dice: float = DEFAULT_MIN_DICE,
    min_kept: float = 0.5,
    atom_names: Optional[Sequence] = None,
    map_rule: str = "winner",
    stable: Optional[Sequence[bool]] = None,
    cache=None,
    grey: Optional[np.ndarray] = None,
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
    null : {"auto", "spin", "volume", "shift"}
        "spin": the maps are projected onto the fsLR 32k cortex
        (:func:`~bids_llm_encode.networks.surface.volume_to_cortex`), thresholded
        there, compared with the atlas's own vertex labels, and tested against
        ``n_spins`` rotations of the networks (built-in atlases only).
        "volume": circular 3D shifts with maps and networks cut to the grey
        matter (:func:`~bids_llm_encode.networks.atlases.grey_matter`), so that
        a shifted map is compared only where maps can be. "shift": the same
        shifts over the whole brain mask (the first version; its null is too
        light for grey-matter maps). "auto": "spin" for CA12 / Yeo7 / Yeo17,
        "volume" for the others.
    n_null : int or None
        Volume nulls: circular shifts drawn per map (the same offsets serve all networks).
        ``None`` (or 0) uses every valid shift (typically 10^4 - 10^5 at 4 mm)
        at no extra cost.
    n_spins : int
        Spin test: rotations (cached per mesh, seed and number).
    seed : int
    fdr_alpha : float
    min_dice : float
        ``linked`` means ``q < fdr_alpha`` and ``dice >= min_dice`` (and ``dice > 0``).
    min_kept : float
        Volume nulls: a shift is used only if at least this fraction of the map
        stays in the support (the mask for "shift", the grey matter for "volume").
    atom_names : sequence, optional
        Values of the ``atom`` column (default 0 .. n_atoms - 1).
    map_rule : {"winner", "all"}
        "winner" (default): a voxel (vertex, for the spin test) belongs to the
        map of the atom with the largest |z| there only (:func:`preferred_atom_maps`);
        "all": every atom's map is its own thresholded z.
    stable : sequence of bool, shape (n_atoms,), optional
        Atoms reproducible across the dictionary's restarts
        (``patterns.consensus.linkable_atoms``). The others keep their rows and
        p-values but are never linked, and their q is NaN: the FDR runs over
        the stable atoms' tests only. Default: all stable.
    cache : Cache, optional
        Where the spin test's rotations are kept (namespace ``spins``).
    grey : ndarray of bool, shape (n_voxels,), optional
        The volume null's support; default :func:`~bids_llm_encode.networks.atlases.grey_matter`.

    Returns
    -------
    DataFrame
        One row per atom x network x sign with columns :data:`COLUMNS`. For
        rows whose ``null`` is "spin", ``n_map_voxels``, ``n_network_voxels``
        and ``n_overlap`` count fsLR 32k vertices and the overlap measures are
        the surface's; otherwise they count mask voxels. A map with no
        supra-threshold element has dice 0 and p 1.
    """
    from .atlases import grey_matter
    from .surface import cortex_labels, spin_codes, spin_indices, spin_pvalues, volume_to_cortex

    from ..bids.images import Grayordinates

    grid = mask_img if isinstance(mask_img, Grayordinates) else None
    if grid is None:
        mask_img, mask = _as_mask(mask_img)
        n_vox = int(mask.sum())
    else:
        n_vox = grid.size
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
    kind = resolve_null(null, atlas, grayordinates=grid is not None)
    exhaustive = not n_null
    if ((not exhaustive and n_null < 1) or threshold < 0 or not 0 < fdr_alpha < 1 or not 0 < min_kept <= 1
            or not 0 <= min_dice <= 1 or n_spins < 1):
        raise UsageError(f"correspondence: need n_null >= 1, n_spins >= 1, threshold >= 0, 0 < fdr_alpha < 1, "
                         f"0 < min_kept <= 1, 0 <= min_dice <= 1; got {n_null}, {n_spins}, {threshold}, "
                         f"{fdr_alpha}, {min_kept}, {min_dice}")
    n_atoms, n_net = z.shape[0], nets.shape[0]
    names = list(atom_names) if atom_names is not None else list(range(n_atoms))
    if len(names) != n_atoms:
        raise UsageError(f"{len(names)} atom names for {n_atoms} maps")
    t0 = time.perf_counter()
    if kind == "spin":
        if grid is not None:  # grayordinates: the cortical ones are the fsLR 32k vertices already
            ctx = grid.cortex()
            zs, codes = z[:, ctx], network_codes(nets[:, ctx])
            if not codes.any():
                raise DataError(f"atlas {atlas.name} labels no cortical grayordinate; the spin test needs "
                                "cortical networks")
        else:
            zs, codes = volume_to_cortex(z, mask_img), cortex_labels(atlas)
        if map_rule == "winner":
            zs = preferred_atom_maps(zs)
        maps = np.stack([zs > threshold, zs < -threshold], axis=1)  # (n_atoms, 2, n_vertices)
        spun = spin_codes(codes, spin_indices(n_spins, seed, cache))
        ov, _, p = spin_pvalues(maps.reshape(2 * n_atoms, -1), codes, n_net, spun)
        inter = ov.reshape(n_atoms, 2, n_net).transpose(0, 2, 1)
        pvals = p.reshape(n_atoms, 2, n_net).transpose(0, 2, 1)
        net_size = np.bincount(codes, minlength=n_net + 1)[1:]
        described = f"spin test: {n_spins} rotations of the fsLR 32k sphere (surface maps, vertices)"
    else:
        if map_rule == "winner":
            z = preferred_atom_maps(z)
        maps = np.stack([z > threshold, z < -threshold], axis=1)  # (n_atoms, 2, n_voxels)
        inter = np.einsum("asv,nv->ans", maps.astype(np.float32), nets.astype(np.float32))
        inter = np.rint(inter).astype(np.int64)
        net_size = nets.sum(axis=1)
        if kind == "volume":
            sup = grey_matter(mask_img) if grey is None else np.asarray(grey, bool)
            if sup.shape != (n_vox,) or not sup.any():
                raise DataError(f"the volume null's support must be a non-empty flag per mask voxel ({n_vox})")
            sub = np.zeros_like(mask)
            sub[mask] = sup
            pvals = _shift_pvalues(maps[:, :, sup], sub, nets[:, sup], n_null=n_null, seed=seed,
                                   min_kept=min_kept, names=names, what="grey matter")
            described = "circular 3D shifts within the grey matter"
        else:
            pvals = _shift_pvalues(maps, mask, nets, n_null=n_null, seed=seed, min_kept=min_kept,
                                   names=names, what="mask")
            described = "circular 3D shifts in the mask box"
    k = maps.sum(axis=2)  # (n_atoms, 2)
    rows = []
    for a in range(n_atoms):
        for s, sign in enumerate(SIGNS):
            ka = int(k[a, s])
            for n in range(n_net):
                ov = int(inter[a, n, s]) if ka else 0
                den = ka + int(net_size[n])
                union = den - ov
                rows.append((names[a], atlas.labels[n], sign, ka, int(net_size[n]), ov,
                             2 * ov / den if den else 0.0, ov / union if union else 0.0,
                             ov / ka if ka else 0.0, float(pvals[a, n, s]) if ka else 1.0))
    df = pd.DataFrame(rows, columns=COLUMNS[:10])
    ok = np.ones(n_atoms, bool) if stable is None else np.asarray(stable, bool).ravel()
    if ok.shape != (n_atoms,):
        raise UsageError(f"stable must have one flag per atom ({n_atoms}), got shape {ok.shape}")
    df["stable"] = np.repeat(ok, n_net * 2)  # rows are atom-major
    df["q"] = np.nan
    if df["stable"].any():
        df.loc[df["stable"], "q"] = false_discovery_control(df.loc[df["stable"], "p"].to_numpy(), method="bh")
    df["null"] = kind
    df["min_dice"] = float(min_dice)
    df["linked"] = df["stable"] & (df["q"] < fdr_alpha) & (df["dice"] > 0) & (df["dice"] >= min_dice)
    log.info("correspondence with %s (%s): %d atoms x %d networks x 2 signs, %d links (q < %g, "
             "dice >= %g), %.1f s", atlas.name, described, n_atoms, n_net, int(df["linked"].sum()),
             fdr_alpha, min_dice, time.perf_counter() - t0)
    df.attrs.update(atlas=atlas.name, threshold=threshold, n_null=n_null, n_spins=n_spins, seed=seed,
                    map_rule=map_rule, fdr_alpha=fdr_alpha, min_dice=min_dice, min_kept=min_kept,
                    null=kind, null_description=described)
    return df[COLUMNS]


#: Sidecar descriptions of the columns that say how a row was tested.
NULL_COLUMNS = {
    "null": {"Description": "the spatial null that gave p: spin (rotations of the fsLR 32k sphere; the "
             "counts and overlaps are then of surface vertices), volume (circular shifts within the grey "
             "matter) or shift (circular shifts in the whole brain mask)"},
    "min_dice": {"Description": "the overlap floor a link needs beside q < FDRAlpha"},
}


def null_meta(corr_df: pd.DataFrame) -> dict:
    """Sidecar keys that say which null served a :func:`correspondence` table, and the link rule."""
    a = corr_df.attrs
    out = {"SpatialNull": a.get("null"), "SpatialNullDescription": a.get("null_description"),
           "MinDice": a.get("min_dice"),
           "LinkRule": "q < FDRAlpha (BH over the stable atoms' tests) and dice >= MinDice"}
    if a.get("null") == "spin":
        out["Spins"] = a.get("n_spins")
    return out


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
        Columns :data:`LINK_COLUMNS` (``atom, network, sign, dice, p, q, null, min_dice``:
        the null that gave p, and the overlap floor the link passed), sorted by atom, sign, q.
    """
    missing = set(COLUMNS) - set(corr_df.columns)
    if missing:
        raise DataError(f"not a correspondence table: missing columns {sorted(missing)}")
    out = corr_df.loc[corr_df["linked"].astype(bool), LINK_COLUMNS]
    return out.sort_values(["atom", "sign", "q"], kind="stable").reset_index(drop=True)
