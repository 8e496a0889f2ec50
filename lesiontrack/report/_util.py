"""Shared helpers of the report: errors, configuration, visit dates, figure encoding."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # the report never opens a window

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..config import load_config

__all__ = ["ReportError", "report_config", "visit_times", "interval_text", "mpl_text",
           "png_bytes", "STATUSES"]

#: lesion statuses in the order of their codes (0 = background) in status-coded maps
STATUSES = ("new", "enlarging", "stable", "shrinking", "resolved")


class ReportError(ValueError):
    """A report cannot be built: missing derivatives, a bad figure name or slice."""


def report_config(cfg=None) -> dict:
    """``cfg`` or, when None, the ``[report]`` section of the default pipeline config."""
    return load_config()["report"] if cfg is None else cfg


def visit_times(sessions: pd.DataFrame, session_ids) -> pd.Series:
    """Acquisition time per session (NaT where unknown), indexed by session_id."""
    if "acq_time" in sessions.columns and "session_id" in sessions.columns:
        txt = sessions.set_index("session_id")["acq_time"].astype("string").str.strip()
        txt = txt.where(~txt.isin(["", "n/a", "<NA>"]))
        t = pd.to_datetime(txt, errors="coerce", format="ISO8601")
        t = t[~t.index.duplicated()]
    else:
        t = pd.Series(dtype="datetime64[ns]")
    return t.reindex(list(session_ids))


def interval_text(days: float) -> str:
    """A human interval: days under 2 weeks, weeks under 3 months, months under 3 years."""
    if not np.isfinite(days):
        return ""
    d = abs(days)
    if d < 14:
        s = f"{d:.0f} d"
    elif d < 91:
        s = f"{d / 7:.0f} wk"
    elif d < 3 * 365.25:
        s = f"{d / 30.4375:.0f} mo"
    else:
        s = f"{d / 365.25:.1f} y"
    return ("-" if days < 0 else "+") + s


def mpl_text(text) -> str:
    """User text made safe for matplotlib (no mathtext from ``$``)."""
    return str(text).replace("$", r"\$")


def _palette(rgb: np.ndarray, colors: int):
    """A palette for ``rgb``: evenly spaced greys plus the image's own colours.

    Figures are grey-level images with a few coloured outlines and marks; a plain
    median-cut palette spends its entries on the greys and merges the rare colours
    (amber outlines turn red), so the coloured pixels get their own entries.
    """
    from PIL import Image as PILImage

    chroma = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    coloured = rgb[chroma > 24]
    n_col = min(max(colors // 4, 8), colors - 16) if coloured.size else 0
    entries = []
    if n_col:
        # the most frequent exact colours (line and legend cores) first, then a median cut
        packed = coloured.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        uniq, count = np.unique(packed, return_counts=True)
        top = uniq[np.argsort(-count, kind="stable")[: n_col // 2]]
        entries = [np.stack([(top >> 16) & 255, (top >> 8) & 255, top & 255], axis=1).astype(np.uint8)]
        rest = coloured[~np.isin(packed, top)]
        if rest.size:
            sample = PILImage.fromarray(np.ascontiguousarray(rest[None, :, :]), "RGB")
            k = n_col - len(top)
            q = sample.quantize(colors=k, method=PILImage.Quantize.MEDIANCUT, dither=PILImage.Dither.NONE)
            used = len(q.getcolors(k) or [])
            entries.append(np.asarray(q.getpalette()[: 3 * max(used, 1)], dtype=np.uint8).reshape(-1, 3))
        entries = list(np.concatenate(entries))
    greys = np.linspace(0, 255, colors - len(entries)).round().astype(np.uint8)
    pal = np.concatenate([np.repeat(greys[:, None], 3, axis=1)] + ([np.array(entries)] if entries else []))
    img = PILImage.new("P", (1, 1))
    img.putpalette(pal.ravel().tolist())
    return img


def png_bytes(fig: Figure, dpi: float, colors: int = 256) -> bytes:
    """Render ``fig`` to PNG bytes, palette-quantised to ``colors`` (0 = keep RGB)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    if not colors:
        return buf.getvalue()
    from PIL import Image as PILImage  # matplotlib depends on Pillow

    buf.seek(0)
    with PILImage.open(buf) as im:
        rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    pal = rgb.quantize(palette=_palette(arr, int(colors)), dither=PILImage.Dither.NONE)
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
