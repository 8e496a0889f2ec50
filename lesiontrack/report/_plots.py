"""Trajectory and swimmer plots of one subject, against the clinical timeline."""
from __future__ import annotations

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..result import SubjectResult
from ._util import STATUSES, mpl_text, report_config, visit_times

__all__ = ["time_axis", "trajectory_figure", "swimmer_figure", "clinical_column"]

_MARKS = {  # per-lesion marks of the swimmer plot: column, marker, colour key, label
    "restricted": ("restricted_mm3", "^", "restricted diffusion"),
    "blackhole": ("blackhole_mm3", "s", "black hole"),
    "enhancing": ("enhancing_mm3", "*", "enhancing"),
}


def time_axis(sessions: pd.DataFrame, session_ids) -> tuple[np.ndarray, bool]:
    """x position of each visit: matplotlib date numbers when every visit has a date,
    else the visit index. Returns ``(x, is_date)``."""
    t = visit_times(sessions, session_ids)
    if len(t) and t.notna().all():
        return mdates.date2num(t.to_numpy()), True
    return np.arange(len(session_ids), dtype=float), False


def _format_x(ax, x, is_date, session_ids):
    if is_date:
        loc = mdates.AutoDateLocator(minticks=3, maxticks=7)
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    else:
        ax.set_xticks(x, list(session_ids), fontsize=8)
    span = float(x[-1] - x[0]) if len(x) > 1 else 1.0
    ax.set_xlim(x[0] - 0.05 * span, x[-1] + 0.05 * span)
    return span


def clinical_column(sessions: pd.DataFrame, name: str):
    """The sessions-table column called ``name`` (case-insensitive), or None."""
    hits = [c for c in sessions.columns if str(c).lower() == name]
    return sessions[hits[0]] if hits else None


def _events(sessions: pd.DataFrame, session_ids) -> list:
    col = clinical_column(sessions, "event")
    if col is None:
        return []
    ev = col.reindex(sessions.index).astype("string").fillna("").str.strip()
    sid = sessions["session_id"].tolist()
    out = []
    for s, text in zip(sid, ev):
        if text and text.lower() != "n/a" and s in session_ids:
            out.append((list(session_ids).index(s), text))
    return out


def _series(sessions, session_ids, col):
    if col not in sessions.columns:
        return None
    v = pd.to_numeric(sessions.set_index("session_id")[col], errors="coerce")
    v = v[~v.index.duplicated()].reindex(list(session_ids)).to_numpy(dtype=float)
    return v if np.isfinite(v).any() else None


