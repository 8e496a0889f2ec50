"""Status rules of tracked lesions and the image evidence behind them.

Two tests decide whether a change seen in the masks is called a change
(see ``docs/tracking.md`` for the literature behind every default):

* **volume rule** — the volume change must exceed the largest of an absolute
  minimum (``min_change_mm3``), a relative one that depends on the lesion size
  (``enlarge_rel_small`` below ``size_boundary_mm3``, ``enlarge_rel_large`` above) and
  the lesion's own measurement noise, ``mdc_z`` standard deviations of its volume.
  The noise model has two parts, both scaled by the lesion's boundary shell (the
  ``N`` voxels of its one-voxel inner boundary, voxel volume ``v``): a systematic
  shift of the whole boundary by ``boundary_shift_voxels`` between visits
  (registration, intensity normalisation), ``boundary_shift_voxels * N * v``, and
  independent partial-volume decisions of the boundary voxels (each a coin flip at
  worst), ``0.5 * sqrt(N) * v``; the two add in quadrature.
* **image evidence** — with normalised FLAIR given, a changed region must change in
  the images: the one-sided z score of its median FLAIR difference
  (:class:`DifferenceEvidence`) must reach ``min_intensity_z`` (an increase for new /
  enlarging, a decrease for shrinking / resolved). Confirmed change then replaces the
  relative term of the volume rule (``detectable_change(..., relative=False)``).
* **boundary shift integral** — with FLAIR, a continuing lesion's volume change is
  measured in the images (:func:`boundary_shift_change`): the FLAIR difference summed
  over the lesion's boundary region, in units of the lesion's own contrast. A shift or
  a jittering outline cancels in the sum, partial volume counts for what it is, and the
  noise of the sum is known from the difference image; the lesion is enlarging
  (shrinking) when the change exceeds ``mdc_z`` times that noise, ``min_change_mm3``
  and ``min_relative_change`` of its volume. Where both visits have T2w, the change is
  measured on the T2w subtraction too and counted only as far as the two acquisitions
  agree (:func:`agreeing_shift`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._morph import dilation, erosion

__all__ = ["STATUS", "NEW", "ENLARGING", "STABLE", "SHRINKING", "RESOLVED",
           "volume_status", "detectable_change", "boundary_shell", "boundary_shift_change",
           "agreeing_shift", "DifferenceEvidence"]

STATUS = np.array(["new", "enlarging", "stable", "shrinking", "resolved"], dtype=object)
NEW, ENLARGING, STABLE, SHRINKING, RESOLVED = range(5)
MIN_CONTRAST = 0.1   # lesion-to-NAWM contrast floor of the boundary shift integral (normalised FLAIR)


def boundary_shell(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each component's one-voxel inner boundary (6-neighbourhood)."""
    mask = lab > 0
    inner = erosion(mask, ndi.generate_binary_structure(3, 1))
    return np.bincount(lab[mask & ~inner], minlength=n + 1)


def detectable_change(v0_mm3, shell_voxels, voxel_volume: float, cfg: dict,
                      relative: bool = True) -> np.ndarray:
    """Smallest volume change (mm^3) called a change, per lesion (see module notes).

    ``relative=False`` leaves out the size-dependent relative term: used when the
    change is confirmed in the FLAIR subtraction, which replaces the reader's
    measurement variability that term stands for.
    """
    v0 = np.asarray(v0_mm3, dtype=np.float64)
    n = np.asarray(shell_voxels, dtype=np.float64)
    sd = voxel_volume * np.sqrt((cfg["boundary_shift_voxels"] * n) ** 2 + 0.25 * n)
    need = np.maximum(cfg["min_change_mm3"], cfg["mdc_z"] * sd)
    if relative:
        rel = np.where(v0 < cfg["size_boundary_mm3"], cfg["enlarge_rel_small"],
                       cfg["enlarge_rel_large"])
        need = np.maximum(need, rel * v0)
    return need


