"""Rigid alignment of every contrast of every visit into one unbiased subject space.

Within a visit, each contrast is registered rigidly onto the visit's reference
(FLAIR, else T2w) with Mattes mutual information, random sampling inside a head
foreground mask and a block-average pyramid. Across visits, the references are
aligned to a running mean image and the transforms re-centred by the inverse of
their mean, so that no visit is privileged (the "individual" space). All
transforms are in ITK resampling direction (individual point -> native point, LPS).

Examples
--------
>>> al = align_subject(images, load_config()["registration"])          # doctest: +SKIP
>>> flair1 = sitk_bridge.resample(images["ses-01"]["FLAIR"], al.grid,
...                               al.transforms["ses-01"]["FLAIR"])    # doctest: +SKIP
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from . import sitk_bridge
from ._reg_core import (FitResult, Prepared, RegistrationError, fit_rigid, parallel_map, peak_ratio,
                        prepare, rotation_angle_deg, similarity, sitk_threads)
from ._reg_template import auto_voxel_size, make_grid, mean_image, recentre
from .image import Image

__all__ = ["align_subject", "register_rigid", "SubjectAlignment", "RegistrationQC",
           "RegistrationError", "REFERENCE_ORDER"]

#: Reference contrast of a visit: the first of these that is present.
REFERENCE_ORDER = ("FLAIR", "T2w")

_REQUIRED = ("threads", "voxel_size", "min_voxel_size", "grid_extent", "grid_margin_mm",
             "template_iterations", "levels_mm", "samples", "iterations", "step_mm",
             "min_step_mm", "relaxation", "histogram_bins", "mask_level_mm", "mask_margin_mm",
             "nonuniformity_sigma_mm", "moments_min_shift_mm", "search_range_deg", "search_step_deg",
             "search_starts", "search_min_gain", "seed", "qc_min_similarity",
             "qc_peak_shift_mm", "qc_min_peak_ratio", "qc_outlier_mad", "qc_outlier_min_drop", "qc_max_rotation_deg", "qc_max_translation_mm",
             "qc_max_rotation_deg_longitudinal", "qc_max_translation_mm_longitudinal")


@dataclass
class RegistrationQC:
    """Quality record of one registration.

    Attributes
    ----------
    session_id, modality : str
        The registered (moving) image.
    fixed : str
        What it was registered to (``"ses-01/FLAIR"``, ``"individual"``).
    metric : float
        Final Mattes mutual information (negative; lower is better).
    stop_condition : str
        The optimiser's stop condition at the finest level.
    iterations : int
        Optimiser iterations at the finest level.
    similarity : float
        Post-registration normalised mutual information ``(H(A)+H(B))/H(A,B) - 1`` in
        the fixed foreground (0 = independent, 1 = identical).
    flagged : bool
        True when the alignment looks wrong; ``reason`` says why.
    """

    session_id: str
    modality: str
    fixed: str
    metric: float
    stop_condition: str
    iterations: int
    similarity: float
    flagged: bool = False
    reason: str = ""


@dataclass
class SubjectAlignment:
    """Result of :func:`align_subject`.

    Attributes
    ----------
    grid : Image
        The individual space: isotropic grid whose float32 data is the mean of the
        aligned, intensity-normalised (median of the foreground = 1) session references.
    transforms : dict
        ``transforms[session_id][modality] -> sitk.Transform`` (one AffineTransform)
        mapping individual-space points into that image (LPS, resampling direction).
    qc : list of RegistrationQC
        One record per registered image (each session reference against the
        individual mean, every other contrast against its session reference).
    reference : dict
        ``reference[session_id]`` -> the reference modality of that session.
    """

    grid: Image
    transforms: dict
    qc: list
    reference: dict = field(default_factory=dict)


def _check_cfg(cfg: dict):
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise RegistrationError(f"registration config lacks {', '.join(missing)}; "
                                "start from lesiontrack/data/pipelines/default.toml")
    n = len(cfg["levels_mm"])
    for key in ("samples", "iterations", "step_mm", "relaxation"):
        if len(cfg[key]) != n:
            raise RegistrationError(f"registration.{key} must have one value per level "
                                    f"(levels_mm has {n}), got {list(cfg[key])}")
    if cfg["voxel_size"] != "auto" and not (isinstance(cfg["voxel_size"], (int, float))
                                            and cfg["voxel_size"] > 0):
        raise RegistrationError(f"registration.voxel_size must be 'auto' or a positive number "
                                f"(mm), got {cfg['voxel_size']!r}")
    for key in ("search_range_deg", "search_step_deg", "search_starts", "search_min_gain"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                (key == "search_starts" and v != int(v)):
            raise RegistrationError(f"registration.{key} must be a number >= 0"
                                    f"{' (an integer)' if key == 'search_starts' else ''} "
                                    f"(0 turns the rotation search off), got {v!r}")
    if int(cfg["template_iterations"]) < 0:
        raise RegistrationError("registration.template_iterations must be >= 0, got "
                                f"{cfg['template_iterations']}")


def _plausibility(m: np.ndarray, centre, max_rot: float, max_shift: float) -> str:
    rot = rotation_angle_deg(m)
    shift = float(np.linalg.norm(m[:3, :3] @ centre + m[:3, 3] - centre))
    reasons = []
    if rot > max_rot:
        reasons.append(f"rotation {rot:.1f} deg exceeds {max_rot:g}")
    if shift > max_shift:
        reasons.append(f"translation {shift:.1f} mm exceeds {max_shift:g}")
    return "; ".join(reasons)


def _qc(fixed: Prepared, moving: Prepared, fit, cfg, names, limits) -> RegistrationQC:
    sid, mod, fixed_name = names
    sim = similarity(fixed, moving, fit.transform, int(cfg["histogram_bins"]))
    reasons = []
    if sim < float(cfg["qc_min_similarity"]):
        reasons.append(f"similarity {sim:.3f} below {cfg['qc_min_similarity']:g}")
    ratio = peak_ratio(fixed, moving, fit.transform, int(cfg["histogram_bins"]),
                       float(cfg["qc_peak_shift_mm"]), sim)
    if ratio < float(cfg["qc_min_peak_ratio"]):
        reasons.append(f"no similarity peak at the solution (ratio {ratio:.2f} to "
                       f"{cfg['qc_peak_shift_mm']:g} mm shifts, below {cfg['qc_min_peak_ratio']:g})")
    m = sitk_bridge.linear_to_matrix(fit.transform)
    why = _plausibility(m, fixed.centroid, *limits)
    if why:
        reasons.append(why)
    return RegistrationQC(sid, mod, fixed_name, fit.metric, fit.stop, fit.iterations, sim,
                          bool(reasons), "; ".join(reasons))


def _flag_outliers(qc: list, cfg: dict) -> list:
    """Flag similarities far below the subject's typical value for the same pairing."""
    out = list(qc)
    groups: dict = {}
    for i, q in enumerate(out):
        groups.setdefault((q.modality, q.fixed == "individual"), []).append(i)
    for idx in groups.values():
        if len(idx) < 3:
            continue
        sims = np.array([out[i].similarity for i in idx])
        med = float(np.median(sims))
        mad = 1.4826 * float(np.median(np.abs(sims - med)))
        for i, s in zip(idx, sims):
            low = s < med - float(cfg["qc_outlier_mad"]) * mad
            if low and s < med * (1 - float(cfg["qc_outlier_min_drop"])):
                why = f"similarity {s:.3f} far below the subject's typical {med:.3f}"
                q = out[i]
                out[i] = replace(q, flagged=True, reason="; ".join(r for r in (q.reason, why) if r))
    return out


