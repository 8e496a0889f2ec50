"""Tests of lesiontrack.track: identities, statuses, change maps, events."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from lesiontrack.config import load_config
from lesiontrack.track import EVENT_COLUMNS, TrackingError, carry_unobserved, track_lesions
from lesiontrack._track_match import label_components, match_components

SHAPE = (36, 36, 36)
GRID = np.indices(SHAPE, dtype=np.float32)


@pytest.fixture(scope="module")
def cfg():
    return dict(load_config()["track"])


def ball(c, r):
    return ((GRID[0] - c[0]) ** 2 + (GRID[1] - c[1]) ** 2 + (GRID[2] - c[2]) ** 2) <= r * r


def union(*balls):
    out = np.zeros(SHAPE, bool)
    for b in balls:
        out |= b
    return out


def status_of(tr, lesion_id, t):
    ev = tr.events
    row = ev[(ev.lesion_id == lesion_id) & (ev.session_index == t)]
    assert len(row) == 1, f"lesion {lesion_id} has {len(row)} rows at session {t}"
    return row.iloc[0]


def id_at(tr, t, point):
    return int(tr.labels[t][point])


# ---------------------------------------------------------------- basic behaviour
def test_single_session(cfg):
    m = union(ball((9, 9, 9), 3), ball((26, 26, 26), 4))
    tr = track_lesions([m], (1, 1, 1), cfg)
    assert tr.change == [None]
    assert list(tr.events.columns) == EVENT_COLUMNS
    assert sorted(tr.events.lesion_id.tolist()) == [1, 2]
    assert (tr.events.status == cfg["baseline_status"]).all()
    assert len(tr.intervals) == 0
    assert tr.labels[0].dtype == np.int32 and set(np.unique(tr.labels[0])) == {0, 1, 2}


def test_statuses_two_sessions(cfg):
    a, b, c, d = (9, 9, 9), (26, 26, 26), (9, 26, 9), (26, 9, 26)
    m0 = union(ball(a, 3), ball(b, 5), ball(c, 4), ball(d, 3.5))
    m1 = union(ball(a, 5), ball(b, 3), ball(c, 4), ball((18, 18, 18), 3))   # d resolved
    tr = track_lesions([m0, m1], (1, 1, 1), cfg)
    ia, ib, ic, idd = (id_at(tr, 0, p) for p in (a, b, c, d))
    assert status_of(tr, ia, 1).status == "enlarging"
    assert status_of(tr, ib, 1).status == "shrinking"
    assert status_of(tr, ic, 1).status == "stable"
    res = status_of(tr, idd, 1)
    assert res.status == "resolved" and res.volume_mm3 == 0
    inew = id_at(tr, 1, (18, 18, 18))
    assert inew not in (ia, ib, ic, idd) and status_of(tr, inew, 1).status == "new"
    # identity kept on the map
    assert id_at(tr, 1, a) == ia and id_at(tr, 1, b) == ib and id_at(tr, 1, c) == ic
    ch = tr.change[1]
    assert ch.dtype == np.uint8
    assert np.all(ch[m1 & ~m0 & (tr.labels[1] == ia)] == 1)
    assert np.all(ch[m0 & ~m1 & (tr.labels[0] == ib)] == 2)
    assert np.all(ch[m0 & ~m1 & (tr.labels[0] == idd)] == 2)
    assert np.all(ch[tr.labels[1] == inew] == 1)
    iv = tr.intervals.iloc[0]
    assert (iv.new, iv.enlarging, iv.shrinking, iv.resolved) == (1, 1, 1, 1)
    assert not iv.neda_t2


def test_boundary_noise_is_not_change(cfg):
    """A one-voxel boundary wobble of a large lesion is below the detectable change."""
    m0 = ball((18, 18, 18), 8)
    m1 = m0.copy()
    m1[18, 18, 27] = True          # add a voxel
    m1[18, 18, 10] = False         # drop another
    m1[26, 18, 18] = False
    tr = track_lesions([m0, m1], (1, 1, 1), cfg)
    assert status_of(tr, 1, 1).status == "stable"
    assert not tr.change[1].any()
    assert tr.intervals.neda_t2.iloc[0]


def test_merge_split_lineage(cfg):
    p, q = (18, 12, 18), (18, 24, 18)
    m0 = union(ball(p, 3), ball(q, 3))
    bridge = (np.abs(GRID[0] - 18) <= 2) & (np.abs(GRID[2] - 18) <= 2) & (GRID[1] >= 12) & (GRID[1] <= 24)
    m1 = union(ball(p, 4), ball(q, 3), bridge)      # confluent
    m2 = union(ball(p, 4), ball(q, 3))              # split again
    tr = track_lesions([m0, m1, m2], (1, 1, 1), cfg)
    ip, iq = id_at(tr, 0, p), id_at(tr, 0, q)
    survivor = id_at(tr, 1, p)
    assert id_at(tr, 1, q) == survivor                # one ID for the confluent lesion
    gone = iq if survivor == ip else ip
    row = status_of(tr, gone, 1)
    assert row.merged_into == survivor and row.volume_mm3 == 0
    assert gone not in tr.events[tr.events.session_index == 2].lesion_id.tolist()
    ids2 = {id_at(tr, 2, p), id_at(tr, 2, q)}
    assert survivor in ids2 and len(ids2) == 2
    child = (ids2 - {survivor}).pop()
    assert status_of(tr, child, 2).split_from == survivor
    assert tr.intervals.merged.tolist() == [1, 0] and tr.intervals.split.tolist() == [0, 1]


def test_reappearing_lesion_keeps_id_and_many_sessions(cfg):
    a, b = (10, 10, 10), (26, 26, 26)
    seq = [union(ball(a, 4), ball(b, 3)), union(ball(a, 4), ball(b, 3)), ball(a, 4),
           ball(a, 4), union(ball(a, 4), ball((26, 27, 26), 3)), union(ball(a, 4), ball(b, 3))]
    tr = track_lesions(seq, (1, 1, 1), cfg)
    ib = id_at(tr, 0, b)
    assert [status_of(tr, ib, t).status for t in (1, 2)] == ["stable", "resolved"]
    assert ib not in tr.events[tr.events.session_index == 3].lesion_id.tolist()
    assert id_at(tr, 4, (26, 27, 26)) == ib and status_of(tr, ib, 4).status == "new"
    assert tr.events.lesion_id.max() == 2          # no fresh ID was spent
    assert len(tr.labels) == len(tr.change) == 6 and tr.change[0] is None


def test_new_needs_image_evidence(cfg):
    """A lesion only in the second mask, with no FLAIR increase, is not called new."""
    rng = np.random.default_rng(0)
    f0 = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    f1 = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    old, true_new = ball((10, 10, 10), 3), ball((26, 26, 26), 3)
    f0[old] += 0.8
    f1[old | true_new] += 0.8                   # bright in both: missed at visit 0
    m0 = np.zeros(SHAPE, bool)                  # segmentation missed `old` at visit 0
    m1 = union(old, true_new)
    brain = np.ones(SHAPE, bool)
    tr = track_lesions([m0, m1], (1, 1, 1), cfg, flair=[f0, f1], brain_mask=brain)
    assert status_of(tr, id_at(tr, 1, (26, 26, 26)), 1).status == "new"
    assert status_of(tr, id_at(tr, 1, (10, 10, 10)), 1).status == "stable"
    assert np.all(tr.change[1][true_new] == 1) and not tr.change[1][old].any()
    assert 0.05 < tr.intervals.noise_sd.iloc[0] < 0.09     # sqrt(2) * 0.05


def test_enlarging_with_flair_needs_confirmed_growth(cfg):
    """With FLAIR, growth counts only where the subtraction confirms it."""
    rng = np.random.default_rng(1)
    f0 = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    f1 = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
    a, b = (10, 10, 10), (25, 25, 25)
    f0[ball(a, 3) | ball(b, 5)] += 0.8
    f1[ball(a, 5) | ball(b, 5)] += 0.8           # a grew in the images, b did not
    m0 = union(ball(a, 3), ball(b, 4))           # b under-segmented at visit 0
    m1 = union(ball(a, 5), ball(b, 5))
    tr = track_lesions([m0, m1], (1, 1, 1), cfg, flair=[f0, f1], brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr, id_at(tr, 1, a), 1).status == "enlarging"
    assert status_of(tr, id_at(tr, 1, b), 1).status == "stable"
    grown = m1 & ~m0
    assert np.all(tr.change[1][grown & ball(a, 5)] == 1)
    assert not tr.change[1][grown & ball(b, 5)].any()
    # without the images, b's mask growth (+95 %) is taken at face value
    tr2 = track_lesions([m0, m1], (1, 1, 1), cfg)
    assert status_of(tr2, id_at(tr2, 1, b), 1).status == "enlarging"


def test_flair_missing_at_one_session(cfg):
    """Intervals touching a session without FLAIR fall back to the mask rules."""
    rng = np.random.default_rng(2)
    f = [(1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(3)]
    a, b = (10, 10, 10), (25, 25, 25)
    m = [ball(a, 3), union(ball(a, 3), ball(b, 3)), union(ball(a, 3), ball(b, 3))]
    tr = track_lesions(m, (1, 1, 1), cfg, flair=[f[0], None, f[2]], brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr, id_at(tr, 1, b), 1).status == "new"        # no images: masks decide
    assert np.isnan(tr.intervals.noise_sd.iloc[0]) and np.isnan(tr.intervals.noise_sd.iloc[1])
    tr2 = track_lesions(m, (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr2, id_at(tr2, 1, b), 1).status == "stable"   # images show nothing new


def test_anisotropic_spacing_volumes(cfg):
    m = ball((18, 18, 18), 3)
    tr = track_lesions([m], (0.5, 0.5, 2.0), cfg)
    assert tr.events.volume_mm3.iloc[0] == pytest.approx(m.sum() * 0.5)


@pytest.mark.parametrize("bad, msg", [
    ({"connectivity": 4}, "connectivity"),
    ({"enlarge_rel_small": -1}, "enlarge_rel_small"),
    ({"baseline_status": "old"}, "baseline_status"),
])
def test_config_errors(cfg, bad, msg):
    with pytest.raises(TrackingError, match=msg):
        track_lesions([ball((9, 9, 9), 3)], (1, 1, 1), {**cfg, **bad})


def test_input_errors(cfg):
    with pytest.raises(TrackingError, match="one 3D grid"):
        track_lesions([np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool)], (1, 1, 1), cfg)
    with pytest.raises(TrackingError, match="empty"):
        track_lesions([], (1, 1, 1), cfg)
    with pytest.raises(TrackingError, match="flair"):
        track_lesions([np.zeros(SHAPE, bool)] * 2, (1, 1, 1), cfg, flair=[None])
    with pytest.raises(TrackingError, match="t2w"):
        track_lesions([np.zeros(SHAPE, bool)] * 2, (1, 1, 1), cfg, t2w=[None])
    with pytest.raises(TrackingError, match=r"t2w\[1\] has shape"):
        track_lesions([np.zeros(SHAPE, bool)] * 2, (1, 1, 1), cfg, t2w=[None, np.zeros((3, 3, 3))])
    with pytest.raises(TrackingError, match="spacing"):
        track_lesions([np.zeros(SHAPE, bool)], (1, 0, 1), cfg)


# ---------------------------------------------------------------- property tests
centres = st.tuples(*[st.integers(6, 29)] * 3)
blobs = st.lists(st.tuples(centres, st.floats(1.5, 5.0)), min_size=1, max_size=6)
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(blobs, blobs, st.randoms(use_true_random=False))
def test_matcher_invariant_to_relabelling(b0, b1, rnd):
    l0, n0 = label_components(union(*[ball(c, r) for c, r in b0]), 3)
    l1, n1 = label_components(union(*[ball(c, r) for c, r in b1]), 3)
    p0 = np.array([0] + rnd.sample(range(1, n0 + 1), n0))      # old label -> new label
    p1 = np.array([0] + rnd.sample(range(1, n1 + 1), n1))
    m = match_components(l0, n0, l1, n1)
    mp = match_components(p0[l0], n0, p1[l1], n1)
    # permuted result == permutation of the original result
    assert np.array_equal(mp.parent[p1], p0[m.parent])
    assert np.array_equal(mp.keeps[p1], m.keeps)
    assert np.array_equal(mp.dest[p0], p1[m.dest])
    assert np.array_equal(mp.merged[p0], m.merged)


@PROPS
@given(st.floats(2.5, 6.0), st.tuples(*[st.floats(-1, 1)] * 3), st.floats(0.0, 0.95))
def test_moved_less_than_radius_keeps_id(r, direction, frac):
    cfg = dict(load_config()["track"])
    v = np.array(direction)
    norm = np.linalg.norm(v)
    shift = v / norm * frac * r if norm > 1e-3 else np.zeros(3)
    c0 = np.array([18.0, 18.0, 18.0])
    m0, m1 = ball(c0, r), ball(c0 + shift, r)
    tr = track_lesions([m0, m1], (1, 1, 1), cfg)
    assert set(np.unique(tr.labels[1])) == {0, 1}
    assert tr.events[tr.events.session_index == 1].lesion_id.tolist() == [1]


@PROPS
@given(blobs, st.integers(2, 5))
def test_identical_visits_all_stable(b, n):
    cfg = dict(load_config()["track"])
    m = union(*[ball(c, r) for c, r in b])
    tr = track_lesions([m] * n, (1, 1, 1), cfg)
    later = tr.events[tr.events.session_index > 0]
    assert (later.status == "stable").all()
    assert all(not c.any() for c in tr.change[1:])
    assert all(np.array_equal(tr.labels[0], lab) for lab in tr.labels)
    assert tr.intervals.neda_t2.all()
    assert later.merged_into.isna().all() and later.split_from.isna().all()


@PROPS
@given(st.lists(blobs, min_size=1, max_size=4))
def test_events_consistent_with_maps(seq):
    """Invariants of any tracking: one row per lesion and session, volumes, change maps."""
    cfg = dict(load_config()["track"])
    masks = [union(*[ball(c, r) for c, r in b]) for b in seq]
    tr = track_lesions(masks, (1, 1, 1), cfg)
    ev = tr.events
    assert not ev.duplicated(["lesion_id", "session_index"]).any()
    for t, lab in enumerate(tr.labels):
        assert np.array_equal(lab > 0, masks[t])
        ids, counts = np.unique(lab[lab > 0], return_counts=True)
        rows = ev[ev.session_index == t].set_index("lesion_id")
        assert set(ids) <= set(rows.index)
        assert np.allclose(rows.loc[ids, "volume_mm3"].to_numpy(), counts)
        gone = rows[~rows.index.isin(ids)]
        assert (gone.volume_mm3 == 0).all() and (gone.status == "resolved").all()
        if t:
            ch = tr.change[t]
            assert not (ch == 1)[~(masks[t] & ~masks[t - 1])].any()
            assert not (ch == 2)[~(masks[t - 1] & ~masks[t])].any()


def test_a_shifted_lesion_is_stable_even_where_the_images_confirm_both_rims(cfg):
    """A lesion moved by 2 voxels (residual misregistration) gains a crescent on one side
    and loses one on the other, both real in the subtraction: its net change (+14 %) is
    below its minimum detectable change, so it is stable, and its rims are not drawn."""
    rng = np.random.default_rng(3)
    f = [(1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
    m0, m1 = ball((17, 18, 18), 5.0), ball((19, 18, 18), 5.1)
    f[0][m0] += 0.8
    f[1][m1] += 0.8
    gained, lost = (m1 & ~m0).sum(), (m0 & ~m1).sum()
    assert gained > 200 and 0 < gained - lost < 0.15 * m0.sum()
    tr = track_lesions([m0, m1], (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr, id_at(tr, 1, (18, 18, 18)), 1).status == "stable"
    assert not tr.change[1].any()


def test_scattered_loss_of_a_lesion_counts_as_a_whole(cfg):
    """On a coarse grid the lost rim of a shrinking lesion breaks into scattered pieces:
    the boundary shift integral sums them, so the lesion (a third of it lost) is
    shrinking, and only lost voxels are drawn (2). The same mask change without any
    change in the images is stable."""
    rng = np.random.default_rng(4)
    f = [(1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
    m0 = ball((18, 18, 18), 6.5)
    shell = m0 & ~ball((18, 18, 18), 4.5)
    holes = shell & ((GRID.sum(axis=0) % 2) == 0)
    m1 = m0 & ~holes
    f[0][m0] += 0.8
    f[1][m1] += 0.8
    assert 0.3 < holes.sum() / m0.sum() < 0.4
    spacing = (2.0, 2.0, 2.0)                                       # 8 mm^3 < min_change_mm3
    tr = track_lesions([m0, m1], spacing, cfg, flair=f, brain_mask=np.ones(SHAPE, bool))
    row = status_of(tr, id_at(tr, 1, (18, 18, 18)), 1)
    assert row.status == "shrinking"
    assert not tr.change[1][~holes].any() and set(np.unique(tr.change[1])) <= {0, 2}
    g = [f[0], f[0].copy()]
    tr2 = track_lesions([m0, m1], spacing, cfg, flair=g, brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr2, id_at(tr2, 1, (18, 18, 18)), 1).status == "stable"


def _pv_ball(c, r, contrast=0.8):
    """A ball rendered with partial volume (4x supersampled along each axis)."""
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    occ = np.zeros(SHAPE, np.float32)
    for dz in sub:                              # loop over the 64 sub-voxel offsets
        for dy in sub:
            for dx in sub:
                d2 = (GRID[0] + dz - c[0]) ** 2 + (GRID[1] + dy - c[1]) ** 2 + (GRID[2] + dx - c[2]) ** 2
                occ += d2 <= r * r
    return contrast * occ / 64


def test_boundary_shift_change_measures_the_volume_change_in_the_images():
    """The boundary shift integral recovers a lesion's true volume change from
    partial-volume images to a few per cent, and a shift (misregistration) to about
    zero, whatever the masks say."""
    from lesiontrack._track_status import DifferenceEvidence, boundary_shift_change

    rng = np.random.default_rng(7)
    noise = [0.02 * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2)]
    brain = np.ones(SHAPE, bool)
    true = 4 / 3 * np.pi * (7.0 ** 3 - 6.0 ** 3)
    for c1, r1, expect in (((18, 18, 18), 6.0, -true), ((19.5, 18, 18), 7.0, 0.0)):
        a, b = _pv_ball((18, 18, 18), 7.0), _pv_ball(c1, r1)
        f0, f1 = 1.0 + a + noise[0], 1.0 + b + noise[1]
        m0, m1 = a > 0.4, b > 0.4
        ev = DifferenceEvidence(f0, f1, brain, m0 | m1)
        dv, sd = boundary_shift_change(m0.astype(int), m1.astype(int), 1, ev, 1.0)
        assert abs(dv[1] - expect) < 0.05 * true, (dv[1], expect)
        assert 0 < sd[1] < 0.05 * true
    # a label with no voxels (a lesion of neither visit here) changes by nothing
    dv, sd = boundary_shift_change(m0.astype(int), m1.astype(int), 2, ev, 1.0)
    assert dv[2] == 0 and sd[2] == 0


def test_a_moved_lesion_whose_new_rim_was_missed_is_stable(cfg):
    """A lesion moved by 3 voxels whose segmentation at the second visit missed the side
    it moved to: the mask lost a third of it, and that loss is real in the subtraction,
    but so is the unsegmented gain on the other side. Measured in the images the volume
    did not change: stable."""
    rng = np.random.default_rng(5)
    f = [(1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in range(2)]
    m0, moved = ball((16, 18, 18), 5.0), ball((19, 18, 18), 5.0)
    f[0][m0] += 0.8
    f[1][moved] += 0.8
    m1 = m0 & moved
    assert (m0 & ~m1).sum() > 0.3 * m0.sum()
    tr = track_lesions([m0, m1], (1, 1, 1), cfg, flair=f, brain_mask=np.ones(SHAPE, bool))
    assert status_of(tr, id_at(tr, 1, (18, 18, 18)), 1).status == "stable"


@pytest.mark.parametrize("shape, factors", [((40, 37, 23), (6, 6, 2)), ((17, 30, 9), (1, 4, 3)),
                                            ((5, 5, 5), (5, 5, 5))])
def test_background_upsampling_is_linear_interpolation_of_block_centres(shape, factors):
    """The slow-difference background is interpolated back from block means exactly as
    ``scipy.ndimage.zoom(order=1, mode="nearest", grid_mode=True)`` would, only faster."""
    from scipy import ndimage as ndi
    from lesiontrack._track_status import _upsample_linear
    blocks = [-(-n // f) for n, f in zip(shape, factors)]
    a = np.random.default_rng(0).normal(size=blocks).astype(np.float32)
    ref = ndi.zoom(a, factors, order=1, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    got = _upsample_linear(a, factors, shape)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_t2w_confirms_the_flair_volume_change(cfg):
    """Thick-slice acquisitions sample a small lesion's partial volume differently at each
    visit, so its FLAIR boundary shift integral can grow while its extent does not. T2w,
    a separate acquisition, does not share that error: the change counts only as far as
    the two agree. Lesion a looks a third larger on the second FLAIR only (a sampling
    artefact; half of that is below the 25 % a change must reach), b grew in both
    contrasts, c looks larger on FLAIR and smaller on T2w."""
    rng = np.random.default_rng(11)
    a, b, c = (9, 9, 9), (26, 26, 26), (9, 26, 18)
    flair = [_pv_ball(a, 5.0) + _pv_ball(b, 4.0) + _pv_ball(c, 4.5),
             _pv_ball(a, 5.5) + _pv_ball(b, 6.0) + _pv_ball(c, 5.5)]
    t2w = [_pv_ball(a, 5.0) + _pv_ball(b, 4.0) + _pv_ball(c, 4.5),
           _pv_ball(a, 5.0) + _pv_ball(b, 6.0) + _pv_ball(c, 3.5)]
    flair = [(1.0 + f + 0.02 * rng.standard_normal(SHAPE)).astype(np.float32) for f in flair]
    t2w = [(1.0 + f + 0.02 * rng.standard_normal(SHAPE)).astype(np.float32) for f in t2w]
    m0 = union(ball(a, 5.0), ball(b, 4.0), ball(c, 4.5))
    m1 = union(ball(a, 5.0), ball(b, 6.0), ball(c, 4.5))
    brain = np.ones(SHAPE, bool)

    def statuses(**kw):
        tr = track_lesions([m0, m1], (1, 1, 1), cfg, flair=flair, brain_mask=brain, **kw)
        return [status_of(tr, id_at(tr, 1, p), 1).status for p in (a, b, c)]

    assert statuses() == ["enlarging", "enlarging", "enlarging"]           # FLAIR alone
    assert statuses(t2w=t2w) == ["stable", "enlarging", "stable"]
    assert statuses(t2w=[None, t2w[1]]) == ["enlarging", "enlarging", "enlarging"]  # no pair
    off = dict(cfg, confirm_with_t2w=False)
    tr = track_lesions([m0, m1], (1, 1, 1), off, flair=flair, brain_mask=brain, t2w=t2w)
    assert status_of(tr, id_at(tr, 1, a), 1).status == "enlarging"


def test_agreeing_shift():
    from lesiontrack._track_status import agreeing_shift

    dv, sd = agreeing_shift(np.array([0.0, 80.0, 80.0, -60.0, 50.0]), np.array([0, 10, 10, 20, 5.0]),
                            np.array([0.0, 40.0, -30.0, -20.0, 0.0]), np.array([0, 30, 5, 10, 5.0]))
    assert dv.tolist() == [0.0, 60.0, 0.0, -40.0, 0.0]
    assert sd.tolist() == [0.0, 30.0, 10.0, 20.0, 5.0]


# ------------------------------------------------- visits that miss part of the brain
def _three_visits_with_a_slab_missing_the_top(seed=3):
    """Three visits of two lesions, one high up (z > 24) that the middle visit's field of
    view (z < 22) misses; the low one grows at visit 2. FLAIR noise 0.05, lesions +0.8."""
    rng = np.random.default_rng(seed)
    hi, lo = (18, 18, 29), (18, 18, 10)
    masks = [union(ball(hi, 4), ball(lo, 3)), union(ball(hi, 4), ball(lo, 3)),
             union(ball(hi, 4), ball(lo, 5))]
    flair = []
    for m in masks:
        f = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)
        f[m] += 0.8
        flair.append(f)
    seen = GRID[2] < 22
    masks[1] = masks[1] & seen
    flair[1] = np.where(seen, flair[1], 0).astype(np.float32)       # outside the slab: no data
    return masks, flair, [None, seen, None], hi, lo


def test_a_lesion_outside_one_visits_field_of_view_is_carried_not_resolved(cfg):
    masks, flair, observed, hi, lo = _three_visits_with_a_slab_missing_the_top()
    brain = np.ones(SHAPE, bool)
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=flair, brain_mask=brain, observed=observed)
    lid = id_at(tr, 0, hi)
    assert id_at(tr, 1, hi) == lid == id_at(tr, 2, hi)
    assert status_of(tr, lid, 1).status == "stable" and status_of(tr, lid, 2).status == "stable"
    assert status_of(tr, lid, 1).volume_mm3 == status_of(tr, lid, 0).volume_mm3   # carried
    assert not tr.change[1].any() and not tr.change[2][ball(hi, 5)].any()
    assert status_of(tr, id_at(tr, 2, lo), 2).status == "enlarging"               # seen: measured
    # the same inputs without the observed regions: the lesion resolves, then is new again
    tr0 = track_lesions(masks, (1, 1, 1), cfg, flair=flair, brain_mask=brain)
    assert tr0.labels[1][hi] == 0
    assert (tr0.events[(tr0.events.session_index == 1)].status == "resolved").sum() == 1
    assert tr0.change[1][ball(hi, 4)].all()        # drawn as lost (2) then gained (1)
    assert (tr0.change[1][ball(hi, 3)] == 2).all() and (tr0.change[2][ball(hi, 3)] == 1).all()


def test_a_lesion_outside_the_first_visits_field_of_view_is_not_new_later(cfg):
    masks, flair, observed, hi, lo = _three_visits_with_a_slab_missing_the_top()
    order = [1, 0, 2]                        # the visit with the short slab comes first
    masks, flair, observed = ([a[k] for k in order] for a in (masks, flair, observed))
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=flair, brain_mask=np.ones(SHAPE, bool),
                       observed=observed)
    lid = id_at(tr, 1, hi)
    assert id_at(tr, 0, hi) == lid            # carried back from the first visit that saw it
    assert status_of(tr, lid, 1).status == "stable"
    assert not tr.change[1].any()


def test_observed_everywhere_changes_nothing(cfg):
    masks, flair, _, _, _ = _three_visits_with_a_slab_missing_the_top()
    brain = np.zeros(SHAPE, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    kw = dict(flair=flair, brain_mask=brain)
    ref = track_lesions(masks, (1, 1, 1), cfg, **kw)
    outside_brain_only = [None, np.pad(np.ones((34, 34, 34), bool), 1), None]
    for obs in ([None, None, None], outside_brain_only):
        tr = track_lesions(masks, (1, 1, 1), cfg, observed=obs, **kw)
        assert tr.events.equals(ref.events)
        assert all((a == b).all() for a, b in zip(tr.labels, ref.labels))


def test_carry_unobserved_forward_then_backward():
    a = [np.full(4, v, np.float32) for v in (1, 2, 3, 4)]
    obs = [np.array([1, 0, 0, 1], bool), np.array([1, 1, 0, 1], bool),
           np.array([0, 0, 0, 1], bool), np.array([1, 1, 1, 1], bool)]
    out = carry_unobserved(a, obs)
    assert out[0].tolist() == [1, 2, 4, 1]       # voxels 1, 2 first seen at visits 1 and 3
    assert out[1].tolist() == [2, 2, 4, 2]
    assert out[2].tolist() == [2, 2, 4, 3]       # carried forward from visit 1
    assert out[3] is a[3]                        # observed everywhere: untouched
    with_gap = carry_unobserved([a[0], None, a[2], a[3]], obs)
    assert with_gap[1] is None and with_gap[2].tolist() == [1, 4, 4, 3]
    assert carry_unobserved(None, obs) is None and carry_unobserved(a, None) is a


def test_one_visit_with_a_short_slab(cfg):
    """A single visit: nothing to carry from; its lesions are what it observed."""
    masks, flair, observed, hi, lo = _three_visits_with_a_slab_missing_the_top()
    tr = track_lesions(masks[1:2], (1, 1, 1), cfg, flair=flair[1:2],
                       brain_mask=np.ones(SHAPE, bool), observed=observed[1:2])
    assert tr.labels[0][hi] == 0 and tr.labels[0][lo] > 0 and tr.change == [None]
    assert len(tr.events) == 1


def test_observed_input_errors(cfg):
    m = [ball((9, 9, 9), 3)] * 2
    with pytest.raises(TrackingError, match="observed has 1 maps for 2"):
        track_lesions(m, (1, 1, 1), cfg, observed=[None])
    with pytest.raises(TrackingError, match=r"observed\[1\] has shape"):
        track_lesions(m, (1, 1, 1), cfg, observed=[None, np.ones((3, 3, 3), bool)])
