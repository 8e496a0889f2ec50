"""Vectorised per-session segmentation: T2/FLAIR lesions, restricted diffusion, black holes, enhancement.

Method
------
Every threshold is expressed against the subject's own normal-appearing tissue:
the peak (mode) and half-width of the intensity histogram of white matter and of
grey matter (voxels with a high MNI prior probability), statistics that neither
lesions nor atlas misregistration move.

1. *Lesions*. For FLAIR and T2w, a voxel's hyperintensity is its z-score against the
   white-matter peak; where the atlas allows grey matter, it is the z-score of the
   voxel's upper-tail probability under the two tissues mixed in the atlas' proportions,
   smoothed by the atlas' registration uncertainty (``atlas_uncertainty_mm``). A voxel
   as bright as normal grey matter is common where grey matter is likely and rare where
   it is not; the smaller of the two z-scores, used before, treated a voxel with a 5 %
   grey-matter prior as grey matter and hid periventricular lesions next to the deep
   grey matter at 2 mm. Infratentorially, with FLAIR, on grids coarser than 1.5 mm, T2w
   is scored against white matter alone (``infratentorial_t2w_vs_wm``,
   :func:`_t2w_wm_only`): the cerebellar cortex is nearly as T2w-bright as a lesion
   partial-volumed with it, not as FLAIR-bright. The contrasts are combined
   by the geometric mean of their z-scores, so a voxel must be abnormal on both
   (CSF is bright on T2w but dark on FLAIR). With ``flair_confirmed_by_t2w``, lesions
   found on FLAIR without T2w that this misses are kept where their FLAIR core is
   T2w-bright on average (mean T2w z at least ``grow_z``): small lesions whose T2w
   contrast is weaker voxel by voxel (an option, off by default: docs/accuracy.md). Lesions grow by hysteresis from
   confident seeds (``seed_z``) through connected voxels above ``grow_z``; each
   lesion's edge lies at ``boundary_fraction`` of its own core score (the
   partial-volume midpoint). T1w does not decide whether a lesion exists (most MS
   lesions are T1w-isointense), but with ``use_t1`` a lesion whose core is
   T1w-hypointense (mean T1w z of its seeds at least ``grow_z``) takes its extent
   from the geometric mean with the T1w hypointensity z as a third factor, with that
   score's own hysteresis and edges (thin T1w slices sharpen edges blurred on thick
   FLAIR/T2w slices). With FLAIR, a lesion's core (the mean FLAIR of its seeds) must lie
   ``core_above_gm_z`` grey-matter half-widths (the narrower side) above the grey-matter peak: where the
   affinely carried atlas misplaces cortex or deep grey matter into white matter, they
   are scored against white matter alone and pass the score, but they are no brighter
   than grey matter, and a lesion is FLAIR-bright against both tissues (warped-anatomy
   phantoms' precision 0.31-0.45 -> 0.69-0.87). Components below ``min_lesion_mm3`` and components whose border
   is mostly CSF or outside the brain (sulcal partial-volume artefacts,
   ``max_csf_border``) are dropped. With FLAIR but no T2w, a lesion must also be a focal
   hyperintensity: its mean FLAIR must exceed the mean FLAIR of the tissue it touches
   (CSF-like voxels excluded) by ``local_contrast_z`` NAWM half-widths, the growth level.
   Deep and thick grey matter, brighter than a grey-matter peak lowered by the cortex's
   partial volume, passes the score and the core rule but fades into the grey matter
   around it (FLAIR alone: 1 mm phantom's lesion-wise precision 0.445 -> 0.831, recall
   1.00 kept); with T2w the combined score vetoes it.
   *Without FLAIR* T2w cannot tell lesions from CSF and its partial volume with tissue
   (both are T2w-bright and moderately T1w-dark; FLAIR nulls the CSF). In a subject with
   FLAIR at other visits, such a visit is given a FLAIR imputed from the nearest FLAIR
   visit and the significant T2w change (:func:`impute_flair`, called by the pipeline).
   With no FLAIR at all (``no_flair_csf``), the CSF spaces (T2w-bright and T1w-dark
   compartments of at least ``CSF_MIN_ML`` or open onto the brain's surface; without T1w
   the atlas CSF) are no lesion, a lesion must be thicker than the partial-volume rim
   around them (it survives a one-voxel opening) and lie in white matter more than in
   grey matter (GM partial-volumed with sulcal CSF looks the same on T2w and T1w).
2. *Restricted diffusion*: from lesion voxels with ADC below ``adc_max_restricted``
   (mm^2/s) and bright on b1000 relative to NAWM, grown through lesion voxels whose ADC
   lies ``restricted_grow_z`` half-widths below the NAWM ADC peak (:mod:`._seg_parts`).
3. *Black holes*: from lesion voxels with T1w ``blackhole_gm_z`` half-widths below the
   grey-matter peak (unequivocally darker than white and grey matter), to each core's
   partial-volume edge (:mod:`._seg_parts`).
4. *Enhancement*: lesion voxels whose ceT1w - T1w difference exceeds its NAWM
   distribution by ``enhancing_z`` sigma.

For a subject with several visits, the pipeline pools the peak widths (the z units)
over the visits (:func:`pooled_widths`, ``pool_sessions``) so every visit is thresholded
alike and lesion change comes from the images, not from each visit's width estimate
(on the real longitudinal patient, at a seed level of 4.0, the per-visit lesion volumes
went from 15.2 / 11.6 mL to 14.5 / 12.1 mL, the change lesions being mostly shrinking ones).

All images must be preprocessed (:func:`lesiontrack.preprocess.preprocess_session`):
on the same grid, NAWM peak = 1.0. The work is done inside the bounding box of the
brain mask.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr, ndtri
from skimage.filters import threshold_otsu

from ._seg_measures import lesion_measures
from ._seg_parts import blackhole_mask, enhancing_mask, restricted_mask
from ._seg_stats import tissue_peak
from ._track_detect import fdr_threshold, noise_model

__all__ = ["SessionMasks", "SegmentError", "segment_session", "lesion_measures", "lesion_score",
           "lesion_zmap", "pooled_widths", "impute_flair", "impute_t2w", "gm_share"]

MEASURES = ("lesion", "restricted", "blackhole", "enhancing")
CSF_MIN_ML = 1.0   # without FLAIR, T2w-bright/T1w-dark compartments this large are CSF, not lesion


class SegmentError(ValueError):
    """Segmentation cannot run on the given images or settings."""


@dataclass
class SessionMasks:
    """Masks of one session on the individual grid (bool arrays of one shape).

    ``available`` names the measures the session's contrasts could give (a
    measure not available is an all-False mask, not a finding).
    """

    lesion: np.ndarray
    restricted: np.ndarray
    blackhole: np.ndarray
    enhancing: np.ndarray
    available: set = field(default_factory=set)


def _check_cfg(cfg: dict):
    for key in ("seed_z", "grow_z", "core_above_gm_z", "min_lesion_mm3", "csf_z", "max_csf_border",
                "adc_max_restricted", "b1000_z", "restricted_grow_z", "blackhole_gm_z", "enhancing_z",
                "atlas_uncertainty_mm"):
        if key not in cfg:
            raise SegmentError(f"[segment] setting '{key}' is missing from the pipeline config")
    if not cfg["seed_z"] >= cfg["grow_z"]:
        raise SegmentError(f"[segment] seed_z ({cfg['seed_z']}) must be >= grow_z ({cfg['grow_z']})")
    if isinstance(cfg["core_above_gm_z"], bool) or not (isinstance(cfg["core_above_gm_z"], (int, float))
                                                       and cfg["core_above_gm_z"] >= 0):
        raise SegmentError("[segment] core_above_gm_z must be a number >= 0 (0: off), got "
                           f"{cfg['core_above_gm_z']!r}")
    lc = cfg.get("local_contrast_z", 0.0)
    if isinstance(lc, bool) or not (isinstance(lc, (int, float)) and lc >= 0):
        raise SegmentError(f"[segment] local_contrast_z must be a number >= 0 (0: off), got {lc!r}")
    if cfg["connectivity"] not in (1, 2, 3):
        raise SegmentError(f"[segment] connectivity must be 1, 2 or 3, got {cfg['connectivity']!r}")
    if not 0 <= cfg["max_csf_border"] <= 1:
        raise SegmentError(f"[segment] max_csf_border must lie in [0, 1], got {cfg['max_csf_border']!r}")
    if cfg.get("infratentorial_t2w_vs_wm", False) not in (True, False, "auto"):
        raise SegmentError("[segment] infratentorial_t2w_vs_wm must be true, false or \"auto\", got "
                           f"{cfg['infratentorial_t2w_vs_wm']!r}")


def _bbox(mask: np.ndarray, margin: int = 1):
    """Slices of the bounding box of ``mask`` (whole array when empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(out)


class _Tissue:
    """Peaks of normal-appearing WM and GM per contrast (inside the brain crop).

    The peaks are estimated from a regular subsample of at most ``max_samples``
    voxels of each tissue (the histogram mode needs far fewer than a brain holds).
    """

    def __init__(self, brain, wm, gm, cfg, widths=None, gm_share=None, t2w_wm_only=None):
        self.widths = widths or {}
        self.gm_share = gm_share
        self.t2w_wm_only = t2w_wm_only
        wmin, gmin = cfg["tissue_prior_min"]
        cap = int(cfg["max_samples"])
        self.idx = {}
        for name, sel in (("wm", brain & (wm >= wmin)), ("gm", brain & (gm >= gmin) & (wm < wmin))):
            idx = np.flatnonzero(sel)
            if idx.size < 100:
                idx = np.flatnonzero(brain)
            self.idx[name] = idx[::max(1, idx.size // cap)]
        self.gm_possible = gm >= float(cfg["gm_possible_min"])
        self.wm_prob, self.gm_prob = wm, gm
        self.bins = int(cfg["histogram_bins"])
        self._cache = {}

    def peak(self, key, arr, tissue="wm"):
        if (key, tissue) not in self._cache:
            v = arr.ravel()[self.idx[tissue]]
            v = v[v > 0] if key != "enh" else v
            if v.size < 100:
                raise SegmentError(f"{key}: fewer than 100 positive voxels in the {tissue.upper()} "
                                   "prior; the image does not overlap the brain")
            p = tissue_peak(v, bins=self.bins)
            if (key, tissue) in self.widths:      # the subject's pooled widths (pooled_widths)
                lo, hi = self.widths[key, tissue]
                p = replace(p, sigma_low=lo, sigma_high=hi)
            self._cache[key, tissue] = p
        return self._cache[key, tissue]

    def z_hyper(self, key, arr):
        """Hyperintensity z against normal white matter and, where the atlas allows grey
        matter (``gm_possible``), against the mixture of the two tissues the atlas expects
        there: the voxel's upper-tail probability ``P = w Phi(-z_wm) + g Phi(-z_gm)``
        (``g`` = ``gm_share``, the GM share of the WM and GM priors, smoothed by the atlas
        registration uncertainty: :func:`gm_share`; ``w = 1 - g``) as a z-score,
        ``-Phi^-1(P)``. Only voxels brighter than the WM peak are scored this way (the
        others score at most 0, which the lesion score clips). T2w is scored against white
        matter alone where ``t2w_wm_only`` is set (:func:`_t2w_wm_only`)."""
        pw, pg = self.peak(key, arr, "wm"), self.peak(key, arr, "gm")
        zw = arr - np.float32(pw.mode)
        zw *= np.float32(1.0 / pw.sigma_low)
        sel = self.gm_possible & (zw > 0)
        if key == "T2w" and self.t2w_wm_only is not None:
            sel &= ~self.t2w_wm_only
        if sel.any():
            z1 = zw[sel]
            z2 = (arr[sel] - np.float32(pg.mode)) * np.float32(1.0 / pg.sigma_low)
            if self.gm_share is not None:
                g = self.gm_share[sel]
            else:
                wm, gm = self.wm_prob[sel], self.gm_prob[sel]
                g = (gm / np.maximum(wm + gm, 1e-6)).astype(np.float32)
            p = (1 - g) * ndtr(-z1) + g * ndtr(-z2)
            # beyond ~13 SDs both tails underflow (float32): far brighter than either tissue
            tiny = np.finfo(np.float32).tiny
            zw[sel] = np.where(p > tiny, -ndtri(np.maximum(p, tiny)), np.minimum(z1, z2))
        return zw


def _t2w_wm_only(images, priors, box, cfg, spacing=None):
    """Where T2w hyperintensity is scored against white matter alone: infratentorially
    (location class 3), with FLAIR, when ``infratentorial_t2w_vs_wm`` is on (``"auto"``:
    when the grid's voxel edge, the cube root of its volume, exceeds
    ``infratentorial_auto_min_voxel_mm``).

    The cerebellar cortex gives the atlas a large grey-matter share there, and grey matter
    is nearly as bright as a lesion on T2w (1.25-1.35 times white matter) but not on FLAIR
    (1.1 times): a small lesion, partial-volumed with that cortex on 2-4 mm slices, is no
    brighter than grey matter on T2w, and the T2w factor of the lesion score (the
    geometric mean with FLAIR) hid it. Against white matter alone T2w still vetoes what is
    not T2w-bright; the FLAIR factor, scored against the mixture and capping the T2w one
    (``cap_by_flair``), keeps normal grey matter out. Without FLAIR nothing would, so the
    mixture stays.

    On a fine grid the rule costs more than it gains: lesions keep their T2w contrast
    there, while pure cerebellar cortex (brighter on FLAIR than the partial-volumed
    grey-matter peak) loses the T2w veto, and 1 mm phantoms' lesion-wise precision fell
    by 0.03-0.06. ``"auto"`` therefore applies it only where a lesion of the smallest
    countable size (3 mm across, MAGNIMS) spans fewer than two voxels: a voxel edge above
    1.5 mm (sampling theorem), where partial volume dilutes such lesions.
    """
    mode = cfg.get("infratentorial_t2w_vs_wm", False)
    if mode == "auto":   # without a spacing (lesion_zmap's simple form) the mixture stays
        edge = (0.0 if spacing is None
                else float(np.prod(np.asarray(spacing, dtype=float))) ** (1.0 / 3.0))
        mode = edge > float(cfg["infratentorial_auto_min_voxel_mm"])
    if not (mode and "FLAIR" in images and "T2w" in images):
        return None
    return np.asarray(priors.location)[box] == 3


def gm_share(priors, spacing, cfg: dict) -> np.ndarray:
    """Grey matter's share of the WM and GM priors, ``gm / (wm + gm)``, each prior first
    smoothed by a Gaussian of SD ``atlas_uncertainty_mm`` (the template is registered to
    the subject affinely: a voxel's tissue proportions are the atlas' around where the
    voxel may truly map). Computed once per subject grid (cached on ``priors``).

    The default, 1.5 mm, was measured against 0 and 3 mm (docs/architecture.md): without
    smoothing, thin real cortex that the atlas places a little off scores as lesion (the
    real longitudinal patient with a FLAIR withheld: 28 false-positive change components,
    19 at 1.5 mm, 18 at 3 mm); at 3 mm the cortical ribbon takes white matter's share and
    lesion-wise precision on the 1 mm phantom fell from 0.92 to 0.86 (0.90 at 1.5 mm). A
    maximum filter instead (grey matter wherever it is within 3 mm) gave back the real
    case's figures but also all the misses next to the deep grey matter.
    """
    sd = float(cfg["atlas_uncertainty_mm"])
    key = (sd, tuple(float(x) for x in spacing))
    with _SHARE_LOCK:   # the pipeline segments sessions side by side: computed once
        cache = priors.__dict__.setdefault("_gm_share", {})
        share = cache.get(key)
        if share is None:
            wm = np.asarray(priors.wm_prob, np.float32)
            gm = np.asarray(priors.gm_prob, np.float32)
            if sd > 0:
                sig = [sd / float(x) for x in spacing]
                wm, gm = ndi.gaussian_filter(wm, sig), ndi.gaussian_filter(gm, sig)
            share = (gm / np.maximum(wm + gm, np.float32(1e-6))).astype(np.float32)
            cache.clear()
            cache[key] = share
    return share


_SHARE_LOCK = threading.Lock()


def lesion_score(images: dict, brain, tissue: _Tissue, use_t1: bool = False,
                 cap: bool = False) -> np.ndarray:
    """Combined FLAIR/T2w hyperintensity z (geometric mean of the clipped z-scores)."""
    zs = [np.maximum(tissue.z_hyper(m, images[m]), 0, out=None) for m in ("FLAIR", "T2w") if m in images]
    if not zs:
        raise SegmentError("lesion segmentation needs FLAIR or T2w; neither is present "
                           "(give an external lesion mask instead)")
    if use_t1 and "T1w" in images:
        zs.append(_t1_hypo_z(images, tissue))
    score = zs[0]
    for z in zs[1:]:
        if cap:      # T2w-bright and T1w-dark also fit CSF: only FLAIR tells them apart
            np.minimum(z, zs[0], out=z)
        np.multiply(score, z, out=score)
    if len(zs) > 1:
        np.power(score, np.float32(1.0 / len(zs)), out=score)
    score[~brain] = 0
    return score


def _neighbour_offsets(shape, connectivity):
    """Flat-index offsets of the neighbours of a voxel (C order)."""
    st = ndi.generate_binary_structure(3, connectivity)
    st[1, 1, 1] = False
    d = np.argwhere(st) - 1
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    return d @ strides


def _t1_hypo_z(images, tissue) -> np.ndarray:
    """T1w hypointensity z against the NAWM peak (clipped at 0)."""
    p = tissue.peak("T1w", images["T1w"], "wm")
    z1 = np.float32(p.mode) - images["T1w"]
    z1 *= np.float32(1.0 / p.sigma_high)
    return np.maximum(z1, 0, out=z1)


def _core_vs_gm(flair, lab, n, seeds, tissue) -> np.ndarray:
    """Per component of ``lab``: the mean FLAIR of its seed voxels (its brightest voxel if
    it has none) as a z-score against normal grey matter: the grey-matter peak and the
    narrower of its two half-widths. Other tissues only widen a side of that peak (white
    matter and partial volume with CSF the lower one, lesions the upper one), and on a
    thick-slice FLAIR whose template was registered to the FLAIR itself the lower one was
    1.8 times the upper (real longitudinal patient, FLAIR alone). One pass over the voxels,
    whatever the number of components."""
    pg = tissue.peak("FLAIR", flair, "gm")
    width = np.float32(min(pg.sigma_low, pg.sigma_high))
    core = np.full(n + 1, -np.inf, np.float32)
    if n:
        idx = np.flatnonzero(lab)                 # the lesion voxels only (no sort of the image)
        ls, fl = lab.ravel()[idx], flair.ravel()[idx]
        np.maximum.at(core, ls, fl)
        sd = seeds.ravel()[idx]
        cnt = np.bincount(ls[sd], minlength=n + 1)
        mean = np.bincount(ls[sd], weights=fl[sd], minlength=n + 1) / np.maximum(cnt, 1)
        core = np.where(cnt > 0, mean, core).astype(np.float32)
        core[0] = -np.inf
    return (core - np.float32(pg.mode)) / width


def _core_level(score, lab, n, seeds, fraction, floor):
    """Per component: the mean score of its seed voxels (its own contrast) and the edge
    level at ``fraction`` of it (the partial-volume midpoint for 0.5), at least ``floor``."""
    seed_lab = lab[seeds]
    n_seed = np.bincount(seed_lab, minlength=n + 1)
    core = np.bincount(seed_lab, weights=score[seeds], minlength=n + 1) / np.maximum(n_seed, 1)
    level = np.maximum(fraction * core, floor).astype(np.float32)
    level[0] = np.inf
    return n_seed, level


def _csf_like(images, brain, tissue, voxel_mm3: float) -> np.ndarray:
    """Without FLAIR: the CSF spaces, voxels nearer the CSF than grey matter on both T2w
    and T1w that form a large compartment (at least ``CSF_MIN_ML``) or open onto the
    brain's surface. A T1w black hole is as T2w-bright and T1w-dark as CSF, but enclosed
    in tissue and small.

    The CSF levels are the data's own: the mode of T1w below the GM peak by 2 of its
    widths, then the mode of T2w where T1w is nearer that level than the GM peak. Without
    T1w, the T2w of CSF has no reliable peak of its own (its bright tail merges with the
    lesions'): the atlas CSF (neither WM nor GM prior) then decides, where the T2w is
    brighter than the Otsu threshold of the brain's T2w.
    """
    t2 = images["T2w"]
    if "T1w" not in images:
        tb = t2[brain]
        otsu = threshold_otsu(tb[:: max(1, tb.size // 1_000_000)])
        del tb
        return brain & (t2 > otsu) & (tissue.wm_prob + tissue.gm_prob < 0.5)
    t1 = images["T1w"]
    g1 = tissue.peak("T1w", t1, "gm")
    dark = brain & (t1 < g1.mode - 2 * g1.sigma_low)
    if np.count_nonzero(dark) < 100:
        return np.zeros(brain.shape, bool)
    mid1 = 0.5 * (tissue_peak(t1[dark], bins=tissue.bins).mode + g1.mode)
    cv = t2[brain & (t1 < mid1)]
    if cv.size < 100:
        return np.zeros(brain.shape, bool)
    mid2 = 0.5 * (tissue_peak(cv, bins=tissue.bins).mode + tissue.peak("T2w", t2, "gm").mode)
    like = brain & (t2 > mid2) & (t1 < mid1)
    lab, n = ndi.label(like)
    big = np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3 >= CSF_MIN_ML * 1000.0
    outer = ndi.binary_dilation(~brain) & like       # touching the brain's surface
    big[np.unique(lab[outer])] = True
    big[0] = False
    return big[lab]


def _no_flair_excluded(score, images, brain, tissue, voxel_mm3: float, grow: float) -> np.ndarray:
    """T2w without FLAIR: voxels that cannot be lesion. CSF and its partial volume with
    tissue are as T2w-bright as lesions: CSF-like voxels are left out, and so are the thin
    rims the candidate region keeps around them: a lesion must be thicker than the
    partial-volume rim (it survives a one-voxel opening), and only the voxels next to such
    a core are given back (the edge the opening took)."""
    cand = (score > grow) & ~_csf_like(images, brain, tissue, voxel_mm3)
    cross = ndi.generate_binary_structure(3, 1)
    return ~(ndi.binary_dilation(ndi.binary_opening(cand, structure=cross), structure=cross) & cand)


def _segment_lesions(images, brain, location, tissue, spacing, cfg) -> np.ndarray:
    cap = bool(cfg["cap_by_flair"]) and "FLAIR" in images
    # lesions are found on the T2-weighted contrasts: T2/FLAIR hyperintensity defines them
    score = lesion_score(images, brain, tissue, False, cap)
    conn = int(cfg["connectivity"])
    grow, seed_z, frac = float(cfg["grow_z"]), float(cfg["seed_z"]), float(cfg["boundary_fraction"])
    no_flair = "FLAIR" not in images and bool(cfg["no_flair_csf"])
    if no_flair:
        excluded = _no_flair_excluded(score, images, brain, tissue, float(np.prod(spacing)), grow)
        score[excluded] = 0
    # hysteresis: components of {score > grow_z} that contain a seed (score > seed_z)
    lab, n = ndi.label(score > grow, structure=ndi.generate_binary_structure(3, conn))
    if n == 0:
        return np.zeros(brain.shape, bool)
    seeds = score > seed_z
    n_seed, level = _core_level(score, lab, n, seeds, frac, grow)
    keep = n_seed > 0
    lesion = keep[lab] & (score >= level[lab])
    if bool(cfg["use_t1"]) and "T1w" in images:
        # a lesion whose core is also T1w-hypointense takes its edge from all contrasts
        # together (thin T1w slices sharpen edges blurred on thick FLAIR slices); a
        # T1w-isointense lesion (most MS lesions are) keeps the edge of the contrasts
        # that show it
        z1 = _t1_hypo_z(images, tissue)
        dark = (np.bincount(lab[seeds], weights=z1[seeds], minlength=n + 1)
                / np.maximum(n_seed, 1)) >= grow
        del z1
        dark[0] = False
        sel = dark[lab]
        both = lesion_score(images, brain, tissue, True, cap)
        if no_flair:
            both[excluded] = 0
        # there, the all-contrast score's own hysteresis and edges: its components that
        # touch such a lesion (T1w-dark, T2w-faint parts included)
        lab2, n2 = ndi.label(both > grow, structure=ndi.generate_binary_structure(3, conn))
        n_both, level_both = _core_level(both, lab2, n2, both > seed_z, frac, grow)
        ok2 = (np.bincount(lab2[sel], minlength=n2 + 1) > 0) & (n_both > 0)
        ok2[0] = False
        lesion &= ~sel
        lesion |= ok2[lab2] & (both >= level_both[lab2])
        del both, sel, lab2
        lab, n = ndi.label(lesion, structure=ndi.generate_binary_structure(3, conn))
        keep = np.ones(n + 1, bool)
    above_gm = float(cfg["core_above_gm_z"])
    if above_gm > 0 and "FLAIR" in images:
        # every lesion (the grown regions split by their edges): its core, the mean FLAIR
        # of its seeds, must lie beyond normal grey matter. Where the atlas misplaces grey
        # matter (a brain the affine template fits poorly), cortex and deep grey matter
        # are scored against white matter alone and pass the lesion score; they are no
        # brighter than grey matter. A lesion is FLAIR-bright against both tissues.
        if not (bool(cfg["use_t1"]) and "T1w" in images):
            lesion &= keep[lab]
            lab, n = ndi.label(lesion, structure=ndi.generate_binary_structure(3, conn))
            keep = np.ones(n + 1, bool)
        keep &= _core_vs_gm(images["FLAIR"], lab, n, seeds, tissue) >= above_gm
    vox = float(np.prod(spacing))
    keep &= np.bincount(lab[lesion], minlength=n + 1) * vox >= float(cfg["min_lesion_mm3"])
    keep[0] = False
    lesion &= keep[lab]
    # CSF-border pruning: share of each component's outside contacts that are CSF-like
    # (without FLAIR the CSF and its rims are already out, and lesions border them; what
    # stays is grey matter partial-volumed with sulcal CSF, which T2w and T1w cannot tell
    # from a lesion: a component must lie in white matter more than in grey matter)
    if no_flair:
        labs = lab[lesion]
        keep &= (np.bincount(labs, weights=tissue.wm_prob[lesion], minlength=n + 1)
                 >= np.bincount(labs, weights=tissue.gm_prob[lesion], minlength=n + 1))
        keep[0] = False
        return lesion & keep[lab]
    if "FLAIR" in images:
        ref = images["FLAIR"]
    elif "T1w" in images:
        ref = images["T1w"]
    else:
        return lesion
    p = tissue.peak("FLAIR" if "FLAIR" in images else "T1w", ref)
    # CSF-like voxels outside the periventricular zone (periventricular lesions border the
    # ventricles by definition) and outside the brain
    csf = ((ref < p.mode - float(cfg["csf_z"]) * p.sigma_low) & (location != 1)) | ~brain
    idx = np.flatnonzero(lesion)
    last = lesion.size - 1     # the crop keeps a 1-voxel margin; clipping guards a brain at the FOV edge
    labs = lab.ravel()[idx]
    les_f, csf_f, ref_f = lesion.ravel(), csf.ravel(), ref.ravel()
    n_out = np.zeros(idx.size, np.float64)
    n_csf = np.zeros(idx.size, np.float64)
    # FLAIR without T2w (none at any visit: a visit without one is given an imputed T2w)
    local = float(cfg.get("local_contrast_z", 0.0)) if "FLAIR" in images and "T2w" not in images else 0.0
    touched = []                # (component, tissue voxel) contacts, as one int64 key each
    for off in _neighbour_offsets(lesion.shape, conn):      # loop over neighbour offsets
        nb = np.clip(idx + off, 0, last)
        out = ~les_f[nb]
        n_out += out
        on = out & csf_f[nb]
        n_csf += on
        if local > 0:
            tis = out & ~on
            touched.append(labs[tis].astype(np.int64) * (last + 1) + nb[tis])
    border = np.bincount(labs, weights=n_out, minlength=n + 1)
    on_csf = np.bincount(labs, weights=n_csf, minlength=n + 1)
    keep &= on_csf <= float(cfg["max_csf_border"]) * np.maximum(border, 1)
    if local > 0:
        # a lesion is a focal hyperintensity: its mean FLAIR must exceed the mean FLAIR of
        # the tissue around it (the voxels it touches, CSF-like ones excluded, each once)
        # by the growth level. Normal grey matter brighter than the grey-matter peak (deep
        # and thick grey matter against a partial-volumed cortex peak) passes the
        # hysteresis but fades into the grey matter around it; a lesion steps up from
        # its surroundings. With T2w, the combined score vetoes such grey matter, and the
        # rule is left out: a large confluent lesion's mean lies near its edge level, and on
        # the real longitudinal patient the rule made its volume hinge on a missing T2w
        # (docs/accuracy.md, FLAIR alone)
        key = np.unique(np.concatenate(touched))
        comp, vox = key // (last + 1), key % (last + 1)
        n_tis = np.bincount(comp, minlength=n + 1)
        outside = np.bincount(comp, weights=ref_f[vox], minlength=n + 1) / np.maximum(n_tis, 1)
        inside = np.bincount(labs, weights=ref_f[idx], minlength=n + 1) / np.maximum(
            np.bincount(labs, minlength=n + 1), 1)
        keep &= (n_tis == 0) | (inside - outside >= local * p.sigma_low)
    keep[0] = False
    return lesion & keep[lab]


def _flair_confirmed(images, brain, location, tissue, spacing, cfg, lesion) -> np.ndarray:
    """Lesions found on FLAIR (T2w left out) that the combined score missed, kept where
    T2w confirms them on average: the mean T2w z (capped by the FLAIR z, as in the lesion
    score) over the component's FLAIR core (FLAIR z above ``seed_z``) reaches ``grow_z``.

    The combined score asks every seed voxel to be abnormal on both contrasts together
    (their geometric mean above ``seed_z``); a small lesion drawn on FLAIR whose T2w
    contrast is weaker, on thicker T2w slices or by sequence, misses it voxel by voxel
    although its core is T2w-bright on average. Grey matter that FLAIR alone would take is
    not T2w-brighter than the grey matter the T2w z expects there, and stays out."""
    alone = _segment_lesions({m: a for m, a in images.items() if m != "T2w"}, brain, location,
                             tissue, spacing, cfg)
    alone &= ~lesion
    conn = ndi.generate_binary_structure(3, int(cfg["connectivity"]))
    lab, n = ndi.label(alone, structure=conn)
    if n == 0:
        return alone
    touch = np.zeros(n + 1, bool)       # components that touch a combined-score lesion are its edge
    touch[np.unique(lab[ndi.binary_dilation(lesion, structure=conn) & alone])] = True
    idx = np.flatnonzero(lab)
    labs = lab.ravel()[idx]
    zf = np.maximum(tissue.z_hyper("FLAIR", images["FLAIR"]).ravel()[idx], 0)
    zt = np.minimum(np.maximum(tissue.z_hyper("T2w", images["T2w"]).ravel()[idx], 0), zf)
    core = zf >= float(cfg["seed_z"])
    n_core = np.bincount(labs[core], minlength=n + 1)
    t2 = np.bincount(labs[core], weights=zt[core], minlength=n + 1) / np.maximum(n_core, 1)
    keep = (n_core > 0) & (t2 >= float(cfg["grow_z"])) & ~touch
    keep[0] = False
    return keep[lab]


def _enhancement(imgs: dict):
    return imgs["ceT1w"] - imgs["T1w"] if "T1w" in imgs else imgs["ceT1w"]


def pooled_widths(sessions: list, priors, cfg: dict) -> dict:
    """Tissue peak widths pooled over the sessions of one subject.

    Every z threshold of the segmentation is in units of a tissue peak's width. Estimated
    per visit, the width varies with each scan's noise and with the histogram estimate
    itself, so a lesion at the same intensity can fall on either side of a threshold at
    two visits. Pooled (the mean over the sessions that have the contrast), every visit
    of a subject is thresholded alike and change between visits comes from the images;
    each visit keeps its own peak position (mode).

    Parameters
    ----------
    sessions : list of dict[str, ndarray]
        Preprocessed contrasts of each session (as for :func:`segment_session`).
    priors : lesiontrack.preprocess.Priors
    cfg : dict
        The ``[segment]`` section.

    Returns
    -------
    dict
        ``{(contrast, tissue): (sigma_low, sigma_high)}``, for :func:`segment_session`
        and :func:`lesion_zmap` (``widths=``).
    """
    _check_cfg(cfg)
    brain_full = np.asarray(priors.brain_mask, dtype=bool)
    box = _bbox(brain_full)
    brain = brain_full[box]
    found: dict = {}
    for images in sessions:                       # loop over sessions
        tissue = _Tissue(brain, priors.wm_prob[box], priors.gm_prob[box], cfg)
        imgs = {m: np.asarray(a, dtype=np.float32)[box] for m, a in images.items()
                if m in ("FLAIR", "T2w", "T1w", "ceT1w", "b1000", "ADC")}
        if "ceT1w" in imgs:
            imgs["enh"] = _enhancement(imgs)
        for key in [k for k in ("FLAIR", "T2w", "T1w", "b1000", "ADC", "enh") if k in imgs]:
            for t in (("wm", "gm") if key in ("FLAIR", "T2w", "T1w") else ("wm",)):
                try:
                    p = tissue.peak(key, imgs[key], t)
                except SegmentError:              # no overlap: that session adds nothing
                    continue
                found.setdefault((key, t), []).append((p.sigma_low, p.sigma_high))
    return {k: (float(np.mean([w[0] for w in v])), float(np.mean([w[1] for w in v])))
            for k, v in found.items()}


def impute_flair(sessions: list, priors, spacing, cfg: dict) -> tuple[list, dict]:
    """Sessions without FLAIR, given one from the subject's nearest FLAIR visit and the T2w change.

    On T2w alone, lesions and the partial volume of white matter with CSF have the same
    intensities (both are T2w-bright and moderately T1w-dark; FLAIR nulls the CSF): a
    T2w-only segmentation either joins lesions to the ventricles and sulci or, pruning
    those, loses them. In a subject with FLAIR at other visits, the CSF is the same
    anatomy at every visit, and a change of the tissue shows on both contrasts. A session
    with T2w but no FLAIR is therefore given, for the segmentation only, the FLAIR of the
    nearest visit (in session order) that has both FLAIR and T2w, plus that visit's
    FLAIR/T2w width ratio times the significant T2w change between the two visits::

        FLAIR_i = FLAIR_j + (sigma_FLAIR / sigma_T2w)_j * D,
        D = T2w_i - T2w_j where |T2w_i - T2w_j| >= impute_change_z * sd, else 0

    (sigma: the NAWM peak half-width below the mode of visit ``j``; ``sd``: the voxel-wise
    noise SD of the T2w difference, acquisition noise plus residual misalignment times the
    local gradient, fitted to the data by :func:`lesiontrack._track_detect.noise_model`).
    The significant voxels must form same-sign regions of at least ``min_lesion_mm3`` that
    hold a voxel significant at a false-discovery rate of 5 % over the brain, and lie
    neither in nor next to the CSF of visit ``j``'s FLAIR: FLAIR nulls the CSF, so a T2w
    change there is a shift of partial volume (slice position, registration, atrophy), not
    lesion. Unchanged tissue keeps visit ``j``'s FLAIR, so a stable lesion is found alike at
    both visits and CSF stays dark; a new T2w hyperintensity enters the imputed FLAIR in
    FLAIR's own z units; noise and edge misalignment of the T2w pair do not.
    The imputed image is not an output (the session's own contrasts are what is written and
    shown), and change between visits is still tested on a contrast every visit has.

    Parameters
    ----------
    sessions : list of dict[str, ndarray]
        Preprocessed contrasts of the subject's sessions, in time order.
    priors : lesiontrack.preprocess.Priors
    spacing : sequence of 3 float
        Voxel size in mm.
    cfg : dict
        The ``[segment]`` section.

    Returns
    -------
    sessions : list of dict
        The input dicts, with ``FLAIR`` added to the ones it was imputed for (new dicts;
        the inputs are not modified).
    source : dict
        ``{index of the session given a FLAIR: index of the session it came from}``.
    """
    _check_cfg(cfg)
    return _impute(sessions, priors, spacing, cfg, "FLAIR", "T2w")


def impute_t2w(sessions: list, priors, spacing, cfg: dict) -> tuple[list, dict]:
    """Sessions with FLAIR but no T2w, given one from the nearest visit with both and the FLAIR change.

    The lesion score is the geometric mean of the FLAIR and T2w z-scores, so a visit
    without T2w would be scored on FLAIR alone: its faint lesions, edges and noise blobs
    differ from those of the visits scored on both, and the tracker would call the
    difference change (on the real longitudinal patient with visit 1's T2w withheld: 8
    false-positive change components against 3 with every contrast; 9 when every visit
    was scored on FLAIR alone). The mirror of :func:`impute_flair`::

        T2w_i = T2w_j + (sigma_T2w / sigma_FLAIR)_j * D,
        D = FLAIR_i - FLAIR_j where significant (as in impute_flair), else 0

    with the significant change kept out of and away from visit ``j``'s CSF (defined on its
    FLAIR, as there). Unchanged tissue keeps visit ``j``'s T2w, so the T2w factor of the
    score is the same at both visits and change comes from the FLAIR. Not an output.

    Returns
    -------
    sessions : list of dict
        The input dicts, with ``T2w`` added to the ones it was imputed for (new dicts).
    source : dict
        ``{index of the session given a T2w: index of the session it came from}``.
    """
    _check_cfg(cfg)
    return _impute(sessions, priors, spacing, cfg, "T2w", "FLAIR")


def _impute(sessions, priors, spacing, cfg, target, by):
    """``target`` for the sessions that have ``by`` but not ``target``: the nearest visit's
    ``target`` plus the significant ``by`` change in ``target``'s width units (impute_flair,
    impute_t2w)."""
    full = [i for i, s in enumerate(sessions) if target in s and by in s]
    todo = [i for i, s in enumerate(sessions) if target not in s and by in s]
    out, source = list(sessions), {}
    if not full or not todo:
        return out, source
    brain_full = np.asarray(priors.brain_mask, dtype=bool)
    box = _bbox(brain_full)
    brain = brain_full[box]
    ratio = {}
    for i in todo:                                   # loop over sessions
        j = min(full, key=lambda k: (abs(k - i), k))
        tissue_j = _Tissue(brain, priors.wm_prob[box], priors.gm_prob[box], cfg)
        if j not in ratio:
            pa = tissue_j.peak(target, np.asarray(sessions[j][target], np.float32)[box])
            pb = tissue_j.peak(by, np.asarray(sessions[j][by], np.float32)[box])
            ratio[j] = np.float32(pa.sigma_low / pb.sigma_low)
        ref = sessions[j]
        img = np.subtract(sessions[i][by], ref[by], dtype=np.float32)
        mean = np.add(sessions[i][by], ref[by], dtype=np.float32)
        sd = noise_model(img, mean, brain_full, spacing)[0]
        del mean
        z = img / sd
        del sd
        # significant change: same-sign regions beyond impute_change_z noise SDs, of at least
        # min_lesion_mm3, holding a voxel significant at a false-discovery rate of 5 % over
        # the brain (a lone noisy voxel, or the heavy tail of resampling differences between
        # thick-slice scans, is no lesion change)
        seed = max(float(cfg["impute_change_z"]), fdr_threshold(z[brain_full], 0.05))
        keep = np.zeros(img.shape, bool)
        vox = float(np.prod(spacing))
        for sz in (z, -z):                           # loop over the two signs
            lab, n = ndi.label(sz >= float(cfg["impute_change_z"]),
                               structure=ndi.generate_binary_structure(3, int(cfg["connectivity"])))
            big = np.bincount(lab.ravel(), minlength=n + 1) * vox >= float(cfg["min_lesion_mm3"])
            big &= np.bincount(lab[sz >= seed], minlength=n + 1) > 0
            big[0] = False
            keep |= big[lab]
        del z, lab
        # FLAIR nulls the CSF: a change in or next to the CSF of the source visit's FLAIR is a
        # shift of partial volume (registration, slice position, atrophy), not lesion
        pf = tissue_j.peak("FLAIR", np.asarray(ref["FLAIR"], np.float32)[box])
        csf = np.zeros(brain_full.shape, bool)
        csf[box] = ref["FLAIR"][box] < pf.mode - float(cfg["csf_z"]) * pf.sigma_low
        keep &= ~ndi.binary_dilation(csf, structure=ndi.generate_binary_structure(3, 3))
        del csf
        img[~keep] = 0
        del keep
        img *= ratio[j]
        img += ref[target]
        np.maximum(img, 0, out=img)
        out[i] = dict(sessions[i], **{target: img})
        source[i] = j
    return out, source


def lesion_zmap(images: dict, priors, cfg: dict, widths=None, spacing=None) -> np.ndarray:
    """Lesion-likeness of every voxel: the combined FLAIR/T2w hyperintensity z of :func:`segment_session`.

    The score the segmentation finds lesions with (``seed_z`` / ``grow_z``), on the full
    grid (0 outside the brain). The tracker's change detector uses it to restrict
    image change to voxels that look like lesion at the brighter visit.

    Parameters
    ----------
    images : dict[str, ndarray]
        Preprocessed contrasts of one session (as for :func:`segment_session`).
    priors : lesiontrack.preprocess.Priors
    cfg : dict
        The ``[segment]`` section of the pipeline config.
    widths : dict, optional
        The subject's pooled tissue widths (:func:`pooled_widths`).
    spacing : sequence of 3 float, optional
        Voxel size in mm (default 1 mm): without FLAIR, the CSF spaces (as the segmentation
        finds them, measured in mm^3) are NaN: as T2w-bright as a lesion, but neither lesion
        nor normal tissue (a comparison with NaN is False on either side).

    Returns
    -------
    ndarray (float32)
    """
    _check_cfg(cfg)
    brain_full = np.asarray(priors.brain_mask, dtype=bool)
    for mod, arr in images.items():
        if np.shape(arr) != brain_full.shape:
            raise SegmentError(f"{mod}: shape {np.shape(arr)} differs from the brain mask {brain_full.shape}")
    box = _bbox(brain_full)
    brain = brain_full[box]
    imgs = {m: np.asarray(a, dtype=np.float32)[box] for m, a in images.items()}
    share = gm_share(priors, spacing, cfg)[box] if spacing is not None else None
    tissue = _Tissue(brain, priors.wm_prob[box], priors.gm_prob[box], cfg, widths, share,
                     _t2w_wm_only(images, priors, box, cfg, spacing))
    score = lesion_score(imgs, brain, tissue, False, bool(cfg["cap_by_flair"]) and "FLAIR" in imgs)
    if "FLAIR" not in imgs and bool(cfg["no_flair_csf"]):
        vox = float(np.prod(spacing)) if spacing is not None else 1.0
        score[_csf_like(imgs, brain, tissue, vox)] = np.nan
    out = np.zeros(brain_full.shape, np.float32)
    out[box] = score
    return out


def _empty(shape):
    return np.zeros(shape, dtype=bool)


def segment_session(images: dict, priors, spacing, cfg: dict, lesion_mask=None,
                    widths=None) -> SessionMasks:
    """Segment one preprocessed session.

    Parameters
    ----------
    images : dict[str, ndarray]
        Preprocessed contrasts on the individual grid (``FLAIR``, ``T2w``, ``T1w``,
        ``ceT1w``, ``b1000`` with NAWM peak 1.0; ``ADC`` in mm^2/s). FLAIR or T2w
        is needed unless ``lesion_mask`` is given.
    priors : lesiontrack.preprocess.Priors
    spacing : sequence of 3 floats
        Voxel size in mm.
    cfg : dict
        The ``[segment]`` section of the pipeline config.
    lesion_mask : ndarray of bool, optional
        An external lesion mask (LST-AI, manual, ...) used instead of the
        T2/FLAIR segmentation; everything downstream uses it.
    widths : dict, optional
        Tissue peak widths pooled over the subject's sessions (:func:`pooled_widths`);
        default: this session's own.

    Returns
    -------
    SessionMasks
    """
    _check_cfg(cfg)
    brain_full = np.asarray(priors.brain_mask, dtype=bool)
    shape = brain_full.shape
    for mod, arr in images.items():
        if np.shape(arr) != shape:
            raise SegmentError(f"{mod}: shape {np.shape(arr)} differs from the brain mask {shape}")
    if lesion_mask is not None and np.shape(lesion_mask) != shape:
        raise SegmentError(f"lesion_mask: shape {np.shape(lesion_mask)} differs from the brain mask {shape}")
    box = _bbox(brain_full if lesion_mask is None else (brain_full | np.asarray(lesion_mask, bool)))
    brain = brain_full[box]
    imgs = {m: np.asarray(a, dtype=np.float32)[box] for m, a in images.items()}
    tissue = _Tissue(brain, priors.wm_prob[box], priors.gm_prob[box], cfg, widths,
                     gm_share(priors, spacing, cfg)[box], _t2w_wm_only(images, priors, box, cfg, spacing))
    available = {"lesion"}
    if lesion_mask is not None:
        lesion = np.asarray(lesion_mask, dtype=bool)[box]
    else:
        lesion = _segment_lesions(imgs, brain, priors.location[box], tissue, spacing, cfg)
        if bool(cfg.get("flair_confirmed_by_t2w", False)) and "FLAIR" in imgs and "T2w" in imgs:
            lesion |= _flair_confirmed(imgs, brain, priors.location[box], tissue, spacing, cfg, lesion)

    restricted = np.zeros_like(lesion)
    if "ADC" in imgs:
        restricted = restricted_mask(lesion, imgs["ADC"], imgs.get("b1000"), tissue, cfg)
        available.add("restricted")

    blackhole = np.zeros_like(lesion)
    if "T1w" in imgs:
        blackhole = blackhole_mask(lesion, imgs["T1w"], tissue, cfg)
        available.add("blackhole")

    enhancing = np.zeros_like(lesion)
    if "ceT1w" in imgs:
        enhancing = enhancing_mask(lesion, _enhancement(imgs), imgs.get("T1w"), tissue, cfg,
                                   float(np.prod(spacing)))
        available.add("enhancing")

    def full(m):
        out = _empty(shape)
        out[box] = m
        return out

    return SessionMasks(full(lesion), full(restricted), full(blackhole), full(enhancing), available)