def register_rigid(fixed: Image, moving: Image, cfg: dict, fixed_mask=None, moving_mask=None,
                   init: sitk.Transform | None = None):
    """Rigidly register ``moving`` onto ``fixed`` (Mattes MI, multi-resolution).

    Parameters
    ----------
    fixed, moving : Image
        3D images in any orientation and resolution.
    cfg : dict
        ``load_config()["registration"]``.
    fixed_mask, moving_mask : bool array or label Image on the image's grid, optional
        Restrict sampling to these regions (default: automatic head foreground of the
        fixed image; the moving mask is only used when given).
    init : sitk.Transform, optional
        Initial fixed -> moving map; default: the better of the header alignment and a
        centre-of-mass alignment, against starts turned by a coarse rotation search
        (``search_range_deg``; see ``docs/architecture.md``).

    Returns
    -------
    transform : sitk.Euler3DTransform
        Maps fixed points to moving points (LPS; ``sitk_bridge.resample(moving, fixed, T)``).
    qc : RegistrationQC
        With empty ``session_id`` and ``modality``.
    """
    _check_cfg(cfg)
    with sitk_threads(cfg["threads"]):
        pf = prepare(fixed, cfg, fixed_mask)
        pm = prepare(moving, cfg, moving_mask)
        fit = fit_rigid(pf, pm, cfg, init, use_moving_mask=moving_mask is not None)
        qc = _qc(pf, pm, fit, cfg, ("", "", fixed.source), (float(cfg["qc_max_rotation_deg"]),
                                                              float(cfg["qc_max_translation_mm"])))
    return fit.transform, qc