def boundary_shift_change(key0: np.ndarray, key1: np.ndarray, n: int, ev, voxel_volume: float):
    """Volume change of each lesion measured in the FLAIR images (boundary shift integral).

    Parameters
    ----------
    key0, key1 : ndarray of int
        The lesion (1..n) each voxel belongs to at the previous / current visit (0: none),
        on the grid of ``ev``.
    n : int
        Number of lesions.
    ev : DifferenceEvidence
        The FLAIR difference of the interval (with ``level``, the mean FLAIR of the two
        visits).
    voxel_volume : float
        mm^3 per voxel.

    Returns
    -------
    change, sd : ndarray (n + 1,)
        The volume change (mm^3, positive = growth) and its noise standard deviation.

    Notes
    -----
    The boundary shift integral (Freeborough & Fox 1997) measures a volume change as the
    intensity difference summed over the boundary region, each voxel's difference divided
    by the contrast between the two tissues. Here the region is the lesion's union over
    the two visits grown by one voxel, minus its intersection shrunk by one voxel (the
    core, whose intensity drifts without the outline moving, is left out); the two
    tissues are normal white matter (1.0 on normalised FLAIR) and the lesion's own level,
    the median of the mean FLAIR over its voxels present at both visits. Each voxel's
    change is clipped to one voxel. Voxels near two lesions go to the one with the larger
    label. A lesion that only moves (misregistration) gains on one side what it loses on
    the other, and a boundary that jitters from one segmentation to the next moves no
    intensity: both sum to about zero, while partial-volume loss counts in fractions of
    voxels. The noise SD of the sum is ``v * sqrt(m * resel) * sigma / contrast`` for
    ``m`` voxels of a difference image with noise ``sigma`` and ``resel`` voxels per
    independent sample (:class:`DifferenceEvidence`).
    """
    full = np.ones((3, 3, 3), bool)
    key = np.where(key1 > 0, key1, key0)
    union = key > 0
    inter = (key0 > 0) & (key1 > 0)
    region = dilation(union, full) & ~erosion(inter, full)
    owner = np.where(union, key, ndi.grey_dilation(key, footprint=full))[region]
    level = np.full(n + 1, np.nan)
    for where in (union, inter):                  # a lesion's level: over its core if it has one
        k = key[where]
        present = np.flatnonzero(np.bincount(k, minlength=n + 1)[1:]) + 1
        if present.size:
            level[present] = ndi.median(ev.level[where], labels=k, index=present)
    contrast = np.maximum(np.nan_to_num(level) - 1.0, MIN_CONTRAST)
    d = np.clip((ev.diff[region] - ev.offset) / contrast[owner], -1.0, 1.0)
    change = np.bincount(owner, weights=d, minlength=n + 1) * voxel_volume
    count = np.bincount(owner, minlength=n + 1)
    sd = voxel_volume * np.sqrt(count * ev.resel) * ev.sigma / contrast
    change[0] = sd[0] = 0.0
    return change, sd


def agreeing_shift(dv1, sd1, dv2, sd2):
    """One volume change per lesion from two independent boundary shift integrals.

    FLAIR and T2w are separate acquisitions, with their own slice positions. On thick
    slices a small lesion's partial volume, and so its boundary shift integral, depends
    on where the slices fall, differently in each acquisition, while a real change of
    its extent shows in both. The change is therefore the mean of the two measurements
    where they agree in direction and 0 where they do not; its noise SD is the larger of
    the two (figures in ``docs/tracking.md``).

    Parameters
    ----------
    dv1, sd1, dv2, sd2 : ndarray
        Change (mm^3) and noise SD of each lesion by :func:`boundary_shift_change` on
        the two contrasts.

    Returns
    -------
    change, sd : ndarray
    """
    dv1, dv2 = np.asarray(dv1, dtype=np.float64), np.asarray(dv2, dtype=np.float64)
    agree = np.sign(dv1) == np.sign(dv2)
    return np.where(agree, 0.5 * (dv1 + dv2), 0.0), np.maximum(sd1, sd2)


