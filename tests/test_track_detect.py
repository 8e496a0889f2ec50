"""Tests of the image-driven change detector of lesiontrack.track (lesion_z given)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.special import ndtri
from scipy.stats import norm

from lesiontrack.config import load_config
from lesiontrack.track import TrackingError, track_lesions
from lesiontrack import _morph
from lesiontrack._track_detect import fdr_threshold

SHAPE = (36, 36, 36)
GRID = np.indices(SHAPE, dtype=np.float32)
SIGMA = 0.05                                       # image noise (NAWM = 1.0)


@pytest.fixture(scope="module")
def cfg():
    return dict(load_config()["track"])


def ball(c, r):
    return ((GRID[0] - c[0]) ** 2 + (GRID[1] - c[1]) ** 2 + (GRID[2] - c[2]) ** 2) <= r * r


def images(seed, bright0, bright1, contrast=0.5):
    """Two noisy FLAIR visits, their lesion scores (z against NAWM) and a brain mask."""
    rng = np.random.default_rng(seed)
    f = [(1.0 + SIGMA * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
    f[0][bright0] += contrast
    f[1][bright1] += contrast
    z = [np.maximum((x - 1.0) / SIGMA, 0).astype(np.float32) for x in f]
    return f, z, np.ones(SHAPE, bool)


def test_fdr_threshold_matches_benjamini_hochberg():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.standard_normal(20000), 6 + rng.standard_normal(200)])
    thr = fdr_threshold(z, 0.05)
    p = 2 * norm.sf(np.abs(z))
    ps = np.sort(p)
    k = np.flatnonzero(ps <= 0.05 * np.arange(1, p.size + 1) / p.size)[-1]
    assert np.count_nonzero(np.abs(z) >= thr) == k + 1
    assert fdr_threshold(rng.standard_normal(1000) * 0.1, 0.05) == np.inf


@pytest.mark.parametrize("q", [0.001, 0.05, 0.5, 1.0, 1.5])
def test_fdr_threshold_matches_the_whole_sort(q):
    """Only values above the last rank's level are sorted; the threshold is that of
    Benjamini-Hochberg over every value (no rank, no level skipped)."""
    rng = np.random.default_rng(1)
    for k in range(20):
        z = rng.standard_normal(int(rng.integers(1, 5000))) * rng.choice([0.5, 1.0, 2.0])
        z[: k] += rng.uniform(2, 8, size=min(k, z.size))
        a = np.sort(np.abs(z))[::-1]
        crit = -ndtri(np.minimum(q * np.arange(1, a.size + 1) / (2.0 * a.size), 0.5))
        ok = np.flatnonzero(a >= crit)
        assert fdr_threshold(z, q) == (a[ok[-1]] if ok.size else np.inf)
    assert fdr_threshold(np.array([]), q) == np.inf


def test_sparse_morphology_is_scipys():
    """The tracker's dilation and erosion of sparse masks give scipy's results, also for
    masks on the array's faces, for every neighbourhood; dense masks go to scipy."""
    rng = np.random.default_rng(2)
    for trial in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 16, 3))
        m = rng.random(shape) < rng.choice([0.003, 0.02, 0.3])
        if trial % 2:
            m = ndi.binary_dilation(m)
        for conn in (1, 2, 3):
            st = ndi.generate_binary_structure(3, conn)
            assert np.array_equal(_morph.dilation(m, st), ndi.binary_dilation(m, st))
            assert np.array_equal(_morph.erosion(m, st), ndi.binary_erosion(m, st))
    with pytest.raises(ValueError, match="symmetric"):
        _morph.dilation(np.pad(np.ones((1, 1, 1), bool), 9), np.ones((3, 3, 1), bool))