def trajectory_figure(result: SubjectResult, cfg=None) -> Figure:
    """Lesion load, counts and activity over time, with EDSS and treatment events.

    Three panels sharing the time axis: total lesion volume (mL) with EDSS on a
    second axis; lesion count with new / enlarging counts per interval (bars);
    restricted, black-hole and enhancing volumes (mL). Events from the ``event``
    column are dotted vertical lines annotated at the top.
    """
    cfg = report_config(cfg)
    sids = list(result.session_ids)
    s = result.sessions
    x, is_date = time_axis(s, sids)
    vv = result.grid.voxel_volume
    fig = Figure(figsize=(7.5, 7.2))
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw=dict(hspace=0.12, left=0.1, right=0.88,
                                                            top=0.87, bottom=0.07))
    span = _format_x(axes[-1], x, is_date, sids)
    sc = cfg["status_colors"]

    vol = _series(s, sids, "lesion_volume_mm3")
    if vol is None:  # derive from the label maps (one count per session)
        vol = np.array([np.count_nonzero(lab) * vv for lab in result.labels])
    axes[0].plot(x, vol / 1000.0, "o-", color="black", label="lesion volume")
    axes[0].set_ylabel("lesion volume (mL)")
    axes[0].set_ylim(0, max(float(np.nanmax(vol)) / 1000.0 * 1.15, 0.1) if np.isfinite(vol).any() else 1.0)
    edss = clinical_column(s, "edss")
    handles = [Line2D([], [], color="black", marker="o", label="lesion volume")]
    if edss is not None:
        e = pd.to_numeric(edss, errors="coerce").set_axis(s["session_id"])
        e = e[~e.index.duplicated()].reindex(sids).to_numpy(dtype=float)
        if np.isfinite(e).any():
            ax2 = axes[0].twinx()
            ok = np.isfinite(e)
            ax2.step(x[ok], e[ok], where="post", color="#7B3294", lw=1.5, alpha=0.8)
            ax2.plot(x[ok], e[ok], "D", color="#7B3294", ms=4)
            ax2.set_ylim(0, 10)
            ax2.set_ylabel("EDSS", color="#7B3294")
            handles.append(Line2D([], [], color="#7B3294", marker="D", label="EDSS"))
    axes[0].legend(handles=handles, loc="best", fontsize=7, frameon=False)

    cnt = _series(s, sids, "lesion_count")
    if cnt is None:
        cnt = np.array([len(np.unique(lab[lab > 0])) for lab in result.labels], dtype=float)
    axes[1].plot(x, cnt, "o-", color="black", label="lesion count")
    w = span * 0.012 if span > 0 else 0.2
    for off, col, key in ((-0.5, "new_count", "new"), (0.5, "enlarging_count", "enlarging")):
        v = _series(s, sids, col)
        if v is not None:
            axes[1].bar(x[1:] + off * w, np.nan_to_num(v[1:]), width=w, color=sc[key],
                        label=f"{key} since previous visit")
    axes[1].set_ylabel("lesions")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="best", fontsize=7, frameon=False)

    mc = cfg["marker_colors"]
    curves = {}
    for col, key, masks in (("restricted_volume_mm3", "restricted", result.restricted),
                            ("blackhole_volume_mm3", "blackhole", result.blackhole),
                            ("enhancing_count", "enhancing", result.enhancing)):
        v = np.array([np.count_nonzero(m) * vv for m in masks], dtype=float)
        if col in s.columns:  # n/a in the sessions table: not measured at that visit
            t = pd.to_numeric(s.set_index("session_id")[col], errors="coerce")
            t = t[~t.index.duplicated()].reindex(sids).to_numpy(dtype=float)
            v = np.where(np.isfinite(t), t if col.endswith("mm3") else v, np.nan)
        curves[key] = v
    peak = max([float(np.nanmax(v)) for v in curves.values() if np.isfinite(v).any()] or [0.0])
    scale, unit = (1000.0, "mL") if peak >= 1000 else (1.0, "mm\u00b3")
    for key, label in (("restricted", "restricted diffusion"), ("blackhole", "black holes"),
                       ("enhancing", "enhancing")):
        v = curves[key]
        if np.isfinite(v).any():
            axes[2].plot(x, v / scale, "o-", color=mc[key], mec="black", mew=0.5, label=label)
        else:
            axes[2].plot([], [], "o", color=mc[key], mec="black", mew=0.5, label=f"{label}: not measured")
    axes[2].set_ylabel(f"volume ({unit})")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(loc="best", fontsize=7, frameon=False)

    notes = []
    for n, (i, text) in enumerate(_events(s, sids), start=1):
        for ax in axes:
            ax.axvline(x[i], color="0.45", ls=":", lw=1)
        axes[0].annotate(str(n), xy=(x[i], 1.0), xycoords=("data", "axes fraction"),
                         xytext=(0, 3 + 9 * ((n - 1) % 2)), textcoords="offset points",
                         ha="center", va="bottom", fontsize=7, color="white", weight="bold",
                         bbox=dict(boxstyle="circle,pad=0.2", fc="0.3", ec="none"))
        short = text if len(text) <= 48 else text[:46] + "..."
        notes.append(f"({n}) {sids[i]}: {short}")
    if notes:
        fig.text(0.1, 0.955, mpl_text("    ".join(notes)), fontsize=7, color="0.2", va="top",
                 wrap=True)
    for ax in axes:
        ax.grid(alpha=0.25)
    fig.suptitle(f"sub-{mpl_text(result.subject)}: lesion activity over time", fontsize=10, y=0.99)
    return fig


