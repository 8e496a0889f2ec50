"""A small synthetic SubjectResult for the report tests (2 mm grid, 5 visits, 4 lesions)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lesiontrack.image import Image
from lesiontrack.result import SubjectResult

SHAPE = (40, 48, 36)
SPACING = 2.0
SCRIPT = "<script>window.__pwned = 1; document.title = 'pwned';</script>"

# lesion id -> (centre voxel, radius (voxels) per visit; 0 = absent)
LESIONS = {
    1: ((14, 30, 20), (3, 3, 3, 3, 3)),        # stable
    2: ((26, 28, 18), (0, 2, 3, 2, 0)),        # new, enlarging, shrinking, resolved
    3: ((20, 16, 22), (3, 2, 0, 0, 0)),        # enhancing at A, shrinking, resolved
    4: ((24, 34, 12), (0, 0, 3, 3, 3)),        # new with restricted diffusion, then black hole
}
DATES = ["2019-01-10", "2019-10-14", "2019-11-04", "2019-11-18", "2021-04-20"]


def _status(prev, now):
    if now == 0:
        return "resolved"
    if prev == 0:
        return "new"
    return "enlarging" if now > prev else ("shrinking" if now < prev else "stable")


def make_result(n_sessions: int = 5, event_text: str = SCRIPT, affine=None,
                contrasts=("FLAIR", "T1w", "ceT1w", "b1000", "ADC")) -> SubjectResult:
    rng = np.random.default_rng(0)
    if affine is None:  # LPS-like orientation, to exercise the display reorientation
        affine = np.diag([-SPACING, -SPACING, SPACING, 1.0])
        affine[:3, 3] = [40.0, 50.0, -30.0]
    grid = Image(np.zeros(SHAPE, np.float32), affine)
    ii, jj, kk = np.indices(SHAPE)
    c = (np.array(SHAPE) - 1) / 2
    brain = ((ii - c[0]) / 17) ** 2 + ((jj - c[1]) / 21) ** 2 + ((kk - c[2]) / 15) ** 2 <= 1
    sids = [f"ses-{i + 1:02d}" for i in range(n_sessions)]
    vv = SPACING ** 3
    labels, change, restricted, blackhole, enhancing, images, rows = [], [], [], [], [], {}, []
    for s, sid in enumerate(sids):
        lab = np.zeros(SHAPE, np.int32)
        for lid, (cen, radii) in LESIONS.items():
            if radii[s]:
                d2 = (ii - cen[0]) ** 2 + (jj - cen[1]) ** 2 + (kk - cen[2]) ** 2
                lab[d2 <= radii[s] ** 2] = lid
        labels.append(lab)
        change.append(None if s == 0 else np.where((lab > 0) & (labels[s - 1] == 0), 1,
                                                   np.where((lab == 0) & (labels[s - 1] > 0), 2, 0))
                      .astype(np.uint8))
        restricted.append((lab == 4) & (s == 2) | (lab == 2) & (s == 1))
        blackhole.append((lab == 4) & (s == 3))
        enhancing.append((lab == 3) & (s == 0))
        noise = rng.normal(0, 0.05, SHAPE).astype(np.float32)
        base = np.where(brain, 1.0, 0.05).astype(np.float32) + noise
        imgs = {
            "FLAIR": base + 0.8 * (lab > 0),
            "T1w": base - 0.3 * (lab > 0) - 0.4 * blackhole[-1],
            "ceT1w": base - 0.3 * (lab > 0) + 1.0 * enhancing[-1],
            "b1000": base + 0.9 * restricted[-1],
            "ADC": (base + 0.5 * (lab > 0) - 0.6 * restricted[-1]) * 8e-4,
        }
        images[sid] = {m: grid.with_data(v.astype(np.float32)) for m, v in imgs.items() if m in contrasts}
        vols = np.bincount(lab.ravel(), minlength=5) * vv
        for lid, (cen, radii) in LESIONS.items():
            prev = radii[s - 1] if s else 0
            if radii[s] == 0 and prev == 0:
                continue
            rows.append(dict(lesion_id=lid, session_id=sid, volume_mm3=float(vols[lid]),
                             status=_status(prev, radii[s]),
                             restricted_mm3=float(np.count_nonzero(restricted[-1] & (lab == lid)) * vv),
                             blackhole_mm3=float(np.count_nonzero(blackhole[-1] & (lab == lid)) * vv),
                             enhancing_mm3=float(np.count_nonzero(enhancing[-1] & (lab == lid)) * vv),
                             centroid_x=float(cen[0]), centroid_y=float(cen[1]), centroid_z=float(cen[2]),
                             merged_into=pd.NA, split_from=pd.NA))
    lesions = pd.DataFrame(rows)
    for col in ("merged_into", "split_from"):
        lesions[col] = lesions[col].astype("Int64")
    per = lesions[lesions["volume_mm3"] > 0].groupby("session_id")
    sessions = pd.DataFrame({
        "session_id": sids,
        "acq_time": DATES[:n_sessions],
        "lesion_count": [int(per.size().get(s, 0)) for s in sids],
        "lesion_volume_mm3": [float(per["volume_mm3"].sum().get(s, 0.0)) for s in sids],
        "new_count": [int((lesions[(lesions.session_id == s)].status == "new").sum()) for s in sids],
        "enlarging_count": [int((lesions[(lesions.session_id == s)].status == "enlarging").sum()) for s in sids],
        "resolved_count": [int((lesions[(lesions.session_id == s)].status == "resolved").sum()) for s in sids],
        "restricted_volume_mm3": [float(m.sum() * vv) for m in restricted],
        "blackhole_volume_mm3": [float(m.sum() * vv) for m in blackhole],
        "enhancing_count": [int(m.any()) for m in enhancing],
        "edss": [0.0, 9.5, 9.0, 8.0, 3.5][:n_sessions],
        "event": (["alemtuzumab", event_text, "plasma exchange", "rituximab & cyclophosphamide", ""]
                  [:n_sessions]),
    })
    qc = pd.DataFrame([dict(session_id=sid, modality=m, metric="mattes", stop_condition="converged",
                            iterations=40, similarity=-0.6, flagged=(sid == "ses-03" and m == "T1w"),
                            reason="similarity below cohort median - 3 MAD" if (sid == "ses-03" and m == "T1w")
                            else "")
                       for sid in sids for m in ("T1w", "dwi")])
    config = {"registration": {"metric": "mattes", "bins": 32}, "segment": {"threshold": 2.5},
              "track": {"min_overlap": 0.1}, "report": {}}
    provenance = {"versions": {"lesiontrack": "0.1.0", "numpy": np.__version__,
                               "SimpleITK": "2.3.1"}, "seed": 0, "config_hash": "abc123"}
    return SubjectResult(subject="01", session_ids=sids, grid=grid, images=images, labels=labels,
                         change=change, restricted=restricted, blackhole=blackhole, enhancing=enhancing,
                         brain_mask=brain, sessions=sessions, lesions=lesions, qc=qc, config=config,
                         provenance=provenance)
