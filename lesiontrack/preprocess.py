"""Subject priors (brain mask, tissue probabilities, lesion locations) and per-session preprocessing.

:func:`prepare_subject` runs once per subject in the individual space: it
registers the MNI152 T1 template that nilearn ships (affine, mutual information)
to each of the subject's mean T1w, FLAIR and T2w, keeps the alignment under which
the atlas tissue classes best explain all the contrasts (:func:`tissue_fit`, each
contrast's fit relative to its best over the alignments, so that every contrast has one
vote), and
carries the brain mask, the grey/white-matter priors and the lesion-location map
into the subject grid. Skull-stripped input is detected from the image itself.

:func:`preprocess_session` corrects the bias field (N4, fitted on a shrunk image and
applied at full resolution) and normalises every structural contrast so that the
normal-appearing white-matter peak is 1.0 (the histogram mode inside the WM prior,
which lesion load does not move).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import sitk_bridge
from ._reg_core import sitk_threads, usable_cpus
from ._seg_atlas import (LOCATION_NAMES, coarse_fixed, load_templates, location_map,
                         register_template, warp_template)
from ._seg_stats import tissue_peak
from .image import Image

__all__ = ["Priors", "PreprocessError", "LOCATION_NAMES", "prepare_subject", "preprocess_session",
           "preprocess_sessions", "detect_skullstripped", "stripped_inputs", "n4_correct", "tissue_fit"]

log = logging.getLogger(__name__)

_NORMALISED = ("FLAIR", "T2w", "T1w", "ceT1w", "b1000")


class PreprocessError(ValueError):
    """Preprocessing cannot run on the given images or settings."""


@dataclass
class Priors:
    """Subject-level priors on the individual grid.

    Attributes
    ----------
    brain_mask : ndarray (bool)
    wm_prob, gm_prob, csf_prob : ndarray (float32)
        Tissue probabilities from the MNI152 templates.
    location : ndarray (uint8)
        0 none, 1 periventricular, 2 juxtacortical, 3 infratentorial, 4 deep white matter.
    skullstripped : bool
        Whether the input was found (or declared) skull-stripped.
    template_fit : dict
        The contrasts the template was registered to, each with its :func:`tissue_fit`
        (``"tissue_fit"``, after the similarity stage; empty when only one was tried) and
        that fit relative to each contrast's best over the alignments, averaged
        (``"relative_fit"``, which chose), and ``"chosen"``.
    """

    brain_mask: np.ndarray
    wm_prob: np.ndarray
    gm_prob: np.ndarray
    csf_prob: np.ndarray
    location: np.ndarray
    skullstripped: bool
    template_fit: dict = field(default_factory=dict)


def _support(data: np.ndarray) -> np.ndarray:
    """Largest connected non-zero region, holes filled."""
    nz = data != 0
    lab, n = ndi.label(nz)
    if n == 0:
        return nz
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(lab == int(np.argmax(sizes)))


def detect_skullstripped(img: Image, cfg: dict) -> bool:
    """Whether ``img`` is already skull-stripped.

    A skull-stripped image has an exactly-zero background over a large part of
    its field of view (at least ``skullstrip_min_background``) and its non-zero
    region is no larger than a brain (``skullstrip_max_brain_ml`` mL, above any
    adult intracranial volume); a head with scalp is two to three times larger.
    """
    bg = float(np.mean(img.data == 0))
    if bg < float(cfg["skullstrip_min_background"]):
        return False
    vol_ml = float(_support(img.data).sum()) * img.voxel_volume / 1000.0
    return vol_ml <= float(cfg["skullstrip_max_brain_ml"])


def stripped_inputs(images_by_session: dict, cfg: dict) -> dict | None:
    """Per modality, whether every session's native image of it is skull-stripped
    (:func:`detect_skullstripped`), for :func:`prepare_subject`. ``None`` unless
    ``skullstripped = "auto"``.

    Parameters
    ----------
    images_by_session : dict[str, dict[str, Image]]
        Each session's native images by modality, as read from their files.
    cfg : dict
        The ``[preprocess]`` section of the pipeline config.
    """
    if cfg.get("skullstripped") != "auto":
        return None
    out = {}
    for imgs in images_by_session.values():
        for mod, img in imgs.items():
            if mod in cfg["template_modalities"] and out.get(mod, True):
                out[mod] = detect_skullstripped(img, cfg)
    return out


def _check_cfg(cfg: dict):
    ss = cfg.get("skullstripped")
    if ss not in ("auto", True, False):
        raise PreprocessError(f"[preprocess] skullstripped must be one of \"auto\", true, false; got {ss!r}")
    if int(cfg["location_map_resolution"]) not in (1, 2):
        raise PreprocessError(f"[preprocess] location_map_resolution must be 1 or 2 (mm), got "
                              f"{cfg['location_map_resolution']!r}")
    if cfg.get("template_selection") not in ("fit", "first"):
        raise PreprocessError(f"[preprocess] template_selection must be \"fit\" or \"first\", got "
                              f"{cfg.get('template_selection')!r}")
    for key in ("template_resolution", "registration_template_resolution"):
        if int(cfg[key]) not in (1, 2):
            raise PreprocessError(f"[preprocess] {key} must be 1 or 2 (mm), got {cfg[key]!r}")
    for key in ("template_search_range_deg", "template_search_step_deg", "template_search_starts",
                "template_search_min_gain"):
        v = cfg.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                (key == "template_search_starts" and v != int(v)):
            raise PreprocessError(f"[preprocess] {key} must be a number >= 0"
                                  f"{' (an integer)' if key == 'template_search_starts' else ''} "
                                  f"(0 turns the rotation search off), got {v!r}")
    warp = cfg.get("template_warp_mm", 0)
    if isinstance(warp, bool) or not isinstance(warp, (int, float)) or not (warp == 0 or 10 <= warp <= 200):
        raise PreprocessError(f"[preprocess] template_warp_mm must be 0 (affine only) or a control-point "
                              f"spacing of 10-200 mm, got {warp!r}")
    it = cfg.get("template_warp_iterations", 1)
    if isinstance(it, bool) or not isinstance(it, int) or it < 1:
        raise PreprocessError(f"[preprocess] template_warp_iterations must be an integer >= 1, got {it!r}")


def tissue_fit(images: list, transform: sitk.Transform, cfg: dict) -> float:
    """How well the atlas tissue classes explain the subject's intensities under ``transform``.

    ``transform`` maps subject points into the MNI152 template (as
    :func:`register_template` returns it). Every image is resampled onto the template
    grid; inside the template brain, where the image has data, each voxel takes its
    most probable atlas class (CSF, GM, WM). The fit of one image is the correlation
    ratio (eta squared) of its intensity ranks on the classes (on a 4 mm grid): the
    share of the rank variance the classes explain, 0 (no relation) to 1. Ranks make
    it independent of the contrast's intensity scale and robust to lesions and
    outliers; whatever the contrast orders the tissues, a correct alignment separates
    them. Returns the mean over ``images`` (:func:`_tissue_fits` gives each image's).
    """
    return float(np.mean(_tissue_fits(images, transform, cfg)))


def _tissue_fits(images: list, transform: sitk.Transform, cfg: dict) -> list:
    """:func:`tissue_fit` of each image of ``images``."""
    grid, cls = _template_classes(int(cfg["registration_template_resolution"]))
    inv = transform.GetInverse()
    out = []
    for img in images:                          # loop over the subject's contrasts (<= 3)
        x = sitk_bridge.resample(img, grid, inv).data
        sel = (cls > 0) & (x > 0)
        if np.count_nonzero(sel) < 1000:
            out.append(0.0)
            continue
        lab, v = cls[sel], x[sel]
        r = np.empty(v.size, np.float64)
        r[np.argsort(v, kind="stable")] = np.arange(v.size, dtype=np.float64)
        n = np.bincount(lab, minlength=4)
        mu = np.bincount(lab, weights=r, minlength=4) / np.maximum(n, 1)
        between = float(np.sum(n * (mu - r.mean()) ** 2))
        out.append(between / max(float(r.var() * r.size), 1e-12))
    return out


@lru_cache(maxsize=2)
def _template_classes(resolution: int):
    """Most probable atlas class (0 outside the brain, 1 CSF, 2 GM, 3 WM) on every other
    voxel of the template grid (4 mm for the 2 mm template: ~30,000 brain voxels, plenty
    for a correlation ratio), and that grid as an :class:`Image`."""
    t = load_templates(resolution)
    sub = (slice(None, None, 2),) * 3
    brain, gm, wm = t["brain"].data[sub], t["gm"].data[sub], t["wm"].data[sub]
    cls = np.argmax(np.stack([np.clip(brain - gm - wm, 0, 1), gm, wm]), axis=0) + 1
    cls[brain < 0.5] = 0
    aff = t["brain"].affine.copy()
    aff[:3, :3] *= 2.0
    return Image(brain.astype(np.float32), aff), cls.astype(np.intp)


def prepare_subject(grid_images: dict, cfg: dict, native_stripped: dict | None = None) -> Priors:
    """Atlas priors of one subject in the individual space.

    Parameters
    ----------
    grid_images : dict[str, Image]
        Across-session mean image of each modality on the individual grid.
    cfg : dict
        The ``[preprocess]`` section of the pipeline config.
    native_stripped : dict[str, bool], optional
        Per modality, whether every session's native image of it is skull-stripped
        (:func:`detect_skullstripped` on the images as stored, :func:`stripped_inputs`).
        With ``skullstripped = "auto"`` the modality the priors are drawn on decides from
        it; without it, from its across-session mean. The mean is a poorer witness: its
        support is the union of the visits' brains, widened by their misalignment and the
        interpolation, and a large brain's mean can exceed ``skullstrip_max_brain_ml``
        where each visit does not.

    Returns
    -------
    Priors
    """
    _check_cfg(cfg)
    order = [m for m in cfg["template_modalities"] if m in grid_images]
    if not order:
        raise PreprocessError(f"prepare_subject needs one of {cfg['template_modalities']} "
                              f"(the [preprocess] template_modalities), got {sorted(grid_images)}")
    ref = grid_images[order[0]]
    ss = cfg["skullstripped"]
    if ss != "auto":
        skullstripped = bool(ss)
    elif native_stripped is not None and order[0] in native_stripped:
        skullstripped = bool(native_stripped[order[0]])
    else:
        skullstripped = detect_skullstripped(ref, cfg)
    if cfg["template_selection"] == "first":
        order = order[:1]
    with sitk_threads(int(cfg["threads"])):   # threads = 1: byte-identical reruns
        if len(order) == 1:
            transform = register_template(ref, skullstripped, cfg)
            best, fit, rel = 0, {}, {}
        else:
            # the similarity stage on every contrast, side by side (SimpleITK releases the
            # GIL); the alignment that fits all contrasts best is refined (affine)
            def similarity(m):
                f = coarse_fixed(grid_images[m], cfg)
                return f, register_template(f, skullstripped, cfg, stages=("similarity",))

            with ThreadPoolExecutor(min(len(order), usable_cpus())) as pool:
                coarse, fits = zip(*pool.map(similarity, order))
            # each contrast's fit under each alignment (rows: alignments), relative to its
            # best: every contrast has one vote. A contrast's own scale of fit depends on its
            # tissue contrast (a 2D T1w's rank fit can be five times a FLAIR's), and each
            # alignment fits its own image best, so a plain mean let the contrast with the
            # widest scale choose its own alignment, also where it shrank the brain
            fits_each = np.array([_tissue_fits([grid_images[m] for m in order], t, cfg)
                                  for t in fits])
            top = fits_each.max(axis=0)
            relative = np.divide(fits_each, top, out=np.zeros_like(fits_each),
                                 where=top > 0).mean(axis=1)
            best = int(np.argmax(relative))
            fit = {m: round(float(v), 4) for m, v in zip(order, fits_each.mean(axis=1))}
            rel = {m: round(float(v), 4) for m, v in zip(order, relative)}
            log.info("template registered to %s (after the similarity stage, tissue fit %s; "
                     "relative to each contrast's best %s)", order[best],
                     ", ".join(f"{m} {v:.3f}" for m, v in fit.items()),
                     ", ".join(f"{m} {v:.3f}" for m, v in rel.items()))
            transform = register_template(coarse[best], skullstripped, cfg, init=fits[best],
                                          stages=("affine",))
        if float(cfg["template_warp_mm"]) > 0:
            transform = warp_template(grid_images[order[best]], skullstripped, cfg, transform)
    res = int(cfg["template_resolution"])
    tmpl = load_templates(res)

    def carry(img: Image) -> np.ndarray:
        return sitk_bridge.resample(img, ref, transform).data

    wm = np.clip(carry(tmpl["wm"]), 0, 1).astype(np.float32)
    gm = np.clip(carry(tmpl["gm"]), 0, 1).astype(np.float32)
    brain_p = np.clip(carry(tmpl["brain"]), 0, 1).astype(np.float32)
    location = carry(location_map(int(cfg["location_map_resolution"]), cfg)).astype(np.uint8)
    support = _support(ref.data)
    if skullstripped:
        brain = support
    else:
        brain = (brain_p >= 0.5) & support
    csf = np.clip(np.maximum(brain_p, brain.astype(np.float32)) - wm - gm, 0, 1).astype(np.float32)
    location[~brain] = 0
    location[brain & (location == 0)] = 4
    log.info("priors from %s: skull-stripped=%s, brain %.0f mL", order[best], skullstripped,
             brain.sum() * ref.voxel_volume / 1000.0)
    return Priors(brain, wm, gm, csf, location, skullstripped,
                  {"chosen": order[best], "tissue_fit": fit, "relative_fit": rel})


def n4_correct(data: np.ndarray, mask: np.ndarray, spacing, cfg: dict) -> np.ndarray:
    """N4 bias-field correction fitted on a shrunk image, applied at full resolution.

    ``cfg`` keys: ``n4_fit_voxel_mm`` (the fit runs on the image shrunk to about this
    voxel size, by subsampling: N4 sharpens the histogram of tissue intensities, which
    block averages would blur; the field is smooth, so a coarse fit loses nothing),
    ``n4_iterations`` (per fitting level), ``n4_convergence``, ``threads``.

    The arrays go to SimpleITK without reordering (a diagonal index-space geometry with
    the spacing reversed), so no transposed copy is made on the way in or out.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    fit_mm = float(cfg["n4_fit_voxel_mm"])
    k = [max(1, int(round(fit_mm / s))) for s in sp]

    def image(arr):
        simg = sitk.GetImageFromArray(arr)
        simg.SetSpacing(tuple(float(v) for v in sp[::-1]))
        return simg

    img = sitk.Shrink(image(np.maximum(data, 0).astype(np.float32, copy=False)), k[::-1])
    msk = sitk.Shrink(image(mask.astype(np.uint8)), k[::-1])
    corr = sitk.N4BiasFieldCorrectionImageFilter()
    if int(cfg["threads"]) > 0:  # one thread: reruns are byte-identical (and N4 gains little from more here)
        corr.SetNumberOfThreads(int(cfg["threads"]))
    corr.SetMaximumNumberOfIterations([int(i) for i in cfg["n4_iterations"]])
    corr.SetConvergenceThreshold(float(cfg["n4_convergence"]))
    corr.Execute(img, msk)
    ref = sitk.Image([int(n) for n in data.shape[::-1]], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(v) for v in sp[::-1]))
    out = sitk.GetArrayFromImage(corr.GetLogBiasFieldAsImage(ref))   # same axis order as data
    np.negative(out, out=out)
    np.exp(out, out=out)
    out *= data
    return out.astype(np.float32, copy=False)