def test_missed_new_and_vanished_lesions_are_detected(cfg):
    """Lesions absent from both masks but visible in the images are tracked and drawn."""
    stays, new, gone = ball((10, 10, 10), 4), ball((26, 26, 10), 3), ball((10, 26, 26), 3)
    f, z, brain = images(0, stays | gone, stays | new)
    masks = [stays.copy(), stays.copy()]            # the segmentation missed new and gone
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z)
    ch = tr.change[1]
    assert (ch[new] == 1).mean() > 0.8 and (ch[gone] == 2).mean() > 0.8
    assert not ch[ball((10, 10, 10), 3)].any()
    lid = int(tr.labels[1][26, 26, 10])
    row = tr.events[(tr.events.lesion_id == lid) & (tr.events.session_index == 1)]
    assert lid > 0 and row.status.iloc[0] == "new"
    # outside the true changes nothing is drawn
    assert not ch[~ball((26, 26, 10), 5) & ~ball((10, 26, 26), 5)].any()
    # without lesion scores the masks decide, as before: nothing changed
    tr0 = track_lesions(masks, (1, 1, 1), cfg, flair=f, brain_mask=brain)
    assert not tr0.change[1].any()


def test_no_change_no_detection(cfg):
    """Stable lesions and pure noise give no detected change (FDR control)."""
    les = ball((12, 12, 12), 5) | ball((24, 24, 24), 4)
    f, z, brain = images(3, les, les)
    tr = track_lesions([les, les], (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z)
    assert not tr.change[1].any()
    assert tr.intervals[["new", "enlarging", "shrinking", "resolved"]].to_numpy().sum() == 0


def test_faint_change_outside_lesion_tissue_is_ignored(cfg):
    """A significant increase in tissue that is not lesion-like at either visit is no lesion."""
    region = ball((18, 18, 18), 4)
    f, z, brain = images(4, np.zeros(SHAPE, bool), region, contrast=0.12)   # z ~ 2.4 at visit 1
    empty = np.zeros(SHAPE, bool)
    tr = track_lesions([empty, empty], (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z)
    assert not tr.change[1].any()


def test_lesion_z_checks(cfg):
    m = [ball((18, 18, 18), 3)] * 2
    f, z, brain = images(5, m[0], m[1])
    with pytest.raises(TrackingError, match="lesion_z"):
        track_lesions(m, (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z[:1])
    with pytest.raises(TrackingError, match="change_fdr_q"):
        track_lesions(m, (1, 1, 1), dict(cfg, change_fdr_q=1.5), flair=f, brain_mask=brain, lesion_z=z)


def test_noise_model_recovers_noise_and_misalignment():
    """An intensity wave, the second visit shifted by 0.3 mm along it: the model keeps the
    acquisition noise, finds a misalignment term, and gives steep slopes a larger noise
    SD than flat tissue; without a shift it finds no misalignment."""
    from lesiontrack._track_detect import noise_model
    rng = np.random.default_rng(4)

    def visit(shift):
        return (1 + 0.6 * np.sin((GRID[1] + shift) / 2.5)
                + SIGMA * rng.standard_normal(SHAPE)).astype(np.float32)

    f0, f1, f2 = visit(0.0), visit(0.3), visit(0.0)
    region = np.zeros(SHAPE, bool)
    region[3:-3, 3:-3, 3:-3] = True
    slope = np.abs(np.cos(GRID[1] / 2.5)) * 0.6 / 2.5            # |d intensity / d mm|
    sd, s0, delta = noise_model(f1 - f0, 0.5 * (f0 + f1), region, (1.0, 1.0, 1.0))
    assert s0 == pytest.approx(SIGMA * np.sqrt(2), rel=0.2)
    assert 0.15 <= delta <= 0.45
    assert np.median(sd[region & (slope > 0.2)]) > 1.3 * np.median(sd[region & (slope < 0.03)])
    _, s0b, deltab = noise_model(f2 - f0, 0.5 * (f0 + f2), region, (1.0, 1.0, 1.0))
    assert deltab < 0.1 and s0b == pytest.approx(SIGMA * np.sqrt(2), rel=0.15)


def test_noise_model_calibrates_intensity_bands_the_gradient_does_not_explain():
    """Flat tissue at two intensities, the bright band (a partial-volume mixture sampled
    differently at the two visits) three times noisier: with the intensity calibration z
    has unit spread in the bright band; without it that spread is 1.8 (the single
    fitted SD sits between the two bands), the failure it corrects. The quieter band
    keeps the fitted SD (z spread 0.6: the calibration never scales below 1)."""
    from lesiontrack._track_detect import noise_model
    rng = np.random.default_rng(7)
    mean = np.where(GRID[0] < SHAPE[0] // 2, 1.0, 1.5).astype(np.float32)
    noise = np.where(mean > 1.2, 3 * SIGMA, SIGMA).astype(np.float32)
    diff = (noise * rng.standard_normal(SHAPE)).astype(np.float32)
    region = np.ones(SHAPE, bool)
    bright = mean > 1.2

    def spread(z):
        return 1.4826 * np.median(np.abs(z - np.median(z)))

    sd, _, _ = noise_model(diff, mean, region, (1.0, 1.0, 1.0))
    z = diff / sd
    assert spread(z[bright]) == pytest.approx(1.0, abs=0.1)
    assert spread(z[~bright]) < 0.8
    sd0, _, _ = noise_model(diff, mean, region, (1.0, 1.0, 1.0), by_intensity=False)
    assert spread((diff / sd0)[bright]) > 1.5
    assert np.median(sd[~bright]) == pytest.approx(np.median(sd0[~bright]), rel=1e-6)


def test_no_change_is_detected_outside_either_field_of_view(cfg):
    """A region imaged at one visit only (zero at the other) is not change."""
    stays, new = ball((10, 10, 10), 4), ball((26, 26, 18), 3)
    f, z, brain = images(5, stays, stays | new)
    f[1][:, :, 30:] = 0.0                         # visit 2's field of view ends at slice 30
    f[0][:, :, 30:] += 0.0
    z[1][:, :, 30:] = 0.0
    bright = ball((18, 18, 32), 3)               # bright at visit 1 only, outside visit 2's FOV
    f[0][bright] += 0.5
    z[0][bright] = 10.0
    tr = track_lesions([stays.copy(), stays.copy()], (1, 1, 1), cfg, flair=f, brain_mask=brain,
                       lesion_z=z)
    ch = tr.change[1]
    assert (ch[new] == 1).mean() > 0.8           # the real new lesion is found
    assert not ch[:, :, 29:].any()               # nothing at or beyond visit 2's FOV edge


def test_a_lesion_drifting_slightly_darker_is_not_drawn_as_lost(cfg):
    """A large lesion 1 noise SD darker at the second visit, whose mask shrinks a little,
    is not drawn as lost (the region is significant, but no voxel changed status); a
    real loss of the same mask difference is."""
    big = ball((18, 18, 18), 8)
    core = ball((18, 18, 18), 6)
    for drop, expect in ((SIGMA, False), (0.4, True)):
        rng = np.random.default_rng(6)
        f = [(1.0 + SIGMA * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
        f[0][big] += 0.6
        f[1][core] += 0.6
        f[1][big & ~core] += 0.6 - drop
        tr = track_lesions([big, core], (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool))
        lost = tr.change[1] == 2
        assert lost[big & ~core].any() == expect


def test_a_detected_bump_below_the_lesions_detectable_change_is_not_enlargement(cfg):
    """A small bright bump on the edge of a large lesion, missed by the segmentation and
    found by the detector, is below that lesion's minimum detectable change: the lesion
    stays stable and the bump is not drawn; a large enough one makes it enlarging."""
    big = ball((18, 18, 18), 7)
    for r, expect in ((1.6, "stable"), (4.5, "enlarging")):
        bump = ball((18, 18, 25.5), r) & ~big
        f, z, brain = images(7, big, big | bump)
        tr = track_lesions([big, big.copy()], (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z)
        lid = int(tr.labels[1][18, 18, 18])
        row = tr.events[(tr.events.lesion_id == lid) & (tr.events.session_index == 1)]
        assert bump.sum() * 1.0 >= cfg["min_change_mm3"]
        assert row.status.iloc[0] == expect, (r, bump.sum())
        assert (tr.change[1][bump] == 1).any() == (expect == "enlarging")
        assert not tr.change[1][~bump].any()


def _three_visits(seed, contrasts):
    """Three noisy FLAIR visits with a lesion of the given contrast at each, and scores."""
    rng = np.random.default_rng(seed)
    f = [(1.0 + SIGMA * rng.standard_normal(SHAPE)).astype(np.float32) for _ in contrasts]
    les = ball((18, 18, 18), 3.5)
    for x, k in zip(f, contrasts):
        x[les] += k
    z = [np.maximum((x - 1.0) / SIGMA, 0).astype(np.float32) for x in f]
    return f, z, les


def test_a_lesion_missed_at_one_visit_is_rescued_from_its_neighbours(cfg):
    """A lesion found at visits 0 and 2 and missed at visit 1, where it still reaches the
    growth level (score ~3.4, below the seed level 3.5), is lesion at visit 1 too: one
    lesion with one ID, not a lesion resolving and coming back. (Its FLAIR contrast drops
    by two thirds at visit 1: measured in the images, it shrinks and grows back.)"""
    f, z, les = _three_visits(8, (0.5, 0.17, 0.5))
    masks = [les.copy(), np.zeros(SHAPE, bool), les.copy()]
    brain = np.ones(SHAPE, bool)
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=f, brain_mask=brain, lesion_z=z)
    assert (tr.labels[1][les] > 0).mean() > 0.8
    ev = tr.events
    assert ev.lesion_id.nunique() == 1 and len(ev) == 3
    assert not (ev.status == "resolved").any() and not (ev.status.iloc[1:] == "new").any()
    off = track_lesions(masks, (1, 1, 1), dict(cfg, rescue_missed=False), flair=f, brain_mask=brain,
                        lesion_z=z)
    assert not off.labels[1].any() and (off.events.status == "resolved").any()
    # nothing is rescued where no neighbouring visit has a lesion
    tr0 = track_lesions([np.zeros(SHAPE, bool)] * 3, (1, 1, 1), cfg, flair=f, brain_mask=brain,
                        lesion_z=z)
    assert not any(lab.any() for lab in tr0.labels[:2])


def test_a_faint_region_before_a_new_lesion_is_not_rescued(cfg):
    """A lesion that appears at visit 1 (the FLAIR brightens strongly) has a faint region
    at growth level at visit 0 (a precursor, or partial volume): it is not pulled back
    into visit 0, and the lesion is new at visit 1."""
    f, z, les = _three_visits(9, (0.15, 0.6, 0.6))
    masks = [np.zeros(SHAPE, bool), les.copy(), les.copy()]
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool), lesion_z=z)
    assert not tr.labels[0].any()
    lid = int(tr.labels[1][18, 18, 18])
    row = tr.events[(tr.events.lesion_id == lid) & (tr.events.session_index == 1)]
    assert row.status.iloc[0] == "new"


def test_a_faint_new_lesion_counts_with_its_whole_extent(cfg):
    """A faint new lesion, confidently lesion only in a core smaller than a countable
    lesion but at the segmentation's growth level over a countable extent, away from
    every lesion of the other visit, is detected as a whole. The same profile on the rim
    of a lesion present at both visits is not: rims follow the stricter rule."""
    lo, hi = cfg["change_absent_z"], cfg["change_lesion_z"]
    new_core, new = ball((26, 26, 10), 1.2), ball((26, 26, 10), 3)
    big = ball((10, 10, 18), 6)
    rim = ball((10, 10, 25.5), 3) & ~big
    rim_core = ball((10, 10, 25.5), 1.2) & ~big
    assert new_core.sum() < cfg["min_change_mm3"] <= new.sum()
    rng = np.random.default_rng(11)
    f = [(1.0 + SIGMA * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
    for img in f:
        img[big] += 0.5
    f[1][new | rim] += 0.25
    f[1][new_core | rim_core] += 0.25                # the core is brighter
    z = [np.zeros(SHAPE, np.float32) for _ in range(2)]
    for zz in z:
        zz[big] = 2 * hi
    z[1][new | rim] = 0.5 * (lo + hi)              # growth level, not a confident lesion
    z[1][new_core | rim_core] = hi + 1.0
    tr = track_lesions([big, big.copy()], (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool), lesion_z=z)
    ch = tr.change[1]
    assert (ch[new] == 1).mean() > 0.8
    lid = int(tr.labels[1][26, 26, 10])
    row = tr.events[(tr.events.lesion_id == lid) & (tr.events.session_index == 1)]
    assert lid > 0 and row.status.iloc[0] == "new"
    assert not ch[rim].any()
    assert not ch[~ball((26, 26, 10), 4)].any()
