"""File side of cohort runs: leftover temporary files, crash logs, status table,
BIDS filter files and the progress display. Private helpers of :mod:`lesiontrack.cohort`.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from ._io import write_text

__all__ = ["CohortError", "clean_temp_files", "write_crash_log", "read_bids_filter",
           "Progress", "TEMP_PREFIX"]

#: prefix of the temporary files :func:`lesiontrack._io.atomic_path` writes
TEMP_PREFIX = ".tmp-"
logger = logging.getLogger("lesiontrack.cohort")


class CohortError(ValueError):
    """A cohort run was given invalid settings or inputs (names the parameter)."""


def clean_temp_files(output_dir, subjects, *, root: bool = False) -> list[Path]:
    """Remove temporary files an interrupted run left behind.

    Looks in ``OUTPUT_DIR/sub-<s>/`` (recursively) for every subject in ``subjects``,
    at the root for files of these subjects (``.tmp-sub-<s>...``), and with
    ``root=True`` at every root-level temporary file (status table, descriptions).
    Only call this for subjects no live process is writing.
    """
    out = Path(output_dir)
    removed = []
    candidates = []
    for s in subjects:
        sub = out / f"sub-{s}"
        if sub.is_dir():
            candidates += [p for p in sub.rglob(TEMP_PREFIX + "*") if p.is_file()]
        candidates += list(out.glob(f"{TEMP_PREFIX}sub-{s}[._]*"))
    if root and out.is_dir():
        candidates += list(out.glob(TEMP_PREFIX + "*"))
    for p in dict.fromkeys(candidates):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def write_crash_log(output_dir, subject, text: str, context: dict | None = None) -> Path:
    """Write a subject's traceback to ``OUTPUT_DIR/sub-<s>/log/crash-<timestamp>.txt``."""
    from . import __version__
    now = _dt.datetime.now(_dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
    path = Path(output_dir) / f"sub-{subject}" / "log" / f"crash-{stamp}.txt"
    head = [f"subject: sub-{subject}", f"time: {now.isoformat()}",
            f"lesiontrack: {__version__}", f"python: {sys.version.split()[0]}"]
    head += [f"{k}: {v}" for k, v in (context or {}).items()]
    write_text(path, "\n".join(head) + "\n\n" + text.rstrip() + "\n")
    return path


def _labels(value, what: str, source) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CohortError(f"{source}: '{what}' must be a label or a list of labels, "
                         f"got {value!r}")
    prefix = "sub-" if what == "subject" else "ses-"
    return [v[len(prefix):] if v.startswith(prefix) else v for v in value]


# filter keys selecting the input file of a contrast (fMRIPrep's lower-case names)
FILTER_MODALITIES = {"flair": "FLAIR", "t2w": "T2w", "t1w": "T1w", "cet1w": "ceT1w", "dwi": "dwi",
                     "adc": "ADC"}


def read_bids_filter(bids_filter) -> dict:
    """Read a BIDS filter (dict, or path of a JSON file).

    The filter selects participants and sessions by BIDS entity, e.g.
    ``{"subject": ["01", "03"], "session": ["01", "02"]}`` (labels with or without
    the ``sub-``/``ses-`` prefix), and, as fMRIPrep's does, the input file of a contrast
    by its entities: ``{"flair": {"acquisition": "3D"}, "t1w": {"reconstruction": null}}``
    (keys ``flair``, ``t2w``, ``t1w``, ``cet1w``, ``dwi``, ``adc``; entities ``acquisition``,
    ``ceagent``, ``reconstruction``, ``run``, ``direction`` or their short names; a value,
    a list of values, or ``null`` for "without this entity"). Other keys are refused,
    naming the file.

    Returns
    -------
    dict
        ``subject`` and ``session`` label lists where given, and ``inputs``:
        ``{modality: {short entity: [values]}}`` where contrasts are filtered.
    """
    from .bids import ENTITY_NAMES, INPUT_ENTITIES

    if bids_filter is None:
        return {}
    source = "bids_filter"
    if isinstance(bids_filter, (str, os.PathLike)):
        source = str(bids_filter)
        try:
            bids_filter = json.loads(Path(bids_filter).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CohortError(f"{source}: BIDS filter file does not exist") from None
        except json.JSONDecodeError as exc:
            raise CohortError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(bids_filter, dict):
        raise CohortError(f"{source}: a BIDS filter must be a JSON object, "
                         f"got {type(bids_filter).__name__}")
    unknown = sorted(set(bids_filter) - {"subject", "session"} - set(FILTER_MODALITIES))
    if unknown:
        raise CohortError(f"{source}: unknown filter entities {unknown}; "
                         f"allowed: 'subject', 'session', and the contrasts "
                         f"{', '.join(repr(k) for k in FILTER_MODALITIES)}")
    out = {k: _labels(v, k, source) for k, v in bids_filter.items() if k in ("subject", "session")}
    inputs = {}
    for key in (k for k in bids_filter if k in FILTER_MODALITIES):
        query = bids_filter[key]
        if not isinstance(query, dict):
            raise CohortError(f"{source}: '{key}' must be an object of entities, e.g. "
                              f'{{"acquisition": "3D"}}, got {query!r}')
        flt = {}
        for ent, value in query.items():
            short = ENTITY_NAMES.get(ent, ent)
            if short not in INPUT_ENTITIES:
                raise CohortError(f"{source}: '{key}' filters on '{ent}', which inputs do not carry; "
                                  f"allowed: {', '.join(ENTITY_NAMES)} (or {', '.join(INPUT_ENTITIES)})")
            values = value if isinstance(value, list) else [value]
            if not values or not all(v is None or isinstance(v, (str, int)) for v in values):
                raise CohortError(f"{source}: '{key}.{ent}' must be a label, a number, null or a list "
                                  f"of them, got {value!r}")
            flt[short] = values
        inputs[FILTER_MODALITIES[key]] = flt
    if inputs:
        out["inputs"] = inputs
    return out


class Progress:
    """Progress over subjects: a one-line bar on a terminal, log lines elsewhere.

    Parameters
    ----------
    total : int
        Number of subjects.
    enabled : bool
        False = silent.
    stream : file, optional
        Where the bar goes (default ``sys.stderr``); bar only if it is a terminal.
    """

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.counts = {"ok": 0, "failed": 0, "skipped": 0}
        self.t0 = time.monotonic()
        self.step = ""

    def _line(self) -> str:
        done = sum(self.counts.values())
        width = 30
        fill = int(width * done / self.total) if self.total else width
        el = int(time.monotonic() - self.t0)
        text = (f"[{'#' * fill}{'-' * (width - fill)}] {done}/{self.total} subjects  "
                f"ok {self.counts['ok']}  failed {self.counts['failed']}  "
                f"skipped {self.counts['skipped']}  {el // 60:02d}:{el % 60:02d}")
        return text + (f"  {self.step}"[:60] if self.step else "")

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self._line())
        self.stream.flush()

    def info(self, message: str, warn: bool = False) -> None:
        """A message (above the bar on a terminal); ``warn`` = logged even when silent."""
        if not self.enabled:
            if warn:
                logger.warning(message)
            return
        if self.bar:
            self.stream.write("\r\033[K" + message + "\n")
            self._draw()
        else:
            stamp = time.strftime("%H:%M:%S")
            self.stream.write(f"{stamp} lesiontrack: {message}\n")
            self.stream.flush()

    def update(self, row: dict) -> None:
        """Count one finished subject and show it."""
        self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        done = sum(self.counts.values())
        msg = f"{row['participant_id']}: {row['status']}"
        if row.get("duration_s") is not None:
            msg += f" in {row['duration_s']:.1f} s"
        if row.get("message"):
            msg += f" - {row['message']}"
        self.info(f"[{done}/{self.total}] {msg}")

    def substep(self, subject: str, step: str) -> None:
        """A step of one subject (forwarded from its worker)."""
        if self.enabled and self.bar:
            self.step = f"sub-{subject}: {step}"
            self._draw()
        else:
            logger.debug("sub-%s: %s", subject, step)

    def close(self) -> None:
        if self.enabled and self.bar:
            self.step = ""
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