def volume_status(v0_mm3, v1_mm3, shell_voxels, voxel_volume: float, cfg: dict) -> np.ndarray:
    """Status codes (ENLARGING / STABLE / SHRINKING) from the volume rule.

    Parameters
    ----------
    v0_mm3, v1_mm3 : ndarray
        Volume of the lesion (its whole lineage) at the previous and current visit.
    shell_voxels : ndarray
        Voxel count of its boundary shell at the previous visit.
    voxel_volume : float
        mm^3 per voxel.
    cfg : dict
        The ``[track]`` configuration.
    """
    v0 = np.asarray(v0_mm3, dtype=np.float64)
    dv = np.asarray(v1_mm3, dtype=np.float64) - v0
    need = detectable_change(v0, shell_voxels, voxel_volume, cfg)
    out = np.full(v0.shape, STABLE, dtype=np.int8)
    out[dv >= need] = ENLARGING
    out[-dv >= need] = SHRINKING
    return out


class DifferenceEvidence:
    """Significance of the FLAIR change between two visits over candidate regions.

    Parameters
    ----------
    f_prev, f_cur : ndarray (float)
        Normalised FLAIR of the two visits on one grid.
    brain : ndarray of bool or None
        Where to estimate the noise (default: where either image is non-zero).
    exclude : ndarray of bool
        Voxels left out of the noise estimate (lesions of either visit).
    spacing : sequence of 3 float
        Voxel size (mm), for ``background_mm``.
    background_mm : float
        Width of the slowly varying background removed first (0: none).
    crop : tuple of slices, optional
        Keep the difference image (and ``level``, the mean of the two visits) of this
        box only: :meth:`zscore` then takes label maps of the box.

    Notes
    -----
    The noise of the difference image is estimated over the brain minus the lesions:
    its median (removed as a global offset), its robust standard deviation ``sigma``
    (1.4826 times the median absolute deviation) and its spatial smoothness — the
    lag-one autocorrelation ``rho`` along each axis, from the robust variance of the
    voxel-to-voxel differences, gives the Gaussian kernel width
    ``s = sqrt(-1 / (4 ln rho))`` voxels, and a region of ``n`` voxels holds about
    ``n_eff = n / prod(max(1, 2 sqrt(pi) s))`` independent samples. The score of a
    region is its median difference divided by the standard error of a median,
    ``1.2533 * sigma / sqrt(n_eff)``: a one-sided z statistic that is independent
    of the intensity scale, of global drifts and of the resampling smoothness.
    With ``background_mm`` > 0, differences varying more slowly than a Gaussian of that
    width (mm), estimated over the region outside lesions, are removed first: lesion
    change is focal, while bias fields and normalisation errors vary slowly.
    """

    def __init__(self, f_prev, f_cur, brain, exclude, spacing=(1.0, 1.0, 1.0),
                 background_mm: float = 0.0, crop=None):
        self.diff = np.asarray(f_cur, dtype=np.float32) - np.asarray(f_prev, dtype=np.float32)
        region = (brain if brain is not None else (f_prev != 0) | (f_cur != 0)) & ~exclude
        if background_mm > 0:
            # remove slowly varying differences (bias fields, normalisation): a
            # normalised Gaussian average of the difference over the region
            sig = [background_mm / float(sp) for sp in spacing]
            self.diff -= _background(self.diff, region, sig)
        self.noise_region = region if crop is None else None   # brain outside lesions
        vals = self.diff[region]
        if vals.size < 100:
            raise ValueError(f"too few brain voxels outside lesions ({vals.size}) to estimate "
                             "the FLAIR difference noise; check brain_mask")
        vals = vals[:: max(1, vals.size // 400_000)]      # ample for two quantiles
        self.offset = float(np.median(vals))
        self.sigma = max(_robust_sd(vals, self.offset), 1e-6)
        # lag-one differences on every other line across the axis: a quarter of the data
        thin = 2 if region.sum() > 400_000 else 1
        widths = []
        for ax in range(3):                      # loop over the three axes
            a = [slice(None, None, thin)] * 3
            b = [slice(None, None, thin)] * 3
            a[ax], b[ax] = slice(1, None), slice(None, -1)
            pair = region[tuple(a)] & region[tuple(b)]
            step = (self.diff[tuple(a)] - self.diff[tuple(b)])[pair]
            rho = 1.0 - (_robust_sd(step, 0.0) ** 2) / (2 * self.sigma ** 2) if step.size else 0.0
            s = np.sqrt(-1.0 / (4 * np.log(rho))) if 0 < rho < 1 else (0.0 if rho <= 0 else 10.0)
            widths.append(max(1.0, 2 * np.sqrt(np.pi) * s))
        self.resel = float(np.prod(widths))
        # the mean of the two visits (the lesions' own level, boundary_shift_change)
        box = crop if crop is not None else (slice(None),) * 3
        self.level = 0.5 * (np.asarray(f_prev, dtype=np.float32)[box]
                            + np.asarray(f_cur, dtype=np.float32)[box])
        if crop is not None:                     # scores are asked for inside this box only
            self.diff = np.ascontiguousarray(self.diff[crop])

    def zscore(self, lab: np.ndarray, n: int) -> np.ndarray:
        """Score (see Notes) of the difference over each label 1..n (NaN where empty)."""
        return self.scores(lab, n)[0]

    def scores(self, lab: np.ndarray, n: int):
        """Per label 1..n (NaN where empty): the region's score (see Notes) and its
        effect size, the median difference in units of the voxel noise ``sigma``."""
        out = np.full(n + 1, np.nan)
        eff = np.full(n + 1, np.nan)
        sel = lab > 0
        if n == 0 or not sel.any():
            return out, eff
        l1 = lab[sel]
        present, count = np.unique(l1, return_counts=True)
        med = np.asarray(ndi.median(self.diff[sel], labels=l1, index=present), dtype=np.float64)
        n_eff = np.maximum(count / self.resel, 1.0)
        eff[present] = (med - self.offset) / self.sigma
        out[present] = eff[present] * np.sqrt(n_eff) / 1.2533
        return out, eff


def _robust_sd(vals, centre) -> float:
    return 1.4826 * float(np.median(np.abs(vals - centre)))


def _background(values: np.ndarray, region: np.ndarray, sigma_vox) -> np.ndarray:
    """Normalised Gaussian average of ``values`` over ``region`` (wide kernel).

    Computed on a grid of blocks about a third of the kernel width along each axis
    (a kernel that wide loses nothing there), then interpolated linearly back to the
    full grid.
    """
    k = [max(1, int(s // 3)) for s in sigma_vox]
    pad = [(0, (-n) % f) for n, f in zip(values.shape, k)]
    shp = [(n + p[1]) // f for n, p, f in zip(values.shape, pad, k)]

    def coarse(a):
        b = np.pad(a, pad, mode="constant").reshape(shp[0], k[0], shp[1], k[1], shp[2], k[2])
        return ndi.gaussian_filter(b.mean(axis=(1, 3, 5)), [s / f for s, f in zip(sigma_vox, k)],
                                   mode="constant")

    w = coarse(region.astype(np.float32))
    ratio = coarse(np.where(region, values, 0).astype(np.float32)) / np.maximum(w, 1e-6)
    ratio[w < 1e-6] = 0.0
    return _upsample_linear(ratio.astype(np.float32), k, values.shape)


def _upsample_linear(a: np.ndarray, factors, shape) -> np.ndarray:
    """Linear interpolation of block means ``a`` back to the full grid ``shape``.

    Block ``j`` of ``f`` voxels along an axis has its centre at voxel ``(j + 0.5) f - 0.5``;
    outside the first and last centres the edge value is kept (``scipy.ndimage.zoom`` with
    ``order=1, mode="nearest", grid_mode=True``, cropped). Done one axis at a time, the first
    axis first (small arrays grow last along the contiguous axis): about ten times faster
    than ``zoom`` on a 1 mm brain.
    """
    out = a
    for ax, (f, n) in enumerate(zip(factors, shape)):
        x = np.clip((np.arange(n) + 0.5) / f - 0.5, 0, out.shape[ax] - 1)
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, out.shape[ax] - 1)
        w = np.expand_dims((x - i0).astype(np.float32), [d for d in range(out.ndim) if d != ax])
        lo = np.take(out, i0, axis=ax)
        hi = np.take(out, i1, axis=ax)
        hi -= lo
        hi *= w
        lo += hi
        out = lo
    return out
