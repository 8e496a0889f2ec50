"""Accuracy metrics against ground truth: overlap, lesion-wise detection, volume, registration.

All functions take plain arrays (boolean or label masks on one grid) and physical
spacing in mm; nothing here loops over voxels or lesions.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["dice", "lesion_detection", "volume_error", "registration_error"]


def _as_bool(a, name):
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask, got shape {a.shape}")
    return a > 0


def dice(truth, pred) -> float:
    """Dice overlap 2|A∩B| / (|A| + |B|) of two masks (1.0 when both are empty)."""
    t, p = _as_bool(truth, "truth"), _as_bool(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth and pred must share one grid, got {t.shape} and {p.shape}")
    denom = int(t.sum()) + int(p.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(t & p)) / denom


def _components(mask, connectivity, spacing, min_volume_mm3):
    structure = ndi.generate_binary_structure(3, connectivity)
    lab, n = ndi.label(mask, structure=structure)
    if n and min_volume_mm3 > 0:
        vox = float(np.prod(spacing))
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * vox
        keep = sizes >= min_volume_mm3
        keep[0] = False
        remap = np.zeros(n + 1, np.int64)
        remap[keep] = np.arange(1, int(keep.sum()) + 1)
        lab = remap[lab]
        n = int(keep.sum())
    return lab, n


def _hit(lab_a, n_a, other_mask):
    """Per component of ``lab_a`` (1..n_a): does it overlap ``other_mask``?"""
    if n_a == 0:
        return np.zeros(0, bool)
    counts = np.bincount(lab_a[other_mask], minlength=n_a + 1)
    return counts[1:] > 0


def lesion_detection(truth, pred, *, connectivity: int = 3, spacing=(1.0, 1.0, 1.0),
                     min_volume_mm3: float = 0.0) -> dict:
    """Lesion-wise detection: connected components (26-connectivity by default).

    A truth lesion is detected when a predicted lesion overlaps it; a predicted
    lesion is a true positive when it overlaps a truth lesion. Components smaller
    than ``min_volume_mm3`` are ignored on both sides (and a predicted component
    overlapping only an ignored truth lesion is not counted as false).

    Returns
    -------
    dict with precision, recall, f1, n_truth, n_pred, tp_truth, tp_pred, fp, fn
    """
    t, p = _as_bool(truth, "truth"), _as_bool(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"truth and pred must share one grid, got {t.shape} and {p.shape}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be one of 1, 2, 3 (6-, 18-, 26-neighbourhood), got {connectivity}")
    lt, nt = _components(t, connectivity, spacing, min_volume_mm3)
    lp, np_ = _components(p, connectivity, spacing, min_volume_mm3)
    tp_truth = int(_hit(lt, nt, p).sum())
    pred_hits_any = _hit(lp, np_, t)            # overlaps any truth voxel
    pred_hits_kept = _hit(lp, np_, lt > 0)      # overlaps a counted truth lesion
    tp_pred = int(pred_hits_kept.sum())
    fp = int((~pred_hits_any).sum())
    n_pred_counted = tp_pred + fp
    precision = tp_pred / n_pred_counted if n_pred_counted else (1.0 if nt == 0 else 0.0)
    recall = tp_truth / nt if nt else (1.0 if np_ == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n_truth": nt, "n_pred": np_,
            "tp_truth": tp_truth, "tp_pred": tp_pred, "fp": fp, "fn": nt - tp_truth}


def volume_error(truth, pred, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Volumes in mm³ and the (signed) relative error of ``pred`` against ``truth``."""
    vox = float(np.prod(spacing))
    tv = float(np.count_nonzero(_as_bool(truth, "truth"))) * vox
    pv = float(np.count_nonzero(_as_bool(pred, "pred"))) * vox
    return {"truth_mm3": tv, "pred_mm3": pv, "abs_mm3": abs(pv - tv),
            "rel": (pv - tv) / tv if tv > 0 else (0.0 if pv == 0 else float("inf"))}


def registration_error(t_est, t_true, points_lps) -> dict:
    """Distances (mm) between where two transforms send the same points.

    ``t_est`` and ``t_true`` are SimpleITK transforms (or 4x4 LPS matrices) that
    should map ``points_lps`` (N, 3) to the same places; returns mean and max.
    """
    from .sitk_bridge import transform_points

    pts = np.asarray(points_lps, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points_lps must be an (N, 3) array, got shape {pts.shape}")

    def apply(t):
        if isinstance(t, np.ndarray):
            return pts @ t[:3, :3].T + t[:3, 3]
        return transform_points(t, pts)

    d = np.linalg.norm(apply(t_est) - apply(t_true), axis=1)
    return {"mean_mm": float(d.mean()), "max_mm": float(d.max()), "median_mm": float(np.median(d))}