def preprocess_session(images: dict, priors: Priors, spacing, cfg: dict) -> dict:
    """Bias-correct and normalise one session's images (individual grid).

    Parameters
    ----------
    images : dict[str, ndarray]
        Modality -> array on the individual grid.
    priors : Priors
    spacing : sequence of 3 floats
        Voxel size (mm).
    cfg : dict
        The ``[preprocess]`` section: ``n4_modalities`` (contrasts to bias-correct),
        N4 settings (see :func:`n4_correct`), ``nawm_prior_min`` (WM probability
        of the voxels whose histogram peak defines normal-appearing white matter).

    Returns
    -------
    dict[str, ndarray]
        FLAIR, T2w, T1w, ceT1w and b1000 float32 with the NAWM peak at 1.0; ADC
        (mm^2/s) and any other key unchanged.
    """
    return preprocess_sessions({None: dict(images)}, priors, spacing, cfg)[None]


def preprocess_sessions(sessions: dict, priors: Priors, spacing, cfg: dict, done=None) -> dict:
    """:func:`preprocess_session` for several sessions, all their images on one pool.

    The images of every session go side by side on the CPUs this process may use (N4
    and numpy release the GIL; each N4 keeps its own thread count, so the results are
    those of :func:`preprocess_session`, session by session). One pool for all of them
    keeps the CPUs busy where a session's last image would leave one idle.

    Parameters
    ----------
    sessions : dict[key, dict[str, ndarray]]
        Session -> modality -> array on the individual grid. Each array is removed from
        its session's dict when its turn comes, so that memory is released as the work
        goes on.
    priors, spacing, cfg
        As for :func:`preprocess_session`.
    done : callable, optional
        ``done(session, modality, array)`` for each result, in input order, as soon as
        it and those before it are ready (e.g. to write it in the background).

    Returns
    -------
    dict[key, dict[str, ndarray]]
        Session -> modality -> preprocessed array, in the input order.
    """
    brain = priors.brain_mask
    nawm = brain & (priors.wm_prob >= float(cfg["nawm_prior_min"]))
    jobs = [(key, mod) for key, images in sessions.items() for mod in images]

    def one(job):
        key, mod = job
        a = np.asarray(sessions[key].pop(mod), dtype=np.float32)
        if a.shape != brain.shape:
            raise PreprocessError(f"{mod}: shape {a.shape} differs from the priors' grid {brain.shape}")
        if mod not in _NORMALISED:
            return a
        valid = brain & (a > 0)
        if mod in cfg["n4_modalities"] and valid.sum() > 1000:
            a = n4_correct(a, valid, spacing, cfg)
        sel = nawm & (a > 0)
        if sel.sum() < 1000:
            sel = valid
        if sel.sum() < 100:
            raise PreprocessError(f"{mod}: fewer than 100 positive voxels inside the brain mask; "
                                  "the image does not overlap the brain")
        peak = tissue_peak(a[sel], bins=int(cfg["histogram_bins"]))
        if peak.mode <= 0:
            raise PreprocessError(f"{mod}: normal-appearing white-matter peak is {peak.mode:g} (<= 0)")
        return a / np.float32(peak.mode)

    out = {key: {} for key in sessions}
    n = min(len(jobs), usable_cpus())
    with ThreadPoolExecutor(max(n, 1)) as pool:
        for (key, mod), arr in zip(jobs, pool.map(one, jobs) if n > 1 else map(one, jobs)):
            out[key][mod] = arr
            if done is not None:
                done(key, mod, arr)
    return out
