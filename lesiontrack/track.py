"""Longitudinal lesion tracking: identities, statuses, change maps and events.

:func:`track_lesions` takes every visit's lesion mask on the subject grid and follows
each lesion through time:

* **identity** — connected components of consecutive visits are matched by voxel
  overlap as a bipartite graph (:mod:`lesiontrack._track_match`); splits keep the
  lineage in the part with the largest overlap and give the other parts new IDs with
  ``split_from``; merges give the confluent lesion the ID of its largest-overlap
  predecessor and record ``merged_into`` for the others, whose voxels carry the
  surviving ID in later ``labels`` maps; the footprint of a resolved lesion is
  remembered, and a lesion reappearing there gets its old ID back;
* **status** — new / enlarging / stable / shrinking / resolved by the rules of
  :mod:`lesiontrack._track_status` (a minimum detectable change; with FLAIR, the
  volume change measured on the subtraction image by a boundary shift integral, confirmed
  on the T2w subtraction where both visits have T2w, and subtraction evidence for new
  lesions and drawn change), documented in ``docs/tracking.md``;
* **change maps** — 1 where a new or enlarging lesion gained voxels, 2 where a
  shrinking or resolved lesion lost voxels, in connected components that are a
  detectable change themselves; boundary changes of stable lesions are not drawn;
* **hysteresis across time** — given the segmentation's lesion scores (``lesion_z``),
  a lesion one visit missed is taken from a neighbouring visit where it reaches the
  growth level (``rescue_missed``, :func:`lesiontrack._track_detect.rescue_missed`);
* **image-driven detection** — given the segmentation's lesion scores (``lesion_z``),
  significant FLAIR change (false-discovery-rate controlled) in voxels that changed
  lesion status is added first (:mod:`lesiontrack._track_detect`), so lesions the
  per-visit segmentations missed are tracked and drawn too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._reg_core import parallel_map
from ._track_detect import detect_change, fdr_threshold, rescue_missed
from ._track_match import _first_per_group, label_components, match_components
from ._track_status import (ENLARGING, NEW, RESOLVED, SHRINKING, STABLE, STATUS,
                            DifferenceEvidence, agreeing_shift, boundary_shell,
                            boundary_shift_change, detectable_change, volume_status)

__all__ = ["Tracking", "TrackingError", "track_lesions", "carry_unobserved", "EVENT_COLUMNS"]

EVENT_COLUMNS = ["lesion_id", "session_index", "status", "merged_into", "split_from", "volume_mm3"]
_KEYS = {"connectivity": int, "min_overlap_voxels": int, "min_change_mm3": float,
         "size_boundary_mm3": float, "enlarge_rel_small": float, "enlarge_rel_large": float,
         "boundary_shift_voxels": float, "mdc_z": float, "min_intensity_z": float,
         "min_voxel_change_z": float, "background_mm": float, "baseline_status": str,
         "merged_status": str, "remember_resolved": bool, "change_fdr_q": float,
         "change_lesion_z": float, "change_absent_z": float, "rescue_missed": bool,
         "min_relative_change": float, "confirm_with_t2w": bool}


class TrackingError(ValueError):
    """Inputs or settings of the tracking step are unusable."""


@dataclass
class Tracking:
    """Result of :func:`track_lesions`.

    Attributes
    ----------
    labels : list of ndarray (int32)
        Lesion-ID map per session; the same ID marks the same lesion at every
        session (IDs >= 1, 0 = background). After a merge the confluent lesion
        carries the surviving ID only.
    change : list of (ndarray (uint8) or None)
        None for the first session; else 1 = voxels that became lesion since the
        previous session, 2 = voxels that stopped being lesion (detectable changes only).
    events : DataFrame
        One row per lesion per session from its first appearance up to and including
        the session where it resolves or merges (volume 0), and again if it comes back.
        Columns ``lesion_id, session_index, status, merged_into, split_from,
        volume_mm3`` (ids as nullable Int64).
    intervals : DataFrame
        One row per interval (``session_index`` of its second visit): counts of
        ``new, enlarging, stable, shrinking, resolved, merged, split`` lesions,
        ``gained_mm3``/``lost_mm3`` (change-map volumes), ``noise_sd`` (robust SD of
        the FLAIR difference, NaN without FLAIR) and ``neda_t2`` (no new or enlarging
        lesion).
    """

    labels: list
    change: list
    events: pd.DataFrame
    intervals: pd.DataFrame


def _check_cfg(cfg: dict) -> dict:
    missing = sorted(set(_KEYS) - set(cfg))
    if missing:
        raise TrackingError(f"[track] config is missing {', '.join(missing)}")
    out = {k: _KEYS[k](cfg[k]) for k in _KEYS}
    if out["connectivity"] not in (1, 2, 3):
        raise TrackingError(f"[track] connectivity must be 1, 2 or 3 (6-, 18-, 26-neighbourhood), "
                            f"got {cfg['connectivity']}")
    for k in ("min_change_mm3", "size_boundary_mm3", "enlarge_rel_small", "enlarge_rel_large",
              "boundary_shift_voxels", "mdc_z", "min_intensity_z", "min_voxel_change_z", "background_mm",
              "change_lesion_z", "change_absent_z", "min_relative_change"):
        if not out[k] >= 0:
            raise TrackingError(f"[track] {k} must be >= 0, got {cfg[k]}")
    if not 0 <= out["change_fdr_q"] < 1:
        raise TrackingError(f"[track] change_fdr_q must lie in [0, 1) (0 = no change detection), "
                            f"got {cfg['change_fdr_q']}")
    for k, allowed in (("baseline_status", ("new", "stable")), ("merged_status", ("stable", "resolved"))):
        if out[k] not in allowed:
            raise TrackingError(f"[track] {k} must be one of {', '.join(allowed)}, got {cfg[k]!r}")
    return out


def _check_inputs(masks, spacing, flair, brain_mask, lesion_z=None, t2w=None):
    if len(masks) == 0:
        raise TrackingError("track_lesions: lesion_masks is empty; at least one session is needed")
    masks = [np.asarray(m) for m in masks]
    shape = masks[0].shape
    for i, m in enumerate(masks):
        if m.ndim != 3 or m.shape != shape:
            raise TrackingError(f"lesion_masks[{i}] has shape {m.shape}; all sessions must share "
                                f"one 3D grid {shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise TrackingError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
    for name, per_session, what in (("flair", flair, "images"), ("t2w", t2w, "images"),
                                    ("lesion_z", lesion_z, "maps")):
        if per_session is None:
            continue
        if len(per_session) != len(masks):
            raise TrackingError(f"{name} has {len(per_session)} {what} for {len(masks)} lesion masks")
        for i, a in enumerate(per_session):
            if a is not None and np.shape(a) != shape:
                raise TrackingError(f"{name}[{i}] has shape {np.shape(a)}, the masks {shape}")
    if brain_mask is not None and np.shape(brain_mask) != shape:
        raise TrackingError(f"brain_mask has shape {np.shape(brain_mask)}, the masks {shape}")
    return [m > 0 for m in masks], spacing


def _rows(ids, index, status, vol_mm3, merged_into=None, split_from=None) -> pd.DataFrame:
    n = len(ids)

    def ids_or_na(a):
        a = np.zeros(n, np.int64) if a is None else np.asarray(a, dtype=np.int64)
        out = pd.array(a, dtype="Int64")
        out[a <= 0] = pd.NA
        return out

    return pd.DataFrame({
        "lesion_id": pd.array(np.asarray(ids, dtype=np.int64), dtype="Int64"),
        "session_index": np.full(n, index, dtype=np.int64),
        "status": pd.Series(STATUS[np.asarray(status, dtype=np.int64)], dtype=object),
        "merged_into": ids_or_na(merged_into),
        "split_from": ids_or_na(split_from),
        "volume_mm3": np.asarray(vol_mm3, dtype=np.float64),
    })


class _State:
    """What is carried from one session to the next."""

    def __init__(self, lab, n, ids, mask):
        self.lab, self.n, self.ids, self.mask = lab, n, ids, mask


def track_lesions(lesion_masks, spacing, cfg: dict, flair=None, brain_mask=None,
                  lesion_z=None, t2w=None, observed=None) -> Tracking:
    """Follow every lesion through the sessions.

    Parameters
    ----------
    lesion_masks : list of ndarray (bool)
        Lesion mask per session, in time order, all on the subject grid.
    spacing : sequence of 3 float
        Voxel size in mm.
    cfg : dict
        The ``[track]`` configuration section.
    flair : list of (ndarray or None), optional
        Intensity-normalised FLAIR per session on the same grid (None where missing);
        used for the image evidence of new / enlarging / shrinking / resolved lesions.
    brain_mask : ndarray (bool), optional
        Region for the noise estimate of the FLAIR difference.
    lesion_z : list of (ndarray or None), optional
        Lesion score per session (:func:`lesiontrack.segment.lesion_zmap`). Given with
        ``flair`` and ``brain_mask`` (and ``change_fdr_q`` > 0), significant FLAIR change
        in voxels that look like lesion at the brighter visit is added to the masks
        before tracking (:mod:`lesiontrack._track_detect`): lesions the per-visit
        segmentation missed are then tracked and drawn in the change maps.
    t2w : list of (ndarray or None), optional
        Intensity-normalised T2w per session as acquired (None where missing; never an
        imputed image), with ``flair``. With ``confirm_with_t2w``, an interval whose two
        visits both have T2w measures each continuing lesion's volume change on the T2w
        subtraction too, and counts the change only as far as the two independent
        acquisitions agree (:func:`lesiontrack._track_status.agreeing_shift`).
    observed : list of (ndarray (bool) or None), optional
        Per session, where its images observe the tissue (inside the fields of view of
        its lesion contrasts; None: everywhere). Where a session did not observe a
        voxel, its lesion mask, images and scores there are carried from the last session
        that did (the first later one for voxels no earlier session observed; see
        :func:`carry_unobserved`): a lesion outside one visit's field of view is not
        called resolved there and new at the next, and the change is measured where
        both visits observed the tissue. The returned ``labels`` hold the carried
        lesions, so volumes count them.

    Returns
    -------
    Tracking
    """
    c = _check_cfg(cfg)
    masks, spacing = _check_inputs(lesion_masks, spacing, flair, brain_mask, lesion_z, t2w)
    if not c["confirm_with_t2w"]:
        t2w = None
    full_shape = masks[0].shape
    brain = None if brain_mask is None else np.asarray(brain_mask) > 0
    observed = _check_observed(observed, len(masks), full_shape, brain)
    if observed is not None:
        masks = carry_unobserved(masks, observed)
        flair, t2w, lesion_z = (carry_unobserved(a, observed) for a in (flair, t2w, lesion_z))
    detected = [None] * len(masks)
    if lesion_z is not None and brain is not None and c["rescue_missed"] and len(masks) > 1:
        masks = carry_unobserved(rescue_missed(masks, lesion_z, flair, brain, spacing, c,
                                               observed=observed), observed)
    if flair is not None and lesion_z is not None and brain is not None and c["change_fdr_q"] > 0:
        masks, detected = _add_detected_change(masks, flair, lesion_z, brain, spacing, c, observed)
        masks = carry_unobserved(masks, observed)
    # all lesion work happens in this box (holding the detected losses too)
    box = _bbox(masks + [d[1] for d in detected if d is not None])
    masks = [m[box] for m in masks]
    vv = float(np.prod(spacing))
    base_status = NEW if c["baseline_status"] == "new" else STABLE
    merged_status = STABLE if c["merged_status"] == "stable" else RESOLVED

    lab, n = label_components(masks[0], c["connectivity"])
    ids = np.arange(n + 1, dtype=np.int64)
    next_id = n + 1
    labels = [ids[lab].astype(np.int32)]
    change = [None]
    vol = np.bincount(lab.ravel(), minlength=n + 1)
    events = [_rows(ids[1:], 0, np.full(n, base_status), vol[1:] * vv)]
    intervals = []
    memory = np.zeros(lab.shape, np.int32) if c["remember_resolved"] else None
    first_seen = np.zeros(n + 1, np.int64)       # session where each lesion ID first appeared
    state = _State(lab, n, ids, masks[0])

    for t in range(1, len(masks)):
        lab, n = label_components(masks[t], c["connectivity"])
        ev = ev2 = None
        if flair is not None and flair[t] is not None and flair[t - 1] is not None:
            lesions = np.zeros(full_shape, bool)
            lesions[box] = state.mask | masks[t]
            pairs = [(flair[t - 1], flair[t])]
            if t2w is not None and t2w[t] is not None and t2w[t - 1] is not None:
                pairs.append((t2w[t - 1], t2w[t]))
            # the two subtractions side by side (numpy and ndimage release the GIL)
            seen = _both_observed(brain, observed, t - 1, t)
            evs = parallel_map(lambda p: DifferenceEvidence(p[0], p[1], seen, lesions, spacing,
                                                            c["background_mm"], crop=box), pairs)
            ev, ev2 = evs[0], (evs[1] if len(evs) > 1 else None)
        det = None if detected[t] is None else tuple(a[box] for a in detected[t])
        out = _step(t, state, lab, n, masks[t], ev, memory, first_seen, next_id, c, vv,
                    merged_status, det, ev2)
        first_seen = np.concatenate([first_seen, np.full(out["next_id"] - next_id, t, np.int64)])
        next_id = out["next_id"]
        labels.append(out["ids"][lab].astype(np.int32))
        change.append(out["change"])
        events.append(out["events"])
        cnt = np.bincount(out["status_all"], minlength=5)
        intervals.append({"session_index": t, "new": cnt[NEW], "enlarging": cnt[ENLARGING],
                          "stable": cnt[STABLE], "shrinking": cnt[SHRINKING],
                          "resolved": cnt[RESOLVED], "merged": out["n_merged"],
                          "split": out["n_split"],
                          "gained_mm3": float(np.count_nonzero(out["change"] == 1)) * vv,
                          "lost_mm3": float(np.count_nonzero(out["change"] == 2)) * vv,
                          "noise_sd": ev.sigma if ev is not None else np.nan,
                          "neda_t2": bool(cnt[NEW] + cnt[ENLARGING] == 0)})
        state = _State(lab, n, out["ids"], masks[t])

    ev_df = pd.concat(events, ignore_index=True)
    ev_df = ev_df.sort_values(["session_index", "lesion_id"], kind="stable").reset_index(drop=True)
    iv = pd.DataFrame(intervals, columns=["session_index", "new", "enlarging", "stable",
                                          "shrinking", "resolved", "merged", "split",
                                          "gained_mm3", "lost_mm3", "noise_sd", "neda_t2"])
    return Tracking([_paste(a, box, full_shape) for a in labels],
                    [None if a is None else _paste(a, box, full_shape) for a in change],
                    ev_df[EVENT_COLUMNS], iv)


def _check_observed(observed, n: int, shape, brain):
    """The sessions' observed regions as bool arrays, each True outside the brain (no
    lesion is carried there); None when every session observed the whole brain."""
    if observed is None:
        return None
    if len(observed) != n:
        raise TrackingError(f"observed has {len(observed)} maps for {n} lesion masks")
    out = []
    for i, o in enumerate(observed):
        if o is None:
            out.append(np.ones(shape, bool))
            continue
        if np.shape(o) != shape:
            raise TrackingError(f"observed[{i}] has shape {np.shape(o)}, the masks {shape}")
        o = np.asarray(o, dtype=bool)
        out.append(o | ~brain if brain is not None else o)
    return None if all(o.all() for o in out) else out


def carry_unobserved(arrays, observed):
    """Per session, ``arrays`` with the voxels its session did not observe taken from the
    last earlier session that did (last observation carried forward) and, where no
    earlier session did, from the first later one that did (next observation carried
    backward). Sessions whose array is None are skipped; arrays of sessions that
    observed everything are returned as they are (not copied).

    Parameters
    ----------
    arrays : list of (ndarray or None) or None
    observed : list of ndarray (bool) or None
        As returned by :func:`_check_observed` (None: returned unchanged).
    """
    if arrays is None or observed is None:
        return arrays
    out = list(arrays)
    have = [t for t, a in enumerate(out) if a is not None]
    seen_before = None                       # voxels an earlier session observed
    seen_by = {}
    for k, t in enumerate(have):             # loop over sessions: forward
        if k > 0 and not observed[t].all():
            out[t] = np.where(observed[t], out[t], out[have[k - 1]])
        seen_before = observed[t].copy() if seen_before is None else seen_before | observed[t]
        seen_by[t] = None if seen_before.all() else seen_before.copy()
    for k in range(len(have) - 2, -1, -1):   # loop over sessions: backward
        t = have[k]
        if seen_by[t] is not None:
            out[t] = np.where(seen_by[t], out[t], out[have[k + 1]])
    return out


def _both_observed(brain, observed, t0: int, t1: int):
    """The brain where both sessions observed the tissue (the noise region of their
    subtraction: carried voxels do not change)."""
    if observed is None or brain is None:
        return brain
    return brain & observed[t0] & observed[t1]


def _add_detected_change(masks, flair, lesion_z, brain, spacing, c, observed=None):
    """Masks with the image-detected gains added (a lesion the segmentation missed is
    then tracked), and the detected ``(gain, loss)`` per session (None for the first
    session and where an image is missing)."""
    masks = [m.copy() for m in masks]
    detected = [None] * len(masks)
    vv = float(np.prod(spacing))
    for t in range(1, len(masks)):                   # loop over intervals
        if any(a is None for a in (flair[t - 1], flair[t], lesion_z[t - 1], lesion_z[t])):
            continue
        seen = _both_observed(brain, observed, t - 1, t)
        ev = DifferenceEvidence(flair[t - 1], flair[t], seen, masks[t - 1] | masks[t], spacing,
                                c["background_mm"])
        gain, loss = detect_change(ev, np.asarray(lesion_z[t - 1]), np.asarray(lesion_z[t]),
                                   seen, c["connectivity"], vv, c, f_prev=flair[t - 1],
                                   f_cur=flair[t], spacing=spacing, masks=(masks[t - 1], masks[t]))
        masks[t] |= gain
        detected[t] = (gain, loss)
    return masks, detected


def _bbox(masks, margin: int = 2):
    """Slices of the box holding every session's lesions (plus a margin)."""
    union = np.zeros(masks[0].shape, bool)
    for m in masks:                                  # loop over sessions
        union |= m
    if not union.any():
        return (slice(0, 1),) * 3
    box = []
    for ax in range(3):                              # loop over the three axes
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(int(hit[0]) - margin, 0),
                         min(int(hit[-1]) + margin + 1, union.shape[ax])))
    return tuple(box)


