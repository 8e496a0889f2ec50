"""Private helpers of :mod:`lesiontrack.registration`: the unbiased subject space.

The individual space is built like a rigid template (FreeSurfer's robust template,
ANTs' template building): session references are registered to a running mean, the
transforms are re-centred by the inverse of their mean (mean rotation in the
quaternion sense, mean displacement of the brain centre) so that no visit is
privileged, and the mean image is rebuilt on an isotropic grid.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import sitk_bridge
from ._reg_core import RegistrationError, mean_rigid, mean_rotation

_F = np.diag([-1.0, -1.0, 1.0])


def recentre(mats: dict, center) -> dict:
    """Right-compose every map with the inverse of their mean so the mean becomes identity.

    ``mats[s]`` maps the current common space to session ``s`` (LPS, 4x4 rigid). The
    fixed point of the re-centring iteration is a space whose mean map to the sessions
    is the identity.
    """
    out = dict(mats)
    for _ in range(5):
        mean = mean_rigid(list(out.values()), center)
        inv = np.linalg.inv(mean)
        out = {s: m @ inv for s, m in out.items()}
        if np.abs(mean - np.eye(4)).max() < 1e-9:
            break
    return out


def _closest_ras(c: np.ndarray) -> np.ndarray:
    """Permute and flip the columns of a RAS direction matrix so it is closest to identity."""
    out = np.zeros(3 * 3).reshape(3, 3)
    used = set()
    for col in np.argsort(-np.abs(c).max(axis=0)):
        order = [r for r in np.argsort(-np.abs(c[:, col])) if r not in used]
        r = order[0]
        used.add(r)
        out[:, r] = c[:, col] * np.sign(c[r, col])
    return out


def auto_voxel_size(refs: list, min_mm: float) -> float:
    """The finest in-plane spacing of the references, but not below ``min_mm``."""
    finest = min(min(r.spacing) for r in refs)
    return float(max(finest, float(min_mm)))


def make_grid(preps: dict, refs: dict, mats: dict, voxel: float, extent: str, margin: float):
    """Affine and shape of the isotropic individual grid (RAS).

    Axes: the mean orientation of the reference images' axes in the individual space,
    reordered and flipped to be closest to RAS. Extent: the union of the references'
    foreground masks (``"foreground"``) or of their fields of view (``"fov"``), plus
    ``margin`` mm. The lattice passes through the voxel centres of the first session's
    reference (a single 1 mm visit keeps its own voxels: no interpolation blur).
    """
    dirs, pts = [], []
    for s, m in mats.items():
        r = m[:3, :3]
        d_lps = _F @ refs[s].affine[:3, :3] / np.asarray(refs[s].spacing)
        dirs.append(_closest_ras(_F @ (r.T @ d_lps)))
        src = preps[s].mask_points if extent == "foreground" else preps[s].corners
        inv = np.linalg.inv(m)
        pts.append(src @ inv[:3, :3].T + inv[:3, 3])
    if extent not in ("foreground", "fov"):
        raise RegistrationError(f"registration.grid_extent must be 'foreground' or 'fov', got {extent!r}")
    fix = [d if np.linalg.det(d) > 0 else d @ np.diag([1, 1, -1]) for d in dirs]
    c = mean_rotation(fix)
    ras = sitk_bridge.lps_to_ras_points(np.concatenate(pts))
    u = ras @ c
    lo = u.min(axis=0) - margin
    hi = u.max(axis=0) + margin
    # anchor: the first reference's voxel (0, 0, 0) centre, in the individual space
    s0 = next(iter(mats))
    inv0 = np.linalg.inv(mats[s0])
    o = inv0[:3, :3] @ (_F @ refs[s0].affine[:3, 3]) + inv0[:3, 3]
    o_u = sitk_bridge.lps_to_ras_points(o[None, :])[0] @ c
    lo = o_u + np.floor((lo - o_u) / voxel) * voxel
    shape = tuple(int(x) for x in np.ceil((hi - lo) / voxel).astype(int) + 1)
    aff = np.eye(4)
    aff[:3, :3] = c * voxel
    aff[:3, 3] = c @ lo
    return aff, shape


def mean_image(refs: dict, preps: dict, mats: dict, grid_ref: sitk.Image) -> np.ndarray:
    """Mean of the intensity-normalised references resampled once into the grid.

    Each reference contributes only where its field of view covers the grid voxel.
    Returns a float32 array in ``Image`` axis order.
    """
    acc = None
    cnt = None
    for s, m in mats.items():
        t = sitk_bridge.matrix_to_transform(m)
        src = sitk_bridge.to_sitk(refs[s], np.float32)
        out = sitk.Resample(src, grid_ref, t, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
        a = sitk_bridge.from_sitk(out).data
        ok = np.isfinite(a)
        a = np.where(ok, a / np.float32(preps[s].scale), np.float32(0))
        acc = a if acc is None else acc + a
        cnt = ok.astype(np.float32) if cnt is None else cnt + ok
    return np.ascontiguousarray(np.where(cnt > 0, acc / np.maximum(cnt, 1), 0).astype(np.float32))