def swimmer_figure(result: SubjectResult, cfg=None) -> Figure:
    """Each lesion a row: its lifetime, volume (marker area) and status at each visit.

    Rows are ordered by first appearance, then size; when there are more lesions
    than ``swimmer_max_lesions`` the largest (peak volume) are shown.
    """
    cfg = report_config(cfg)
    sids = list(result.session_ids)
    x = np.arange(len(sids), dtype=float)  # visits equally spaced, so close visits stay legible
    les = result.lesions
    if not {"lesion_id", "session_id", "volume_mm3", "status"} <= set(les.columns):
        les = pd.DataFrame(columns=["lesion_id", "session_id", "volume_mm3", "status"])
    les = les[les["session_id"].isin(sids)].copy()
    n_total = les["lesion_id"].nunique()
    fig_h = 1.6
    if n_total:
        les["x"] = x[les["session_id"].map({s: i for i, s in enumerate(sids)}).to_numpy()]
        agg = les.groupby("lesion_id").agg(first=("x", "min"), last=("x", "max"),
                                           peak=("volume_mm3", "max"))
        keep = agg.nlargest(int(cfg["swimmer_max_lesions"]), "peak")
        keep = keep.sort_values(["first", "peak"], ascending=[True, False])
        order = pd.Series(np.arange(len(keep)), index=keep.index)
        les = les[les["lesion_id"].isin(keep.index)]
        les["y"] = order.reindex(les["lesion_id"]).to_numpy()
        fig_h = 1.4 + 0.2 * len(keep)
    height = min(max(fig_h, 2.4), 16.0)
    fig = Figure(figsize=(7.5, height))
    ax = fig.add_axes((0.1, 0.6 / height, 0.66, 1.0 - 1.1 / height))
    t = visit_times(result.sessions, sids)
    span = _format_x(ax, x, False, [f"{sid}\n{d:%Y-%m-%d}" if pd.notna(d) else sid
                                    for sid, d in zip(sids, t)])
    if not n_total:
        ax.text(0.5, 0.5, "no lesions", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return fig
    ax.hlines(order.to_numpy(), keep["first"], keep["last"], color="0.75", lw=3, zorder=1)
    colors = les["status"].map(cfg["status_colors"]).fillna("white").to_numpy()
    vmax = max(float(les["volume_mm3"].max()), 1e-6)
    size = 10 + 140 * np.sqrt(les["volume_mm3"].to_numpy(dtype=float) / vmax)
    ax.scatter(les["x"], les["y"], s=size, c=list(colors), edgecolors="black", linewidths=0.5, zorder=2)
    mc = cfg["marker_colors"]
    handles = [Line2D([], [], ls="", marker="o", mfc=cfg["status_colors"][st], mec="black", label=st)
               for st in STATUSES]
    for j, (key, (col, marker, label)) in enumerate(_MARKS.items()):
        if col not in les.columns:
            continue
        hit = pd.to_numeric(les[col], errors="coerce").fillna(0).to_numpy() > 0
        if hit.any():
            ax.scatter(les["x"].to_numpy()[hit] + (j - 1) * 0.03 * span, les["y"].to_numpy()[hit] - 0.38,
                       marker=marker, s=22, c=mc[key], edgecolors="black", linewidths=0.4, zorder=3)
        handles.append(Line2D([], [], ls="", marker=marker, mfc=mc[key], mec="black", label=label))
    ax.set_yticks(order.to_numpy(), [f"L{i}" for i in order.index], fontsize=7)
    ax.set_ylim(len(order) - 0.4, -0.8)
    ax.set_ylabel("lesion")
    ax.grid(axis="x", alpha=0.25)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              title="status / marks\n(area ~ volume)", title_fontsize=7)
    shown = f" (largest {len(order)} of {n_total})" if len(order) < n_total else ""
    ax.set_title(f"sub-{mpl_text(result.subject)}: every lesion over time{shown}", fontsize=10)
    return fig