def _paste(a: np.ndarray, box, shape) -> np.ndarray:
    out = np.zeros(shape, a.dtype)
    out[box] = a
    return out


def _step(t, prev: _State, lab, n, mask, ev, memory, first_seen, next_id, c, vv,
          merged_status, det=None, ev2=None) -> dict:
    """Match one session to the previous one; IDs, statuses, change map, event rows.

    ``det``: image-detected ``(gain, loss)`` of the interval (significant change by the
    detector's own test), counted as confirmed change of at least ``min_change_mm3``.
    ``ev2``: the T2w subtraction of the interval, a second measurement of each continuing
    lesion's volume change (:func:`agreeing_shift`).
    """
    m = match_components(prev.lab, prev.n, lab, n, c["min_overlap_voxels"],
                         prev_rank=first_seen[prev.ids])
    ids = np.zeros(n + 1, dtype=np.int64)
    split_from = np.zeros(n + 1, dtype=np.int64)
    keep = np.flatnonzero(m.keeps)
    ids[keep] = prev.ids[m.parent[keep]]
    child = np.flatnonzero((m.parent > 0) & ~m.keeps)
    ids[child] = np.arange(next_id, next_id + child.size)
    split_from[child] = prev.ids[m.parent[child]]
    next_id += child.size

    cand = np.flatnonzero((m.parent == 0) & (np.arange(n + 1) > 0))
    is_cand = np.zeros(n + 1, bool)
    is_cand[cand] = True
    if memory is not None and cand.size:
        _reuse_ids(ids, lab, is_cand, memory)
    fresh = cand[ids[cand] == 0]
    ids[fresh] = np.arange(next_id, next_id + fresh.size)
    next_id += fresh.size

    # ---- volumes, lineage and the volume rule
    vol0 = np.bincount(prev.lab.ravel(), minlength=prev.n + 1).astype(np.float64) * vv
    vol1 = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64) * vv
    shell0 = boundary_shell(prev.lab, prev.n).astype(np.float64)
    v0 = np.bincount(m.dest[1:], weights=vol0[1:], minlength=n + 1)
    s0 = np.bincount(m.dest[1:], weights=shell0[1:], minlength=n + 1)
    sib = np.bincount(m.parent[child], weights=vol1[child], minlength=prev.n + 1)
    v1 = vol1 + np.where(m.keeps, sib[m.parent], 0.0)
    status = volume_status(v0, v1, s0, vv, c)

    vanished = (m.dest == 0)
    vanished[0] = False
    new_ok = vol1 >= c["min_change_mm3"]
    if ev is not None:                         # a new lesion must be new in the images
        z_new, eff_new = ev.scores(np.where(is_cand[lab], lab, 0), n)
        new_ok &= (z_new >= c["min_intensity_z"]) & (eff_new >= c["min_voxel_change_z"])
    if det is not None:                        # or hold a detected gain of its own
        det_gain, det_loss = det
        new_ok |= np.bincount(lab[det_gain & ~prev.mask], minlength=n + 1) * vv >= c["min_change_mm3"]
    status[cand] = np.where(new_ok[cand], NEW, STABLE)
    lineage = np.arange(n + 1)
    lineage[child] = m.dest[m.parent[child]]
    status[child] = status[lineage[child]]

    # change map: gained / lost voxels in connected components that are themselves a
    # detectable change (see docs/tracking.md); with FLAIR, the confirmed gross change
    # of a lesion decides enlarging / shrinking
    gain = _confirmed(mask & ~prev.mask, +1, ev, c, vv)
    loss = _confirmed(prev.mask & ~mask, -1, ev, c, vv)
    cont = ~is_cand
    cont[0] = False
    if ev is not None:
        # the lesion's volume change measured in the images (boundary shift integral):
        # a moved or jittering outline sums to about zero, partial volume counts
        dv, sd = boundary_shift_change(m.dest[prev.lab], lineage[lab], n, ev, vv)
        if ev2 is not None:
            dv, sd = agreeing_shift(dv, sd, *boundary_shift_change(m.dest[prev.lab], lineage[lab],
                                                                   n, ev2, vv))
        need_b = np.maximum(np.maximum(c["min_change_mm3"], c["mdc_z"] * sd),
                            c["min_relative_change"] * v0)
        st = np.full(n + 1, STABLE, np.int8)
        st[dv >= need_b] = ENLARGING
        st[-dv >= need_b] = SHRINKING
        if det is not None:
            need = detectable_change(v0, s0, vv, c, relative=False)                    # detected change: significant by its own test
            up_d = np.bincount(lineage[lab[det_gain]], minlength=n + 1) * vv
            down_d = np.bincount(m.dest[prev.lab[det_loss & prev.mask]], minlength=n + 1) * vv
            free = (st == STABLE) & cont       # only the detected voxels are drawn for these
            st[free & (up_d - down_d >= need)] = ENLARGING
            st[free & (down_d - up_d >= need)] = SHRINKING
            gain &= ~free[lineage][lab]
            loss &= ~free[m.dest][prev.lab]
        status[cont] = st[lineage][cont]
    else:
        up = np.bincount(lineage[lab[gain]], minlength=n + 1)
        down = np.bincount(m.dest[prev.lab[loss]], minlength=n + 1)
        status[(status == ENLARGING) & ~(up[lineage] > 0)] = STABLE
        status[(status == SHRINKING) & ~(down[lineage] > 0)] = STABLE
    grow = (status == NEW) | (status == ENLARGING)
    shrink = ((status[m.dest] == SHRINKING) & ~vanished) | vanished
    shrink[0] = False
    chg = np.zeros(mask.shape, np.uint8)
    chg[gain & grow[lab]] = 1
    chg[loss & shrink[prev.lab]] = 2
    if det is not None:          # detected change: lesion-like and significantly changed
        chg[det_gain & grow[lab]] = 1
        chg[det_loss & (shrink[prev.lab] | (prev.lab == 0))] = 2

    if memory is not None and vanished.any():
        foot = vanished[prev.lab]
        memory[foot] = prev.ids[prev.lab[foot]]

    merged = np.flatnonzero(m.merged)
    gone = np.flatnonzero(vanished)
    rows = [_rows(ids[1:], t, status[1:], vol1[1:], split_from=split_from[1:]),
            _rows(prev.ids[gone], t, np.full(gone.size, RESOLVED), np.zeros(gone.size)),
            _rows(prev.ids[merged], t, np.full(merged.size, merged_status), np.zeros(merged.size),
                  merged_into=ids[m.dest[merged]])]
    df = pd.concat([r for r in rows if len(r)] or rows[:1], ignore_index=True)
    return {"ids": ids, "next_id": next_id, "change": chg, "events": df,
            "status_all": np.concatenate([status[1:], np.full(gone.size, RESOLVED)]).astype(np.int64),
            "n_merged": int(merged.size), "n_split": int(child.size)}


