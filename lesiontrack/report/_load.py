"""Rebuild a :class:`SubjectResult` from the derivatives of a finished run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import threshold_otsu

from ..bids import deriv_path
from ..image import load_image
from ..result import SubjectResult
from ._util import ReportError

__all__ = ["load_result"]

# modality key -> (datatype, deriv_path keywords) of the space-individual preprocessed images
_PREPROC = {
    "FLAIR": [("anat", dict(desc="preproc", suffix="FLAIR"))],
    "T2w": [("anat", dict(desc="preproc", suffix="T2w"))],
    "T1w": [("anat", dict(desc="preproc", suffix="T1w"))],
    "ceT1w": [("anat", dict(ce="gadolinium", desc="preproc", suffix="T1w"))],
    "b1000": [("dwi", dict(desc="preproc", suffix="dwi")), ("dwi", dict(desc="preproc", suffix="b1000"))],
    "ADC": [("dwi", dict(desc="preproc", suffix="ADC"))],
}
_MASKS = ("restricted", "blackhole", "enhancing")


def _read_tsv(path: Path, required: bool) -> pd.DataFrame:
    if not path.exists():
        if required:
            raise ReportError(f"{path}: not found; the report needs this table of a finished run")
        return pd.DataFrame()
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except Exception as exc:
        raise ReportError(f"{path}: cannot be read as TSV ({exc})") from None


def _brain_mask(out: Path, sub: str, reference: np.ndarray) -> np.ndarray:
    for p in (out / f"sub-{sub}" / "anat" / f"sub-{sub}_space-individual_desc-brain_mask.nii.gz",
              out / f"sub-{sub}" / f"sub-{sub}_space-individual_desc-brain_mask.nii.gz"):
        if p.exists():
            return load_image(p, is_label=True, allow_constant=True).data > 0
    # no stored mask: Otsu foreground of the mean reference image, largest component, holes filled
    finite = np.nan_to_num(reference)
    fg = finite > threshold_otsu(finite)
    lab, n = ndimage.label(fg)
    if n > 1:
        fg = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(fg)


def load_result(output_dir, subject) -> SubjectResult:
    """Rebuild one subject's result from ``output_dir`` (the OUTPUT CONTRACT's files).

    Reads the sessions / lesions / registration-QC tables, ``sub-<s>_provenance.json``
    (its ``config`` entry is the configuration, the rest the provenance), and per
    session the space-individual preprocessed images, lesion-ID and change maps and
    the restricted / black-hole / enhancing masks (absent masks are all-False) and the
    ``desc-observed_mask`` of a visit that did not observe the whole brain. The
    brain mask is ``sub-<s>/anat/sub-<s>_space-individual_desc-brain_mask.nii.gz`` when
    present, else the Otsu foreground of the mean reference image.

    Raises
    ------
    ReportError
        When the subject folder, its sessions table or a lesion-ID map is missing.
    """
    out = Path(output_dir)
    sub = str(subject)[4:] if str(subject).startswith("sub-") else str(subject)
    sdir = out / f"sub-{sub}"
    if not sdir.is_dir():
        found = sorted(p.name for p in out.glob("sub-*") if p.is_dir()) if out.is_dir() else []
        raise ReportError(f"{sdir}: no derivatives for sub-{sub} in {out} "
                          f"(subjects found: {', '.join(found) or 'none'})")
    sessions = _read_tsv(sdir / f"sub-{sub}_desc-sessions_stats.tsv", required=True)
    lesions = _read_tsv(sdir / f"sub-{sub}_desc-lesions_stats.tsv", required=True)
    qc = _read_tsv(sdir / f"sub-{sub}_desc-registration_qc.tsv", required=False)
    for col in ("merged_into", "split_from"):
        if col in lesions.columns:
            lesions[col] = pd.to_numeric(lesions[col], errors="coerce").astype("Int64")
    prov_path = sdir / f"sub-{sub}_provenance.json"
    provenance = json.loads(prov_path.read_text("utf-8")) if prov_path.exists() else {}
    config = provenance.pop("config", {}) if isinstance(provenance, dict) else {}

    sids = [str(s) for s in sessions["session_id"]]
    images, labels, change, masks, grid = {}, [], [], {m: [] for m in _MASKS}, None
    observed = []
    for sid in sids:  # loop over sessions
        images[sid] = {}
        for mod, candidates in _PREPROC.items():
            for datatype, kw in candidates:
                p = deriv_path(out, sub, sid, datatype, space="individual", ext=".nii.gz", **kw)
                if p.exists():
                    images[sid][mod] = load_image(p)
                    break
        lab_path = deriv_path(out, sub, sid, "anat", space="individual", desc="lesions", suffix="dseg")
        if not lab_path.exists():
            raise ReportError(f"{lab_path}: lesion-ID map of {sid} not found")
        lab = load_image(lab_path, is_label=True, allow_constant=True)
        if grid is None:
            grid = lab
        lab.check_same_grid(grid, f"sub-{sub} derivatives")
        labels.append(np.asarray(lab.data, dtype=np.int32))
        ch = deriv_path(out, sub, sid, "anat", space="individual", desc="change", suffix="dseg")
        change.append(np.asarray(load_image(ch, is_label=True, allow_constant=True).data, np.uint8)
                      if ch.exists() and sid != sids[0] else None)
        for m in _MASKS:
            p = deriv_path(out, sub, sid, "anat", space="individual", label=m, suffix="mask")
            masks[m].append(load_image(p, is_label=True, allow_constant=True).data > 0 if p.exists()
                            else np.zeros(grid.shape[:3], dtype=bool))
        p = deriv_path(out, sub, sid, "anat", space="individual", desc="observed", suffix="mask")
        observed.append(load_image(p, is_label=True, allow_constant=True).data > 0 if p.exists()
                        else None)
        for mod, img in images[sid].items():
            img.check_same_grid(grid, f"sub-{sub} {sid} {mod} and the lesion map")
    refs = [next(images[s][m].data for m in ("FLAIR", "T2w") if m in images[s])
            for s in sids if {"FLAIR", "T2w"} & set(images[s])]
    mean = (np.mean(refs, axis=0, dtype=np.float32) if refs
            else np.zeros(grid.shape[:3], dtype=np.float32))
    grid_img = grid.with_data(mean, is_label=False, source=f"sub-{sub} individual space")
    brain = _brain_mask(out, sub, mean) if refs else np.ones(grid.shape[:3], dtype=bool)
    return SubjectResult(subject=sub, session_ids=sids, grid=grid_img, images=images, labels=labels,
                         change=change, restricted=masks["restricted"], blackhole=masks["blackhole"],
                         enhancing=masks["enhancing"], brain_mask=brain, sessions=sessions,
                         lesions=lesions, qc=qc, config=config, provenance=provenance,
                         observed=observed if any(o is not None for o in observed) else None)
