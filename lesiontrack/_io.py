"""Atomic output writing: every file is written to a temporary name, then renamed."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text", "write_json", "write_tsv", "OutputError"]


class OutputError(OSError):
    """An output cannot be written (read-only folder, full disk, ...)."""


def _suffixes(path: Path) -> str:
    # keep compound suffixes (.nii.gz) so libraries pick the right format
    name = path.name
    for suf in (".nii.gz", ".tsv", ".json", ".txt", ".html", ".png", ".pdf", ".svg", ".toml", ".nii"):
        if name.endswith(suf):
            return suf
    return path.suffix


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.name[:40] + "-", suffix=_suffixes(path),
                                   dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(exc.errno, f"cannot write into {path.parent}: {exc.strerror}") from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_tsv(path, df) -> Path:
    """Write a pandas DataFrame as TSV (n/a for missing values, BIDS style)."""
    return write_text(path, df.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n"))
