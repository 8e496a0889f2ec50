"""Phantom anatomy: tissue maps on the MNI152 grid and noiseless contrast rendering.

The anatomy comes from the MNI152 templates that nilearn ships inside its package
(no download): grey- and white-matter probability maps and the brain mask, CSF
being the brain mask minus grey and white matter. An optional skull/scalp ring is
added around the brain. Each contrast is rendered as a mixture of tissue
intensities (relative to white matter = 1) with a smooth texture, and lesions
replace the white-matter signal by their own intensity.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["Anatomy", "load_anatomy", "warp_anatomy", "render", "smooth_noise", "TISSUE", "LESION", "CONTRAST_TABLES",
           "ADC"]

# Relative tissue intensities (white matter = 1) of every rendered contrast.
# "extra" is the CSF between brain and skull; "b0" is the DWI b = 0 signal (T2-like).
TISSUE = {
    #        GM     WM    CSF   skull  scalp
    "FLAIR": (1.25, 1.00, 0.18, 0.04, 0.70),
    "T2w": (1.35, 1.00, 3.20, 0.04, 0.90),
    "T1w": (0.72, 1.00, 0.30, 0.04, 1.15),
    "ceT1w": (0.74, 1.00, 0.30, 0.04, 1.30),
    "b0": (1.30, 1.00, 3.00, 0.04, 0.35),
}
# Apparent diffusion coefficients (mm^2/s) of the tissues.
ADC = {"GM": 0.85e-3, "WM": 0.75e-3, "CSF": 3.0e-3, "skull": 1.0e-3, "scalp": 1.0e-3}
# Lesion intensities: (low, high) of the per-lesion factor relative to white matter.
LESION = {
    "FLAIR": (1.55, 2.0),
    "T2w": (1.7, 2.3),
    "T1w": (0.76, 0.88),
    "b0": (1.5, 1.9),
    "blackhole_T1w": 0.42,      # T1 black hole (close to CSF/GM)
    "enhancing_ceT1w": (1.40, 1.65),
    "adc_chronic": 1.10e-3,     # chronic / non-acute lesion tissue
    "adc_acute": 0.95e-3,       # acute lesion outside its restricted core
    "adc_restricted": 0.40e-3,  # restricted diffusion
}
# Lesions of lower contrast (``make_phantom(lesion_contrast="low")``): FLAIR grey matter
# nearer white matter and lesions fainter on FLAIR and T2w, nearer the real cross-sectional
# patient's FLAIR (grey matter 1.10, lesion mean 1.31 times white matter) than the standard
# tables; juxtacortical lesions are then barely brighter than grey matter on T2w.
TISSUE_LOW = {**TISSUE, "FLAIR": (1.15, 1.00, 0.18, 0.04, 0.70)}
LESION_LOW = {**LESION, "FLAIR": (1.30, 1.60), "T2w": (1.50, 1.90)}
CONTRAST_TABLES = {"standard": (TISSUE, LESION), "low": (TISSUE_LOW, LESION_LOW)}
_SKULL_MM = (1.5, 7.0, 12.0)   # outer edges of extra-axial CSF, skull and scalp (mm)
_HULL_SIGMA_MM = 5.0           # smoothing of the brain mask that the skull follows


@dataclass
class Anatomy:
    """Tissue maps on the world grid (the MNI152 template grid).

    Attributes
    ----------
    affine : (4, 4) ndarray
        Voxel -> RAS mm of the world grid.
    gm, wm, csf, skull, scalp : ndarray (float32)
        Tissue fractions (sum <= 1; the rest is air).
    brain : ndarray (bool)
        Brain mask.
    texture : ndarray (float32)
        Smooth zero-mean, unit-variance field used as tissue heterogeneity.
    location : ndarray (uint8)
        Lesion-placement classes: 1 periventricular, 2 juxtacortical,
        3 infratentorial, 4 deep white matter, 0 none.
    t1_template : ndarray (float32)
        The MNI152 T1 template itself (written to truth as the world reference).
    """

    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    brain: np.ndarray
    texture: np.ndarray
    location: np.ndarray
    t1_template: np.ndarray

    @property
    def shape(self):
        return self.wm.shape

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def world_mm(self, flat_index) -> np.ndarray:
        """RAS mm coordinates of flat voxel indices, (N, 3) float64."""
        ijk = np.stack(np.unravel_index(flat_index, self.shape), axis=1).astype(np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def smooth_noise(shape, sigma_vox, rng) -> np.ndarray:
    """Gaussian noise smoothed with ``sigma_vox`` voxels, rescaled to unit variance."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox,
                                    mode="reflect")
    sd = float(field.std())
    return field / sd if sd > 0 else field


