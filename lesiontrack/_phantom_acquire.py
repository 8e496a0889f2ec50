"""Phantom acquisition: scanner grids, head poses, bias field, Rician noise, NIfTI writing.

The world (head) frame is the template grid. For every session and contrast the head
sits in the scanner with its own rigid pose ``P`` (world point -> scanner point, RAS)
and the image grid is defined in scanner coordinates (own voxel size, axis order,
flips and a slight obliquity). The image is sampled from the world rendering through
``P^-1``; the truth transform written for it is ``P`` in ITK's resampling direction
(world point -> image point, LPS), so ``sitk.Resample(image, world_ref, P)`` aligns it.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from . import sitk_bridge
from ._io import write_bytes
from .image import Image

__all__ = ["Acquisition", "SPECS", "plan_acquisition", "acquire", "nifti_bytes", "euler"]

_AX = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
       "S": (0, 0, 1), "I": (0, 0, -1)}
# per contrast: voxel size at resolution 1 and 2 (mm), axis orders (one is drawn per
# image), SNR of white matter, stored integer dtype and its scl_slope
SPECS = {
    "FLAIR": dict(spacing={1: (0.9, 0.9, 3.0), 2: (1.8, 1.8, 3.6)},
                  orient=("LAS", "RAS", "LPS"), snr=22.0, dtype=np.int16, slope=0.5),
    "T2w": dict(spacing={1: (1.0, 1.0, 3.0), 2: (2.0, 2.0, 4.0)},
                orient=("RAS", "LAS", "RPS"), snr=25.0, dtype=np.uint16, slope=1.0),
    "T1w": dict(spacing={1: (1.0, 1.0, 1.0), 2: (2.0, 2.0, 2.0)},
                orient=("ASR", "PSL", "AIL"), snr=30.0, dtype=np.uint16, slope=1.0),
    "ceT1w": dict(spacing={1: (1.0, 1.0, 1.0), 2: (2.0, 2.0, 2.0)},
                  orient=("LAS", "RAS", "LPS"), snr=28.0, dtype=np.int16, slope=0.25),
    "dwi": dict(spacing={1: (2.0, 2.0, 2.0), 2: (2.5, 2.5, 2.5)},
                orient=("LAS", "LPS", "RAS"), snr=20.0, dtype=np.uint16, slope=1.0),
}
MAX_ROT_DEG, MAX_SHIFT_MM, MAX_OBLIQUE_DEG = 4.0, 5.0, 6.0
NOISE_UNITS = 3.0    # noise sigma in stored integer units (white matter = NOISE_UNITS * snr)


def euler(angles_deg) -> np.ndarray:
    """Rotation matrix from x, y, z Euler angles in degrees (R = Rz @ Ry @ Rx)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class Acquisition:
    """Geometry of one image: grid affine and shape, head pose, and its parameters."""

    modality: str
    affine: np.ndarray        # voxel -> scanner RAS
    shape: tuple
    pose: np.ndarray          # 4x4 RAS: world point -> scanner point
    orientation: str
    rotation_deg: np.ndarray
    shift_mm: np.ndarray
    oblique_deg: np.ndarray
    gain: float
    bias_coef: np.ndarray

    def truth_transform(self):
        """World -> image points (LPS, ITK resampling direction)."""
        return sitk_bridge.from_ras_matrix(self.pose)

    def grid(self) -> Image:
        return Image(np.zeros(self.shape, np.uint8), self.affine, source=self.modality)


