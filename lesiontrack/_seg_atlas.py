"""MNI152 atlas priors: templates, the lesion-location map and the template registration.

The templates are the MNI152 2009 (symmetric) T1, grey- and white-matter
probability maps and brain mask that nilearn ships inside its package (no
download). The location map follows the MAGNIMS lesion topography: a voxel is
*periventricular* near the lateral/third/fourth ventricles, *juxtacortical* in or
next to the cortical ribbon, *infratentorial* in the brainstem or cerebellum,
*deep white matter* elsewhere in the brain.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from . import sitk_bridge
from ._reg_core import rotation_search, voxel_points
from .image import Image

__all__ = ["LOCATION_NAMES", "load_templates", "location_map", "register_template", "coarse_fixed",
           "warp_template"]

log = logging.getLogger(__name__)

LOCATION_NAMES = {0: "none", 1: "periventricular", 2: "juxtacortical",
                  3: "infratentorial", 4: "deep white matter"}


@lru_cache(maxsize=4)
def load_templates(resolution: int) -> dict:
    """The nilearn MNI152 templates at ``resolution`` mm as :class:`Image` (float32).

    Keys: ``"T1w"`` (skull-stripped T1 template), ``"gm"``, ``"wm"`` (tissue
    probabilities), ``"brain"`` (brain mask, 0/1).
    """
    from nilearn import datasets

    loaders = {"T1w": datasets.load_mni152_template, "gm": datasets.load_mni152_gm_template,
               "wm": datasets.load_mni152_wm_template, "brain": datasets.load_mni152_brain_mask}
    out = {}
    for key, fn in loaders.items():
        nimg = fn(resolution=resolution)
        out[key] = Image(np.asarray(nimg.get_fdata(), dtype=np.float32), nimg.affine,
                         source=f"nilearn MNI152 {key} ({resolution} mm)")
    return out


def _mni_coords(img: Image):
    """RAS mm coordinates (x, y, z) of every voxel of ``img``, as three broadcastable arrays."""
    idx = np.ogrid[tuple(slice(0, n) for n in img.shape[:3])]
    a = img.affine
    return tuple(sum(a[r, c] * idx[c] for c in range(3)) + a[r, 3] for r in range(3))


def location_map(resolution: int, cfg: dict) -> Image:
    """Lesion-location classes (uint8, see :data:`LOCATION_NAMES`) on the template grid.

    Parameters (``cfg`` = the ``[preprocess]`` section): ``ventricle_csf_min``
    (CSF probability of the ventricles), ``ventricle_min_depth_mm`` (ventricles lie
    deeper than this below the brain surface; sulcal CSF does not),
    ``periventricular_mm``, ``juxtacortical_mm`` (distance from ventricle / cortex),
    ``deep_gm_box_mm`` (MNI box [xmin, xmax, ymin, ymax, zmin, zmax] of the basal
    ganglia and thalami, grey matter that is not cortex), ``infratentorial_max_z_mm``,
    ``brainstem_half_width_mm``, ``brainstem_max_y_mm``, ``cerebellum_max_y_mm``.
    """
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                       if k in _LOCATION_KEYS))
    return _location_map(resolution, key)


_LOCATION_KEYS = {"ventricle_csf_min", "ventricle_min_depth_mm", "periventricular_mm",
                  "juxtacortical_mm", "deep_gm_box_mm", "infratentorial_max_z_mm",
                  "brainstem_half_width_mm", "brainstem_max_y_mm", "cerebellum_max_y_mm"}


@lru_cache(maxsize=4)
def _location_map(resolution: int, key: tuple) -> Image:
    cfg = dict(key)
    t = load_templates(resolution)
    sp = t["brain"].spacing
    brain = t["brain"].data > 0.5
    gm, wm = t["gm"].data, t["wm"].data
    csf = np.clip(t["brain"].data - gm - wm, 0.0, 1.0)
    depth = ndi.distance_transform_edt(brain, sampling=sp)
    vent = (csf >= cfg["ventricle_csf_min"]) & (depth > cfg["ventricle_min_depth_mm"])
    near_vent = ndi.distance_transform_edt(~vent, sampling=sp) <= cfg["periventricular_mm"]
    x, y, z = _mni_coords(t["brain"])
    bx = cfg["deep_gm_box_mm"]
    deep_gm = ((x >= bx[0]) & (x <= bx[1]) & (y >= bx[2]) & (y <= bx[3])
               & (z >= bx[4]) & (z <= bx[5]))
    cortex = (gm >= 0.5) & ~deep_gm
    near_cortex = ndi.distance_transform_edt(~cortex, sampling=sp) <= cfg["juxtacortical_mm"]
    infra = (z < cfg["infratentorial_max_z_mm"]) & (
        ((np.abs(x) <= cfg["brainstem_half_width_mm"]) & (y < cfg["brainstem_max_y_mm"]))
        | (y < cfg["cerebellum_max_y_mm"]))
    loc = np.full(brain.shape, 4, np.uint8)
    loc[near_cortex] = 2
    loc[near_vent] = 1
    loc[infra & brain] = 3
    loc[~brain] = 0
    return t["brain"].with_data(loc, is_label=True, source="MNI152 lesion-location map")


def _coarse(simg: sitk.Image, voxel_mm: float) -> sitk.Image:
    """Smooth and resample a SimpleITK image to an isotropic ``voxel_mm`` grid."""
    sp = np.array(simg.GetSpacing())
    size = np.array(simg.GetSize())
    new_size = [max(int(round(n)), 4) for n in size * sp / voxel_mm]
    sm = sitk.SmoothingRecursiveGaussian(simg, float(voxel_mm) / 2.0)
    return sitk.Resample(sm, new_size, sitk.Transform(), sitk.sitkLinear, simg.GetOrigin(),
                         (float(voxel_mm),) * 3, simg.GetDirection(), 0.0, sitk.sitkFloat32)


def coarse_fixed(fixed: Image, cfg: dict) -> sitk.Image:
    """The copy of ``fixed`` that :func:`register_template` registers: smoothed and
    resampled to an isotropic ``registration_voxel_mm`` grid."""
    return _coarse(sitk.Cast(sitk_bridge.to_sitk(fixed, np.float32), sitk.sitkFloat32),
                   float(cfg["registration_voxel_mm"]))


def _mi_registration(cfg: dict, moving_mask, fixed_mask=None) -> sitk.ImageRegistrationMethod:
    """A registration with the template settings: Mattes mutual information on a random
    sample (fixed seed), linear interpolation, the configured threads."""
    reg = sitk.ImageRegistrationMethod()
    if int(cfg.get("threads", 0)) > 0:  # one thread: reruns are byte-identical
        reg.SetNumberOfThreads(int(cfg["threads"]))
    reg.SetMetricAsMattesMutualInformation(int(cfg["registration_bins"]))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(cfg["registration_sampling"]), 1)
    reg.SetMetricMovingMask(moving_mask)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _rotated_starts(f: sitk.Image, m: sitk.Image, com: sitk.Similarity3DTransform,
                    skullstripped: bool, cfg: dict) -> list:
    """Starts of the similarity stage turned away from the centre-of-mass one.

    A head lies in the scanner pitched or turned against the template's (AC-PC)
    orientation, often by 10-30 degrees, beyond what the gradient descent captures. The
    rotations of :func:`lesiontrack._reg_core.rotation_search` (``template_search_step_deg``
    steps up to ``template_search_range_deg``) about the centre of mass that score better
    than the unrotated start, at most ``template_search_starts``; the head foreground
    (Otsu; the brain when skull-stripped) is sampled on about 8,000 voxels.
    """
    arr = sitk.GetArrayViewFromImage(f)
    fg = arr > 0 if skullstripped else arr > threshold_otsu(arr[arr > 0])
    sel = np.flatnonzero(fg.ravel())
    if sel.size < 64:
        return []
    sel = sel[::max(1, sel.size // 8000)]
    vals = arr.ravel()[sel]
    bins = int(cfg["registration_bins"])
    lo, hi = np.percentile(vals, [1, 99])
    fbin = np.clip(((vals - lo) / max(hi - lo, 1e-6) * bins).astype(np.intp), 0, bins - 1)
    mv = sitk.GetArrayViewFromImage(m)
    found = rotation_search(voxel_points(f, sel), fbin, m,
                            tuple(np.percentile(mv[mv > 0], [1, 99])), com.GetCenter(),
                            [com.GetTranslation()], float(cfg["template_search_range_deg"]),
                            float(cfg["template_search_step_deg"]),
                            int(cfg["template_search_starts"]), bins)
    out = []
    for r, t in found:                                   # loop over the few kept
        s = sitk.Similarity3DTransform()
        s.SetCenter(com.GetCenter())
        s.SetMatrix(tuple(float(x) for x in r.ravel()))
        s.SetTranslation(tuple(float(x) for x in t))
        out.append(s)
    return out


def register_template(fixed: Image, skullstripped: bool, cfg: dict, *, init=None,
                      stages=("similarity", "affine")) -> sitk.Transform:
    """Affine transform mapping points of ``fixed`` (LPS) into the MNI152 template.

    Mattes mutual information (so any of T1w, FLAIR, T2w works as ``fixed``),
    centre-of-mass initialisation, a similarity (7 dof) then an affine (12 dof)
    stage, each multi-resolution. On images with skull, the metric is restricted
    to the template brain (the template is skull-stripped).

    ``stages`` runs only some of the stages; ``init`` (a linear transform, e.g. the
    result of the similarity stage) replaces the centre-of-mass start. ``fixed`` may
    also be the :func:`coarse_fixed` copy of the image (made once for several calls).
    """
    t = load_templates(int(cfg.get("registration_template_resolution", cfg["template_resolution"])))
    tmpl = t["T1w"].with_data(t["T1w"].data * (t["brain"].data > 0.5))   # brain only
    f = fixed if isinstance(fixed, sitk.Image) else coarse_fixed(fixed, cfg)
    m = sitk.Cast(sitk_bridge.to_sitk(tmpl), sitk.sitkFloat32)
    com = sitk.CenteredTransformInitializer(f, m, sitk.Similarity3DTransform(),
                                            sitk.CenteredTransformInitializerFilter.MOMENTS)
    mmask = sitk.Cast(m > 0, sitk.sitkUInt8)
    fmask = sitk.Cast(f > 0, sitk.sitkUInt8)
    transform = com if init is None else init

    def fit(stage, start):
        reg = _mi_registration(cfg, mmask, fmask if skullstripped else None)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=int(cfg["registration_iterations"]),
            relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
        reg.SetInitialTransform(start, inPlace=True)
        reg.Execute(f, m)
        log.info("template registration %s: metric %.4f after %d iterations (%s)", stage,
                 reg.GetMetricValue(), reg.GetOptimizerIteration(),
                 reg.GetOptimizerStopConditionDescription())
        return float(reg.GetMetricValue())

    for stage in stages:
        if stage == "affine":
            aff = sitk.AffineTransform(3)
            mat = sitk_bridge.linear_to_matrix(transform)
            aff.SetCenter(com.GetCenter())
            c = np.array(com.GetCenter())
            aff.SetMatrix(tuple(mat[:3, :3].ravel()))
            aff.SetTranslation(tuple(mat[:3, :3] @ c + mat[:3, 3] - c))
            transform = aff
        elif transform is not com:
            raise ValueError("the similarity stage starts from the centre-of-mass alignment")
        value = fit(stage, transform)
        if stage == "similarity" and init is None:
            # a head turned beyond the optimiser's reach: fits from rotated starts compete
            gain = float(cfg["template_search_min_gain"]) * abs(value)
            for start in _rotated_starts(f, m, com, skullstripped, cfg):
                v = fit("similarity, rotated start", start)
                if v < value - gain:
                    value, transform, gain = v, start, 0.0
    return sitk_bridge.flatten(transform)


def warp_template(fixed: Image, skullstripped: bool, cfg: dict, affine: sitk.Transform) -> sitk.Transform:
    """Refine ``affine`` (fixed point -> template point) by a smooth B-spline deformation.

    An affine map leaves a real brain a few millimetres off the template (ventricle
    size, deep grey matter, cortex), enough for the atlas to place grey matter where the
    subject has white matter. The deformation lives in the subject's space and is applied
    before ``affine``; its control points are ``template_warp_mm`` apart, so it moves
    ventricles, deep grey matter and the cortex as a whole but cannot follow single gyri
    or lesions. Mattes mutual information (any contrast) on the ``registration_voxel_mm``
    grid, L-BFGS-B for ``template_warp_iterations`` per level, two levels, each control
    point's displacement bounded by half the control-point spacing; on images with skull
    the metric is restricted to the affinely carried template brain, grown by two voxels.
    If the optimisation still fails, the affine map is kept (with a warning).
    """
    t = load_templates(int(cfg.get("registration_template_resolution", cfg["template_resolution"])))
    tmpl = t["T1w"].with_data(t["T1w"].data * (t["brain"].data > 0.5))
    f = coarse_fixed(fixed, cfg)
    m = sitk.Cast(sitk_bridge.to_sitk(tmpl), sitk.sitkFloat32)
    extent = np.array(f.GetSize()) * np.array(f.GetSpacing())
    mesh = [max(1, int(round(e / float(cfg["template_warp_mm"])))) for e in extent]
    if skullstripped:
        fmask = sitk.Cast(f > 0, sitk.sitkUInt8)
    else:
        brain = sitk.Resample(sitk.Cast(sitk_bridge.to_sitk(t["brain"]), sitk.sitkFloat32), f, affine,
                              sitk.sitkLinear, 0.0) > 0.5
        fmask = sitk.BinaryDilate(sitk.Cast(brain, sitk.sitkUInt8), [2, 2, 2])
    iterations = int(cfg["template_warp_iterations"])
    # every control point's displacement is bounded by half the control-point spacing:
    # unbounded, a long optimiser step could carry the template off the subject
    # ("all samples map outside moving image buffer": the affine map was then all that
    # was left), and neighbouring control points cannot cross
    bound = 0.5 * float(cfg["template_warp_mm"])
    optimisers = (
        ("L-BFGS-B", lambda r: r.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
            maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
            costFunctionConvergenceFactor=1e7, lowerBound=-bound, upperBound=bound)),
        # on a rough mutual-information surface L-BFGS-B's line search can fail at its
        # first step and leave the deformation at zero; a gradient descent with a line
        # search, its steps scaled by the physical shift they cause, still moves
        ("gradient descent", lambda r: (r.SetOptimizerAsGradientDescentLineSearch(
            learningRate=1.0, numberOfIterations=iterations, convergenceMinimumValue=1e-5,
            convergenceWindowSize=5, estimateLearningRate=r.EachIteration,
            maximumStepSizeInPhysicalUnits=0.05 * bound), r.SetOptimizerScalesFromPhysicalShift())),
    )
    for name, set_optimiser in optimisers:
        bspline = sitk.BSplineTransformInitializer(f, mesh, 3)
        reg = _mi_registration(cfg, sitk.Cast(m > 0, sitk.sitkUInt8), fmask)
        set_optimiser(reg)
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bspline, inPlace=True)
        try:
            reg.Execute(f, m)
        except RuntimeError as exc:      # e.g. a diverging optimisation carried the template away
            log.warning("template warp (%s) failed (%s)", name, str(exc).strip().splitlines()[-1])
            continue
        moved = float(np.max(np.abs(bspline.GetParameters()))) if bspline.GetNumberOfParameters() else 0.0
        log.info("template warp (%s control-point cells, %s): metric %.4f after %d iterations, "
                 "largest control-point shift %.1f mm (%s)", "x".join(map(str, mesh)), name,
                 reg.GetMetricValue(), reg.GetOptimizerIteration(), moved,
                 reg.GetOptimizerStopConditionDescription())
        if moved >= 0.01 * bound:
            break
    else:
        log.warning("template warp: no optimiser moved the template; the affine alignment is used")
        return affine
    # the B-spline, sampled on the registration grid, as a displacement field: the field
    # is smooth on the scale of the control points, so linear interpolation of it changes
    # the carried maps by under 0.01, and it carries them about four times faster
    field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(),
                                              f.GetSpacing(), f.GetDirection())
    out = sitk.CompositeTransform(3)
    out.AddTransform(affine)
    out.AddTransform(sitk.DisplacementFieldTransform(field))   # applied first (ITK: last added)
    return out
