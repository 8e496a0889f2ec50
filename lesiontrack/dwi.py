"""Diffusion-weighted imaging: b-values/vectors and the trace ADC fit.

The fit is the log-linear least-squares fit of the direction-averaged (trace)
signal against the b-value, voxelwise and vectorised:
``log S(b) = log S0 - b * ADC``. The trace signal of a shell is the geometric
mean of its directions (the mean of the logarithms), which cancels the
diffusion anisotropy to first order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image import Image

__all__ = ["DWIMaps", "DWIError", "read_bvals_bvecs", "fit_dwi"]


class DWIError(ValueError):
    """Diffusion inputs are inconsistent; the message names the file or parameter."""


@dataclass
class DWIMaps:
    """DWI-derived maps on the native DWI grid.

    Attributes
    ----------
    b0 : Image
        Mean of the b=0 volumes (used to register the series).
    b1000 : Image
        Mean of the volumes of the highest shell (the trace-weighted image).
    adc : Image
        Apparent diffusion coefficient in mm^2/s.
    """

    b0: Image
    b1000: Image
    adc: Image


def _read_numbers(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise DWIError(f"{path}: {what} file does not exist")
    try:
        rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        arr = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError:
        raise DWIError(f"{path}: {what} file must hold whitespace-separated numbers") from None
    if arr.size == 0:
        raise DWIError(f"{path}: {what} file is empty")
    return arr


def read_bvals_bvecs(bval_path, bvec_path, n_volumes: int, *,
                     b0_max: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL-style ``.bval`` / ``.bvec`` files and check them against the series.

    Parameters
    ----------
    bval_path, bvec_path : path-like
        b-values (one row, s/mm^2) and gradient directions (3 rows, or one
        row of 3 per volume).
    n_volumes : int
        Number of volumes of the DWI series.
    b0_max : float
        b-values (s/mm^2) at or below this count as b=0 (the ``dwi_b0_max``
        setting of the ``[segment]`` config).

    Returns
    -------
    bvals : (n,) ndarray
    bvecs : (n, 3) ndarray

    Raises
    ------
    DWIError
        A count differs from ``n_volumes``, values are negative or not finite,
        or the series has no b=0 volume or no diffusion-weighted volume.
    """
    bval_path, bvec_path = Path(bval_path), Path(bvec_path)
    bvals = _read_numbers(bval_path, "b-value").ravel()
    if bvals.size != n_volumes:
        raise DWIError(f"{bval_path}: {bvals.size} b-values for a series of {n_volumes} volumes")
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise DWIError(f"{bval_path}: b-values must be finite and non-negative")
    vec = _read_numbers(bvec_path, "b-vector")
    if vec.shape == (3, n_volumes):
        bvecs = vec.T
    elif vec.shape == (n_volumes, 3):
        bvecs = vec
    else:
        raise DWIError(f"{bvec_path}: expected 3 rows of {n_volumes} values (or {n_volumes} "
                       f"rows of 3), got shape {vec.shape}")
    if not np.all(np.isfinite(bvecs)):
        raise DWIError(f"{bvec_path}: b-vectors contain NaN or Inf")
    if not np.any(bvals <= b0_max):
        raise DWIError(f"{bval_path}: no b=0 volume (smallest b-value {bvals.min():g} s/mm^2, "
                       f"b=0 means b <= {b0_max:g})")
    if bvals.max() <= b0_max:
        raise DWIError(f"{bval_path}: no diffusion-weighted volume (all b-values <= {b0_max:g} s/mm^2)")
    return bvals, bvecs


def fit_dwi(dwi: Image, bvals, bvecs, cfg: dict) -> DWIMaps:
    """Fit the trace ADC and build the b=0 and highest-shell images of a DWI series.

    Parameters
    ----------
    dwi : Image
        4D series, volumes along the last axis.
    bvals : (n,) array_like
        b-values in s/mm^2.
    bvecs : (n, 3) array_like
        Gradient directions (checked for shape; the trace fit does not need them).
    cfg : dict
        ``load_config()["segment"]``; uses ``dwi_b0_max`` (s/mm^2: b-values at or
        below count as b=0), ``dwi_shell_tolerance`` (s/mm^2: b-values this close
        form one shell) and ``adc_max`` (mm^2/s, upper clip of the fit).

    Returns
    -------
    DWIMaps
        ``b0``, ``b1000`` and ``adc`` (mm^2/s) on the native DWI grid, float32.
    """
    if dwi.data.ndim != 4:
        raise DWIError(f"{dwi.source}: fit_dwi needs a 4D series, got shape {dwi.shape}")
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    n = dwi.shape[3]
    if bvals.size != n or np.asarray(bvecs).shape != (n, 3):
        raise DWIError(f"{dwi.source}: {n} volumes but {bvals.size} b-values and b-vectors of "
                       f"shape {np.asarray(bvecs).shape}")
    b0_max, tol = float(cfg["dwi_b0_max"]), float(cfg["dwi_shell_tolerance"])
    is_b0 = bvals <= b0_max
    if not is_b0.any():
        raise DWIError(f"{dwi.source}: no b=0 volume (b <= dwi_b0_max={b0_max:g} s/mm^2)")
    if is_b0.all():
        raise DWIError(f"{dwi.source}: no diffusion-weighted volume (all b <= {b0_max:g} s/mm^2)")
    # shells: b-values grouped within the tolerance (sorted, split at gaps > tol)
    b_dw = np.sort(np.unique(bvals[~is_b0]))
    edges = b_dw[np.r_[True, np.diff(b_dw) > tol]]
    shell_of = np.where(is_b0, -1, np.searchsorted(edges, bvals, side="right") - 1)
    data = np.asarray(dwi.data, dtype=np.float32)
    eps = np.float32(1e-6)
    b0 = data[..., is_b0].mean(axis=-1)
    top = shell_of == shell_of.max()
    b_hi = data[..., top].mean(axis=-1)
    # log-linear least squares over b=0 and every shell (trace = geometric mean)
    logs = [np.log(np.maximum(b0, eps))]
    bs = [0.0]
    for s in range(len(edges)):                       # loop over shells, not voxels
        sel = shell_of == s
        logs.append(np.log(np.maximum(data[..., sel], eps)).mean(axis=-1))
        bs.append(float(bvals[sel].mean()))
    bs = np.asarray(bs, dtype=np.float32)
    bc = bs - bs.mean()
    lmean = sum(logs) / len(logs)
    slope = sum(np.float32(c) * (lg - lmean) for c, lg in zip(bc, logs)) / np.float32((bc ** 2).sum())
    adc = np.clip(-slope, 0.0, float(cfg["adc_max"])).astype(np.float32)
    adc[(b0 <= eps) | ~np.isfinite(adc)] = 0.0
    return DWIMaps(b0=Image(b0, dwi.affine, source=dwi.source),
                   b1000=Image(b_hi.astype(np.float32), dwi.affine, source=dwi.source),
                   adc=Image(adc, dwi.affine, source=dwi.source))
