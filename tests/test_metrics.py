"""Metric functions on hand-made arrays with known answers."""
import numpy as np
import pytest

from lesiontrack import metrics
from lesiontrack.sitk_bridge import matrix_to_transform


def _blob(shape, sl):
    a = np.zeros(shape, bool)
    a[sl] = True
    return a


def test_dice_known_values():
    a = _blob((10, 10, 10), np.s_[0:4, 0:5, 0:5])     # 100 voxels
    b = _blob((10, 10, 10), np.s_[2:6, 0:5, 0:5])     # 100 voxels, 50 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, ~a) == 0.0
    assert metrics.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="one grid"):
        metrics.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


def test_lesion_detection_counts():
    truth = np.zeros((20, 20, 20), bool)
    truth[1:3, 1:3, 1:3] = True        # lesion 1, detected
    truth[10:12, 10:12, 10:12] = True  # lesion 2, missed
    truth[15, 15, 15] = True           # lesion 3 (1 voxel), detected
    pred = np.zeros_like(truth)
    pred[2:4, 2:4, 2:4] = True         # hits lesion 1
    pred[15, 15, 15] = True            # hits lesion 3
    pred[5:7, 15:17, 1:3] = True       # false positive
    r = metrics.lesion_detection(truth, pred)
    assert (r["n_truth"], r["n_pred"], r["tp_truth"], r["tp_pred"], r["fp"]) == (3, 3, 2, 2, 1)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    # ignoring lesions below 2 mm^3 drops the single voxels on both sides
    r = metrics.lesion_detection(truth, pred, min_volume_mm3=2)
    assert (r["n_truth"], r["tp_truth"], r["fp"]) == (2, 1, 1)


def test_lesion_detection_connectivity():
    truth = np.zeros((5, 5, 5), bool)
    truth[1, 1, 1] = truth[2, 2, 2] = True   # diagonal neighbours
    assert metrics.lesion_detection(truth, truth)["n_truth"] == 1
    assert metrics.lesion_detection(truth, truth, connectivity=1)["n_truth"] == 2
    with pytest.raises(ValueError, match="connectivity"):
        metrics.lesion_detection(truth, truth, connectivity=4)


def test_volume_error():
    t = _blob((10, 10, 10), np.s_[0:2, 0:5, 0:5])   # 50 voxels
    p = _blob((10, 10, 10), np.s_[0:3, 0:5, 0:5])   # 75 voxels
    r = metrics.volume_error(t, p, spacing=(1, 1, 2))
    assert r["truth_mm3"] == 100 and r["pred_mm3"] == 150
    assert r["rel"] == pytest.approx(0.5)
    assert r["abs_mm3"] == 50


def test_registration_error_known_shift():
    pts = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], float)
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = [3, 4, 0]                     # 5 mm everywhere
    r = metrics.registration_error(matrix_to_transform(a), matrix_to_transform(b), pts)
    assert r["mean_mm"] == pytest.approx(5) and r["max_mm"] == pytest.approx(5)
    # a 90 degree rotation about z: the error grows with distance from the axis
    rot = np.eye(4)
    rot[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    r = metrics.registration_error(rot, a, pts)
    assert r["max_mm"] == pytest.approx(10 * np.sqrt(2))
    assert r["mean_mm"] == pytest.approx(2 * 10 * np.sqrt(2) / 3)