def _reuse_ids(ids, lab, is_cand, memory) -> None:
    """Give candidate new lesions the ID of the resolved lesion whose footprint they
    overlap most (one candidate per remembered ID); updates ``ids`` and ``memory``."""
    sel = is_cand[lab] & (memory > 0)
    if not sel.any():
        return
    base = int(memory.max()) + 1
    uk, w = np.unique(lab[sel].astype(np.int64) * base + memory[sel], return_counts=True)
    comp, mid = uk // base, uk % base
    best = _first_per_group(comp, -w, mid)                 # best remembered ID per candidate
    comp, mid, w = comp[best], mid[best], w[best]
    uniq = _first_per_group(mid, -w, comp)                 # one candidate per remembered ID
    ids[comp[uniq]] = mid[uniq]
    memory[np.isin(memory, mid[uniq])] = 0


def _confirmed(cand: np.ndarray, sign: int, ev, c: dict, vv: float) -> np.ndarray:
    """Voxels of ``cand`` in connected components that are a detectable change.

    A component counts when its volume reaches ``min_change_mm3`` and, with FLAIR
    evidence, its FLAIR change has the right sign (``sign``), a score of at least
    ``min_intensity_z`` (significance) and a median change of at least
    ``min_voxel_change_z`` voxel noise SDs (size: a large region drifting slightly
    is significant without any voxel having changed lesion status).
    """
    lab, k = label_components(cand, c["connectivity"])
    if k == 0:
        return cand
    ok = np.bincount(lab.ravel(), minlength=k + 1) * vv >= c["min_change_mm3"]
    if ev is not None:
        z, eff = ev.scores(lab, k)
        z, eff = np.nan_to_num(sign * z), np.nan_to_num(sign * eff)
        ok &= eff >= c["min_voxel_change_z"]
        thr = c["min_intensity_z"]
        if c["change_fdr_q"] > 0 and ok[1:].any():
            # every candidate region is a test: one-sided Benjamini-Hochberg over them
            thr = max(thr, fdr_threshold(np.maximum(z[1:][ok[1:]], 0.0), 2 * c["change_fdr_q"]))
        ok &= z >= thr
    ok[0] = False
    return ok[lab]
