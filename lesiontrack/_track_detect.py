"""Image-driven change detection between two visits (private helper of :mod:`lesiontrack.track`).

The per-visit segmentations miss faint and small lesions, so a lesion that appears
(or disappears) between visits may be absent from both masks. This detector looks
for change in the images themselves:

1. the FLAIR difference of the co-registered, intensity-normalised visits, with the
   slowly varying background removed, is scaled by its own robust noise level
   (:class:`lesiontrack._track_status.DifferenceEvidence`: median offset, 1.4826 MAD
   over the brain outside lesions) to a voxel z map;
2. significance is controlled by the false-discovery rate: the seed level is the
   Benjamini-Hochberg threshold at ``change_fdr_q`` of the two-sided voxel p-values over
   the brain (Genovese, Lazar & Nichols 2002), so it adapts to the noise and to the
   amount of change in each scan pair;
3. the voxels must have changed lesion status: a confident lesion at the brighter visit
   (the segmentation's lesion score at least ``change_lesion_z``, above its seed level) and no
   lesion at the other (score below ``change_absent_z``, its growth level) — gain where
   the current visit is the lesion, loss where the previous one was. Regions grow by
   hysteresis from the seeds through such voxels whose change reaches
   ``min_intensity_z`` in the same direction;
4. regions smaller than ``min_change_mm3`` are dropped;
5. a lesion that appeared or vanished whole, away from every lesion of either visit, is
   measured by its extent at the segmentation's growth level (``change_absent_z``),
   as the segmentation's hysteresis measures a lesion (:func:`_whole_new_regions`).

The tracker adds gained regions to the current visit's lesion mask (a missed new lesion
then gets an ID and its status by the usual rules), draws gained and lost regions in
the change map, and lets them make a lesion enlarging or shrinking (``docs/tracking.md``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from ._morph import dilation

__all__ = ["fdr_threshold", "detect_change", "rescue_missed"]


def fdr_threshold(z: np.ndarray, q: float) -> float:
    """Smallest |z| declared significant by Benjamini-Hochberg at level ``q`` (two-sided).

    Returns ``inf`` when nothing is significant.
    """
    a = np.abs(np.asarray(z, dtype=np.float64)).ravel()
    m = a.size
    if m == 0:
        return float("inf")
    # p_(k) <= q k / m  <=>  |z|_(k) >= Phi^-1(1 - q k / (2 m)) (two-sided). No rank
    # passes below the level of k = m, so only the values above it are sorted (they are
    # the top ranks, numbered as in the whole sort)
    a = np.sort(a[a >= -ndtri(min(q / 2.0, 0.5))])[::-1]
    crit = -ndtri(np.minimum(q * np.arange(1, a.size + 1) / (2.0 * m), 0.5))
    ok = np.flatnonzero(a >= crit)
    return float(a[ok[-1]]) if ok.size else float("inf")


def _gradient_magnitude(img: np.ndarray, spacing) -> np.ndarray:
    """|grad| (intensity per mm) of ``img`` after a one-voxel Gaussian, float32."""
    out = np.zeros(img.shape, np.float32)
    for ax in range(3):                                  # loop over the three axes
        order = [0, 0, 0]
        order[ax] = 1
        d = ndi.gaussian_filter(img, 1.0, order=order, output=np.float32)
        d *= np.float32(1.0 / float(spacing[ax]))
        out += d * d
    return np.sqrt(out, out=out)


def _binned_robust_sd(key: np.ndarray, val: np.ndarray, n_bins: int):
    """Median ``key`` and robust SD (1.4826 MAD) of ``val`` in ``n_bins`` quantile bins of ``key``."""
    order = np.argsort(key, kind="stable")
    key, val = key[order], val[order]
    bins = np.array_split(np.arange(key.size), n_bins)
    x = np.array([np.median(key[b]) for b in bins])          # loop over the bins
    sd = np.array([1.4826 * np.median(np.abs(val[b] - np.median(val[b]))) for b in bins])
    return x, sd


def noise_model(diff: np.ndarray, mean_img: np.ndarray, region: np.ndarray, spacing,
                n_bins: int = 20, by_intensity: bool = True):
    """Voxel-wise noise SD of a difference image: ``k(I) sqrt(s0^2 + (delta |grad|)^2)``.

    Besides the acquisition noise ``s0``, a residual misalignment of ``delta`` mm
    between the visits changes the difference by about ``delta`` times the local
    intensity gradient, so edges of the ventricles and the cortex are noisier than
    white matter. Both terms are fitted to the data: the robust variance (1.4826
    MAD, squared) of the difference in ``n_bins`` quantile bins of the gradient
    magnitude over ``region`` (brain outside lesions), by least squares on
    ``var = s0^2 + delta^2 g^2``.

    The gradient does not see all of it. Where the two visits sample a partial volume
    differently (thick slices at other positions, a bright CSF signal as on T2w), the
    difference is noisier than the gradient predicts at intensities of that mixture.
    With ``by_intensity``, the SD is therefore calibrated on the data a second time:
    ``k(I)`` is the robust SD of the resulting z in ``n_bins`` quantile bins of the mean
    intensity ``I`` over ``region``, interpolated between the bins and never below 1
    (the first model is a floor: bands where the difference is quieter, such as the rims
    of lesions that did not change, keep it). On the real longitudinal patient's T2w
    pair, z had a robust SD of 1.3-1.8 at the grey-matter and CSF-mixture intensities
    before this step, and 0.85-1.0 in white matter; on its FLAIR pair 0.8-1.2 throughout.

    Returns
    -------
    sd : ndarray (float32)
    s0, delta : float
        Noise SD (intensity units) and misalignment (mm).
    """
    mean_img = np.asarray(mean_img, dtype=np.float32)
    g = _gradient_magnitude(mean_img, spacing)
    idx = np.flatnonzero(np.asarray(region).ravel())
    idx = idx[::max(1, idx.size // 400_000)]                 # a sample of the region
    gv, dv = g.ravel()[idx], np.asarray(diff).ravel()[idx]
    x, v = _binned_robust_sd(gv, dv, n_bins)
    v = v * v                                                # robust variances
    a = np.stack([np.ones_like(x), x * x], axis=1)
    coef = np.linalg.lstsq(a, v, rcond=None)[0]
    if coef[1] <= 0:                                     # no gradient term: one SD everywhere
        s0, delta = float(np.sqrt(max(np.median(v), 1e-12))), 0.0
    else:
        s0 = float(np.sqrt(max(coef[0], np.min(v) * 0.25, 1e-12)))
        delta = float(np.sqrt(coef[1]))
    g *= np.float32(delta)
    g *= g
    g += np.float32(s0 * s0)
    sd = np.sqrt(g, out=g)
    if by_intensity:
        x, k = _binned_robust_sd(mean_img.ravel()[idx], dv / sd.ravel()[idx], n_bins)
        k = np.maximum(np.nan_to_num(k, nan=1.0), 1.0)
        span = float(x[-1] - x[0])
        if np.any(k > 1.0) and span > 0:
            # k(I), linear between the bins' median intensities, read from a fine table
            # (4097 steps over the range: same values to <0.03 % of it, ten times
            # faster than np.interp over a 1 mm brain)
            lut = np.interp(np.linspace(x[0], x[-1], 4097), x, k).astype(np.float32)
            flat, scale = mean_img.ravel(), sd.reshape(-1)
            for lo in range(0, flat.size, 1 << 22):              # chunks of 4 M voxels
                pos = flat[lo:lo + (1 << 22)] - np.float32(x[0])
                pos *= np.float32(4096.0 / span)
                np.clip(pos, 0.0, 4096.0, out=pos)
                pos += np.float32(0.5)
                scale[lo:lo + (1 << 22)] *= lut[pos.astype(np.intp)]
        elif np.any(k > 1.0):
            sd *= np.float32(k.max())
    return sd, s0, delta


def detect_change(ev, z_prev: np.ndarray, z_cur: np.ndarray, brain: np.ndarray,
                  connectivity: int, voxel_volume: float, c: dict, f_prev=None, f_cur=None,
                  spacing=None, masks=None):
    """Regions of significant gain and loss of lesion signal (see module notes).

    Parameters
    ----------
    ev : DifferenceEvidence
        Difference of the two visits (full grid, no crop).
    z_prev, z_cur : ndarray
        Lesion score of each visit (:func:`lesiontrack.segment.lesion_zmap`).
    brain : ndarray of bool
        Region searched and over which the FDR is controlled.
    connectivity : int
        Neighbourhood of the regions (1, 2, 3).
    voxel_volume : float
        mm^3 per voxel.
    c : dict
        Checked ``[track]`` settings (``change_fdr_q``, ``change_lesion_z``,
        ``change_absent_z``, ``min_intensity_z``, ``min_change_mm3``).
    f_prev, f_cur : ndarray, optional
        The two normalised images. Given (with ``spacing``), voxels without data at
        either visit (outside a field of view, and one voxel inside its edge) are not
        searched, and the noise SD follows :func:`noise_model` (edges, where a
        residual misalignment changes the difference, need more change).
    spacing : sequence of 3 float, optional
    masks : (ndarray, ndarray) of bool, optional
        The two visits' lesion masks. Given, a lesion that appeared (vanished) whole,
        away from every lesion of either visit's mask and from every confident lesion of
        the other visit, is measured by its whole extent at the growth level
        (:func:`_whole_new_regions`).

    Returns
    -------
    gain, loss : ndarray of bool
    """
    brain = np.asarray(brain, dtype=bool)
    shape = brain.shape
    found = ndi.find_objects(brain.astype(np.uint8))
    if not found:
        return np.zeros(shape, bool), np.zeros(shape, bool)
    # work in the brain's box; its margin (6 voxels) exceeds the reach of the gradient's
    # Gaussian (4) and of the erosion (1), so every value inside the brain is as on the
    # full grid
    box = tuple(slice(max(sl.start - 6, 0), min(sl.stop + 6, n)) for sl, n in zip(found[0], shape))
    brain = brain[box]
    z_prev, z_cur = np.asarray(z_prev)[box], np.asarray(z_cur)[box]
    z = ev.diff[box] - np.float32(ev.offset)
    if f_prev is not None and f_cur is not None and spacing is not None:
        f_prev, f_cur = np.asarray(f_prev)[box], np.asarray(f_cur)[box]
        both = (f_prev > 0) & (f_cur > 0)
        brain = brain & ndi.binary_erosion(both, ndi.generate_binary_structure(3, 1))
        mean = np.asarray(f_prev, dtype=np.float32) + np.asarray(f_cur, dtype=np.float32)
        mean *= np.float32(0.5)
        sd, _, _ = noise_model(z, mean, brain & np.asarray(ev.noise_region)[box], spacing)
        del mean
        z /= sd
    else:
        z *= np.float32(1.0 / ev.sigma)
    thr = fdr_threshold(z[brain], c["change_fdr_q"])
    grow = max(c["min_intensity_z"], 0.0)
    st = ndi.generate_binary_structure(3, connectivity)
    out = []
    for sign, like, other in ((1, z_cur, z_prev), (-1, z_prev, z_cur)):    # gain, then loss
        sz = z if sign > 0 else -z
        cand = brain & (sz >= grow) & (like >= c["change_lesion_z"]) & (other < c["change_absent_z"])
        lab, n = ndi.label(cand, structure=st)
        full = np.zeros(shape, bool)
        if n > 0 and np.isfinite(thr):
            keep = np.bincount(lab[cand & (sz >= thr)], minlength=n + 1) > 0
            keep &= np.bincount(lab.ravel(), minlength=n + 1) * voxel_volume >= c["min_change_mm3"]
            keep[0] = False
            full[box] = keep[lab]
            if masks is not None:
                lesions = np.asarray(masks[0], bool)[box] | np.asarray(masks[1], bool)[box]
                full[box] |= _whole_new_regions(sz, like, other, cand & (sz >= thr), brain, grow,
                                                lesions, st, voxel_volume, c)
        out.append(full)
    return out[0], out[1]


def _whole_new_regions(sz, like, other, seeds, brain, grow, lesions, st, voxel_volume, c):
    """Regions of a lesion that appeared or vanished whole, missed by both segmentations.

    The change regions of :func:`detect_change` grow only through voxels that are a
    confident lesion at the brighter visit, so a faint lesion whose confident core is
    smaller than a countable lesion is dropped even when its extent at the
    segmentation's growth level is countable. A lesion that is new (or gone) as a whole
    is measured as the segmentation's hysteresis measures one: from a seed, through
    voxels changed by ``min_intensity_z`` in its direction that reach the growth level
    (``change_absent_z``) at the brighter visit and stay below it at the other. Only
    regions away from everything that makes their outline uncertain qualify: no voxel
    within one voxel of a confident lesion of the other visit (``change_lesion_z``)
    or of either visit's lesion mask. On a lesion's rim the stricter rule stays: there
    the growth level follows the outline's drift between acquisitions, not new lesion.
    """
    reg = brain & (sz >= grow) & (like >= c["change_absent_z"]) & (other < c["change_absent_z"])
    lab, n = ndi.label(reg, structure=st)
    if n == 0:
        return np.zeros(reg.shape, bool)
    ok = np.bincount(lab[seeds], minlength=n + 1) > 0
    near = dilation((other >= c["change_lesion_z"]) | lesions, st)
    ok &= np.bincount(lab[near], minlength=n + 1) == 0
    ok &= np.bincount(lab.ravel(), minlength=n + 1) * voxel_volume >= c["min_change_mm3"]
    ok[0] = False
    return ok[lab]


def rescue_missed(masks, lesion_z, flair, brain: np.ndarray, spacing, c: dict, observed=None) -> list:
    """Lesions a visit's segmentation missed that a neighbouring visit found.

    Hysteresis across time: where a lesion of the previous or the next visit (grown by
    one voxel) reaches the segmentation's growth level at this visit (lesion score at
    least ``change_absent_z``) without a seed of its own (not within one voxel of this
    visit's lesions), it is lesion at this visit too, when the region is a countable
    lesion (``min_change_mm3``). The neighbour's footprint bounds the region: at the
    growth level alone, T2w-only scores spread into grey matter. A region found only at the next visit is kept only where the
    FLAIR does not brighten significantly into that visit (``min_intensity_z`` and
    ``min_voxel_change_z``, as for new lesions): there the next visit's lesion is new,
    and the faint region before it is not yet that lesion. Lesion edges are not touched.

    Parameters
    ----------
    masks : list of ndarray (bool)
        Lesion masks per visit (not modified).
    lesion_z : list of (ndarray or None)
        Lesion score per visit (:func:`lesiontrack.segment.lesion_zmap`).
    flair : list of (ndarray or None) or None
        Normalised FLAIR per visit (for the test on regions found only at the next visit).
    brain : ndarray of bool
    spacing : sequence of 3 float
    c : dict
        Checked ``[track]`` settings.
    observed : list of ndarray (bool), optional
        Where each visit observed the tissue: the noise of a subtraction is estimated
        where both visits did.

    Returns
    -------
    list of ndarray (bool)
        The masks with the rescued regions added.
    """
    from ._track_status import DifferenceEvidence

    st = ndi.generate_binary_structure(3, c["connectivity"])
    vv = float(np.prod(spacing))
    out = [m.copy() for m in masks]
    if not brain.any():
        return out
    box = ndi.find_objects(brain.astype(np.uint8))[0]          # work inside the brain's box
    brain = brain[box]
    observed = None if observed is None else [np.asarray(o)[box] for o in observed]
    masks = [m[box] for m in masks]
    lesion_z = [None if z is None else np.asarray(z)[box] for z in lesion_z]
    flair = None if flair is None else [None if f is None else np.asarray(f)[box] for f in flair]
    last = len(masks) - 1
    for t in range(len(masks)):                      # loop over visits
        if lesion_z[t] is None:
            continue
        before = masks[t - 1] if t > 0 else None
        after = masks[t + 1] if t < last else None
        near = np.zeros(masks[t].shape, bool)
        for m in (before, after):
            if m is not None:
                near |= m
        if not near.any():
            continue
        free = brain & (np.asarray(lesion_z[t]) >= c["change_absent_z"])
        free &= ~dilation(masks[t], st) & dilation(near, st)
        lab, k = ndi.label(free, structure=st)
        if k == 0:
            continue
        keep = np.bincount(lab[near], minlength=k + 1) > 0
        keep &= np.bincount(lab.ravel(), minlength=k + 1) * vv >= c["min_change_mm3"]
        keep[0] = False
        past = np.zeros(k + 1, bool) if before is None else np.bincount(lab[before], minlength=k + 1) > 0
        only_next = keep & ~past
        if only_next.any():
            newer = np.ones(k + 1, bool)                 # without the images: not rescued
            if flair is not None and flair[t] is not None and flair[t + 1] is not None:
                seen = brain if observed is None else brain & observed[t] & observed[t + 1]
                ev = DifferenceEvidence(flair[t], flair[t + 1], seen, masks[t] | after, spacing,
                                        c["background_mm"])
                z, eff = ev.scores(lab, k)
                newer = (np.nan_to_num(z) >= c["min_intensity_z"]) & \
                        (np.nan_to_num(eff) >= c["min_voxel_change_z"])
            keep &= ~(only_next & newer)
        out[t][box] |= keep[lab]
    return out
