"""BIDS input discovery and BIDS-Derivatives output names."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from ._io import write_json, write_tsv

__all__ = [
    "BIDSError", "SessionInputs", "find_subjects", "find_sessions", "read_sessions_tsv",
    "check_subject", "check_output_dir", "deriv_path", "write_dataset_description",
    "write_run_status", "MODALITY_FILES", "INPUT_ENTITIES", "raw_uri",
]


class BIDSError(ValueError):
    """The input dataset is not laid out as BIDS expects."""


# modality key -> (datatype, BIDS filename tail after sub-X_ses-Y_)
MODALITY_FILES = {
    "FLAIR": ("anat", "FLAIR.nii.gz"),
    "T2w": ("anat", "T2w.nii.gz"),
    "T1w": ("anat", "T1w.nii.gz"),
    "ceT1w": ("anat", "ce-gadolinium_T1w.nii.gz"),
    "dwi": ("dwi", "dwi.nii.gz"),
    "ADC": ("dwi", "ADC.nii.gz"),
}

# The entities that may stand between the session and the suffix of an input file
# (BIDS: acquisition, contrast agent, reconstruction, run, phase-encoding direction),
# and the suffix each modality is found by; a contrast-enhanced T1w is a T1w with a
# ``ce-<label>`` entity, whatever its label.
INPUT_ENTITIES = ("acq", "ce", "rec", "run", "dir")
# long (pybids) names of those entities, as a BIDS filter file may give them
ENTITY_NAMES = {"acquisition": "acq", "ceagent": "ce", "reconstruction": "rec", "run": "run",
                "direction": "dir"}
_SUFFIX = {"FLAIR": "FLAIR", "T2w": "T2w", "T1w": "T1w", "ceT1w": "T1w", "dwi": "dwi", "ADC": "ADC"}
_NAME = re.compile(r"^sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?"
                   r"(?P<ents>(?:_[a-zA-Z]+-[a-zA-Z0-9]+)*)_(?P<suffix>[a-zA-Z0-9]+)\.nii(?:\.gz)?$")


@dataclass
class SessionInputs:
    """The input files of one session (absent modalities are missing from ``files``)."""

    subject: str
    session: str                      # label without "ses-"
    files: dict = field(default_factory=dict)
    bval: Path | None = None
    bvec: Path | None = None
    notes: list = field(default_factory=list)     # choices among several candidate files
    folder: Path | None = None                    # the session's folder

    def broken_links(self) -> list[Path]:
        """The NIfTI links in the session's ``anat/`` and ``dwi/`` folders whose target is
        absent (annexed content not fetched)."""
        if self.folder is None:
            return []
        return sorted(p for dt in ("anat", "dwi") if (self.folder / dt).is_dir()
                      for p in (self.folder / dt).iterdir()
                      if p.name.endswith((".nii", ".nii.gz")) and p.is_symlink() and not p.exists())

    def unused_images(self) -> list[str]:
        """Names of the NIfTI files in the session's ``anat/`` and ``dwi/`` folders that
        are no input (another subject or session label, a suffix or entity not read)."""
        if self.folder is None:
            return []
        used = set(self.files.values())
        return sorted(p.name for dt in ("anat", "dwi") if (self.folder / dt).is_dir()
                      for p in (self.folder / dt).iterdir()
                      if p.name.endswith((".nii", ".nii.gz")) and p not in used)

    @property
    def session_id(self) -> str:
        return f"ses-{self.session}"

    @property
    def reference(self) -> str | None:
        """The session reference modality: FLAIR, else T2w."""
        return "FLAIR" if "FLAIR" in self.files else ("T2w" if "T2w" in self.files else None)


def _label(x: str, prefix: str) -> str:
    x = str(x)
    return x[len(prefix):] if x.startswith(prefix) else x


def find_subjects(bids_dir, participant_labels=None) -> list[str]:
    """Subject labels (without ``sub-``) in ``bids_dir``, optionally filtered."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise BIDSError(f"{bids_dir}: BIDS directory does not exist")
    found = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    if participant_labels:
        wanted = [_label(lbl, "sub-") for lbl in participant_labels]
        missing = [w for w in wanted if w not in found]
        if missing:
            raise BIDSError(f"{bids_dir}: participant label(s) not found: "
                            f"{', '.join(missing)}; available: {', '.join(found) or 'none'}")
        found = [f for f in found if f in wanted]
    if not found:
        raise BIDSError(f"{bids_dir}: no sub-* folders found; is this a BIDS dataset?")
    return found