def load_anatomy(resolution: int, rng, skull: bool = True) -> Anatomy:
    """Tissue maps of the MNI152 templates at ``resolution`` mm (1 or 2).

    Parameters
    ----------
    resolution : {1, 2}
        Template grid spacing in mm; this grid is the phantom's world grid.
    rng : numpy.random.Generator
        Source of the texture field (subject-specific heterogeneity).
    skull : bool
        Add a skull (dark) and scalp (bright on T1w) ring around the brain.
    """
    t1_data, gm, wm, affine = _templates(resolution)
    brain = t1_data > 0.2                  # nilearn's load_mni152_brain_mask rule
    vox = float(np.linalg.norm(affine[:3, 0]))
    gm = np.clip(gm, 0, 1) * brain
    wm = np.clip(wm, 0, 1) * brain
    tot = gm + wm
    over = tot > 1
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.where(brain, 1.0 - gm - wm, 0.0).astype(np.float32)

    skull_map = np.zeros_like(wm)
    scalp_map = np.zeros_like(wm)
    if skull:
        # the skull follows a smooth hull of the brain, not every sulcus and notch
        hull = ndimage.gaussian_filter(brain.astype(np.float32), _HULL_SIGMA_MM / vox) > 0.25
        hull |= brain
        dist = ndimage.distance_transform_edt(~hull, sampling=vox).astype(np.float32)
        e_csf, e_skull, e_scalp = _SKULL_MM
        out = ~brain
        csf[out & (dist <= e_csf)] = 1.0
        skull_map[out & (dist > e_csf) & (dist <= e_skull)] = 1.0
        scalp_map[out & (dist > e_skull) & (dist <= e_scalp)] = 1.0

    texture = smooth_noise(wm.shape, 2.5 / vox, rng)
    location = _locations(gm, wm, csf, brain, affine, vox)
    return Anatomy(affine, gm, wm, csf, skull_map, scalp_map, brain, texture, location, t1_data)


WARP_SMOOTHNESS_MM = 15.0   # SD of the Gaussian that smooths the random anatomy warp


def warp_anatomy(anat: Anatomy, rms_mm: float, rng) -> Anatomy:
    """The anatomy under a random smooth deformation of ``rms_mm`` RMS displacement.

    Real brains differ from the MNI152 template by more than an affine map (ventricle
    size, deep grey matter, gyral pattern; a few millimetres after affine alignment). A
    phantom drawn on the template itself fits an atlas carried by an affine registration
    exactly; this warp makes its anatomy differ from the atlas as a real subject's does.
    Each displacement component is Gaussian noise smoothed by ``WARP_SMOOTHNESS_MM``,
    scaled so the displacement's RMS length is ``rms_mm``; every map moves together.
    """
    if rms_mm <= 0:
        return anat
    vox = anat.spacing
    disp = [smooth_noise(anat.shape, WARP_SMOOTHNESS_MM / vox, rng) * np.float32(rms_mm / np.sqrt(3) / vox)
            for _ in range(3)]
    coords = [np.arange(n, dtype=np.float32).reshape([-1 if a == k else 1 for a in range(3)]) + d
              for k, (n, d) in enumerate(zip(anat.shape, disp))]

    def move(a, order=1):
        return ndimage.map_coordinates(a.astype(np.float32, copy=False), coords, order=order,
                                       mode="nearest").astype(a.dtype, copy=False)

    maps = {k: move(getattr(anat, k)) for k in ("gm", "wm", "csf", "skull", "scalp", "texture",
                                                 "t1_template")}
    maps["brain"] = move(anat.brain.astype(np.float32)) > 0.5
    maps["location"] = move(anat.location, order=0)
    return replace(anat, **maps)


