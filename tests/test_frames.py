"""frame_series / words_to_frame_matrix against nilearn's compute_regressor."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from nilearn.glm.first_level import compute_regressor

from bids_llm_encode.errors import DataError, UsageError
from bids_llm_encode.signal.frames import frame_series, words_to_frame_matrix


def _real_onsets(narratives, offset=12.0):
    path = narratives / "stimuli" / "gentle" / "pieman" / "align_excerpt.csv"
    starts = [float(r[2]) for r in csv.reader(path.open()) if r[2]]
    return np.asarray(starts) + offset


@pytest.mark.parametrize("hrf", ["spm", "glover"])
@pytest.mark.parametrize("slice_ref", [0.0, 0.5])
def test_matrix_columns_equal_nilearn(narratives, hrf, slice_ref):
    onsets = _real_onsets(narratives)
    tr = 1.5
    frame_times = (np.arange(60) + slice_ref) * tr
    H = words_to_frame_matrix(onsets, frame_times, hrf, 50)
    assert H.shape == (60, onsets.size)
    for w in [0, 7, 50, onsets.size - 1]:
        ref, _ = compute_regressor(np.vstack([[onsets[w]], [0.0], [1.0]]), hrf, frame_times, oversampling=50)
        np.testing.assert_allclose(H[:, w], ref[:, 0], rtol=1e-6, atol=1e-12 * np.abs(ref).max())


def test_frame_series_equals_nilearn_per_neuron(narratives):
    rng = np.random.default_rng(0)
    onsets = _real_onsets(narratives)
    values = rng.standard_normal((onsets.size, 5))
    frame_times = (np.arange(80) + 0.5) * 1.52
    X = frame_series(onsets, values, frame_times, zscore=False)
    assert X.dtype == np.float32 and X.shape == (80, 5)
    for k in range(5):
        ref, _ = compute_regressor(np.vstack([onsets, np.zeros_like(onsets), values[:, k]]), "spm",
                                   frame_times, oversampling=50)
        np.testing.assert_allclose(X[:, k], ref[:, 0], rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # frames before the story get no input: the first frame precedes every onset by > 10 s
    assert np.allclose(X[: int((onsets.min() - 1) // 1.52)], 0)


def test_zscore_and_constant_columns():
    onsets = np.array([5.0, 6.0, 9.0, 14.0])
    frame_times = np.arange(30) * 2.0
    values = np.column_stack([[1.0, -2.0, 0.5, 3.0], np.zeros(4)])
    X = frame_series(onsets, values, frame_times)
    np.testing.assert_allclose(X[:, 0].mean(), 0, atol=1e-6)
    np.testing.assert_allclose(X[:, 0].std(), 1, atol=1e-5)
    assert np.all(X[:, 1] == 0) and np.isfinite(X).all()


def test_bad_inputs():
    with pytest.raises(DataError, match="one row per word"):
        frame_series([1.0, 2.0], np.zeros((3, 2)), np.arange(10.0))
    with pytest.raises(DataError, match="increasing"):
        words_to_frame_matrix([1.0], np.array([0.0, 2.0, 1.0]))
    with pytest.raises(UsageError, match="HRF"):
        words_to_frame_matrix([1.0], np.arange(10.0), hrf="boxcar")
    with pytest.raises(DataError, match="finite"):
        words_to_frame_matrix([np.nan], np.arange(10.0))