def find_sessions(bids_dir, subject, session_labels=None, input_filters=None) -> list[SessionInputs]:
    """Every session of ``subject`` with the files it has, in label order.

    A subject without ``ses-*`` folders is treated as one session labelled ``1``
    (files directly under ``sub-<s>/anat``). ``input_filters`` (``{modality: {entity:
    [values]}}``, short entity names, ``None`` in the values = the entity absent; see
    :func:`lesiontrack._cohort_files.read_bids_filter`) keeps, per modality, only the
    candidate files that match.
    """
    subject = _label(subject, "sub-")
    sdir = Path(bids_dir) / f"sub-{subject}"
    if not sdir.is_dir():
        raise BIDSError(f"{sdir}: subject folder does not exist")
    sess_dirs = sorted(p for p in sdir.glob("ses-*") if p.is_dir())
    out = []
    if not sess_dirs:
        sess_dirs = [sdir]
    for d in sess_dirs:
        ses = d.name[4:] if d.name.startswith("ses-") else "1"
        if session_labels and ses not in [_label(s, "ses-") for s in session_labels]:
            continue
        prefix = f"sub-{subject}_ses-{ses}_" if d != sdir else f"sub-{subject}_"
        si = SessionInputs(subject, ses, folder=d)
        for mod, (dtype, tail) in MODALITY_FILES.items():
            exact = d / dtype / (prefix + tail)
            cands = _candidates(d / dtype, subject, None if d == sdir else ses, mod)
            if exact.is_file() and exact not in cands:      # labels outside BIDS' alphabet
                cands = sorted(cands + [exact])
            if cands and input_filters and mod in input_filters:
                kept = [c for c in cands if _matches(c, input_filters[mod])]
                if not kept:
                    si.notes.append(f"{mod}: the BIDS filter {input_filters[mod]} leaves none of "
                                    f"{', '.join(c.name for c in cands)}; none is used")
                cands = kept
            if cands:
                si.files[mod], note = _choose(cands, exact, mod)
                if note:
                    si.notes.append(note)
        if "dwi" in si.files:
            base = re.sub(r"\.nii(\.gz)?$", "", str(si.files["dwi"]))
            si.bval = Path(base + ".bval")
            si.bvec = Path(base + ".bvec")
        out.append(si)
    return out


