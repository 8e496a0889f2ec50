"""Robust intensity statistics of normal-appearing tissue (private helpers).

Lesions, partial volume and registration error of the atlas priors all add
tails to a tissue's intensity histogram; its *peak* does not move. The peak
position and the half-widths of the peak on either side (half width at half
maximum / 1.1774 = the sigma of a Gaussian) are therefore the statistics used
for normalisation and z-scores: a lesion load of tens of millilitres changes
neither.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Peak", "tissue_peak"]

_HWHM_TO_SIGMA = 1.0 / np.sqrt(2.0 * np.log(2.0))   # HWHM = 1.1774 sigma


@dataclass(frozen=True)
class Peak:
    """Mode of a tissue's intensity distribution and its Gaussian widths.

    ``sigma_low`` is estimated from the half of the peak below the mode,
    ``sigma_high`` from the half above it; use the side that the abnormality
    under study does not contaminate (the low side for hyperintense lesions).
    """

    mode: float
    sigma_low: float
    sigma_high: float
    n: int

    @property
    def sigma(self) -> float:
        """The narrower of the two half-widths (the less contaminated side)."""
        return min(self.sigma_low, self.sigma_high)


def tissue_peak(values: np.ndarray, bins: int = 256, smooth_bins: float = 2.0,
                clip_percentiles=(0.5, 99.5)) -> Peak:
    """Peak (mode) and half-widths of the histogram of ``values``.

    Parameters
    ----------
    values : ndarray
        Intensities of one tissue class (any shape; flattened).
    bins : int
        Histogram bins between the ``clip_percentiles`` of the values.
    smooth_bins : float
        Gaussian smoothing of the histogram, in bins.
    clip_percentiles : (float, float)
        Range of the histogram, in percentiles of the values.

    Returns
    -------
    Peak
        ``sigma_low``/``sigma_high`` are at least one bin width, so a
        noiseless image still gives finite z-scores.

    Raises
    ------
    ValueError
        Fewer than 100 values (no histogram can be estimated).
    """
    v = np.asarray(values, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size < 100:
        raise ValueError(f"tissue_peak: need at least 100 values to estimate a peak, got {v.size}")
    lo, hi = np.percentile(v, clip_percentiles)
    if not hi > lo:
        return Peak(float(lo), 1e-6 * max(abs(float(lo)), 1.0), 1e-6 * max(abs(float(lo)), 1.0), v.size)
    h, edges = np.histogram(v, bins=bins, range=(float(lo), float(hi)))
    h = ndi.gaussian_filter1d(h.astype(np.float64), smooth_bins, mode="constant")
    centres = 0.5 * (edges[1:] + edges[:-1])
    width = float(edges[1] - edges[0])
    i = int(np.argmax(h))
    below = np.flatnonzero(h[:i] <= h[i] / 2)
    above = np.flatnonzero(h[i:] <= h[i] / 2)
    left = centres[below[-1]] if below.size else centres[0]
    right = centres[i + above[0]] if above.size else centres[-1]
    s_lo = max((centres[i] - left) * _HWHM_TO_SIGMA, width)
    s_hi = max((right - centres[i]) * _HWHM_TO_SIGMA, width)
    return Peak(float(centres[i]), float(s_lo), float(s_hi), int(v.size))