@functools.lru_cache(maxsize=2)
def _templates(resolution):
    """MNI152 T1 (scaled to max 1), GM and WM maps at ``resolution`` mm, and the affine.

    Reads the 1 mm files nilearn ships (the rescaling of ``load_mni152_template``); the
    2 mm grid is nilearn's 2 mm template grid (every other 1 mm voxel), obtained by
    Gaussian anti-aliasing and subsampling, which is faster than nilearn's resampling.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    base = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    names = ("t1", "gm", "wm")
    files = [base / f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz" for n in names]
    if all(f.exists() for f in files):
        imgs = [nib.load(str(f)) for f in files]
    else:  # layout of another nilearn version: use its public loaders
        from nilearn import datasets
        imgs = [datasets.load_mni152_template(resolution=1),
                datasets.load_mni152_gm_template(resolution=1),
                datasets.load_mni152_wm_template(resolution=1)]
    arrays = []
    for img in imgs:
        a = np.asarray(img.get_fdata(), dtype=np.float32)
        a /= max(float(a.max()), 1e-12)
        arrays.append(a)
    affine = np.asarray(imgs[0].affine, dtype=np.float64)
    if resolution != 1:
        arrays = [ndimage.gaussian_filter(a, 0.4 * resolution)[::resolution, ::resolution,
                                                              ::resolution] for a in arrays]
        affine = affine.copy()
        affine[:3, :3] *= resolution
    return arrays[0], arrays[1], arrays[2], affine


def _locations(gm, wm, csf, brain, affine, vox) -> np.ndarray:
    """Candidate centres for lesions, by the usual MS lesion locations."""
    depth = ndimage.distance_transform_edt(brain, sampling=vox)
    ventricles = (csf > 0.6) & (depth > 12.0)
    d_vent = ndimage.distance_transform_edt(~ventricles, sampling=vox)
    d_gm = ndimage.distance_transform_edt(gm < 0.5, sampling=vox)
    ijk = np.indices(wm.shape, dtype=np.float32)
    xyz = [affine[a, 0] * ijk[0] + affine[a, 1] * ijk[1] + affine[a, 2] * ijk[2] + affine[a, 3]
           for a in range(3)]
    x, y, z = xyz
    loc = np.zeros(wm.shape, np.uint8)
    infra = (wm > 0.5) & (z < -15) & (y < -10) & (depth > 6)
    supra = z > -5
    loc[(wm > 0.9) & supra & (d_vent > 10) & (d_gm > 6)] = 4
    loc[(wm > 0.55) & supra & (d_gm > 1.0) & (d_gm <= 3.5) & (depth > 8)] = 2
    loc[(wm > 0.6) & supra & (d_vent > 1.0) & (d_vent <= 6.0)] = 1
    loc[infra] = 3
    return loc


def render(anat: Anatomy, contrast: str, bvalue: float = 0.0,
           texture_amp: float = 0.04, tissue: dict | None = None) -> np.ndarray:
    """Noiseless lesion-free image of ``contrast`` on the world grid (float32).

    For ``contrast="b0"`` a diffusion weighting ``bvalue`` (s/mm^2) multiplies each
    tissue's signal by ``exp(-b * ADC)`` before mixing, so partial volume mixes signals.
    ``tissue``: the relative tissue intensities (default :data:`TISSUE`).
    """
    weights = (TISSUE if tissue is None else tissue)[contrast]
    if bvalue:
        keys = ("GM", "WM", "CSF", "skull", "scalp")
        weights = tuple(v * np.exp(-bvalue * ADC[k]) for v, k in zip(weights, keys))
    g, w, c, sk, sc = (np.float32(v) for v in weights)
    img = anat.gm * g + anat.wm * w + anat.csf * c + anat.skull * sk + anat.scalp * sc
    img *= np.float32(1.0) + np.float32(texture_amp) * anat.texture
    return img.astype(np.float32, copy=False)