def _candidates(folder: Path, subject: str, session: str | None, mod: str) -> list[Path]:
    """The NIfTI files of ``folder`` that are ``mod`` of this subject and session: the
    modality's suffix, only :data:`INPUT_ENTITIES` between the labels and the suffix
    (each at most once; ``part-mag`` too, a phase image is none), a ``ce-`` entity exactly
    for ``ceT1w``; ``.nii.gz`` or ``.nii``."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if (m is None or m["sub"] != subject or m["ses"] != session
                or m["suffix"] != _SUFFIX[mod] or not p.is_file()):
            continue
        ents = [e.split("-", 1) for e in m["ents"].split("_")[1:]]
        keys = [k for k, v in ents if not (k == "part" and v == "mag")]    # a magnitude image is one
        if (len(set(keys)) == len(keys) and set(keys) <= set(INPUT_ENTITIES)
                and ("ce" in keys) == (mod == "ceT1w")):
            out.append(p)
    return sorted(out)


def _entities(path: Path) -> dict:
    m = _NAME.match(path.name)
    return dict(e.split("-", 1) for e in m["ents"].split("_")[1:]) if m else {}


def _matches(path: Path, flt: dict) -> bool:
    """Whether a file's entities match a filter ``{entity: [values]}`` (``None`` in the
    values: the entity may be absent; run values compare as numbers)."""
    ents = _entities(path)
    for key, values in flt.items():
        v = ents.get(key)
        if v is None:
            if None not in values:
                return False
        elif not any(w is not None and (str(w) == v or (key == "run" and str(w).isdigit()
                                                          and v.isdigit() and int(w) == int(v)))
                     for w in values):
            return False
    return True


def _voxel_mm3(path: Path) -> float:
    import nibabel as nib
    try:
        return float(np.prod(nib.load(path).header.get_zooms()[:3]))
    except Exception:                          # unreadable: the loader names it if chosen
        return float("inf")


def _run(path: Path) -> int:
    m = re.search(r"_run-(\d+)", path.name)
    return int(m.group(1)) if m else 0


def _choose(cands: list[Path], exact: Path, mod: str) -> tuple[Path, str | None]:
    """One input among several candidates, and a note naming the choice (None when there
    was none to make): the file named exactly as the input contract says, else the finest
    voxels (a 3D FLAIR over a 2D one: more lesion detail), then the last run (a repeat
    usually replaces a spoilt acquisition), then name order."""
    if len(cands) == 1:
        return cands[0], None
    if exact in cands:
        chosen = exact
        why = "the file named as the input contract says"
    else:
        sizes = {p: _voxel_mm3(p) for p in cands}
        chosen = min(cands, key=lambda p: (round(sizes[p], 3), -_run(p), p.name))
        why = "the finest voxels, then the last run"
    others = ", ".join(p.name for p in cands if p != chosen)
    return chosen, f"{mod}: several candidate files; {chosen} is used ({why}); not used: {others}"


def read_sessions_tsv(bids_dir, subject, sessions: list[SessionInputs] | None = None) -> pd.DataFrame:
    """``sub-<s>_sessions.tsv`` as a DataFrame sorted by time.

    Missing file: the sessions found on disk, in label order, with empty acq_time
    (a warning is for the caller). A session without an ``acq_time`` (no table, no
    column, empty or ``n/a``) takes the earliest ``acq_time`` of its ``scans.tsv``. An unparseable ``acq_time`` raises
    :class:`BIDSError` naming the file, row and value. Sessions listed in the table
    but absent on disk are dropped; sessions on disk but not in the table are
    appended with empty acq_time.
    """
    subject = _label(subject, "sub-")
    path = Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    sessions = sessions if sessions is not None else find_sessions(bids_dir, subject)
    on_disk = [s.session_id for s in sessions]
    if path.exists():
        try:
            df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except Exception as exc:
            raise BIDSError(f"{path}: cannot be read as TSV ({exc})") from None
        if "session_id" not in df.columns:
            raise BIDSError(f"{path}: has no 'session_id' column (columns: {', '.join(df.columns)})")
        df["session_id"] = ["ses-" + _label(s, "ses-") for s in df["session_id"]]
    else:
        df = pd.DataFrame({"session_id": on_disk})
    if "acq_time" not in df.columns:
        df["acq_time"] = ""
    df = df[df["session_id"].isin(on_disk)].copy()
    extra = [s for s in on_disk if s not in set(df["session_id"])]
    if extra:
        df = pd.concat([df, pd.DataFrame({"session_id": extra, "acq_time": ""})], ignore_index=True)
    df = df.fillna("")
    txt = df["acq_time"].astype(str).str.strip().replace({"n/a": ""})
    # a session without a date there: the earliest acq_time of its scans.tsv (what
    # dcm2bids and HeuDiConv write, often without any sessions.tsv)
    undated = (txt == "").to_numpy()
    if undated.any():
        from_scans = [_scans_acq_time(Path(bids_dir), subject, sid, len(on_disk) == 1 and not
                                      (Path(bids_dir) / f"sub-{subject}" / sid).is_dir())
                      if u else "" for sid, u in zip(df["session_id"], undated)]
        txt = txt.where(~undated, pd.Series(from_scans, index=txt.index))
    parsed = pd.to_datetime(txt.where(txt != ""), errors="coerce", format="ISO8601")
    bad = (txt != "") & parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise BIDSError(f"{path}: acq_time '{txt.iloc[row]}' of {df['session_id'].iloc[row]} is not an "
                        "ISO 8601 date-time (e.g. 2020-03-01T09:30:00)")
    df["acq_time"] = txt
    df["_t"] = parsed
    # time order when every session has a date; otherwise label order
    if parsed.notna().all():
        df = df.sort_values(["_t", "session_id"], kind="stable")
    else:
        df = df.sort_values("session_id", kind="stable")
    df = df.drop(columns="_t").reset_index(drop=True)
    # numeric clinical columns (edss, ...) become numbers where they parse
    for col in df.columns:
        if col in ("session_id", "acq_time"):
            continue
        num = pd.to_numeric(df[col].replace({"n/a": "", "": None}), errors="coerce")
        if df[col].replace({"n/a": ""}).ne("").sum() == num.notna().sum():
            df[col] = num
    return df


def _scans_acq_time(bids_dir: Path, subject: str, session_id: str, no_session_folder: bool) -> str:
    """The earliest valid ``acq_time`` of a session's ``scans.tsv`` ("" when there is none)."""
    sdir = bids_dir / f"sub-{subject}"
    path = (sdir / f"sub-{subject}_scans.tsv" if no_session_folder
            else sdir / session_id / f"sub-{subject}_{session_id}_scans.tsv")
    if not path.is_file():
        return ""
    try:
        col = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).get("acq_time")
    except Exception:                      # unreadable: the session stays undated
        return ""
    if col is None:
        return ""
    t = pd.to_datetime(col.str.strip().replace({"n/a": ""}), errors="coerce", format="ISO8601").dropna()
    return t.min().isoformat() if len(t) else ""


