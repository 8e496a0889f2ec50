"""Per-lesion and per-session statistics of a tracked subject (the contract's tables).

:func:`lesion_table` gives ``sub-<s>_desc-lesions_stats.tsv`` and :func:`session_table`
``sub-<s>_desc-sessions_stats.tsv``; :data:`LESION_COLUMNS` and :data:`SESSION_COLUMNS`
describe every column for the JSON sidecars (``location`` only appears with priors;
the clinical columns of ``sessions.tsv`` keep the descriptions of its own sidecar).
Everything is computed once per session over all lesion labels at a time
(``np.bincount`` / ``scipy.ndimage`` with an index array); a measure whose contrast is
missing at a session is NaN there, not zero.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .image import Image

__all__ = ["lesion_table", "session_table", "LESION_COLUMNS", "SESSION_COLUMNS",
           "QuantifyError", "LOCATION_NAMES"]

LOCATION_NAMES = np.array(["none", "periventricular", "juxtacortical", "infratentorial",
                           "deep white matter"], dtype=object)
_MEASURES = ("restricted", "blackhole", "enhancing")

LESION_COLUMNS = {
    "lesion_id": {"Description": "Lesion identifier; the label value of this lesion in every "
                                 "session's space-individual desc-lesions_dseg map", "Units": "n/a"},
    "session_id": {"Description": "Session, as in sessions.tsv", "Units": "n/a"},
    "volume_mm3": {"Description": "T2/FLAIR lesion volume at this session (0 when resolved "
                                  "or merged)", "Units": "mm^3"},
    "status": {"Description": "new | enlarging | stable | shrinking | resolved, relative to the "
                              "previous session, by the rules of docs/tracking.md",
               "Units": "n/a"},
    "restricted_mm3": {"Description": "Volume of the lesion with restricted diffusion (n/a "
                                      "without DWI at this session, or when the lesion lies "
                                      "wholly outside its field of view)", "Units": "mm^3"},
    "blackhole_mm3": {"Description": "Volume of the lesion that is a T1 black hole (n/a "
                                     "without T1w at this session, or when the lesion lies "
                                     "wholly outside its field of view)", "Units": "mm^3"},
    "enhancing_mm3": {"Description": "Volume of the lesion enhancing after gadolinium (n/a "
                                     "without contrast-enhanced T1w at this session, or when "
                                     "the lesion lies wholly outside its field of view)",
                      "Units": "mm^3"},
    "centroid_x": {"Description": "Lesion centre of mass, x (RAS world coordinate of the "
                                  "individual space; n/a when the volume is 0)", "Units": "mm"},
    "centroid_y": {"Description": "Lesion centre of mass, y (RAS)", "Units": "mm"},
    "centroid_z": {"Description": "Lesion centre of mass, z (RAS)", "Units": "mm"},
    "merged_into": {"Description": "lesion_id of the lesion this one joined at this session "
                                   "(empty otherwise)", "Units": "n/a"},
    "split_from": {"Description": "lesion_id of the lesion this one came out of at this "
                                  "session (empty otherwise)", "Units": "n/a"},
    "observed_fraction": {"Description": "Share of the lesion's voxels at this session that "
                                         "lie inside the session's field of view (its FLAIR and "
                                         "T2w): 1 when fully observed; below 1 the rest, and its "
                                         "volume, is carried from the nearest session that "
                                         "observed it (restricted, black-hole and enhancing "
                                         "volumes count the observed part only; n/a when none "
                                         "of it was observed, or when the volume is 0)",
                          "Units": "n/a"},
    "location": {"Description": "Location class (present when anatomical priors were "
                                "computed): infratentorial when mostly so, else "
                                "periventricular or juxtacortical when touching that zone, "
                                "else deep white matter, or none", "Units": "n/a"},
}

SESSION_COLUMNS = {
    "session_id": {"Description": "Session, as in sessions.tsv", "Units": "n/a"},
    "acq_time": {"Description": "Acquisition date and time (ISO 8601), from sessions.tsv",
                 "Units": "n/a"},
    "lesion_count": {"Description": "Number of T2/FLAIR lesions present", "Units": "count"},
    "lesion_volume_mm3": {"Description": "Total T2/FLAIR lesion volume", "Units": "mm^3"},
    "new_count": {"Description": "Lesions with status new (at the first session: the lesions "
                                 "present, when the pipeline counts baseline lesions as new)",
                  "Units": "count"},
    "enlarging_count": {"Description": "Lesions with status enlarging", "Units": "count"},
    "resolved_count": {"Description": "Lesions with status resolved (not counting lesions "
                                      "that merged into another)", "Units": "count"},
    "restricted_volume_mm3": {"Description": "Total volume with restricted diffusion (n/a "
                                             "without DWI)", "Units": "mm^3"},
    "blackhole_volume_mm3": {"Description": "Total T1 black-hole volume (n/a without T1w)",
                             "Units": "mm^3"},
    "enhancing_count": {"Description": "Number of gadolinium-enhancing lesions (n/a without "
                                       "contrast-enhanced T1w)", "Units": "count"},
    "neda": {"Description": "No evidence of disease activity on MRI over the interval ending "
                            "at this session: no new or enlarging T2 lesion and no enhancing "
                            "lesion (empty for the first session, or when enhancement is "
                            "unknown)", "Units": "n/a"},
    "brain_observed_fraction": {"Description": "Share of the brain inside this session's "
                                               "FLAIR/T2w field of view; lesions in the rest "
                                               "are carried from the nearest session that "
                                               "observed them (see observed_fraction in the "
                                               "lesions table)", "Units": "n/a"},
}


class QuantifyError(ValueError):
    """Inputs of the quantification step do not fit together."""


def _available(m, what: str) -> bool:
    avail = getattr(m, "available", None)
    return getattr(m, what, None) is not None and (avail is None or what in avail)


def _check(tracking, masks, n_ids: int, grid: Image):
    n = len(tracking.labels)
    if len(masks) != n or n_ids != n:
        raise QuantifyError(f"tracking has {n} sessions but {len(masks)} masks and {n_ids} "
                            "session ids were given")
    if tracking.labels[0].shape != grid.shape[:3]:
        raise QuantifyError(f"tracking labels have shape {tracking.labels[0].shape}, the grid "
                            f"{grid.shape[:3]}")


def lesion_table(tracking, masks, session_ids, grid: Image, priors=None,
                 observed=None, measures_observed=None) -> pd.DataFrame:
    """One row per lesion per session (``desc-lesions_stats`` contract columns).

    Parameters
    ----------
    tracking : Tracking
        Result of :func:`lesiontrack.track.track_lesions`.
    masks : list of SessionMasks
        Per session, with bool arrays ``restricted``, ``blackhole``, ``enhancing`` and
        the set ``available`` of measures that could be computed.
    session_ids : list of str
        Session labels in time order (e.g. ``ses-01``).
    grid : Image
        The individual space (affine for the centroids, voxel volume).
    priors : Priors, optional
        With a ``location`` array: adds a ``location`` column.
    observed : list of (ndarray (bool) or None), optional
        Per session, where it observed the tissue (None: everywhere), for the
        ``observed_fraction`` column (see :func:`lesiontrack.track.track_lesions`).
    measures_observed : list of (dict or None), optional
        Per session, for a measure (``restricted``, ``blackhole``, ``enhancing``) whose
        contrast's field of view missed part of the brain, where it observed: a lesion
        wholly outside it has that volume n/a (NaN), not 0.

    Returns
    -------
    DataFrame
    """
    session_ids = list(session_ids)
    for name, arg in (("observed", observed), ("measures_observed", measures_observed)):
        if arg is not None and len(arg) != len(session_ids):
            raise QuantifyError(f"{name} has {len(arg)} maps for {len(session_ids)} sessions")
    _check(tracking, masks, len(session_ids), grid)
    vv = grid.voxel_volume
    loc = None if priors is None else getattr(priors, "location", None)
    parts = []
    for t, lab in enumerate(tracking.labels):            # loop over sessions only
        ev = tracking.events[tracking.events["session_index"] == t]
        ids = ev["lesion_id"].to_numpy(dtype=np.int64)
        nmax = int(max(lab.max(), ids.max() if ids.size else 0))
        counts = np.bincount(lab.ravel(), minlength=nmax + 1)
        df = pd.DataFrame({"lesion_id": ev["lesion_id"].to_numpy(),
                           "session_id": session_ids[t],
                           "volume_mm3": counts[ids] * vv,
                           "status": ev["status"].to_numpy()})
        present = counts[ids] > 0
        seen = None if observed is None else observed[t]
        frac = np.where(present, 1.0, np.nan)
        if seen is not None:
            inside = np.bincount(lab[np.asarray(seen, dtype=bool)], minlength=nmax + 1)
            frac[present] = inside[ids[present]] / counts[ids[present]]
        fov = (measures_observed[t] if measures_observed is not None else None) or {}
        for what in _MEASURES:
            if _available(masks[t], what):
                sel = np.asarray(getattr(masks[t], what), dtype=bool)
                per = np.bincount(lab[sel], minlength=nmax + 1) * vv
                unseen = frac == 0                               # not observed: n/a
                if fov.get(what) is not None:                    # outside that contrast's view
                    inside = np.bincount(lab[np.asarray(fov[what], dtype=bool)], minlength=nmax + 1)
                    unseen |= present & (inside[ids] == 0)
                df[f"{what}_mm3"] = np.where(unseen, np.nan, per[ids])
            else:
                df[f"{what}_mm3"] = np.nan
        xyz = np.full((ids.size, 3), np.nan)
        if present.any():
            nz = np.nonzero(lab)                      # lesion voxels only: sparse and fast
            lv = lab[nz]
            com = np.stack([np.bincount(lv, weights=ax, minlength=nmax + 1) for ax in nz], axis=1)
            xyz[present] = grid.world_coords(com[ids[present]] / counts[ids[present], None])
        df["centroid_x"], df["centroid_y"], df["centroid_z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        df["merged_into"] = ev["merged_into"].to_numpy()
        df["split_from"] = ev["split_from"].to_numpy()
        df["observed_fraction"] = frac
        if loc is not None:
            df["location"] = _location(lab, np.asarray(loc), ids, nmax)
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    for col in ("lesion_id", "merged_into", "split_from"):
        out[col] = out[col].astype("Int64")
    return out


def _location(lab, loc, ids, nmax) -> np.ndarray:
    """Location class per lesion, by the clinical precedence of the MRI criteria.

    Mostly (> 50 %) infratentorial -> infratentorial; else touching the periventricular
    zone -> periventricular; else touching the juxtacortical zone -> juxtacortical; else
    deep white matter when any voxel is; else none (empty string when absent).
    """
    sel = lab > 0
    nloc = len(LOCATION_NAMES)
    hist = np.bincount(lab[sel].astype(np.int64) * nloc + np.clip(loc[sel], 0, nloc - 1),
                       minlength=(nmax + 1) * nloc).reshape(nmax + 1, nloc)
    total = hist.sum(axis=1)
    code = np.zeros(nmax + 1, np.int64)
    for c in (4, 2, 1):                     # lowest precedence first, overwritten later
        code[hist[:, c] > 0] = c
    code[hist[:, 3] * 2 > total] = 3
    names = LOCATION_NAMES[code].astype(object)
    names[total == 0] = ""
    return names[ids]


def session_table(tracking, masks, sessions_df: pd.DataFrame, grid: Image,
                  lesion_df: pd.DataFrame, brain_observed=None) -> pd.DataFrame:
    """One row per session (``desc-sessions_stats`` contract columns, ``neda``,
    ``brain_observed_fraction``, clinical).

    Parameters
    ----------
    tracking : Tracking
    masks : list of SessionMasks
    sessions_df : DataFrame
        ``sessions.tsv`` content in time order: ``session_id``, ``acq_time`` and any
        clinical columns (copied through).
    grid : Image
    lesion_df : DataFrame
        The result of :func:`lesion_table`.
    brain_observed : sequence of float, optional
        Per session, the share of the brain its FLAIR/T2w observed (default: all of it).

    Returns
    -------
    DataFrame
    """
    if "session_id" not in sessions_df.columns:
        raise QuantifyError(f"sessions_df needs a session_id column, has {list(sessions_df.columns)}")
    sessions_df = sessions_df.reset_index(drop=True)
    sids = sessions_df["session_id"].astype(str).tolist()
    _check(tracking, masks, len(sids), grid)
    vv = grid.voxel_volume
    counted = lesion_df[lesion_df["merged_into"].isna()]      # a merge is not a resolution
    status = pd.crosstab(counted["session_id"], counted["status"]).reindex(
        index=sids, columns=["new", "enlarging", "resolved"], fill_value=0)
    rows = []
    for t, lab in enumerate(tracking.labels):
        m = masks[t]
        present = np.unique(lab[lab > 0])
        row = {"session_id": sids[t],
               "acq_time": sessions_df["acq_time"].iloc[t] if "acq_time" in sessions_df else pd.NA,
               "lesion_count": int(present.size),
               "lesion_volume_mm3": float(np.count_nonzero(lab)) * vv,
               "new_count": int(status.loc[sids[t], "new"]),
               "enlarging_count": int(status.loc[sids[t], "enlarging"]),
               "resolved_count": int(status.loc[sids[t], "resolved"])}
        for what in ("restricted", "blackhole"):
            row[f"{what}_volume_mm3"] = (float(np.count_nonzero(getattr(m, what))) * vv
                                         if _available(m, what) else np.nan)
        row["enhancing_count"] = _enhancing_count(lab, m) if _available(m, "enhancing") else pd.NA
        rows.append(row)
    out = pd.DataFrame(rows)
    out["enhancing_count"] = out["enhancing_count"].astype("Int64")
    active = (out["new_count"] + out["enlarging_count"] > 0).astype("boolean")
    neda = ~(active | (out["enhancing_count"] > 0))
    neda[out["enhancing_count"].isna() & ~active] = pd.NA
    neda.iloc[0] = pd.NA
    out["neda"] = neda.astype("boolean")
    if brain_observed is not None and len(brain_observed) != len(sids):
        raise QuantifyError(f"brain_observed has {len(brain_observed)} values for {len(sids)} sessions")
    out["brain_observed_fraction"] = (np.ones(len(sids)) if brain_observed is None
                                      else np.asarray(brain_observed, dtype=np.float64))
    extra = [c for c in sessions_df.columns if c not in out.columns]
    return pd.concat([out, sessions_df[extra]], axis=1)


def _enhancing_count(lab, m) -> int:
    """Lesions containing enhancing voxels, plus enhancing components outside any lesion."""
    enh = np.asarray(m.enhancing, dtype=bool)
    inside = np.unique(lab[enh & (lab > 0)]).size
    _, outside = ndi.label(enh & (lab == 0), structure=ndi.generate_binary_structure(3, 3))
    return int(inside + outside)
