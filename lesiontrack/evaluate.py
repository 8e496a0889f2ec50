"""Score a lesiontrack run against the phantom's ground truth, or its lesion masks
against reference masks (a rater's, another tool's) on the native grids.

The individual space of a run is arbitrary (unbiased between visits), so every
comparison goes through the transforms: the run's ``individual -> image`` maps and
the truth's ``world -> image`` maps. Lesion masks are compared on the truth's world
grid (the run's mask carried there through each session's reference image), and the
native-grid lesion mask on its own grid (``native_lesion_*``, the truth carried there);
registration error is measured image-to-image (each contrast against the first
session's reference), which does not depend on the choice of either space.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import bids, metrics, sitk_bridge
from .image import load_image

__all__ = ["evaluate_run", "format_scores", "evaluate_against_masks", "format_reference_scores",
           "EvaluateError", "REFERENCE_COLUMNS"]

_MODS = {"FLAIR": ("anat", None, "FLAIR"), "T2w": ("anat", None, "T2w"), "T1w": ("anat", None, "T1w"),
         "ceT1w": ("anat", "gadolinium", "T1w"), "dwi": ("dwi", None, "dwi")}


def _find(root: Path, pattern: str) -> Path | None:
    hits = sorted(root.rglob(pattern))
    return hits[0] if hits else None


def _xfm_name(subject, session, mod, to):
    _, ce, suffix = _MODS[mod]
    ce_part = f"_ce-{ce}" if ce else ""
    return f"sub-{subject}_{session}{ce_part}_from-{suffix}_to-{to}_mode-image_xfm.txt"


def _brain_points(world, brain, n=4000, seed=0):
    """Random points (LPS) of the truth brain mask, or of the bright part of the world T1w."""
    if brain is not None:
        ijk = np.argwhere(brain.data > 0)
    else:
        data = world.data
        ijk = np.argwhere(data > (np.percentile(data[data > 0], 30) if np.any(data > 0) else 0))
    rng = np.random.default_rng(seed)
    ijk = ijk[rng.choice(len(ijk), size=min(n, len(ijk)), replace=False)]
    return sitk_bridge.ras_to_lps_points(world.world_coords(ijk))


def evaluate_subject(output_dir, truth_dir, bids_dir, subject, min_volume_mm3=10.0) -> dict:
    out, tdir = Path(output_dir), Path(truth_dir) / f"sub-{subject}"
    world_path = _find(tdir, f"sub-{subject}_space-world_T1w.nii.gz")
    if world_path is None:
        raise FileNotFoundError(f"{tdir}: no sub-{subject}_space-world_T1w.nii.gz (phantom truth grid)")
    world = load_image(world_path)
    sessions = list(bids.read_sessions_tsv(bids_dir, subject)["session_id"])
    brain_path = _find(tdir, f"sub-{subject}_space-world_label-brain_mask.nii.gz")
    pts = _brain_points(world, load_image(brain_path, is_label=True) if brain_path else None)
    est, true = {}, {}
    for ses in sessions:
        for mod, (dtype, _, _) in _MODS.items():
            pe = bids.deriv_path(out, subject, ses, dtype, suffix="x").parent / _xfm_name(subject, ses, mod, "individual")
            pt = _find(tdir, _xfm_name(subject, ses, mod, "world"))
            if pe.exists() and pt is not None:
                est[ses, mod] = sitk_bridge.read_transform(pe)
                true[ses, mod] = sitk_bridge.read_transform(pt)
    # the sessions the run processed (a run may cover a subset: --session-label)
    done = [ses for ses in sessions if (ses, "FLAIR") in est or (ses, "T2w") in est]
    if not done:
        raise FileNotFoundError(f"{out}: no processed session of sub-{subject} (no "
                                f"sub-{subject}_ses-*_from-FLAIR/T2w_to-individual transform)")
    s0 = done[0]
    ref0 = "FLAIR" if (s0, "FLAIR") in est else "T2w"
    # points in the first reference image; est/true maps ref0 -> (s, m)
    pts_ref0 = sitk_bridge.transform_points(true[s0, ref0], pts)
    reg_rows = []
    inv_e0, inv_t0 = sitk_bridge.inverse(est[s0, ref0]), sitk_bridge.inverse(true[s0, ref0])
    for (ses, mod), te in est.items():
        if (ses, mod) == (s0, ref0):
            continue
        e = sitk_bridge.compose(inv_e0, te)
        t = sitk_bridge.compose(inv_t0, true[ses, mod])
        r = metrics.registration_error(e, t, pts_ref0)
        reg_rows.append({"session_id": ses, "modality": mod, **r})
    reg = pd.DataFrame(reg_rows)

    seg_rows = []
    spacing = world.spacing
    for ses in done:
        ref = "FLAIR" if (ses, "FLAIR") in est else "T2w"
        # world point -> ref image point (truth) -> individual point (inverse of estimate)
        w2i = sitk_bridge.compose(true[ses, ref], sitk_bridge.inverse(est[ses, ref]))
        tl = _find(tdir, f"sub-{subject}_{ses}_space-world_desc-lesions_dseg.nii.gz")
        row = {"session_id": ses}
        for label, tname in (("lesion", None), ("restricted", "restricted"), ("blackhole", "blackhole"),
                             ("enhancing", "enhancing")):
            pred_p = bids.deriv_path(out, subject, ses, "anat", space="individual", label=label, suffix="mask")
            truth_p = tl if tname is None else _find(tdir, f"sub-{subject}_{ses}_space-world_label-{tname}_mask.nii.gz")
            if not pred_p.exists() or truth_p is None:
                continue
            truth = load_image(truth_p, is_label=True).data > 0
            pred = sitk_bridge.resample(load_image(pred_p, is_label=True), world, w2i).data > 0
            det = metrics.lesion_detection(truth, pred, spacing=spacing, min_volume_mm3=min_volume_mm3)
            row[f"{label}_dice"] = metrics.dice(truth, pred)
            row[f"{label}_f1"] = det["f1"]
            row[f"{label}_recall"] = det["recall"]
            row[f"{label}_precision"] = det["precision"]
            row[f"{label}_truth_mm3"] = float(truth.sum() * world.voxel_volume)
            row[f"{label}_pred_mm3"] = float(pred.sum() * world.voxel_volume)
        # the native-grid lesion mask against the truth sampled onto that grid
        native_p = bids.deriv_path(out, subject, ses, "anat", label="lesion", suffix="mask")
        if native_p.exists() and tl is not None:
            pred = load_image(native_p, is_label=True)
            t_img = load_image(tl, is_label=True)
            truth = sitk_bridge.resample(t_img.with_data((t_img.data > 0).astype(np.uint8)), pred,
                                         sitk_bridge.inverse(true[ses, ref])).data > 0
            det = metrics.lesion_detection(truth, pred.data > 0, spacing=pred.spacing,
                                           min_volume_mm3=min_volume_mm3)
            row["native_lesion_dice"] = metrics.dice(truth, pred.data > 0)
            row["native_lesion_f1"] = det["f1"]
        seg_rows.append(row)
    seg = pd.DataFrame(seg_rows)
    # the truth's statuses compare each visit with the one before it: scored only when the
    # run has every visit
    status = _status_accuracy(out, tdir, subject, sessions, world, est, true) if done == sessions else None
    return {"subject": subject, "registration": reg, "segmentation": seg, "status": status,
            "sessions_scored": done, "sessions_missing": [s for s in sessions if s not in done]}


def _status_accuracy(out, tdir, subject, sessions, world, est, true):
    """Fraction of truth lesion-visits whose status the run got right.

    Each truth lesion at each session is matched to the run's lesion that covers
    most of it (through the transforms); its status there is compared.
    """
    ttab = _find(tdir, f"sub-{subject}_desc-truth_lesions.tsv")
    ltab = out / f"sub-{subject}" / f"sub-{subject}_desc-lesions_stats.tsv"
    if ttab is None or not ltab.exists():
        return None
    truth = pd.read_csv(ttab, sep="\t")
    ours = pd.read_csv(ltab, sep="\t")
    ours_status = {(int(r.lesion_id), r.session_id): r.status for r in ours.itertuples()}
    correct = total = 0
    for ses in sessions:
        ref = "FLAIR" if (ses, "FLAIR") in est else "T2w"
        w2i = sitk_bridge.compose(true[ses, ref], sitk_bridge.inverse(est[ses, ref]))
        tl_p = _find(tdir, f"sub-{subject}_{ses}_space-world_desc-lesions_dseg.nii.gz")
        ol_p = bids.deriv_path(out, subject, ses, "anat", space="individual", desc="lesions", suffix="dseg")
        if tl_p is None or not ol_p.exists():
            continue
        tl = load_image(tl_p, is_label=True).data.astype(np.int64)
        ol = sitk_bridge.resample(load_image(ol_p, is_label=True), world, w2i).data.astype(np.int64)
        rows = truth[truth["session_id"] == ses]
        # dominant run-lesion per truth lesion, in one pass over paired labels
        both = (tl > 0) & (ol > 0)
        pairs = np.stack([tl[both], ol[both]], axis=1)
        dom = {}
        if len(pairs):
            uniq, cnt = np.unique(pairs, axis=0, return_counts=True)
            order = np.lexsort((-cnt, uniq[:, 0]))
            uniq = uniq[order]
            first = np.r_[True, uniq[1:, 0] != uniq[:-1, 0]]
            dom = dict(zip(uniq[first, 0].tolist(), uniq[first, 1].tolist()))
        for r in rows.itertuples():
            total += 1
            if r.status == "resolved":
                # resolved: correct when the run has no lesion there any more
                present = dom.get(int(r.lesion_id))
                correct += int(present is None)
                continue
            lid = dom.get(int(r.lesion_id))
            if lid is not None and ours_status.get((lid, ses)) == r.status:
                correct += 1
    return {"correct": correct, "total": total, "accuracy": correct / total if total else float("nan")}


def evaluate_run(output_dir, truth_dir, bids_dir, participant_labels=None) -> dict:
    subjects = participant_labels or sorted(p.name[4:] for p in Path(truth_dir).glob("sub-*") if p.is_dir())
    return {bids._label(s, "sub-"): evaluate_subject(output_dir, truth_dir, bids_dir, bids._label(s, "sub-"))
            for s in subjects}


def format_scores(scores: dict) -> str:
    lines = []
    for sub, sc in scores.items():
        lines.append(f"== sub-{sub}: accuracy against the phantom truth")
        reg = sc["registration"]
        if len(reg):
            g = reg.groupby("modality").agg(mean_mm=("mean_mm", "mean"), max_mm=("max_mm", "max"))
            lines.append("registration error vs truth (mm, image to first reference, over brain points):")
            for mod, r in g.iterrows():
                lines.append(f"  {mod:6s} mean {r.mean_mm:.2f}  max {r.max_mm:.2f}")
        seg = sc["segmentation"]
        if len(seg):
            cols = [c for c in seg.columns if c.endswith(("_dice", "_f1"))]
            lines.append("segmentation per session (lesion-wise F1 over lesions >= 10 mm3):")
            lines.append(seg[["session_id"] + cols].round(3).to_string(index=False))
        if sc.get("status"):
            st = sc["status"]
            lines.append(f"lesion status correct: {st['correct']}/{st['total']} = {st['accuracy']:.1%}")
        elif sc.get("sessions_missing"):
            lines.append(f"lesion status not scored: the run lacks {', '.join(sc['sessions_missing'])} "
                         "(the truth's statuses compare each visit with the one before it)")
    return "\n".join(lines)


# ---------------------------------------------------------------- against a rater's masks
class EvaluateError(ValueError):
    """Reference masks that cannot be compared; the message names the file."""


REFERENCE_COLUMNS = ["participant_id", "session_id", "dice", "precision", "recall", "f1",
                     "n_reference", "n_lesiontrack", "reference_mm3", "lesiontrack_mm3", "volume_rel_error"]


def _reference_mask(masks_dir, subject, session) -> Path | None:
    p = bids.deriv_path(masks_dir, subject, session, "anat", label="lesion", suffix="mask")
    return p if p.exists() else (p.with_suffix("") if p.with_suffix("").exists() else None)


def _scores(ref, ours, spacing, min_volume_mm3) -> dict:
    det = metrics.lesion_detection(ref, ours, spacing=spacing, min_volume_mm3=min_volume_mm3)
    vol = metrics.volume_error(ref, ours, spacing)
    return {"dice": metrics.dice(ref, ours), "precision": det["precision"], "recall": det["recall"],
            "f1": det["f1"], "n_reference": det["n_truth"], "n_lesiontrack": det["n_pred"],
            "reference_mm3": vol["truth_mm3"], "lesiontrack_mm3": vol["pred_mm3"], "volume_rel_error": vol["rel"]}


def evaluate_against_masks(output_dir, masks_dir, participant_labels=None,
                           min_volume_mm3: float = 10.0) -> tuple[pd.DataFrame, list[str]]:
    """Score a run's native-space lesion masks against reference masks (a rater's, or
    another tool's) laid out like ``--lesion-masks``:
    ``MASKS_DIR/sub-<s>/ses-<t>/anat/sub-<s>_ses-<t>_label-lesion_mask.nii[.gz]``, on the
    grid of the session's reference image (FLAIR, else T2w), as the run's
    ``label-lesion_mask`` is.

    Returns
    -------
    table : DataFrame
        One row per session with a reference (:data:`REFERENCE_COLUMNS`: voxel Dice,
        lesion-wise precision / recall / F1 over lesions of at least ``min_volume_mm3``,
        the lesion counts and volumes, the relative volume error), then one row per
        subject and one for all (``session_id`` ``all``) pooled over their sessions: Dice
        over all voxels, lesion-wise counts summed.
    notes : list of str
        Sessions of the run without a reference mask (not scored).

    Raises
    ------
    EvaluateError
        A reference mask whose grid differs from the run's native mask, or no session
        to score at all.
    """
    out = Path(output_dir)
    subjects = ([bids._label(s, "sub-") for s in participant_labels] if participant_labels
                else sorted(p.name[4:] for p in out.glob("sub-*") if p.is_dir()))
    rows, notes, pooled = [], [], {}
    for sub in subjects:
        for ses_dir in sorted((out / f"sub-{sub}").glob("ses-*")):
            ses = ses_dir.name[4:]
            ours_path = ses_dir / "anat" / f"sub-{sub}_ses-{ses}_label-lesion_mask.nii.gz"
            if not ours_path.exists():
                continue
            ref_path = _reference_mask(masks_dir, sub, ses)
            if ref_path is None:
                notes.append(f"sub-{sub} ses-{ses}: no reference mask in {masks_dir}; not scored")
                continue
            ours = load_image(ours_path, is_label=True, allow_constant=True)
            ref = load_image(ref_path, is_label=True, allow_constant=True)
            if ref.shape != ours.shape or not np.allclose(ref.affine, ours.affine, atol=1e-3):
                raise EvaluateError(
                    f"{ref_path}: grid {ref.shape} differs from that of the run's {ours_path.name} "
                    f"{ours.shape} (affines differ by up to {np.abs(ref.affine - ours.affine).max():.3g} mm): "
                    "a reference mask must lie on the grid of the session's FLAIR (else T2w) file")
            r, o = ref.data > 0, ours.data > 0
            spacing = ours.spacing
            rows.append({"participant_id": f"sub-{sub}", "session_id": f"ses-{ses}",
                         **_scores(r, o, spacing, min_volume_mm3)})
            pooled.setdefault(sub, []).append((r, o, spacing))
    if not rows:
        raise EvaluateError(f"{masks_dir}: no reference mask matches a session of {out} "
                            "(expected sub-<s>/ses-<t>/anat/sub-<s>_ses-<t>_label-lesion_mask.nii.gz)")
    per = pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
    summary = []
    for label, group in [(f"sub-{s}", pooled[s]) for s in pooled] + [("all", sum(pooled.values(), []))]:
        if label != "all" and len(group) == 1 or label == "all" and len(pooled) == 1:
            continue
        inter = sum(int(np.count_nonzero(r & o)) for r, o, _ in group)
        total = sum(int(np.count_nonzero(r)) + int(np.count_nonzero(o)) for r, o, _ in group)
        dets = [metrics.lesion_detection(r, o, spacing=sp, min_volume_mm3=min_volume_mm3) for r, o, sp in group]
        n_t, n_p = sum(d["n_truth"] for d in dets), sum(d["n_pred"] for d in dets)
        tp_t, tp_p, fp = (sum(d[k] for d in dets) for k in ("tp_truth", "tp_pred", "fp"))
        prec = tp_p / (tp_p + fp) if tp_p + fp else 1.0
        rec = tp_t / n_t if n_t else 1.0
        ref_mm3 = float(per.loc[per["participant_id"].eq(label) | (label == "all"), "reference_mm3"].sum())
        our_mm3 = float(per.loc[per["participant_id"].eq(label) | (label == "all"), "lesiontrack_mm3"].sum())
        summary.append({"participant_id": label, "session_id": "all",
                        "dice": 2 * inter / total if total else 1.0, "precision": prec, "recall": rec,
                        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                        "n_reference": n_t, "n_lesiontrack": n_p, "reference_mm3": ref_mm3,
                        "lesiontrack_mm3": our_mm3,
                        "volume_rel_error": (our_mm3 - ref_mm3) / ref_mm3 if ref_mm3 else float("nan")})
    table = pd.concat([per, pd.DataFrame(summary, columns=REFERENCE_COLUMNS)], ignore_index=True) \
        if summary else per
    return table.astype({c: int if c.startswith("n_") else float for c in REFERENCE_COLUMNS[2:]}), notes


def format_reference_scores(table: pd.DataFrame, notes: list, min_volume_mm3: float = 10.0) -> str:
    lines = [f"== lesion masks against the reference masks (native grids; lesion-wise scores over "
             f"lesions >= {min_volume_mm3:g} mm3)", table.round(3).to_string(index=False)]
    return "\n".join(lines + notes)
