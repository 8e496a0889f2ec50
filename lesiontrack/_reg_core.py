"""Private engine of :mod:`lesiontrack.registration`: pyramids, masks, one rigid fit, QC.

Images enter as :class:`~lesiontrack.image.Image` (RAS) and are handed to SimpleITK
only through :mod:`lesiontrack.sitk_bridge`. Transforms are rigid (``Euler3DTransform``)
in ITK resampling direction (fixed point -> moving point, LPS mm).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.filters import threshold_otsu

from . import sitk_bridge
from .image import Image, crop_image

log = logging.getLogger(__name__)


class RegistrationError(ValueError):
    """Registration cannot run on the given images or settings."""


# --------------------------------------------------------------------------------------
# threads

def usable_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by ``OMP_NUM_THREADS`` (which
    cohort workers set)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        n = min(n, int(limit))
    return max(1, n)


def parallel_map(fn, items) -> list:
    """``[fn(x) for x in items]``, side by side on the CPUs this process may use.

    For independent calls that spend their time in SimpleITK filters, numpy or zlib
    (which release the GIL). Each call keeps SimpleITK's thread setting, so a result
    does not depend on how many run at once; results come back in ``items``' order and
    the first exception (in that order) is raised.
    """
    items = list(items)
    n = min(len(items), usable_cpus())
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, items))


@contextmanager
def sitk_threads(n: int):
    """Temporarily set SimpleITK's default thread count (0 = all usable cores)."""
    if n is None or int(n) <= 0:
        n = usable_cpus()
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


# --------------------------------------------------------------------------------------
# pyramid and masks
def _factors(spacing, target_mm: float) -> np.ndarray:
    if target_mm <= 0:
        return np.ones(3, int)
    return np.maximum(1, np.floor(target_mm / np.asarray(spacing) + 0.5)).astype(int)


def shrink(simg: sitk.Image, factors) -> sitk.Image:
    """Average non-overlapping blocks of ``factors`` voxels (multi-threaded ``BinShrink``)."""
    f = [int(x) for x in factors]
    return simg if all(x == 1 for x in f) else sitk.BinShrink(simg, f)


def block_mean(img: Image, factors) -> Image:
    """``img`` averaged over blocks of ``factors`` voxels; the affine follows the block centres."""
    if np.all(np.asarray(factors) == 1):
        return img
    return sitk_bridge.from_sitk(shrink(sitk_bridge.to_sitk(img, np.float32), factors), source=img.source)


def level_image(img: Image, target_mm: float) -> Image:
    """``img`` brought to about ``target_mm`` per voxel (0 = native) by block averaging."""
    return block_mean(img, _factors(img.spacing, target_mm))


@dataclass
class Prepared:
    """One image ready for registration: its pyramid, head mask and intensity scale."""

    levels: list          # sitk images, coarse -> fine, one per configured level
    mask: sitk.Image      # uint8 foreground mask (coarse grid), physical-space test only
    mask_volume: float    # mm^3 inside the mask
    centroid: np.ndarray  # LPS mm, centroid of the mask
    scale: float          # robust intensity scale (median inside the mask)
    mask_points: np.ndarray  # (N, 3) LPS centres of mask voxels (coarse grid)
    corners: np.ndarray   # (8, 3) LPS corners of the field of view
    cache: dict = field(default_factory=dict)  # per-level data of similarity()


