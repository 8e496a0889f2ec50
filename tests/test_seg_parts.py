"""Tests of the lesion parts (lesiontrack._seg_parts): restricted diffusion and black holes
as cores of a lesion, blurred by partial volume as on a coarse grid."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from _segment_synthetic import synthetic_subject
from lesiontrack import segment
from lesiontrack.config import load_config
from lesiontrack.metrics import dice, lesion_detection

CFG = load_config()["segment"]
SP = (2.0, 2.0, 2.0)


def _cored_subject(t1_gm=0.72, t1_core=0.42, t1_lesion=0.85, seed=0):
    """Preprocessed contrasts (NAWM = 1) of the synthetic subject's anatomy with eight
    lesions of 7 mm radius, each with a core of 4 mm radius: restricted diffusion (ADC
    0.4e-3 mm^2/s) in four, a T1w black hole in the other four. T1w, b1000 and ADC are
    blurred by a Gaussian of 3 mm FWHM, as a 2 mm acquisition carried onto another 2 mm
    grid blurs them."""
    _, priors, _, _ = synthetic_subject(resolution=2, seed=seed)
    rng = np.random.default_rng(seed)
    brain, wm, gm = priors.brain_mask, priors.wm_prob, priors.gm_prob
    csf = np.clip(1 - wm - gm, 0, 1) * brain
    cand = np.argwhere(ndi.binary_erosion(brain & (wm > 0.97), iterations=2))
    centres = []
    for c in cand[rng.permutation(len(cand))]:     # test-data generation only
        if all(np.abs(c - o).max() > 9 for o in centres):
            centres.append(c)
        if len(centres) == 8:
            break
    grid = np.indices(brain.shape).astype(np.float32)
    dist = np.min([np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) for c in centres], axis=0) * SP[0]
    which = np.argmin([((grid - c[:, None, None, None]) ** 2).sum(0) for c in centres], axis=0)
    lesion, core = brain & (dist <= 7.0), brain & (dist <= 4.0)
    restricted, blackhole = core & (which % 2 == 0), core & (which % 2 == 1)

    def mix(g, w, c):
        return (g * gm + w * wm + c * csf).astype(np.float32)

    blur = 3.0 / 2.355 / SP[0]
    t1 = mix(t1_gm, 1.0, 0.30)
    t1[lesion] = t1_lesion
    t1[blackhole] = t1_core
    adc = mix(0.85e-3, 0.75e-3, 3.0e-3)
    adc[lesion] = 1.0e-3
    adc[restricted] = 0.4e-3
    b0 = mix(1.3, 1.0, 3.0)
    b0[lesion] = 1.7
    b1000 = b0 * np.exp(-1000.0 * adc) / np.exp(-1000.0 * 0.75e-3)
    out = {}
    for name, img, sd in (("T1w", t1, 0.03), ("b1000", b1000, 0.03), ("ADC", adc, 0.02e-3)):
        img = ndi.gaussian_filter(img, blur) + rng.normal(0, sd, img.shape)
        out[name] = np.where(brain, img, 0).astype(np.float32)
    out["FLAIR"] = np.where(brain, 1 + 0.25 * gm + 0.7 * lesion + rng.normal(0, 0.03, brain.shape),
                            0).astype(np.float32)
    return out, priors, {"lesion": lesion, "restricted": restricted, "blackhole": blackhole}


@pytest.fixture(scope="module")
def cored():
    return _cored_subject()


def test_restricted_cores_grow_to_their_partial_volume_edge(cored):
    """A blurred restricted core's ADC stays above the seed level (0.62e-3) in most of its
    voxels; grown through the voxels below the NAWM ADC peak by 2 of its half-widths it
    is found whole. (Measured: Dice 0.92, volume 0.86 x the truth; without growth 0.73,
    0.57 x.)"""
    imgs, priors, truth = cored
    got = segment.segment_session(imgs, priors, SP, CFG, lesion_mask=truth["lesion"]).restricted
    seeds = segment.segment_session(imgs, priors, SP, dict(CFG, restricted_grow_z=0),
                                    lesion_mask=truth["lesion"]).restricted
    det = lesion_detection(truth["restricted"], got, spacing=SP)
    assert det["recall"] == 1.0 and det["fp"] == 0, det
    assert dice(truth["restricted"], got) >= 0.85
    assert dice(truth["restricted"], got) > dice(truth["restricted"], seeds) + 0.1
    assert 0.75 <= got.sum() / truth["restricted"].sum() <= 1.25
    assert not (got & truth["blackhole"]).any()


def test_black_holes_are_darker_than_grey_matter_and_grow_to_their_edge(cored):
    """Black holes are lesion parts unequivocally darker on T1w than grey matter, found to
    their partial-volume edge; a lesion as dark as grey matter is none."""
    imgs, priors, truth = cored
    got = segment.segment_session(imgs, priors, SP, CFG, lesion_mask=truth["lesion"]).blackhole
    det = lesion_detection(truth["blackhole"], got, spacing=SP)
    assert det["recall"] == 1.0 and det["fp"] == 0, det
    assert dice(truth["blackhole"], got) >= 0.9             # measured 0.99
    assert 0.8 <= got.sum() / truth["blackhole"].sum() <= 1.2
    # the level follows the sequence's grey matter: with a weaker T1w contrast (grey matter
    # at 0.85, black holes at 0.6 before the blur) the cores are still found, where a
    # fixed level of 0.55 x white matter would find none of them
    weak, _, _ = _cored_subject(t1_gm=0.85, t1_core=0.60, t1_lesion=0.92)
    got = segment.segment_session(weak, priors, SP, CFG, lesion_mask=truth["lesion"]).blackhole
    assert lesion_detection(truth["blackhole"], got, spacing=SP)["recall"] == 1.0
    assert not (truth["lesion"] & (weak["T1w"] < 0.55)).any()
    # lesions as dark as grey matter (0.72) and no darker are not black holes
    iso, _, _ = _cored_subject(t1_core=0.72, t1_lesion=0.72)
    got = segment.segment_session(iso, priors, SP, CFG, lesion_mask=truth["lesion"]).blackhole
    assert got.sum() <= 0.02 * truth["lesion"].sum()


def test_the_parts_need_their_contrasts(cored):
    imgs, priors, truth = cored
    m = segment.segment_session({"FLAIR": imgs["FLAIR"], "ADC": imgs["ADC"]}, priors, SP, CFG,
                                lesion_mask=truth["lesion"])
    assert m.available == {"lesion", "restricted"}          # ADC alone decides without b1000
    assert lesion_detection(truth["restricted"], m.restricted, spacing=SP)["recall"] == 1.0
    assert not m.blackhole.any() and not m.enhancing.any()
