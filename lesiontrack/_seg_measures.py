"""Per-lesion measures in physical units, over all connected components at once."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._seg_atlas import LOCATION_NAMES

__all__ = ["lesion_measures"]

_COLUMNS = ["lesion_id", "volume_mm3", "centroid_x", "centroid_y", "centroid_z", "location",
            "restricted_mm3", "blackhole_mm3", "enhancing_mm3"]


def lesion_measures(labels, spacing, affine, masks, priors) -> pd.DataFrame:
    """One row per lesion label: volume, world centroid, location class, sub-volumes.

    Parameters
    ----------
    labels : ndarray of int
        Lesion labels (0 = background), e.g. from :func:`scipy.ndimage.label`
        with 26-connectivity or the tracked lesion IDs.
    spacing : sequence of 3 floats
        Voxel size (mm).
    affine : (4, 4) array_like
        Voxel -> world (RAS mm) of the grid.
    masks : SessionMasks
        ``restricted``, ``blackhole`` and ``enhancing`` masks of the session.
    priors : Priors
        ``location`` map (0 none, 1 periventricular, 2 juxtacortical,
        3 infratentorial, 4 deep white matter).

    Returns
    -------
    DataFrame
        Columns ``lesion_id, volume_mm3, centroid_x, centroid_y, centroid_z``
        (mm, world RAS), ``location`` (name), ``restricted_mm3, blackhole_mm3,
        enhancing_mm3``. A lesion touching the periventricular zone is
        periventricular, else one touching the juxtacortical zone is
        juxtacortical; a lesion mostly infratentorial is infratentorial first.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"lesion_measures: labels must be 3D, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("lesion_measures: labels must be non-negative")
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in _COLUMNS}).astype(
            {"lesion_id": "int64", "location": "object"})
    vox = float(np.prod(spacing))
    # compact relabelling 1..n so bincount stays small whatever the IDs
    lut = np.zeros(int(ids.max()) + 1, np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    nz = np.nonzero(labels)
    lab = lut[labels[nz]]
    n = ids.size + 1
    count = np.bincount(lab, minlength=n)[1:].astype(np.float64)
    ijk = np.stack([np.bincount(lab, weights=c, minlength=n)[1:] for c in nz], axis=1) / count[:, None]
    aff = np.asarray(affine, dtype=np.float64)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]

    def vol(mask):
        return np.bincount(lab, weights=np.asarray(mask)[nz].astype(np.float64), minlength=n)[1:] * vox

    loc = np.asarray(priors.location)[nz].astype(np.int64)
    per = np.bincount(lab * 5 + loc, minlength=n * 5).reshape(n, 5)[1:]
    code = np.where(per[:, 4] + per[:, 1] + per[:, 2] + per[:, 3] > 0, 4, 0)
    code = np.where(per[:, 2] > 0, 2, code)
    code = np.where(per[:, 1] > 0, 1, code)
    code = np.where(per[:, 3] * 2 > count, 3, code)
    names = np.array([LOCATION_NAMES[i] for i in range(5)], dtype=object)
    return pd.DataFrame({
        "lesion_id": ids.astype(np.int64), "volume_mm3": count * vox,
        "centroid_x": xyz[:, 0], "centroid_y": xyz[:, 1], "centroid_z": xyz[:, 2],
        "location": names[code],
        "restricted_mm3": vol(masks.restricted), "blackhole_mm3": vol(masks.blackhole),
        "enhancing_mm3": vol(masks.enhancing)})
