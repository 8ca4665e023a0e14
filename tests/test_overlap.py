"""Map -> network correspondence: overlap measures, planted maps, spatial-null calibration.

Calibration tolerances: a rate of tests with p < 0.05 must lie within 3 binomial
sd of 0.05 (the tests of one map share its spins, so the spread is a little
wider than the binomial; the seeds are fixed, so each test is deterministic).
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from nilearn import datasets, image
from scipy.ndimage import gaussian_filter
from scipy.stats import false_discovery_control

from bids_llm_encode.cache import Cache
from bids_llm_encode.errors import DataError, UsageError
from bids_llm_encode.networks import surface
from bids_llm_encode.networks.atlases import grey_matter, load_atlas
from bids_llm_encode.networks.overlap import (
    LINK_COLUMNS, correspondence, dice, jaccard, link_agreement, links_table, overlap_rate, pairwise_dice)

N_SPINS = 200  # the tests' rotations (computed once per session, cached)


@pytest.fixture(scope="module")
def grid():
    m = datasets.load_mni152_brain_mask(resolution=2)
    m4 = image.resample_img(m, target_affine=np.diag([4, 4, 4]), interpolation="nearest",
                            force_resample=True, copy_header=True)
    return m4, m4.get_fdata() > 0, load_atlas("CA12", m4)


def _smooth(rng, mask, n, sigma=1.5):
    out = np.empty((n, int(mask.sum())))
    for i in range(n):
        f = gaussian_filter(rng.standard_normal(mask.shape), sigma, mode="wrap")
        out[i] = (f / f.std())[mask]
    return out


def test_pairwise_measures():
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 1, 0], bool)
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert overlap_rate(a, b) == pytest.approx(2 / 3)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    assert pairwise_dice(np.stack([a, b, a])) == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    with pytest.raises(DataError):
        dice(a, b[:3])


def test_planted_maps_are_detected(grid):
    mask_img, mask, atlas = grid
    rng = np.random.default_rng(0)
    z = 0.8 * _smooth(rng, mask, 3)
    aud, vis = atlas.labels.index("Auditory"), atlas.labels.index("Visual2")
    z[0, atlas.maps[aud]] += 5.0    # atom 0 activates Auditory
    z[1, atlas.maps[vis]] -= 5.0    # atom 1 deactivates Visual2
    z[2] = 0.0                      # atom 2: nothing above threshold
    df = correspondence(z, mask_img, atlas, null="shift", n_null=None)  # every valid shift: fine p-values
    assert len(df) == 3 * 12 * 2 and list(df.columns[:3]) == ["atom", "network", "sign"]
    assert (df["null"] == "shift").all() and (df["min_dice"] == 0.1).all()
    row = df.set_index(["atom", "network", "sign"])
    hit = row.loc[(0, "Auditory", "activation")]
    assert hit.linked and hit.p < 1e-3 and hit.dice > 0.5
    assert hit.n_network_voxels == atlas.maps[aud].sum()
    assert hit.dice == pytest.approx(2 * hit.n_overlap / (hit.n_map_voxels + hit.n_network_voxels))
    assert hit.overlap_rate == pytest.approx(hit.n_overlap / hit.n_map_voxels)
    assert row.loc[(1, "Visual2", "deactivation")].linked
    assert not row.loc[(0, "Visual2", "activation")].linked
    empty = df[df.atom == 2]
    assert (empty.dice == 0).all() and (empty.p == 1).all() and not empty.linked.any()
    links = links_table(df)
    assert list(links.columns) == LINK_COLUMNS == ["atom", "network", "sign", "dice", "p", "q", "null",
                                                   "min_dice"]
    assert {(0, "Auditory", "activation"), (1, "Visual2", "deactivation")} <= set(
        map(tuple, links[["atom", "network", "sign"]].to_numpy()))
    assert (df.q >= df.p - 1e-12).all()
    # drawn shifts: same seed -> same p; the smallest p is 1 / (n_null + 1)
    drawn = correspondence(z[:1], mask_img, atlas, null="shift", n_null=200, seed=1)
    again = correspondence(z[:1], mask_img, atlas, null="shift", n_null=200, seed=1)
    np.testing.assert_array_equal(drawn.p.to_numpy(), again.p.to_numpy())
    assert drawn.p.min() == pytest.approx(1 / 201)
    # an atom that is not stable across the dictionary's restarts keeps its row and p, is never linked
    flagged = correspondence(z, mask_img, atlas, null="shift", n_null=None, stable=[False, True, True])
    f0 = flagged[flagged.atom == 0]
    np.testing.assert_array_equal(f0.p.to_numpy(), df[df.atom == 0].p.to_numpy())
    assert not f0.linked.any() and f0.q.isna().all() and not f0.stable.any()
    assert flagged.set_index(["atom", "network", "sign"]).loc[(1, "Visual2", "deactivation")].linked


def test_null_calibration_on_unrelated_smooth_maps(grid):
    """Whole-mask shifts, smooth random maps (FWHM ~14 mm) over the whole mask: ~5% at p < 0.05."""
    mask_img, mask, atlas = grid
    z = _smooth(np.random.default_rng(7), mask, 120)
    df = correspondence(z, mask_img, atlas, threshold=2.0, null="shift", n_null=200, seed=3)
    tested = df[df.n_map_voxels > 0]
    assert len(tested) > 2000
    rate = (tested.p < 0.05).mean()
    # measured 0.042-0.053 over two atlases and seeds (docs/networks.md)
    assert 0.03 < rate < 0.075, rate
    assert 0.07 < (tested.p < 0.1).mean() < 0.14
    assert df.linked.mean() < 0.02


def test_link_agreement(grid):
    t1 = pd.DataFrame({"atom": [0, 0], "network": ["A", "B"], "sign": ["activation"] * 2,
                       "dice": [0.4, 0.0], "p": [0.01, 0.9], "linked": [True, False]})
    t2 = t1.assign(linked=[False, False], dice=[0.2, 0.0])
    ag = link_agreement([t1, t2]).set_index("network")
    assert ag.loc["A", "fraction_linked"] == 0.5 and ag.loc["B", "n_linked"] == 0
    assert ag.loc["A", "mean_dice"] == pytest.approx(0.3)


def test_bad_shapes(grid):
    mask_img, mask, atlas = grid
    with pytest.raises(DataError, match="n_atoms"):
        correspondence(np.zeros((2, 10)), mask_img, atlas)
    with pytest.raises(UsageError, match="null"):
        correspondence(np.zeros((1, int(mask.sum()))), mask_img, atlas, null="rotate")


# --------------------------------------------------------------------------- grey matter, spin test


@pytest.fixture(scope="module")
def spins(session_cache):
    return surface.spin_indices(N_SPINS, 0, Cache(session_cache))


@pytest.fixture(scope="module")
def grey(grid):
    return grey_matter(grid[0])


def _gm_smooth(rng, mask, grey, n):
    """Smooth random volume maps confined to the grey matter (0 elsewhere)."""
    z = _smooth(rng, mask, n)
    z[:, ~grey] = 0.0
    return z


def _surface_smooth(rng, n, sigma_mm=8.0, step=4.0):
    """Smooth random maps on the sphere: a smooth 3D Gaussian field (sd ``sigma_mm``) read at the vertices."""
    from scipy.ndimage import map_coordinates

    xyz = 100.0 * np.vstack(surface.cortex_sphere())
    side = int(np.ceil(220 / step))
    ijk = ((xyz + 110.0) / step).T
    out = np.empty((n, xyz.shape[0]))
    for i in range(n):
        f = map_coordinates(gaussian_filter(rng.standard_normal((side,) * 3), sigma_mm / step), ijk, order=1)
        out[i] = (f - f.mean()) / f.std()
    return out


def _within_3sd(rate, n, target=0.05):
    sd = np.sqrt(target * (1 - target) / n)
    return abs(rate - target) <= 3 * sd


def test_spin_rotations(spins):
    """Each vertex takes the value of the vertex its rotated position is nearest to; cached = fresh."""
    from scipy.spatial.transform import Rotation

    left, right = spins
    assert left.shape == (N_SPINS, 29696) and right.shape == (N_SPINS, 29716) and left.dtype == np.uint16
    sph_l, sph_r = surface._spheres()  # sources index the whole mesh (medial wall included)
    fresh = surface.spin_indices(2, 0)  # no cache; the first rotations of the same stream
    np.testing.assert_array_equal(fresh[0], left[:2])
    np.testing.assert_array_equal(fresh[1], right[:2])
    rot = Rotation.random(2, random_state=np.random.default_rng([0, 1729])).as_matrix()
    flip = np.diag([-1.0, 1, 1])
    spacing = 0.025  # ~2.5 mm on the 100 mm sphere: a little more than the 32k mesh's vertex spacing
    for s in range(2):
        for full, xyz, idx, r in ((sph_l, surface.cortex_sphere()[0], left, rot[s]),
                                  (sph_r, surface.cortex_sphere()[1], right, flip @ rot[s] @ flip)):
            err = np.linalg.norm(full[idx[s]] - xyz @ r, axis=1)
            # every rotated position has its source within a vertex spacing (the whole mesh is searched)
            assert np.mean(err < spacing) > 0.999, np.mean(err < spacing)
    # a uniform rotation sends every vertex to a uniformly random place: each network keeps, on
    # average, the cortex's share of the sphere (the rest falls in the medial wall: no data)
    atlas_codes = surface.cortex_labels(load_atlas("Yeo7", datasets.load_mni152_brain_mask(resolution=2)))
    spun = surface.spin_codes(atlas_codes, spins)
    size = np.bincount(atlas_codes, minlength=8)[1:]
    kept = np.stack([np.bincount(r, minlength=8)[1:] for r in spun]) / size
    np.testing.assert_allclose(kept.mean(axis=0), 59412 / 64984, atol=3 * kept.std(axis=0).max() / np.sqrt(N_SPINS))
    assert (spun != atlas_codes[None]).mean() > 0.5  # they did move
    # the value distribution is kept: a vertex's spun code is one of the original codes
    assert set(np.unique(spun)) <= set(np.unique(atlas_codes)) | {0}


@pytest.fixture(scope="module")
def gm_volume_maps(grid, grey):
    mask_img, mask, _ = grid
    return _gm_smooth(np.random.default_rng(5), mask, grey, 60)


@pytest.mark.parametrize("name", ["CA12", "Yeo7"])
def test_spin_calibration_on_surface_maps(spins, name):
    """Unrelated maps smooth on the surface: p < 0.05 in ~5% under the spin test."""
    atlas = load_atlas(name, datasets.load_mni152_brain_mask(resolution=2))
    codes = surface.cortex_labels(atlas)
    z = _surface_smooth(np.random.default_rng(11), 100)
    maps = np.vstack([z > 1.5, z < -1.5])
    _, _, p = surface.spin_pvalues(maps, codes, len(atlas.labels), surface.spin_codes(codes, spins))
    p = p[maps.any(axis=1)].ravel()
    assert p.size > 190 * len(atlas.labels)
    assert _within_3sd((p < 0.05).mean(), p.size), (p < 0.05).mean()


@pytest.fixture(scope="module")
def projected(grid, gm_volume_maps):
    return surface.volume_to_cortex(gm_volume_maps, grid[0])


def test_projection_equals_nilearn_vol_to_surf(grid, gm_volume_maps):
    """volume_to_cortex's sparse matrix gives nilearn's vol_to_surf values (depth sampling, mask)."""
    import warnings

    import nibabel as nib
    from nilearn.surface import vol_to_surf

    mask_img, mask, _ = grid
    z = gm_volume_maps[:3]
    vol = np.zeros(mask.shape + (3,))
    vol[mask] = z.T
    img = nib.Nifti1Image(vol, mask_img.affine)
    ref = []
    for hemi, ids in zip("LR", surface._cortex_vertex_ids()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # vertices with no sample in the mask: NaN
            v = vol_to_surf(img, str(surface._hemi_file(hemi, "pial")),
                            inner_mesh=str(surface._hemi_file(hemi, "white")), kind="depth",
                            interpolation="linear", mask_img=mask_img)
        ref.append(np.asarray(v).reshape(v.shape[0], -1)[ids].T)
    ref = np.nan_to_num(np.hstack(ref))
    got = surface.volume_to_cortex(z, mask_img)
    assert got.shape == ref.shape == (3, 59412) and (ref != 0).mean() > 0.5
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["CA12", "Yeo7"])
def test_spin_calibration_on_projected_grey_matter_maps(grid, projected, spins, name):
    """Grey-matter-confined smooth volume maps, projected to the surface: ~5% at p < 0.05 (spin test)."""
    atlas = load_atlas(name, grid[0])
    codes = surface.cortex_labels(atlas)
    assert projected.shape == (60, 59412) and np.abs(projected).max() > 1
    maps = np.vstack([projected > 1.0, projected < -1.0])
    _, _, p = surface.spin_pvalues(maps, codes, len(atlas.labels), surface.spin_codes(codes, spins))
    p = p[maps.any(axis=1)].ravel()
    assert p.size > 100 * len(atlas.labels)
    assert _within_3sd((p < 0.05).mean(), p.size), (p < 0.05).mean()
    assert false_discovery_control(p).min() > 0.05  # the tail fit gives no unrelated map an FDR link


@pytest.mark.parametrize("name", ["CA12", "Yeo7"])
def test_volume_null_calibration_on_grey_matter_maps(grid, grey, gm_volume_maps, name):
    """The grey-matter-restricted shifts: ~5% at p < 0.05; the whole-mask shifts are too light (~10%)."""
    mask_img, mask, _ = grid
    atlas = load_atlas(name, mask_img)
    df = correspondence(gm_volume_maps, mask_img, atlas, threshold=2.0, null="volume", n_null=None,
                        map_rule="all", grey=grey)
    tested = df[df.n_map_voxels > 0]
    assert len(tested) > 100 * len(atlas.labels) and (df["null"] == "volume").all()
    assert _within_3sd((tested.p < 0.05).mean(), len(tested)), (tested.p < 0.05).mean()
    old = correspondence(gm_volume_maps, mask_img, atlas, threshold=2.0, null="shift", n_null=None,
                         map_rule="all")
    assert (old[old.n_map_voxels > 0].p < 0.05).mean() > 0.08  # the bias issue 10 measured


def test_spin_links_planted_maps_with_an_overlap_floor(grid, session_cache):
    mask_img, mask, atlas = grid
    rng = np.random.default_rng(0)
    z = 0.8 * _smooth(rng, mask, 2)
    aud = atlas.labels.index("Auditory")
    z[0, atlas.maps[aud]] += 5.0  # atom 0 activates Auditory
    df = correspondence(z, mask_img, atlas, cache=Cache(session_cache), n_spins=N_SPINS)
    assert (df["null"] == "spin").all() and df.attrs["null"] == "spin"
    assert df.n_map_voxels.max() <= 59412  # vertices, not voxels
    assert not df[df.atom == 1].linked.any()  # the unplanted atom
    row = df.set_index(["atom", "network", "sign"])
    hit = row.loc[(0, "Auditory", "activation")]
    assert hit.linked and hit.dice > 0.3 and hit.p < 1 / (N_SPINS + 1)  # beyond every rotation: tail fit
    assert hit.n_network_voxels == int((surface.cortex_labels(atlas) == aud + 1).sum())
    # the same table with a floor above the planted map's Dice: significant, not linked
    high = correspondence(z, mask_img, atlas, cache=Cache(session_cache), n_spins=N_SPINS,
                          min_dice=min(1.0, hit.dice + 0.01))
    h = high.set_index(["atom", "network", "sign"]).loc[(0, "Auditory", "activation")]
    assert h.q < 0.05 and not h.linked
    with pytest.raises(UsageError, match="volume atlas"):
        correspondence(z, mask_img, dataclasses.replace(atlas, name="mine"), null="spin")


N_NEUROMAPS = 100  # neuromaps' rotations take ~0.1 s each


@pytest.fixture(scope="module")
def neuromaps_spins():
    return surface.neuromaps_spin_indices(N_NEUROMAPS, 3)


@pytest.mark.parametrize("name", ["CA12", "Yeo7"])
def test_spin_p_agree_with_neuromaps(spins, neuromaps_spins, name):
    """The same maps and statistic with neuromaps' own rotations (gen_spinsamples): the same p up to
    Monte Carlo error, the same share of each network lost to the medial wall, planted maps at the floor."""
    nm = neuromaps_spins
    atlas = load_atlas(name, datasets.load_mni152_brain_mask(resolution=2))
    codes, k = surface.cortex_labels(atlas), len(atlas.labels)
    z = _surface_smooth(np.random.default_rng(21), 40)
    maps = np.vstack([z > 1.5, z < -1.5])
    ours = surface.spin_pvalues(maps, codes, k, surface.spin_codes(codes, spins))[2].ravel()
    theirs = surface.spin_pvalues(maps, codes, k, surface.spin_codes(codes, nm))[2].ravel()
    # Monte Carlo sd of p at p = 0.5 with 100 and 200 rotations: sqrt(.25/100 + .25/200) = 0.061
    assert np.corrcoef(ours, theirs)[0, 1] > 0.95
    assert np.median(np.abs(ours - theirs)) < 0.05, np.median(np.abs(ours - theirs))
    size = np.bincount(codes, minlength=k + 1)[1:]
    for idx in (spins, nm):
        kept = np.stack([np.bincount(r, minlength=k + 1)[1:] for r in surface.spin_codes(codes, idx)]) / size
        assert abs(kept.mean() - 59412 / 64984) < 0.01, kept.mean()
    planted = np.stack([codes == j + 1 for j in range(k)])  # each network itself
    p = surface.spin_pvalues(planted, codes, k, surface.spin_codes(codes, nm))[2].diagonal()
    assert p.max() <= 3 / (N_NEUROMAPS + 1), p