def _reference(sid: str, mods: dict) -> str:
    for m in REFERENCE_ORDER:
        if m in mods:
            return m
    raise RegistrationError(f"session {sid}: needs a FLAIR or T2w image as reference, "
                            f"got {sorted(mods)}")


def align_subject(images: dict, cfg: dict, progress=None) -> SubjectAlignment:
    """Align every image of one subject into its unbiased individual space.

    Parameters
    ----------
    images : dict
        ``images[session_id][modality] -> Image`` (3D native images; modalities
        FLAIR, T2w, T1w, ceT1w, dwi (b=0); each session needs FLAIR or T2w).
    cfg : dict
        ``load_config()["registration"]``.
    progress : callable(step_name, i, n), optional
        Called before each registration.

    Returns
    -------
    SubjectAlignment
    """
    _check_cfg(cfg)
    if not images:
        raise RegistrationError("align_subject: no sessions given")
    refs_mod = {sid: _reference(sid, mods) for sid, mods in images.items()}
    for sid, mods in images.items():
        for mod, img in mods.items():
            if not isinstance(img, Image) or img.data.ndim != 3:
                raise RegistrationError(f"session {sid}, {mod}: expected a 3D Image, got "
                                        f"{getattr(img, 'shape', type(img).__name__)}")
    sids = list(images)
    n_steps = sum(len(m) - 1 for m in images.values())
    if len(sids) > 1:
        n_steps += len(sids) - 1 + len(sids) * int(cfg["template_iterations"])
    step = [0]
    lock = threading.Lock()

    def tick(name):   # called from the worker threads: one count, calls in turn
        with lock:
            step[0] += 1
            if progress is not None:
                progress(name, step[0], n_steps)

    intra_lim = (float(cfg["qc_max_rotation_deg"]), float(cfg["qc_max_translation_mm"]))
    long_lim = (float(cfg["qc_max_rotation_deg_longitudinal"]),
                float(cfg["qc_max_translation_mm_longitudinal"]))
    # Independent fits run side by side (parallel_map); each keeps cfg["threads"], so the
    # results do not depend on how many run at once.
    with sitk_threads(cfg["threads"]):
        refs = {sid: images[sid][refs_mod[sid]] for sid in sids}
        rprep = dict(zip(sids, parallel_map(lambda sid: prepare(refs[sid], cfg), sids)))

        # within each visit: every contrast onto the visit reference
        pairs = [(sid, mod) for sid in sids for mod in images[sid] if mod != refs_mod[sid]]

        def intra_fit(pair):
            sid, mod = pair
            ref = refs_mod[sid]
            tick(f"{sid} {mod} -> {ref}")
            moving = prepare(images[sid][mod], cfg)  # kept only while in use (memory)
            fit = fit_rigid(rprep[sid], moving, cfg, None)
            return fit.transform, _qc(rprep[sid], moving, fit, cfg, (sid, mod, f"{sid}/{ref}"), intra_lim)

        intra = {sid: {} for sid in sids}
        qc = []
        for (sid, mod), (t, q) in zip(pairs, parallel_map(intra_fit, pairs)):
            intra[sid][mod] = t
            qc.append(q)

        # across visits: pairwise start, then rigid template iterations
        s0 = sids[0]
        mats = {s0: np.eye(4)}

        def pairwise(sid):
            tick(f"{sid} {refs_mod[sid]} -> {s0}")
            return fit_rigid(rprep[s0], rprep[sid], cfg, None)

        fits = dict(zip(sids[1:], parallel_map(pairwise, sids[1:])))
        for sid in sids[1:]:
            mats[sid] = sitk_bridge.linear_to_matrix(fits[sid].transform)
        mats = recentre(mats, rprep[s0].centroid)
        voxel = (auto_voxel_size(list(refs.values()), float(cfg["min_voxel_size"]))
                 if cfg["voxel_size"] == "auto" else float(cfg["voxel_size"]))
        extent, margin = str(cfg["grid_extent"]), float(cfg["grid_margin_mm"])
        n_iter = int(cfg["template_iterations"]) if len(sids) > 1 else 0
        tprep = None
        for _ in range(n_iter):
            aff, shape = make_grid(rprep, refs, mats, voxel, extent, margin)
            gref = sitk_bridge.to_sitk(Image(np.zeros(shape, np.uint8), aff))
            tmpl = Image(mean_image(refs, rprep, mats, gref), aff, source="individual mean")
            tprep = prepare(tmpl, cfg)

            def to_template(sid):
                tick(f"{sid} {refs_mod[sid]} -> individual")
                return fit_rigid(tprep, rprep[sid], cfg, sitk_bridge.matrix_to_transform(mats[sid]))

            fits.update(zip(sids, parallel_map(to_template, sids)))
            for sid in sids:
                mats[sid] = sitk_bridge.linear_to_matrix(fits[sid].transform)
            mats = recentre(mats, tprep.centroid)

        aff, shape = make_grid(rprep, refs, mats, voxel, extent, margin)
        gref = sitk_bridge.to_sitk(Image(np.zeros(shape, np.uint8), aff))
        grid = Image(mean_image(refs, rprep, mats, gref), aff, source="individual")
        if len(sids) > 1:
            gprep = tprep if tprep is not None else prepare(grid, cfg)
            for sid in sids:
                fit = fits.get(sid)
                t = sitk_bridge.matrix_to_transform(mats[sid])
                if fit is None:  # the pairwise anchor when no template iteration ran
                    fit = FitResult(t, math.nan, "anchor of the pairwise alignment", 0)
                fit = replace(fit, transform=t)
                qc.insert(sids.index(sid), _qc(gprep, rprep[sid], fit, cfg,
                                               (sid, refs_mod[sid], "individual"), long_lim))
        else:
            qc.insert(0, RegistrationQC(s0, refs_mod[s0], "individual", math.nan,
                                        "single session: defines the individual space", 0, 1.0))

    transforms = {}
    for sid in sids:
        t_ref = sitk_bridge.matrix_to_transform(mats[sid])
        transforms[sid] = {refs_mod[sid]: t_ref}
        for mod, t in intra[sid].items():
            transforms[sid][mod] = sitk_bridge.compose(t_ref, t)
    return SubjectAlignment(grid, transforms, _flag_outliers(qc, cfg), dict(refs_mod))