def plan_acquisition(modality, resolution, head_box, centre, rng, *, max_rotation_deg=MAX_ROT_DEG,
                     max_shift_mm=MAX_SHIFT_MM, pitch_deg=0.0) -> Acquisition:
    """Random pose, orientation and obliquity; a grid covering ``head_box`` (world RAS).

    The head is turned by up to ``max_rotation_deg`` about each axis and shifted by up
    to ``max_shift_mm`` along each (uniform, drawn per image), after a pitch of
    ``pitch_deg`` (about the left-right axis) common to every image.
    """
    spec = SPECS[modality]
    rot = rng.uniform(-max_rotation_deg, max_rotation_deg, 3) + np.array([pitch_deg, 0.0, 0.0])
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    pose = np.eye(4)
    pose[:3, :3] = euler(rot)
    pose[:3, 3] = centre - pose[:3, :3] @ centre + shift        # rotate about the head centre
    orient = spec["orient"][int(rng.integers(len(spec["orient"])))]
    oblique = rng.uniform(-MAX_OBLIQUE_DEG, MAX_OBLIQUE_DEG, 3) * (rng.random() < 0.6)
    direction = euler(oblique) @ np.array([_AX[c] for c in orient], float).T
    sp = np.array(spec["spacing"][resolution], float)
    corners = np.array([[head_box[i][0] if (k >> i) & 1 else head_box[i][1] for i in range(3)]
                        for k in range(8)])
    scan = corners @ pose[:3, :3].T + pose[:3, 3]
    u = scan @ direction                                           # coordinates along grid axes
    lo, hi = u.min(axis=0) - 4.0, u.max(axis=0) + 4.0
    shape = tuple(int(v) for v in np.ceil((hi - lo) / sp) + 1)
    aff = np.eye(4)
    aff[:3, :3] = direction * sp[None, :]
    aff[:3, 3] = direction @ lo
    return Acquisition(modality, aff, shape, pose, orient, rot, shift, oblique,
                       float(rng.uniform(0.8, 1.25)), rng.normal(0.0, 0.07, 9))


def _bias(acq: Acquisition) -> np.ndarray:
    """Smooth multiplicative field: exp of a quadratic in normalised grid coordinates."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in acq.shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    c = acq.bias_coef.astype(np.float32)
    return np.exp(c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
                  + c[6] * x * y + c[7] * x * z + c[8] * y * z)


def acquire(world: list[np.ndarray], world_affine, acq: Acquisition, rng,
            brain: np.ndarray | None = None) -> np.ndarray:
    """Sample noiseless world images onto the acquisition grid (linear), apply the bias
    field and gain, add Rician noise. Several world images (e.g. b=0 and b=1000) share
    grid and field and each gets independent noise; returns (X, Y, Z, len(world)) in
    stored units (see :data:`SPECS`). With ``brain`` (world brain mask) the result is
    skull-stripped: zero outside the brain mask carried to the grid."""
    grid = acq.grid()
    t_gen = sitk_bridge.from_ras_matrix(np.linalg.inv(acq.pose))   # grid -> world points
    spec = SPECS[acq.modality]
    level = NOISE_UNITS * spec["snr"] * spec["slope"]               # WM in physical units
    bias = _bias(acq) * np.float32(acq.gain * level)
    sigma = np.float32(level * acq.gain / spec["snr"])
    keep = None
    if brain is not None:
        keep = sitk_bridge.resample(Image(brain.astype(np.float32), world_affine), grid,
                                    t_gen).data > 0.5
    out = np.empty(acq.shape + (len(world),), np.float32)
    for v, w in enumerate(world):                # loop over volumes of one series
        clean = sitk_bridge.resample(Image(w, world_affine), grid, t_gen).data * bias
        n1 = rng.standard_normal(acq.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(acq.shape, dtype=np.float32) * sigma
        vol = np.sqrt((clean + n1) ** 2 + n2 ** 2)
        out[..., v] = vol if keep is None else vol * keep
    return out


def nifti_bytes(data, affine, dtype, slope=1.0, *, zooms=None) -> bytes:
    """Deterministic gzip-compressed NIfTI-1 bytes (integer data with ``scl_slope``)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(np.asarray(data) / slope), info.min, info.max).astype(dtype)
    else:
        data = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if dtype.kind in "iu" and slope != 1.0:
        img.header.set_slope_inter(slope, 0.0)
    return gzip.compress(img.to_bytes(), compresslevel=3, mtime=0)


def write_nifti(path, data, affine, dtype, slope=1.0):
    return write_bytes(path, nifti_bytes(data, affine, dtype, slope))
