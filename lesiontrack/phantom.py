"""Synthetic longitudinal multiple-sclerosis patients with exact ground truth.

:func:`make_phantom` writes a BIDS dataset of one or more subjects, each scanned at
five visits ``ses-01``..``ses-05`` that follow the clinical story A-E of the
reference case (diagnosis; many new restricting lesions after alemtuzumab; growth;
black holes at the nadir; resolution), with FLAIR, T2w, T1w, post-gadolinium T1w
and DWI (b = 0 and six directions at b = 1000 s/mm^2) on their own grids and
rigid poses, and the ground truth in a separate ``truth/`` folder.

Anatomy: the MNI152 templates that nilearn ships (offline). World grid: the template
grid at the chosen resolution. See ``docs/architecture.md`` ("Phantom and ground
truth") for the file layout.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, sitk_bridge
from ._io import write_json, write_text, write_tsv
from ._phantom_acquire import MAX_ROT_DEG, MAX_SHIFT_MM, SPECS, acquire, plan_acquisition, write_nifti
from ._phantom_anatomy import CONTRAST_TABLES, LESION, load_anatomy, render, warp_anatomy
from ._phantom_lesions import (ENLARGE, LOCATIONS, N_VISITS, SHRINK, Design,
                               design_lesions, render_visits)

__all__ = ["make_phantom", "PhantomError", "SESSION_STORY", "MODALITIES"]

MODALITIES = ("FLAIR", "T2w", "T1w", "ceT1w", "dwi")
_BIDS_NAME = {"FLAIR": ("anat", "FLAIR"), "T2w": ("anat", "T2w"), "T1w": ("anat", "T1w"),
              "ceT1w": ("anat", "ce-gadolinium_T1w"), "dwi": ("dwi", "dwi")}
_XFM_NAME = {"FLAIR": "from-FLAIR", "T2w": "from-T2w", "T1w": "from-T1w",
             "ceT1w": "ce-gadolinium_from-T1w", "dwi": "from-dwi"}
BVALUE = 1000.0
BVECS = np.array([[1, 0, 1], [-1, 0, 1], [0, 1, 1], [0, 1, -1], [1, 1, 0], [-1, 1, 0]],
                 float) / np.sqrt(2.0)
# (days after the diagnosis visit, EDSS, event) of visits A-E
SESSION_STORY = (
    (0, 0.0, "diagnosis; alemtuzumab cycle 1 started 2 months later"),
    (334, 6.5, "re-presentation 9 months after alemtuzumab cycle 1; intravenous steroids"),
    (355, 8.0, "progression; plasma exchange"),
    (369, 9.5, "nadir; rituximab, then cyclophosphamide"),
    (886, 3.5, "follow-up 17 months later; remyelination and recovery"),
)


class PhantomError(ValueError):
    """Invalid arguments to :func:`make_phantom`."""


def _rng(seed, subject, purpose):
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(subject), purpose]))


def make_phantom(out_dir, n_subjects: int = 1, seed: int = 0, resolution: int = 2,
                 progress=None, *, skull: bool = True, anatomy_warp_mm: float = 0.0,
                 max_rotation_deg: float = MAX_ROT_DEG, max_shift_mm: float = MAX_SHIFT_MM,
                 pitch_deg: float = 0.0, lesion_contrast: str = "standard") -> dict:
    """Write a synthetic longitudinal MS dataset and its ground truth.

    Parameters
    ----------
    out_dir : path-like
        Output folder; ``out_dir/bids`` (the BIDS dataset) and ``out_dir/truth``
        (the ground truth, never inside ``bids``) are created.
    n_subjects : int
        Number of subjects ``sub-01``, ``sub-02``, ... (each with its own lesions,
        poses and noise).
    seed : int
        Seed; the output is a deterministic function of ``(seed, resolution, skull,
        anatomy_warp_mm)``.
    resolution : {1, 2}
        World-grid spacing in mm; acquisition grids are scaled accordingly
        (e.g. FLAIR 0.9 x 0.9 x 3 mm at 1, 1.8 x 1.8 x 3.6 mm at 2).
    progress : callable, optional
        Called with a short message (str) after each subject/session is written.
    skull : bool
        Keep a skull/scalp ring around the brain, with Rician noise in the air
        (raw-looking images); ``False`` writes skull-stripped images (zero outside
        the brain mask, as brain-extraction tools leave them).
    anatomy_warp_mm : float
        RMS displacement (mm, 0-10) of a random smooth warp applied to each subject's
        anatomy (:func:`lesiontrack._phantom_anatomy.warp_anatomy`). 0, the default,
        draws the MNI152 template itself, which an atlas-based method fits exactly;
        3-5 mm is the residual of real brains after an affine alignment to it.
    max_rotation_deg, max_shift_mm : float
        Head pose of each image in the scanner: turned by up to this about each axis
        (0-45 degrees) and shifted by up to this along each (0-50 mm), uniform and drawn
        per image, so two images of one visit differ by up to twice as much. The
        defaults (4 degrees, 5 mm) are a cooperative patient's; 15 and 20 a head
        repositioned between visits or moving between series.
    pitch_deg : float
        A pitch (about the left-right axis, -45..45 degrees) of the head common to every
        image, as a head lies tilted in the coil against the template's orientation.
    lesion_contrast : {"standard", "low"}
        ``"low"``: FLAIR grey matter at 1.15 times white matter (standard 1.25), lesions at
        1.30-1.60 on FLAIR (1.55-2.0) and 1.50-1.90 on T2w (1.7-2.3), nearer a real
        patient's FLAIR; juxtacortical lesions are then barely brighter than grey matter on
        T2w (``_phantom_anatomy.CONTRAST_TABLES``).

    Returns
    -------
    dict
        ``bids`` and ``truth`` (Paths), ``subjects`` (labels), ``seed``,
        ``resolution``, ``skull``, ``anatomy_warp_mm``, the pose options,
        ``lesion_contrast`` and ``files``: per subject a dict with
        ``sessions`` (session id -> modality -> path), ``truth_table`` (Path) and
        ``world`` (the truth world-grid reference).
    """
    if resolution not in (1, 2):
        raise PhantomError(f"make_phantom: resolution must be 1 or 2 (mm), got {resolution!r}")
    if not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1 or n_subjects > 99:
        raise PhantomError(f"make_phantom: n_subjects must be an integer 1..99, got {n_subjects!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PhantomError(f"make_phantom: seed must be a non-negative integer, got {seed!r}")
    try:
        warp = float(anatomy_warp_mm)
    except (TypeError, ValueError):
        warp = float("nan")
    if not 0.0 <= warp <= 10.0:
        raise PhantomError(f"make_phantom: anatomy_warp_mm must be a number of mm in 0..10, got "
                           f"{anatomy_warp_mm!r}")
    if lesion_contrast not in CONTRAST_TABLES:
        raise PhantomError(f"make_phantom: lesion_contrast must be one of "
                           f"{sorted(CONTRAST_TABLES)}, got {lesion_contrast!r}")
    pose = {}
    for name, value, top in (("max_rotation_deg", max_rotation_deg, 45.0),
                             ("max_shift_mm", max_shift_mm, 50.0), ("pitch_deg", pitch_deg, 45.0)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
        if not (-top if name == "pitch_deg" else 0.0) <= v <= top:
            raise PhantomError(f"make_phantom: {name} must be a number in "
                               f"{-top if name == 'pitch_deg' else 0:g}..{top:g}, got {value!r}")
        pose[name] = v
    out = Path(out_dir)
    bids, truth = out / "bids", out / "truth"
    _write_dataset_files(bids, truth, n_subjects, seed, resolution, skull, warp, pose,
                         lesion_contrast)
    files = {}
    for s in range(1, n_subjects + 1):
        label = f"{s:02d}"
        files[label] = _make_subject(bids, truth, label, s, seed, resolution, skull, progress, warp,
                                     pose, lesion_contrast)
        if progress is not None:
            progress(f"phantom: sub-{label} written")
    return {"bids": bids, "truth": truth, "subjects": list(files), "seed": int(seed),
            "resolution": int(resolution), "skull": bool(skull), "anatomy_warp_mm": warp,
            **pose, "lesion_contrast": lesion_contrast, "files": files}


_POSE_OPTIONS = {"max_rotation_deg": "--max-rotation", "max_shift_mm": "--max-shift",
                 "pitch_deg": "--pitch"}


def _write_dataset_files(bids, truth, n_subjects, seed, resolution, skull, warp=0.0, pose=None,
                         lesion_contrast="standard"):
    cmd = f"lesiontrack phantom OUT --subjects {n_subjects} --seed {seed} --resolution {resolution}"
    if warp > 0:
        cmd += f" --warp {warp:g}"
    if lesion_contrast != "standard":
        cmd += f" --lesion-contrast {lesion_contrast}"
    default = {"max_rotation_deg": MAX_ROT_DEG, "max_shift_mm": MAX_SHIFT_MM, "pitch_deg": 0.0}
    moved = {k: v for k, v in (pose or {}).items() if v != default[k]}   # recorded when not the default
    for k, v in moved.items():
        cmd += f" {_POSE_OPTIONS[k]} {v:g}"
    write_json(bids / "dataset_description.json", {
        "Name": "lesiontrack synthetic longitudinal MS phantom", "BIDSVersion": "1.9.0",
        "DatasetType": "raw", "License": "CC0",
        "GeneratedBy": [{"Name": "lesiontrack", "Version": __version__,
                         "Description": f"{cmd}{'' if skull else ' (skull=False)'}"}]})
    participants = pd.DataFrame({"participant_id": [f"sub-{s:02d}" for s in range(1, n_subjects + 1)],
                                 "group": "patient"})
    write_tsv(bids / "participants.tsv", participants)
    write_text(bids / "README", "Synthetic longitudinal multiple-sclerosis patients made by "
               f"`{cmd}` (lesiontrack {__version__}).\nFive visits (ses-01..ses-05 = A-E) with "
               "FLAIR, T2w, T1w, post-gadolinium T1w and DWI. The ground truth is in ../truth.\n")
    write_json(truth / "dataset_description.json", {
        "Name": "lesiontrack phantom ground truth", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesiontrack", "Version": __version__, "Description": cmd}],
        "seed": int(seed), "resolution_mm": int(resolution), "skull": bool(skull),
        **({"anatomy_warp_mm": warp} if warp > 0 else {}), **moved,
        **({"lesion_contrast": lesion_contrast} if lesion_contrast != "standard" else {})})


def _sessions_table(subject_index, seed) -> pd.DataFrame:
    rng = _rng(seed, subject_index, 11)
    start = datetime(2018, 1, 8, 9, 0) + timedelta(days=int(rng.integers(0, 700)),
                                                   minutes=int(rng.integers(0, 8 * 60)))
    return pd.DataFrame({
        "session_id": [f"ses-{t + 1:02d}" for t in range(N_VISITS)],
        "acq_time": [(start + timedelta(days=d, minutes=int(rng.integers(-90, 90))))
                     .strftime("%Y-%m-%dT%H:%M:%S") for d, _, _ in SESSION_STORY],
        "edss": [e for _, e, _ in SESSION_STORY],
        "event": [ev for _, _, ev in SESSION_STORY],
    })


_SESSIONS_JSON = {
    "acq_time": {"Description": "Acquisition date and time of the visit (ISO 8601)"},
    "edss": {"Description": "Expanded Disability Status Scale at the visit", "Units": "EDSS points"},
    "event": {"Description": "Clinical event or treatment around the visit"},
}


def _lesion_free(anat, tissue=None) -> dict:
    """Noiseless lesion-free world images of every contrast (rendered once per subject)."""
    base = {con: render(anat, con, tissue=tissue) for con in ("FLAIR", "T2w", "b0", "T1w", "ceT1w")}
    base["b1000"] = render(anat, "b0", bvalue=BVALUE, tissue=tissue)
    return base


def _world_images(anat, base, des: Design, vt, t):
    """Noiseless world images of every contrast at visit ``t`` (dict of float32 arrays)."""
    les = vt.ids > 0
    d = vt.design[les] - 1
    ratio = vt.ratio[les]
    tex = 1.0 + 0.04 * anat.texture[les]
    core = 1.0 - 0.35 * ratio ** 2                       # brighter lesion centre
    out = {}
    for con in ("FLAIR", "T2w", "b0"):
        img = base[con].copy()
        img[les] = (1.0 + (des.factors[con][d] - 1.0) * core) * tex
        out[con] = img
    t1 = base["T1w"].copy()
    t1_les = des.factors["T1w"][d].astype(np.float32)
    bh = vt.blackhole[les]
    bh_frac = np.where(bh, ratio / np.maximum(des.blackhole[d, t], 1e-3), 1.0)
    t1_les = np.where(bh, LESION["blackhole_T1w"] + 0.15 * bh_frac, t1_les)
    t1[les] = t1_les * tex
    out["T1w"] = t1
    ce = base["ceT1w"].copy()
    ce_les = np.where(vt.enhancing[les], des.factors["ceT1w"][d], t1_les)
    ce[les] = ce_les * tex
    out["ceT1w"] = ce
    b1000 = base["b1000"].copy()
    adc = np.where(vt.restricted[les], LESION["adc_restricted"],
                   np.where(des.acute[d, t], LESION["adc_acute"], LESION["adc_chronic"]))
    b1000[les] = out["b0"][les] * np.exp(-BVALUE * adc)
    out["b1000"] = b1000
    return out


def _make_subject(bids, truth, label, s, seed, resolution, skull, progress, warp=0.0, pose=None,
                  lesion_contrast="standard"):
    tissue, lesion = CONTRAST_TABLES[lesion_contrast]
    anat = warp_anatomy(load_anatomy(resolution, _rng(seed, s, 1), skull=skull), warp, _rng(seed, s, 5))
    des = design_lesions(anat, _rng(seed, s, 2), lesion)
    visits, events = render_visits(anat, des, _rng(seed, s, 3))
    sub = f"sub-{label}"
    sdir, tdir = bids / sub, truth / sub
    sessions = _sessions_table(s, seed)
    write_tsv(sdir / f"{sub}_sessions.tsv", sessions)
    write_json(sdir / f"{sub}_sessions.json", _SESSIONS_JSON)

    aff = anat.affine
    base = _lesion_free(anat, tissue)
    ref = base["T1w"]
    head = ref > 0.02
    idx = np.argwhere(head)
    box_vox = np.array([idx.min(0), idx.max(0)], float)
    ends = box_vox @ aff[:3, :3].T + aff[:3, 3]
    head_box = [tuple(sorted(ends[:, i])) for i in range(3)]
    centre = np.argwhere(anat.brain).mean(0) @ aff[:3, :3].T + aff[:3, 3]
    vv = float(abs(np.linalg.det(aff[:3, :3])))

    write_nifti(tdir / f"{sub}_space-world_T1w.nii.gz", ref * 500.0, aff, np.uint16)
    write_nifti(tdir / f"{sub}_space-world_label-brain_mask.nii.gz", anat.brain, aff, np.uint8)
    geo_rows, out_files = [], {}
    rng_acq = _rng(seed, s, 4)
    rng_noise = _rng(seed, s, 5)
    for t, vt in enumerate(visits):                     # loop over sessions
        ses = f"ses-{t + 1:02d}"
        world = _world_images(anat, base, des, vt, t)
        stem = f"{sub}_{ses}"
        tses = tdir / ses
        lab_dtype = np.uint8 if vt.ids.max() <= 255 else np.int16
        write_nifti(tses / f"{stem}_space-world_desc-lesions_dseg.nii.gz", vt.ids, aff, lab_dtype)
        for name in ("restricted", "blackhole", "enhancing"):
            write_nifti(tses / f"{stem}_space-world_label-{name}_mask.nii.gz",
                        getattr(vt, name), aff, np.uint8)
        out_files[ses] = {}
        for mod in MODALITIES:                          # loop over contrasts
            acq = plan_acquisition(mod, resolution, head_box, centre, rng_acq, **(pose or {}))
            spec = SPECS[mod]
            vols = [world["b0"]] + [world["b1000"]] * len(BVECS) if mod == "dwi" else [world[mod]]
            data = acquire(vols, aff, acq, rng_noise, brain=None if skull else anat.brain)
            folder, suffix = _BIDS_NAME[mod]
            path = sdir / ses / folder / f"{stem}_{suffix}.nii.gz"
            write_nifti(path, data if mod == "dwi" else data[..., 0], acq.affine,
                        spec["dtype"], spec["slope"])
            if mod == "dwi":
                bvals = np.r_[0.0, np.full(len(BVECS), BVALUE)]
                bvecs = np.vstack([np.zeros(3), BVECS]).T
                write_text(path.with_name(f"{stem}_dwi.bval"),
                           " ".join(f"{b:g}" for b in bvals) + "\n")
                write_text(path.with_name(f"{stem}_dwi.bvec"),
                           "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")
            sitk_bridge.write_transform(
                acq.truth_transform(), tses / f"{stem}_{_XFM_NAME[mod]}_to-world_mode-image_xfm.txt")
            out_files[ses][mod] = path
            geo_rows.append({"session_id": ses, "modality": mod, "orientation": acq.orientation,
                             "spacing_mm": "x".join(f"{v:g}" for v in spec["spacing"][resolution]),
                             "shape": "x".join(str(v) for v in acq.shape),
                             "rot_x_deg": acq.rotation_deg[0], "rot_y_deg": acq.rotation_deg[1],
                             "rot_z_deg": acq.rotation_deg[2], "shift_x_mm": acq.shift_mm[0],
                             "shift_y_mm": acq.shift_mm[1], "shift_z_mm": acq.shift_mm[2],
                             "oblique_deg": float(np.abs(acq.oblique_deg).max())})
        if progress is not None:
            progress(f"phantom: {sub} {ses} written")
    table = _truth_table(visits, events, des, sessions["session_id"].tolist(), aff, vv)
    table_path = tdir / f"{sub}_desc-truth_lesions.tsv"
    write_tsv(table_path, table)
    write_json(table_path.with_suffix(".json"), _TABLE_JSON)
    write_tsv(tdir / f"{sub}_desc-acquisition.tsv", pd.DataFrame(geo_rows).round(4))
    return {"sessions": out_files, "truth_table": table_path,
            "world": tdir / f"{sub}_space-world_T1w.nii.gz"}


_TABLE_JSON = {
    "lesion_id": {"Description": "Lesion label value in the desc-lesions_dseg maps"},
    "session_id": {"Description": "Session (ses-01..ses-05 = visits A-E)"},
    "volume_mm3": {"Description": "Lesion volume on the world grid", "Units": "mm^3"},
    "status": {"Description": "new | enlarging (volume ratio >= 1.2) | stable | shrinking "
                              "(<= 0.8) | resolved (volume 0; also for a lesion merged into another)"},
    "restricted_mm3": {"Description": "Volume with restricted diffusion", "Units": "mm^3"},
    "blackhole_mm3": {"Description": "Volume of T1 black hole", "Units": "mm^3"},
    "enhancing_mm3": {"Description": "Gadolinium-enhancing volume", "Units": "mm^3"},
    "merged_into": {"Description": "Lesion this one joined at this session"},
    "split_from": {"Description": "Lesion this one split off from at this session"},
    "centroid_x": {"Description": "Centroid, world RAS", "Units": "mm"},
    "centroid_y": {"Description": "Centroid, world RAS", "Units": "mm"},
    "centroid_z": {"Description": "Centroid, world RAS", "Units": "mm"},
    "location": {"Description": "periventricular | juxtacortical | infratentorial | deep"},
}


def _truth_table(visits, events, des, session_ids, aff, vv) -> pd.DataFrame:
    """One row per lesion per session from first appearance up to and including resolution."""
    n_id = max(int(v.ids.max()) for v in visits) + 1
    T = len(visits)
    vol = np.zeros((n_id, T))
    meas = {k: np.zeros((n_id, T)) for k in ("restricted", "blackhole", "enhancing")}
    cen = np.full((n_id, T, 3), np.nan)
    for t, v in enumerate(visits):                      # loop over sessions
        lab = v.ids.ravel()
        vol[:, t] = np.bincount(lab, minlength=n_id) * vv
        for k in meas:
            meas[k][:, t] = np.bincount(lab, weights=getattr(v, k).ravel(), minlength=n_id) * vv
        flat = np.flatnonzero(lab)
        if len(flat):
            ijk = np.stack(np.unravel_index(flat, v.ids.shape), axis=1).astype(np.float64)
            xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
            n = np.bincount(lab[flat], minlength=n_id)
            present = n > 0
            for a in range(3):
                cen[present, t, a] = (np.bincount(lab[flat], weights=xyz[:, a], minlength=n_id)
                                      [present] / n[present])
    prev = np.c_[np.zeros(n_id), vol[:, :-1]]
    # a split-off part compares with its parent's previous volume
    parent_prev = prev.copy()
    for (child, t), parent in events["split_from"].items():
        parent_prev[child, t] = prev[parent, t]
    ratio = np.divide(vol, parent_prev, out=np.full_like(vol, np.inf), where=parent_prev > 0)
    status = np.where(vol == 0, "resolved",
                      np.where(np.isinf(ratio), "new",
                               np.where(ratio >= ENLARGE, "enlarging",
                                        np.where(ratio <= SHRINK, "shrinking", "stable"))))
    keep = (vol > 0) | (prev > 0)
    keep[0] = False
    lid, t = np.nonzero(keep)
    design_loc = np.zeros(n_id, int)
    design_loc[1:des.n + 1] = des.location
    for (child, _), parent in events["split_from"].items():
        design_loc[child] = design_loc[parent]
    df = pd.DataFrame({
        "lesion_id": lid, "session_id": np.array(session_ids)[t],
        "volume_mm3": vol[lid, t], "status": status[lid, t],
        "restricted_mm3": meas["restricted"][lid, t], "blackhole_mm3": meas["blackhole"][lid, t],
        "enhancing_mm3": meas["enhancing"][lid, t],
        "merged_into": _event_column(events["merged_into"], lid, t, n_id, T),
        "split_from": _event_column(events["split_from"], lid, t, n_id, T),
        "centroid_x": cen[lid, t, 0], "centroid_y": cen[lid, t, 1], "centroid_z": cen[lid, t, 2],
        "location": [LOCATIONS.get(int(c), "deep") for c in design_loc[lid]],
    })
    return df.sort_values(["lesion_id", "session_id"]).round(3).reset_index(drop=True)


def _event_column(event: dict, lid, t, n_id, n_t):
    """Nullable Int64 column from an ``{(lesion_id, session_index): other_id}`` dict."""
    grid = np.zeros((n_id, n_t), np.int64)
    if event:
        keys = np.array(list(event), dtype=np.int64).reshape(-1, 2)
        grid[keys[:, 0], keys[:, 1]] = np.array(list(event.values()), dtype=np.int64)
    vals = grid[lid, t]
    return pd.arrays.IntegerArray(vals, mask=vals <= 0)