def check_subject(bids_dir, subject, session_labels=None, input_filters=None) -> list[str]:
    """Input problems of one subject, without reading image data (empty when fine)."""
    problems = []
    try:
        sessions = find_sessions(bids_dir, subject, session_labels, input_filters)
    except BIDSError as exc:
        return [str(exc)]
    if not sessions:
        return [f"sub-{_label(subject, 'sub-')}: no sessions found"]
    for s in sessions:
        if s.reference is None:
            unused = s.unused_images()
            problems.append(f"sub-{s.subject} {s.session_id}: neither FLAIR nor T2w found "
                            f"(expected e.g. {Path(bids_dir) / f'sub-{s.subject}' / s.session_id / 'anat' / f'sub-{s.subject}_{s.session_id}_FLAIR.nii.gz'}"
                            + (f"; images there not read: {', '.join(unused)}" if unused else "")
                            + "); this session is skipped")
        for mod, p in s.files.items():
            if p.stat().st_size == 0:
                problems.append(f"{p}: file is empty")
        problems.extend(f"sub-{s.subject} {s.session_id}: {note}" for note in s.notes)
        problems.extend(f"{p}: a link whose content is not here (a DataLad or git-annex file "
                        "not fetched yet: `datalad get` it); not read" for p in s.broken_links())
        if "dwi" in s.files and not (s.bval.exists() and s.bvec.exists()) and "ADC" not in s.files:
            problems.append(f"{s.files['dwi']}: missing .bval/.bvec beside it; diffusion measures are skipped")
    try:
        read_sessions_tsv(bids_dir, subject, sessions)
    except BIDSError as exc:
        problems.append(str(exc))
    return problems


