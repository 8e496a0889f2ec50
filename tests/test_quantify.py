"""Tests of lesiontrack.quantify: the lesions and sessions tables."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from lesiontrack.config import load_config
from lesiontrack.image import Image
from lesiontrack.quantify import (LESION_COLUMNS, SESSION_COLUMNS, QuantifyError,
                                  lesion_table, session_table)
from lesiontrack.track import track_lesions

SHAPE = (30, 30, 30)
G = np.indices(SHAPE, dtype=np.float32)
LESION_CONTRACT = ["lesion_id", "session_id", "volume_mm3", "status", "restricted_mm3",
                   "blackhole_mm3", "enhancing_mm3", "centroid_x", "centroid_y", "centroid_z",
                   "merged_into", "split_from"]
SESSION_CONTRACT = ["session_id", "acq_time", "lesion_count", "lesion_volume_mm3", "new_count",
                    "enlarging_count", "resolved_count", "restricted_volume_mm3",
                    "blackhole_volume_mm3", "enhancing_count"]


@dataclass
class Masks:
    """Stand-in for segment.SessionMasks."""

    lesion: np.ndarray
    restricted: np.ndarray
    blackhole: np.ndarray
    enhancing: np.ndarray
    available: set = field(default_factory=lambda: {"restricted", "blackhole", "enhancing"})


def ball(c, r):
    return ((G[0] - c[0]) ** 2 + (G[1] - c[1]) ** 2 + (G[2] - c[2]) ** 2) <= r * r


@pytest.fixture(scope="module")
def case():
    # oblique, anisotropic grid: centroids must come out in world mm
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 1.0, 2.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    grid = Image(np.zeros(SHAPE, np.float32), aff)
    a, b, c = (8, 8, 8), (20, 20, 20), (8, 22, 15)
    lesion = [ball(a, 3) | ball(b, 3), ball(a, 5) | ball(b, 3) | ball(c, 3), ball(a, 5) | ball(c, 3)]
    z = np.zeros(SHAPE, bool)
    masks = [Masks(lesion[0], ball(a, 2), z, ball(b, 1.5)),
             Masks(lesion[1], ball(c, 2), ball(a, 1), z, available={"restricted", "blackhole"}),
             Masks(lesion[2], z, z, z, available={"blackhole", "enhancing"})]
    tr = track_lesions([m.lesion for m in masks], grid.spacing, dict(load_config()["track"]))
    sessions = pd.DataFrame({"session_id": ["ses-01", "ses-02", "ses-03"],
                             "acq_time": ["2020-01-01T00:00:00", "2020-06-01T00:00:00",
                                          "2021-01-01T00:00:00"],
                             "edss": [1.0, 3.5, 2.0], "event": ["", "relapse", "steroids"]})
    return grid, masks, tr, sessions, (a, b, c)


def test_lesion_table(case):
    grid, masks, tr, sessions, (a, b, c) = case
    df = lesion_table(tr, masks, sessions.session_id, grid)
    assert list(df.columns) == LESION_CONTRACT + ["observed_fraction"]
    assert set(LESION_COLUMNS) == set(LESION_CONTRACT) | {"observed_fraction", "location"}
    assert all(set(v) == {"Description", "Units"} for v in LESION_COLUMNS.values())
    ia, ib = tr.labels[0][a], tr.labels[0][b]
    row = df[(df.lesion_id == ia) & (df.session_id == "ses-01")].iloc[0]
    assert row.volume_mm3 == pytest.approx(ball(a, 3).sum() * 2.0)
    assert row.restricted_mm3 == pytest.approx(ball(a, 2).sum() * 2.0)
    assert row.enhancing_mm3 == 0 and row.blackhole_mm3 == 0
    assert np.allclose([row.centroid_x, row.centroid_y, row.centroid_z],
                       grid.world_coords([a])[0])
    rb = df[(df.lesion_id == ib) & (df.session_id == "ses-01")].iloc[0]
    assert rb.enhancing_mm3 == pytest.approx(ball(b, 1.5).sum() * 2.0)
    # enhancement not available at ses-02: NaN, not 0
    assert df[df.session_id == "ses-02"].enhancing_mm3.isna().all()
    assert df[df.session_id == "ses-03"].restricted_mm3.isna().all()
    # b resolved at ses-03: a row with volume 0 and no centroid
    res = df[(df.lesion_id == ib) & (df.session_id == "ses-03")].iloc[0]
    assert res.status == "resolved" and res.volume_mm3 == 0 and np.isnan(res.centroid_x)
    assert df[df.session_id == "ses-02"].status.tolist().count("new") == 1
    assert str(df.lesion_id.dtype) == "Int64" and df.merged_into.isna().all()
    assert (df.observed_fraction[df.volume_mm3 > 0] == 1).all()         # observed everywhere
    assert df.observed_fraction[df.volume_mm3 == 0].isna().all()


def test_lesion_table_observed_fraction(case):
    """A session whose field of view misses a lesion: its share observed is reported, and
    the sub-volumes of a lesion it did not observe at all are n/a, not 0."""
    grid, masks, tr, sessions, (a, b, c) = case
    seen = G[0] < 16                                  # ses-02 misses x >= 16: b whole, a not
    df = lesion_table(tr, masks, sessions.session_id, grid, observed=[None, seen, None])
    row = {(r.lesion_id, r.session_id): r for r in df.itertuples()}
    ia, ib, ic = tr.labels[1][a], tr.labels[1][b], tr.labels[1][c]
    assert row[ib, "ses-02"].observed_fraction == 0
    assert np.isnan(row[ib, "ses-02"].restricted_mm3) and np.isnan(row[ib, "ses-02"].blackhole_mm3)
    assert row[ia, "ses-02"].observed_fraction == 1 and row[ia, "ses-02"].blackhole_mm3 > 0
    assert row[ic, "ses-02"].observed_fraction == 1
    half = G[2] < 15                                   # c centred on z = 15
    df = lesion_table(tr, masks, sessions.session_id, grid, observed=[None, half, None])
    frac = df[(df.lesion_id == ic) & (df.session_id == "ses-02")].observed_fraction.iloc[0]
    assert frac == pytest.approx((ball(c, 3) & half).sum() / ball(c, 3).sum())
    with pytest.raises(QuantifyError, match="observed has 2 maps for 3 sessions"):
        lesion_table(tr, masks, sessions.session_id, grid, observed=[None, seen])
    # the T1w of ses-02 misses a (x < 14), which the FLAIR saw: its black-hole volume is n/a,
    # the other lesions' are measured
    df = lesion_table(tr, masks, sessions.session_id, grid,
                      measures_observed=[None, {"blackhole": G[0] >= 14}, None])
    row = {(r.lesion_id, r.session_id): r for r in df.itertuples()}
    assert np.isnan(row[ia, "ses-02"].blackhole_mm3) and row[ia, "ses-02"].observed_fraction == 1
    assert row[ia, "ses-02"].restricted_mm3 == 0 and row[ib, "ses-02"].blackhole_mm3 == 0
    with pytest.raises(QuantifyError, match="measures_observed has 1 maps"):
        lesion_table(tr, masks, sessions.session_id, grid, measures_observed=[None])


def test_lesion_table_location(case):
    grid, masks, tr, sessions, (a, b, c) = case

    class Priors:   # a's ball touches the periventricular zone with 1 voxel row only
        location = np.where(G[0] <= 5, 1, np.where(G[1] >= 22, 3, 4)).astype(np.uint8)

    df = lesion_table(tr, masks, sessions.session_id, grid, priors=Priors())
    assert list(df.columns) == LESION_CONTRACT + ["observed_fraction", "location"]
    loc = dict(zip(zip(df.lesion_id, df.session_id), df.location))
    assert loc[(tr.labels[0][a], "ses-01")] == "periventricular"      # touching wins
    assert loc[(tr.labels[0][b], "ses-01")] == "deep white matter"    # minority infratentorial
    assert loc[(tr.labels[1][c], "ses-02")] == "infratentorial"       # majority
    assert loc[(tr.labels[0][b], "ses-03")] == ""                     # resolved


def test_session_table(case):
    grid, masks, tr, sessions, (a, b, c) = case
    les = lesion_table(tr, masks, sessions.session_id, grid)
    df = session_table(tr, masks, sessions, grid, les)
    assert list(df.columns) == SESSION_CONTRACT + ["neda", "brain_observed_fraction", "edss", "event"]
    assert set(SESSION_COLUMNS) == set(SESSION_CONTRACT + ["neda", "brain_observed_fraction"])
    assert (df.brain_observed_fraction == 1).all()
    part = session_table(tr, masks, sessions, grid, les, brain_observed=[1.0, 0.85, 1.0])
    assert part.brain_observed_fraction.tolist() == [1.0, 0.85, 1.0]
    with pytest.raises(QuantifyError, match="brain_observed has 2 values for 3 sessions"):
        session_table(tr, masks, sessions, grid, les, brain_observed=[1.0, 1.0])
    assert df.lesion_count.tolist() == [2, 3, 2]
    assert df.lesion_volume_mm3.iloc[1] == pytest.approx(masks[1].lesion.sum() * 2.0)
    assert df.new_count.tolist()[1:] == [1, 0]
    assert df.enlarging_count.iloc[1] == 1 and df.resolved_count.tolist() == [0, 0, 1]
    assert df.enhancing_count.iloc[0] == 1 and pd.isna(df.enhancing_count.iloc[1])
    assert np.isnan(df.restricted_volume_mm3.iloc[2])
    assert df.blackhole_volume_mm3.iloc[1] == pytest.approx(ball(a, 1).sum() * 2.0)
    # neda: empty first; active interval -> False; quiet interval with enhancement known -> True
    assert pd.isna(df.neda.iloc[0])
    assert bool(df.neda.iloc[1]) is False       # bool(pd.NA) would raise
    assert bool(df.neda.iloc[2]) is True
    assert df.edss.tolist() == [1.0, 3.5, 2.0]


def test_mismatched_inputs(case):
    grid, masks, tr, sessions, _ = case
    with pytest.raises(QuantifyError, match="sessions"):
        lesion_table(tr, masks[:2], sessions.session_id, grid)
    with pytest.raises(QuantifyError, match="session_id"):
        session_table(tr, masks, sessions.drop(columns="session_id"), grid, None)
