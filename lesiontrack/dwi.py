"""Diffusion-weighted imaging: b-values/vectors and the trace ADC fit.

The fit is the log-linear least-squares fit of the direction-averaged (trace)
signal against the b-value, voxelwise and vectorised:
``log S(b) = log S0 - b * ADC``. The trace signal of a shell is the geometric
mean of its directions (the mean of the logarithms), which cancels the
diffusion anisotropy to first order.

Only b=0 and the shells up to ``adc_fit_b_max`` (1500 s/mm^2) enter the fit: the
clinical ADC is that of b=0 and b=1000, on which the restricted-diffusion levels are
defined. Brain tissue's signal decays more slowly than one exponential at higher
b-values (diffusional kurtosis; Jensen et al. 2005, Magn Reson Med 53:1432), so a fit
through b=2000-3000 shells of a research protocol would lower every ADC, normal white
matter's below the restricted level (0.8e-3 with a kurtosis of 1 fits as 0.48e-3
over b = 0-3000). Ready ADC maps are read in whatever unit they are stored in
(mm^2/s, 1e-3 mm^2/s, 1e-6 mm^2/s as scanners often write them, m^2/s):
:func:`adc_unit_scale` finds it from the map's own values.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image import Image

__all__ = ["DWIMaps", "DWIError", "read_bvals_bvecs", "fit_dwi", "adc_unit_scale"]

log = logging.getLogger("lesiontrack")


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
        Mean of the volumes of the highest shell fitted (the trace-weighted image).
    adc : Image
        Apparent diffusion coefficient in mm^2/s.
    b_fitted : tuple of float
        Mean b-value (s/mm^2) of each shell the ADC was fitted on, b=0 first.
    """

    b0: Image
    b1000: Image
    adc: Image
    b_fitted: tuple = ()


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
        form one shell), ``adc_fit_b_max`` (s/mm^2: shells above it are left out of
        the fit) and ``adc_max`` (mm^2/s, upper clip of the fit).

    Returns
    -------
    DWIMaps
        ``b0``, ``b1000`` (the highest shell fitted) and ``adc`` (mm^2/s) on the native
        DWI grid, float32. A series whose every shell lies above ``adc_fit_b_max`` is
        fitted on its lowest shell, with a warning.
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
    b_shell = np.array([bvals[shell_of == k].mean() for k in range(len(edges))])
    fit = b_shell <= float(cfg["adc_fit_b_max"])
    if not fit.any():
        fit[0] = True
        log.warning("%s: every diffusion-weighted shell lies above adc_fit_b_max=%g s/mm^2; the "
                    "ADC is fitted on the lowest (b=%g) and lies below the clinical b=1000 ADC that "
                    "the restricted-diffusion level assumes", dwi.source, float(cfg["adc_fit_b_max"]),
                    b_shell[0])
    elif not fit.all():
        log.info("%s: ADC fitted on b=0 and b=%s s/mm^2; shells b=%s above adc_fit_b_max are left out",
                 dwi.source, ", ".join(f"{b:g}" for b in b_shell[fit]),
                 ", ".join(f"{b:g}" for b in b_shell[~fit]))
    data = np.asarray(dwi.data, dtype=np.float32)
    eps = np.float32(1e-6)
    b0 = data[..., is_b0].mean(axis=-1)
    top = shell_of == np.flatnonzero(fit).max()
    b_hi = data[..., top].mean(axis=-1)
    # log-linear least squares over b=0 and the fitted shells (trace = geometric mean)
    logs = [np.log(np.maximum(b0, eps))]
    bs = [0.0]
    for s in np.flatnonzero(fit):                     # loop over shells, not voxels
        logs.append(np.log(np.maximum(data[..., shell_of == s], eps)).mean(axis=-1))
        bs.append(float(b_shell[s]))
    bs = np.asarray(bs, dtype=np.float32)
    bc = bs - bs.mean()
    lmean = sum(logs) / len(logs)
    slope = sum(np.float32(c) * (lg - lmean) for c, lg in zip(bc, logs)) / np.float32((bc ** 2).sum())
    adc = np.clip(-slope, 0.0, float(cfg["adc_max"])).astype(np.float32)
    adc[(b0 <= eps) | ~np.isfinite(adc)] = 0.0
    return DWIMaps(b0=Image(b0, dwi.affine, source=dwi.source),
                   b1000=Image(b_hi.astype(np.float32), dwi.affine, source=dwi.source),
                   adc=Image(adc, dwi.affine, source=dwi.source),
                   b_fitted=tuple(float(b) for b in bs))


# ADC units and the median brain ADC (about 0.7-1.2e-3 mm^2/s, CSF included) in them
_ADC_UNITS = (("mm^2/s", 1.0, (1e-4, 1e-2)), ("1e-3 mm^2/s", 1e-3, (0.1, 10.0)),
              ("1e-6 mm^2/s", 1e-6, (100.0, 1e4)), ("m^2/s", 1e6, (1e-10, 1e-8)))


def adc_unit_scale(adc: Image) -> tuple[float, str]:
    """The factor that turns a ready ADC map into mm^2/s, from its own values.

    Scanners and toolboxes store ADC in mm^2/s, in 1e-3 mm^2/s (um^2/ms), in
    1e-6 mm^2/s (integers such as 800 for 0.8e-3 mm^2/s) or in m^2/s. These differ by
    factors of 1000, while the median ADC of the positive voxels of a head (brain tissue
    0.7-0.9e-3 mm^2/s, CSF 3e-3) lies within a factor of ten of 1e-3 mm^2/s whatever the
    coverage, so the median tells the unit apart.

    Returns
    -------
    scale : float
        Multiply the map by this to get mm^2/s.
    unit : str
        The unit found.

    Raises
    ------
    DWIError
        The map has no positive voxel, or its median fits none of the units; the message
        names the file.
    """
    a = np.asarray(adc.data)
    pos = a[np.isfinite(a) & (a > 0)]
    if pos.size == 0:
        raise DWIError(f"{adc.source}: the ADC map has no positive value")
    med = float(np.median(pos))
    for unit, scale, (lo, hi) in _ADC_UNITS:
        if lo <= med < hi:
            return scale, unit
    raise DWIError(f"{adc.source}: median positive ADC {med:g} fits no known unit (brain ADC is "
                   "about 0.8e-3 mm^2/s: expected a median of 1e-4 to 1e-2 in mm^2/s, 0.1-10 in "
                   "1e-3 mm^2/s, 100-10000 in 1e-6 mm^2/s, or 1e-10 to 1e-8 in m^2/s)")