def foreground_mask(coarse: Image, margin_mm: float, user_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Head/brain foreground of a coarse image: Otsu, largest component, holes filled.

    Returns the foreground and the foreground dilated by ``margin_mm`` (the sampling mask).
    """
    d = coarse.data
    if user_mask is not None:
        m = np.asarray(user_mask, bool)
    else:
        finite = d[np.isfinite(d)]
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if hi <= lo:
            raise RegistrationError(f"{coarse.source}: image has no contrast to register")
        t = threshold_otsu(np.clip(finite, lo, hi))
        m = d > t
        lab, n = ndimage.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            m = lab == int(np.argmax(sizes))
        m = ndimage.binary_fill_holes(m)
    core = m
    if margin_mm > 0:
        sp = np.asarray(coarse.spacing)
        r = np.ceil(margin_mm / sp).astype(int) + 1
        dist = ndimage.distance_transform_edt(~np.pad(m, [(x, x) for x in r]), sampling=sp)
        m = dist[r[0]:r[0] + m.shape[0], r[1]:r[1] + m.shape[1], r[2]:r[2] + m.shape[2]] <= margin_mm
    if core.sum() < 8:
        raise RegistrationError(f"{coarse.source}: no foreground found to register")
    return core, m


def _flatten(fine: sitk.Image, coarse: Image, mask: np.ndarray, sigma_mm: float) -> sitk.Image:
    """Divide out slow intensity non-uniformity (bias field): the image over its local mean.

    The local mean is a normalised Gaussian average (``sigma_mm``) of the coarse image
    inside the foreground mask, interpolated to the fine grid. MI is biased by bias
    fields that differ between the two images; this removes most of that bias.
    """
    typical = float(np.median(coarse.data[mask]))
    if typical <= 0:
        return fine
    sv = sigma_mm / np.asarray(coarse.spacing)
    w = ndimage.gaussian_filter(mask.astype(np.float32), sv)
    low = ndimage.gaussian_filter(np.where(mask, coarse.data, 0).astype(np.float32), sv) / np.maximum(w, 1e-3)
    low = np.where(mask, np.maximum(low, 1e-3 * typical), typical).astype(np.float32)
    field = sitk.Resample(sitk_bridge.to_sitk(coarse.with_data(low)), fine, sitk.Transform(),
                          sitk.sitkLinear, typical, sitk.sitkFloat32)
    return sitk.Divide(fine, field)


def _fov_corners(img: Image) -> np.ndarray:
    n = np.asarray(img.shape[:3]) - 1
    ijk = np.array([[a, b, c] for a in (-0.5, n[0] + 0.5) for b in (-0.5, n[1] + 0.5)
                    for c in (-0.5, n[2] + 0.5)])
    return sitk_bridge.ras_to_lps_points(img.world_coords(ijk))


def prepare(img: Image, cfg: dict, mask=None) -> Prepared:
    """Build the registration pyramid, foreground mask and scale of one 3D image.

    ``mask`` (bool array on ``img``'s grid, or a label Image on it) replaces the
    automatic foreground mask.
    """
    if img.data.ndim != 3:
        raise RegistrationError(f"{img.source}: registration needs a 3D image, got shape {img.shape}")
    if not np.any(img.data != img.data.flat[0]):
        raise RegistrationError(f"{img.source}: image is constant; nothing to register")
    levels_mm = [float(x) for x in cfg["levels_mm"]]
    mask_mm = float(cfg["mask_level_mm"])
    coarse = level_image(img, mask_mm)
    user = None
    if mask is not None:
        m = mask.data if isinstance(mask, Image) else np.asarray(mask)
        if m.shape != img.shape[:3]:
            raise RegistrationError(f"{img.source}: mask shape {m.shape} does not match the "
                                    f"image shape {img.shape[:3]}")
        f = np.round(np.asarray(coarse.spacing) / np.asarray(img.spacing)).astype(int)
        user = block_mean(img.with_data(m.astype(np.float32)), f).data > 0.5 if np.any(f > 1) else m > 0
    core, m = foreground_mask(coarse, float(cfg["mask_margin_mm"]), user)
    # crop to the mask's bounding box (one coarse voxel of margin): registration cost
    # grows with the image size even with sparse sampling
    f = _factors(img.spacing, mask_mm)
    nz = np.argwhere(m)
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = np.minimum(nz.max(axis=0) + 2, m.shape)
    box = tuple(slice(int(a * k), int(min(b * k, n)) if b < s else None)
                for a, b, k, n, s in zip(lo, hi, f, img.shape, m.shape))
    cropped = sitk_bridge.to_sitk(crop_image(img, box), np.float32)
    if float(cfg["nonuniformity_sigma_mm"]) > 0:
        cropped = _flatten(cropped, coarse, core, float(cfg["nonuniformity_sigma_mm"]))
    imgs = {mm: shrink(cropped, _factors(img.spacing, mm)) for mm in set(levels_mm)}
    vals = coarse.data[core]
    scale = float(np.median(vals[vals > 0])) if np.any(vals > 0) else float(np.abs(vals).max() or 1.0)
    pts = sitk_bridge.ras_to_lps_points(coarse.world_coords(np.argwhere(m)))
    mimg = sitk_bridge.to_sitk(coarse.with_data(m.astype(np.uint8)))
    return Prepared(
        levels=[imgs[mm] for mm in levels_mm],
        mask=mimg, mask_volume=float(m.sum() * coarse.voxel_volume), centroid=pts.mean(axis=0),
        scale=scale if scale > 0 else 1.0, mask_points=pts, corners=_fov_corners(img))


# --------------------------------------------------------------------------------------
# rigid transforms as matrices
def euler_from_matrix(m: np.ndarray, center) -> sitk.Euler3DTransform:
    """A rigid ``Euler3DTransform`` about ``center`` from a 4x4 LPS matrix (rotation part projected)."""
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    c = np.asarray(center, dtype=np.float64)
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(x) for x in c))
    t.SetMatrix(tuple(float(x) for x in r.ravel()))
    t.SetTranslation(tuple(float(x) for x in (m[:3, :3] @ c + m[:3, 3] - c)))
    return t


def rotation_angle_deg(m: np.ndarray) -> float:
    c = (np.trace(m[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def _quat(r: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of a rotation matrix."""
    k = np.array([
        [r[0, 0] - r[1, 1] - r[2, 2], r[1, 0] + r[0, 1], r[2, 0] + r[0, 2], r[2, 1] - r[1, 2]],
        [r[1, 0] + r[0, 1], r[1, 1] - r[0, 0] - r[2, 2], r[2, 1] + r[1, 2], r[0, 2] - r[2, 0]],
        [r[2, 0] + r[0, 2], r[2, 1] + r[1, 2], r[2, 2] - r[0, 0] - r[1, 1], r[1, 0] - r[0, 1]],
        [r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1], r[0, 0] + r[1, 1] + r[2, 2]],
    ]) / 3.0
    w, v = np.linalg.eigh(k)
    q = v[[3, 0, 1, 2], np.argmax(w)]
    return q if q[0] >= 0 else -q


def _rot(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mean_rotation(rs) -> np.ndarray:
    """Chordal L2 mean of rotation matrices (Markley's quaternion average)."""
    qs = np.array([_quat(r) for r in rs])
    w, v = np.linalg.eigh(qs.T @ qs)
    return _rot(v[:, np.argmax(w)])


def mean_rigid(ms, center) -> np.ndarray:
    """Mean of rigid 4x4 maps: mean rotation about ``center`` plus mean displacement of it."""
    c = np.asarray(center, dtype=np.float64)
    r = mean_rotation([m[:3, :3] for m in ms])
    u = np.mean([m[:3, :3] @ c + m[:3, 3] - c for m in ms], axis=0)
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = c + u - r @ c
    return out


# --------------------------------------------------------------------------------------
# one rigid registration
@dataclass
class FitResult:
    transform: sitk.Euler3DTransform
    metric: float
    stop: str
    iterations: int


def _method(cfg, level: int, fixed: Prepared, fixed_level: sitk.Image,
            moving_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    """One pyramid level's Mattes-MI / regular-step gradient-descent set-up."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(int(cfg["histogram_bins"]))
    vox = float(np.prod(fixed_level.GetSpacing()))
    n_in_mask = max(fixed.mask_volume / vox, 1.0)
    pct = min(1.0, float(cfg["samples"][level]) / n_in_mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(pct, int(cfg["seed"]))
    reg.SetMetricFixedMask(fixed.mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(cfg["step_mm"][level]), minStep=float(cfg["min_step_mm"]),
        numberOfIterations=int(cfg["iterations"][level]),
        relaxationFactor=float(cfg["relaxation"][level]), gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _coarse_fit(cfg, fixed: Prepared, moving: Prepared, tx, mmask):
    """Optimise ``tx`` in place at the coarsest level; returns the final metric."""
    reg = _method(cfg, 0, fixed, fixed.levels[0], mmask)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed.levels[0], moving.levels[0])
    return float(reg.GetMetricValue())


def voxel_points(img: sitk.Image, flat_index: np.ndarray) -> np.ndarray:
    """LPS points (N, 3) of the voxels ``flat_index`` of a SimpleITK image's array."""
    zyx = np.unravel_index(flat_index, img.GetSize()[::-1])
    ijk = np.stack(zyx[::-1], axis=1).astype(np.float64)
    d = np.asarray(img.GetDirection(), np.float64).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (ijk * np.asarray(img.GetSpacing())) @ d.T


def rotation_search(fixed_pts, fixed_bins, moving: sitk.Image, moving_range, centre, shifts,
                    range_deg: float, step_deg: float, keep: int, bins: int) -> list:
    """Coarse rotation search (as FLIRT's): the starts that beat the unrotated ones, best first.

    Every rotation ``R`` of a grid (``step_deg`` steps up to ``range_deg`` about each
    axis, about ``centre``) with every translation ``t`` of ``shifts`` maps the fixed
    points ``p`` to ``R (p - c) + c + t``; all are scored in one pass by the normalised
    mutual information of the fixed points' intensity bins ``fixed_bins`` and the moving
    image there (its nearest voxel, binned over ``moving_range``: the starts are 15
    degrees apart and only ranked, the fits refine them). Starts whose points mostly
    fall outside the moving image are skipped.

    Returns at most ``keep`` pairs ``(R, t)`` (3x3 and 3-vector, LPS), each rotation with its
    better translation, scoring above the unrotated starts: none when the images are
    already turned alike, the usual case, so the search costs only its one pass.
    """
    if range_deg <= 0 or step_deg <= 0 or keep <= 0:
        return []
    centre = np.asarray(centre, np.float64)
    shifts = np.atleast_2d(np.asarray(shifts, np.float64))
    pts = np.asarray(fixed_pts, np.float64) - centre                  # (N, 3)
    g = np.deg2rad(np.arange(-np.floor(range_deg / step_deg), np.floor(range_deg / step_deg) + 1)
                   * step_deg)
    ang = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    zero = int(np.flatnonzero(np.all(ang == 0, axis=1))[0])
    rots = np.stack([_euler_zyx(x) for x in ang])                    # (K, 3, 3)
    # moving voxel index of every start's points: R (p - c) + c + t, through the moving
    # grid's direction and spacing (ijk = D^T (q - origin) / spacing), nearest voxel
    d = np.asarray(moving.GetDirection(), np.float64).reshape(3, 3) / np.asarray(moving.GetSpacing())
    rd = rots.transpose(0, 2, 1) @ d                                  # (K, 3, 3)
    off = (centre + shifts - np.asarray(moving.GetOrigin())) @ d      # (S, 3)
    ijk = np.rint((pts[None] @ rd)[:, None] + off[None, :, None, :]).astype(np.intp)
    size = np.asarray(moving.GetSize())
    ok = np.all((ijk >= 0) & (ijk < size), axis=-1).reshape(-1, pts.shape[0])
    flat = (ijk[..., 2] * size[1] + ijk[..., 1]) * size[0] + ijk[..., 0]
    vals = sitk.GetArrayViewFromImage(moving).ravel()[np.where(ok, flat.reshape(ok.shape), 0)]
    lo, hi = moving_range
    mb = np.clip(((vals - lo) / (hi - lo) * bins).astype(np.intp), 0, bins - 1)
    k = np.arange(vals.shape[0])[:, None]
    code = ((k * bins + np.asarray(fixed_bins)[None, :]) * bins + mb)[ok]
    p = np.bincount(code, minlength=vals.shape[0] * bins * bins).reshape(-1, bins, bins).astype(np.float64)
    p /= np.maximum(p.sum(axis=(1, 2), keepdims=True), 1.0)

    def ent(x, axis):
        return -np.sum(x * np.log(np.where(x > 0, x, 1.0)), axis=axis)

    hab = ent(p, (1, 2))
    nmi = np.full(hab.shape, -np.inf)
    good = (hab > 0) & (ok.mean(axis=1) >= 0.5)
    nmi[good] = (ent(p.sum(2), 1) + ent(p.sum(1), 1))[good] / hab[good] - 1.0
    nmi = nmi.reshape(len(rots), len(shifts))
    best_t = np.argmax(nmi, axis=1)
    score = nmi[np.arange(len(rots)), best_t]
    better = np.flatnonzero(score > score[zero])
    order = better[np.argsort(-score[better], kind="stable")][:keep]
    return [(rots[i], shifts[best_t[i]]) for i in order]


def _rotation_starts(cfg, fixed: Prepared, moving: Prepared, centre) -> list:
    """:func:`rotation_search` at the coarsest level of two prepared images.

    The fixed foreground voxels (up to ``samples[0]`` of them) against the moving image,
    rotations about ``centre`` (``search_step_deg`` steps up to ``search_range_deg``), each
    with the header's translation and with the foreground centroids matched; at most
    ``search_starts`` returned, as ``Euler3DTransform`` (fixed point -> moving point).
    """
    bins = int(cfg["histogram_bins"])
    fc, mc = _sim_cache(fixed, 0, bins), _sim_cache(moving, 0, bins)
    n = max(1, fc["sel"].size // max(1, int(cfg["samples"][0])))
    found = rotation_search(voxel_points(fixed.levels[0], fc["sel"][::n]), fc["idx"][::n],
                            moving.levels[0], mc["range"], centre,
                            [np.zeros(3), moving.centroid - fixed.centroid],
                            float(cfg["search_range_deg"]), float(cfg["search_step_deg"]),
                            int(cfg["search_starts"]), bins)
    out = []
    for r, t in found:                                   # loop over the few kept
        e = sitk.Euler3DTransform()
        e.SetCenter(tuple(float(x) for x in centre))
        e.SetMatrix(tuple(float(x) for x in r.ravel()))
        e.SetTranslation(tuple(float(x) for x in t))
        out.append(e)
    return out


def _angles_deg(t: sitk.Euler3DTransform) -> list:
    return [round(float(np.degrees(a)), 1) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ())]


def _euler_zyx(a) -> np.ndarray:
    """Rotation matrix ``Rz Ry Rx`` of the angles ``a`` (rad) about x, y, z."""
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def fit_rigid(fixed: Prepared, moving: Prepared, cfg: dict, init: sitk.Transform | None,
              use_moving_mask: bool = False) -> FitResult:
    """Multi-resolution Mattes-MI rigid fit (fixed point -> moving point).

    Without ``init`` the header alignment and a centre-of-mass alignment of the
    foreground masks are compared at the coarsest level and the better one is used.
    Its coarse-level fit then competes with fits from the best rotations of a coarse
    search (:func:`_rotation_starts`): one of them replaces it only when it ends with a
    metric better by ``search_min_gain`` (a fraction of the default's), so a head
    turned further than the optimiser's capture range (about 10 degrees) is found, and
    images already close keep their usual result.
    """
    centre = fixed.centroid
    mmask = moving.mask if use_moving_mask else None
    if init is not None:
        tx = euler_from_matrix(sitk_bridge.linear_to_matrix(init), centre)
    else:
        cands = [np.eye(4)]
        shift = moving.centroid - fixed.centroid
        if np.linalg.norm(shift) > float(cfg["moments_min_shift_mm"]):
            m = np.eye(4)
            m[:3, 3] = shift
            cands.append(m)
        tx = euler_from_matrix(cands[0], centre)
        if len(cands) > 1:
            best = None
            for m in cands:
                t = euler_from_matrix(m, centre)
                reg = _method(cfg, 0, fixed, fixed.levels[0], mmask)
                reg.SetInitialTransform(t, inPlace=False)
                v = reg.MetricEvaluate(fixed.levels[0], moving.levels[0])
                if best is None or v < best:
                    best, tx = v, t
    metric, stop, its = float("nan"), "", 0
    for lev, (f_img, m_img) in enumerate(zip(fixed.levels, moving.levels)):
        reg = _method(cfg, lev, fixed, f_img, mmask)
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(f_img, m_img)
        metric = float(reg.GetMetricValue())
        stop = reg.GetOptimizerStopConditionDescription()
        its = int(reg.GetOptimizerIteration())
        if lev == 0 and init is None:
            gain = float(cfg["search_min_gain"]) * abs(metric)
            for t in _rotation_starts(cfg, fixed, moving, centre):
                v = _coarse_fit(cfg, fixed, moving, t, mmask)
                log.debug("rotation search: fit to %s deg, metric %.4f (kept fit: %s deg, %.4f)",
                          _angles_deg(t), v, _angles_deg(tx), metric)
                if v < metric - gain:
                    log.info("rigid fit: a start turned by the rotation search wins (%s deg, "
                             "metric %.4f against %.4f)", _angles_deg(t), v, metric)
                    metric, tx = v, t
                    gain = 0.0
    return FitResult(tx, metric, stop, its)


# --------------------------------------------------------------------------------------
# post-registration similarity
def _sim_cache(p: Prepared, lev: int, bins: int) -> dict:
    """Per-level data for :func:`similarity`: mask voxels, their values and bin indices."""
    key = (lev, bins)
    if key not in p.cache:
        img = p.levels[lev]
        mask = sitk.Resample(p.mask, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        sel = sitk.GetArrayViewFromImage(mask).ravel() > 0
        vals = sitk.GetArrayViewFromImage(img).ravel()[sel]
        lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        idx = np.clip(((vals - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
        p.cache[key] = {"sel": np.flatnonzero(sel), "idx": idx, "range": (float(lo), float(hi))}
    return p.cache[key]


def _entropy(q: np.ndarray) -> float:
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


def similarity(fixed: Prepared, moving: Prepared, transform: sitk.Transform, bins: int,
               level: int = -2) -> float:
    """Normalised mutual information ``(H(A)+H(B))/H(A,B) - 1`` inside the fixed mask (0..1).

    Computed on a coarse pyramid level (``level``) of both images, over the fixed
    foreground voxels that map inside the moving field of view; intensities are binned
    between their 1st and 99th percentiles in the foreground.
    """
    lev = max(0, len(fixed.levels) + level) if level < 0 else level
    mlev = min(lev, len(moving.levels) - 1)
    fc = _sim_cache(fixed, lev, bins)
    lo, hi = _sim_cache(moving, mlev, bins)["range"]
    warped = sitk.Resample(moving.levels[mlev], fixed.levels[lev], transform, sitk.sitkLinear,
                           float("nan"), sitk.sitkFloat32)
    b = sitk.GetArrayViewFromImage(warped).ravel()[fc["sel"]]
    ok = np.isfinite(b)
    if ok.sum() < 64:
        return 0.0
    bi = np.clip(((b[ok] - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    h = np.bincount(fc["idx"][ok] * bins + bi, minlength=bins * bins).reshape(bins, bins)
    p = h / h.sum()
    hab = _entropy(p.ravel())
    return float((_entropy(p.sum(1)) + _entropy(p.sum(0))) / hab - 1.0) if hab > 0 else 0.0


def peak_ratio(fixed: Prepared, moving: Prepared, transform: sitk.Transform, bins: int,
               shift_mm: float, at_solution: float | None = None) -> float:
    """Similarity at the solution over its mean when shifted by ``shift_mm`` along each axis.

    A correct alignment sits on a sharp similarity peak (ratios of about 3-5 for
    brain images at 10 mm); a wrong one on a flat plateau (about 1).
    """
    m = sitk_bridge.linear_to_matrix(transform)
    s0 = similarity(fixed, moving, transform, bins) if at_solution is None else at_solution
    around = []
    for ax in range(3):
        for sign in (-1.0, 1.0):
            sh = np.eye(4)
            sh[ax, 3] = sign * shift_mm
            around.append(similarity(fixed, moving, sitk_bridge.matrix_to_transform(m @ sh), bins))
    base = float(np.mean(around))
    return float(s0 / base) if base > 0 else float("inf")
