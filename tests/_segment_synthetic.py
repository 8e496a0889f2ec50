"""A small synthetic MS subject on the MNI152 grid for the preprocess/segment tests.

Tissue maps are the nilearn MNI152 templates; contrasts are tissue mixtures with
Gaussian noise; spherical lesions are planted in white matter, some with restricted
diffusion, some T1 black holes, some enhancing. Deterministic for a given seed.
"""
from __future__ import annotations

import numpy as np

from lesiontrack._seg_atlas import load_templates, location_map
from lesiontrack.config import load_config
from lesiontrack.preprocess import Priors

#            GM    WM    CSF   lesion
TISSUE = {"FLAIR": (1.25, 1.0, 0.18, 1.7), "T2w": (1.35, 1.0, 3.2, 2.0),
          "T1w": (0.72, 1.0, 0.30, 0.80), "b0": (1.3, 1.0, 3.0, 1.7)}
ADC = (0.85e-3, 0.75e-3, 3.0e-3, 1.1e-3)


def synthetic_subject(resolution=2, seed=0, n_lesions=14, noise=0.03):
    """Images (dict of arrays, arbitrary scale), priors, truth masks and the affine."""
    rng = np.random.default_rng(seed)
    t = load_templates(resolution)
    gm, wm = t["gm"].data, t["wm"].data
    brain = t["brain"].data > 0.5
    csf = np.clip(t["brain"].data - gm - wm, 0, 1)
    sp = t["brain"].spacing
    cand = np.argwhere(brain & (wm > 0.97))
    centres = cand[rng.choice(len(cand), n_lesions, replace=False)]
    radii = rng.uniform(2.5, 5.0, n_lesions) / sp[0] * 1.0
    lesion_id = np.zeros(brain.shape, np.int32)
    for i, (c, r) in enumerate(zip(centres, radii)):      # test-data generation only
        lo = np.maximum(c - int(r) - 1, 0)
        box = tuple(slice(a, b) for a, b in zip(lo, c + int(r) + 2))
        g = np.ogrid[box]
        d2 = sum((g[a] - c[a]) ** 2 for a in range(3))
        lesion_id[box][(d2 <= r * r) & brain[box]] = i + 1
    lesion = lesion_id > 0
    ids = np.arange(1, n_lesions + 1)
    restricted = np.isin(lesion_id, ids[0::3])
    blackhole = np.isin(lesion_id, ids[1::3])
    enhancing = np.isin(lesion_id, ids[2::4])
    w = np.stack([gm, wm, csf]).astype(np.float32)

    def mix(vals):
        img = np.tensordot(np.asarray(vals[:3], np.float32), w, axes=1)
        img[lesion] = vals[3]
        return img

    imgs = {m: mix(TISSUE[m]) for m in ("FLAIR", "T2w", "T1w")}
    imgs["T1w"][blackhole] = 0.42
    imgs["ceT1w"] = imgs["T1w"].copy()
    imgs["ceT1w"][enhancing] = 1.5
    adc = mix(ADC)
    adc[restricted] = 0.4e-3
    b0 = mix(TISSUE["b0"])
    b1000 = b0 * np.exp(-1000.0 * adc)
    out = {}
    for m, img in {**imgs, "b1000": b1000}.items():
        noisy = (img + rng.normal(0, noise, img.shape)) * 400.0
        noisy[~brain] = 0.0
        out[m] = noisy.astype(np.float32)
    out["ADC"] = np.where(brain, adc, 0).astype(np.float32)
    cfg = load_config()["preprocess"]
    loc = location_map(resolution, cfg).data.copy()
    priors = Priors(brain, wm.astype(np.float32), gm.astype(np.float32), csf.astype(np.float32),
                    loc, True)
    truth = {"lesion": lesion, "lesion_id": lesion_id, "restricted": restricted,
             "blackhole": blackhole, "enhancing": enhancing}
    return out, priors, truth, t["brain"].affine