def check_output_dir(bids_dir, output_dir) -> None:
    """Refuse an output folder equal to the input or inside its subject folders."""
    b = Path(bids_dir).resolve()
    o = Path(output_dir).resolve()
    if o == b:
        raise BIDSError(f"OUTPUT_DIR {output_dir} is the BIDS input folder; use e.g. "
                        f"{Path(bids_dir) / 'derivatives' / 'lesiontrack'}")
    try:
        rel = o.relative_to(b)
    except ValueError:
        return
    if rel.parts and rel.parts[0].startswith("sub-"):
        raise BIDSError(f"OUTPUT_DIR {output_dir} lies inside the subject folder {b / rel.parts[0]} of "
                        "the input dataset; the input is never written to")


def deriv_path(output_dir, subject, session=None, datatype="anat", *, space=None, desc=None,
               label=None, suffix, ext=".nii.gz", ce=None, extra: str = "") -> Path:
    """A BIDS-Derivatives path: ``sub-<s>/ses-<t>/<datatype>/sub-<s>_ses-<t>[_ce-][_space-][_desc-|_label-]_<suffix>``."""
    parts = [f"sub-{subject}"]
    if session is not None:
        parts.append(f"ses-{_label(session, 'ses-')}")
    if ce:
        parts.append(f"ce-{ce}")
    if extra:
        parts.append(extra)
    if space:
        parts.append(f"space-{space}")
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    name = "_".join(parts) + f"_{suffix}{ext}"
    folder = Path(output_dir) / f"sub-{subject}"
    if session is not None:
        folder = folder / f"ses-{_label(session, 'ses-')}" / datatype
    return folder / name


def write_dataset_description(output_dir, bids_dir=None) -> Path:
    """The derivatives' ``dataset_description.json`` and the dataset-level look-up tables.

    With ``bids_dir``, ``DatasetLinks`` names it ``raw``: the images' sidecars give their
    ``Sources`` as BIDS URIs into it (``bids:raw:sub-01/ses-01/anat/...``)."""
    desc = {
        "Name": "lesiontrack derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesiontrack", "Version": __version__,
                         "CodeURL": "https://github.com/lesiontrack/lesiontrack"}],
    }
    if bids_dir is not None:
        desc["DatasetLinks"] = {"raw": str(abs_path(bids_dir))}
    out = Path(output_dir)
    write_json(out / "dataset_description.json", desc)
    write_tsv(out / "desc-lesions_dseg.tsv",
              pd.DataFrame({"index": [0], "name": ["background"],
                            "description": ["Lesion ID maps: every value >0 is one lesion, the same value "
                                            "for the same lesion at every session (see sub-<s>_desc-lesions_stats.tsv)"]}))
    write_tsv(out / "desc-change_dseg.tsv",
              pd.DataFrame({"index": [0, 1, 2], "name": ["unchanged", "new", "resolved"],
                            "description": ["no change since the previous session",
                                            "became lesion since the previous session",
                                            "stopped being lesion since the previous session"]}))
    return out / "dataset_description.json"


def write_run_status(output_dir, rows) -> Path:
    df = pd.DataFrame(rows, columns=["participant_id", "status", "message"])
    df["message"] = df["message"].astype(str).str.replace(r"[\t\n\r]+", " ", regex=True)
    return write_tsv(Path(output_dir) / "run_status.tsv", df)


_SUB_RE = re.compile(r"^[A-Za-z0-9]+$")


def valid_label(label: str) -> bool:
    return bool(_SUB_RE.match(label))


def abs_path(path) -> Path:
    """Absolute and normalised, symbolic links kept: a DataLad or git-annex dataset's
    files are links into its object store, whose names say nothing of the scan."""
    return Path(os.path.abspath(path))


def raw_uri(bids_dir, path) -> str:
    """``path`` (an input file) as a BIDS URI into the dataset linked as ``raw``."""
    try:
        return "bids:raw:" + abs_path(path).relative_to(abs_path(bids_dir)).as_posix()
    except ValueError:
        return abs_path(path).as_uri()


def sidecar(path, columns: dict) -> Path:
    """Write the JSON sidecar describing a TSV's columns."""
    return write_json(Path(str(path)[: -len(".tsv")] + ".json"), columns)
