"""The parts of a session's lesions: restricted diffusion, T1 black holes, enhancement.

Each is a region inside the T2/FLAIR lesion mask, found in one pass over the voxels
(labelling and ``bincount``, whatever the number of lesions).

Restricted diffusion and black holes are small cores of a lesion, and on a 2 mm grid
partial volume with the lesion tissue around them lifts most of a core's voxels above
any level that only a clearly restricted (dark) voxel passes. Both are therefore found
as the lesions are, by hysteresis: confident seed voxels, then growth to the core's
partial-volume edge.

- *Restricted diffusion* (``restricted_mask``): seeds are lesion voxels with ADC below
  ``adc_max_restricted`` (mm^2/s; the ischaemic-core level of Purushotham et al. 2015) and
  bright on b1000 (``b1000_z`` NAWM half-widths above its NAWM peak). The region grows
  through connected lesion voxels, bright on b1000, whose ADC lies ``restricted_grow_z``
  half-widths below the subject's own NAWM ADC peak: diffusion lower than normal white
  matter, beyond its spread.
- *Black holes* (``blackhole_mask``): areas of unequivocal T1w hypointensity compared
  with both normal-appearing white and grey matter, within a T2 lesion (the definition in
  the glossary of JAMA Neurol 2021;78:351-364; Sahraian et al., Acta Neurol Scand
  2010;122:1-8, review the definitions in use). Seeds are lesion
  voxels whose T1w lies ``blackhole_gm_z`` half-widths (the lower one) below the
  grey-matter peak: a level set by the subject's own T1w contrast, which differs between
  sequences (spin echo, gradient echo) and scanners, where a fixed fraction of the
  white-matter level does not. A seed lies inside its lesion, not on its border, where
  the lesion's partial volume with CSF or grey matter (both T1w-darker) mimics a core. Each black hole's edge is the partial-volume midpoint
  between its seeds' mean T1w and the T1w of the lesion tissue around it (the median over
  the session's lesion voxels no darker than the grey-matter peak), and never brighter
  than that peak.
- *Enhancement* (``enhancing_mask``): lesion voxels whose ceT1w - T1w difference lies
  ``enhancing_z`` half-widths above its NAWM peak, in components of at least
  ``enhancing_min_mm3``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ._morph import erosion

__all__ = ["restricted_mask", "blackhole_mask", "enhancing_mask"]


def _structure(cfg):
    return ndi.generate_binary_structure(3, int(cfg["connectivity"]))


def _lesion_box(lesion):
    """Slices of the bounding box of ``lesion`` grown by one voxel (the parts lie inside
    the lesions: work there, not over the whole brain); ``None`` without lesion."""
    box = []
    for ax in range(lesion.ndim):
        hit = np.flatnonzero(lesion.any(axis=tuple(a for a in range(lesion.ndim) if a != ax)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return tuple(box)


def _in_lesions(lesion, img):
    """The lesions' bounding box, ``img`` there, and there the lesion voxels where ``img``
    has data; ``None`` without lesion."""
    box = _lesion_box(lesion)
    if box is None:
        return None
    crop = img[box]
    return box, crop, lesion[box] & (crop > 0)


def _grown(seeds, grow, structure):
    """The components of ``seeds | grow`` that contain a seed."""
    lab, n = ndi.label(seeds | grow, structure=structure)
    keep = np.zeros(n + 1, bool)
    keep[lab[seeds]] = True
    keep[0] = False
    return keep[lab]


def restricted_mask(lesion, adc, b1000, tissue, cfg) -> np.ndarray:
    """Restricted diffusion inside ``lesion`` (see the module docstring).

    ``adc`` in mm^2/s; ``b1000`` NAWM-normalised or ``None`` (then ADC alone decides);
    ``tissue``: the session's tissue peaks (``segment._Tissue``)."""
    bright = grow = None
    if b1000 is not None:
        pb = tissue.peak("b1000", b1000)
        bright = pb.mode + float(cfg["b1000_z"]) * pb.sigma_low
    z = float(cfg["restricted_grow_z"])
    if z > 0:
        pw = tissue.peak("ADC", adc, "wm")
        grow = pw.mode - z * pw.sigma_low
    out = np.zeros(lesion.shape, bool)
    if (crop := _in_lesions(lesion, adc)) is None:
        return out
    box, a, inside = crop
    if bright is not None:
        inside &= b1000[box] > bright
    seeds = inside & (a < float(cfg["adc_max_restricted"]))
    out[box] = seeds if grow is None or not seeds.any() else _grown(seeds, inside & (a < grow), _structure(cfg))
    return out


def blackhole_mask(lesion, t1, tissue, cfg) -> np.ndarray:
    """T1 black holes inside ``lesion`` (see the module docstring); ``t1`` NAWM-normalised."""
    pg = tissue.peak("T1w", t1, "gm")
    out = np.zeros(lesion.shape, bool)
    if (crop := _in_lesions(lesion, t1)) is None:
        return out
    box, t1, inside = crop
    # seeds lie inside their lesion: its border voxels mix with the tissue around it, and
    # CSF and grey matter are T1w-darker than the lesion
    interior = erosion(lesion[box], ndi.generate_binary_structure(3, 1))
    seeds = inside & interior & (t1 < pg.mode - float(cfg["blackhole_gm_z"]) * pg.sigma_low)
    if not seeds.any():
        return out
    cand = inside & (t1 < pg.mode)
    rest = inside & ~cand
    level = float(np.median(t1[rest] if rest.any() else t1[inside]))
    lab, n = ndi.label(cand, structure=_structure(cfg))
    sl = lab[seeds]
    n_seed = np.bincount(sl, minlength=n + 1)
    core = np.bincount(sl, weights=t1[seeds], minlength=n + 1) / np.maximum(n_seed, 1)
    edge = np.where(n_seed > 0, np.minimum(0.5 * (core + level), pg.mode), -np.inf).astype(np.float32)
    edge[0] = -np.inf
    # the voxels of a seeded component darker than its edge (one labelling: a part cut off
    # from the seeds by the edge is a dark spot of the same candidate region)
    out[box] = seeds | (t1 < edge[lab])
    return out


def enhancing_mask(lesion, enh, t1, tissue, cfg, voxel_mm3: float) -> np.ndarray:
    """Enhancing lesion voxels: ``enh`` = ceT1w - T1w (ceT1w alone without T1w)."""
    p = tissue.peak("enh", enh)
    out = np.zeros(lesion.shape, bool)
    box = _lesion_box(lesion)
    if box is None:
        return out
    enhancing = lesion[box] & (enh[box] > p.mode + float(cfg["enhancing_z"]) * p.sigma_low)
    if t1 is not None:
        enhancing &= t1[box] > 0
    lab, n = ndi.label(enhancing, structure=_structure(cfg))
    keep = np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3 >= float(cfg["enhancing_min_mm3"])
    keep[0] = False
    out[box] = keep[lab]
    return out
