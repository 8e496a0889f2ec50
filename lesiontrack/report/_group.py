"""Group level: cohort summary table and cohort plots (trajectories, new-lesion rates)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ._util import ReportError, mpl_text

__all__ = ["subject_column", "cohort_summary", "cohort_figure"]


def subject_column(df: pd.DataFrame) -> str:
    """Name of the subject column of a cohort table."""
    for c in ("participant_id", "subject", "sub"):
        if c in df.columns:
            return c
    raise ReportError("cohort table needs a 'participant_id' column naming each subject; "
                      f"columns: {', '.join(map(str, df.columns))}")


def _prepared(cohort: pd.DataFrame) -> pd.DataFrame:
    col = subject_column(cohort)
    if "session_id" not in cohort.columns:
        raise ReportError("cohort table needs a 'session_id' column")
    df = cohort.copy()
    df["_sub"] = df[col].astype(str)
    t = df["acq_time"].astype("string") if "acq_time" in df.columns else pd.Series(pd.NA, index=df.index)
    df["_t"] = pd.to_datetime(t.where(~t.isin(["", "n/a"])), errors="coerce", format="ISO8601")
    df = df.sort_values(["_sub", "_t", "session_id"], kind="stable")
    first = df.groupby("_sub")["_t"].transform("min")
    df["_years"] = (df["_t"] - first).dt.total_seconds() / (365.25 * 86400)
    df["_visit"] = df.groupby("_sub").cumcount()
    return df


def cohort_summary(cohort: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: visits, follow-up, first / last lesion volume, new lesions per year."""
    df = _prepared(cohort)
    vol = pd.to_numeric(df.get("lesion_volume_mm3"), errors="coerce") if "lesion_volume_mm3" in df else \
        pd.Series(np.nan, index=df.index)
    new = pd.to_numeric(df["new_count"], errors="coerce") if "new_count" in df else \
        pd.Series(np.nan, index=df.index)
    df = df.assign(_vol=vol, _new=new.where(df["_visit"] > 0))
    g = df.groupby("_sub", sort=True)
    out = pd.DataFrame({
        "visits": g.size(),
        "follow_up_years": g["_years"].max(),
        "first_volume_mm3": g["_vol"].first(),
        "last_volume_mm3": g["_vol"].last(),
        "new_lesions": g["_new"].sum(min_count=1),
    })
    out["volume_change_pct"] = 100 * (out["last_volume_mm3"] - out["first_volume_mm3"]) / \
        out["first_volume_mm3"].where(out["first_volume_mm3"] > 0)
    out["new_per_year"] = out["new_lesions"] / out["follow_up_years"].where(out["follow_up_years"] > 0)
    out.index.name = "participant_id"
    return out.reset_index()


def cohort_figure(cohort: pd.DataFrame) -> Figure:
    """Every subject's lesion-volume trajectory (left) and new-lesion rate (right)."""
    df = _prepared(cohort)
    summ = cohort_summary(cohort)
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(3, 2), wspace=0.28, left=0.07,
                                                    right=0.98, top=0.9, bottom=0.2))
    dated = df["_t"].notna().all()
    for sub, d in df.groupby("_sub", sort=True):  # loop over subjects
        x = d["_years"] * 12 if dated else d["_visit"]
        y = pd.to_numeric(d.get("lesion_volume_mm3"), errors="coerce") / 1000.0
        ax1.plot(x, y, "o-", ms=3, lw=1.2, label=mpl_text(sub))
    ax1.set_xlabel("months since first visit" if dated else "visit")
    ax1.set_ylabel("lesion volume (mL)")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.25)
    if df["_sub"].nunique() <= 12:
        ax1.legend(fontsize=7, frameon=False)
    rate = summ["new_per_year"] if dated else summ["new_lesions"]
    ax2.bar(np.arange(len(summ)), np.nan_to_num(rate.to_numpy(dtype=float)), width=0.6, color="#FF2020")
    ax2.set_xlim(-0.5 - 0.5 * (len(summ) < 4), len(summ) - 0.5 + 0.5 * (len(summ) < 4))
    ax2.set_xticks(np.arange(len(summ)), [mpl_text(s) for s in summ["participant_id"]], rotation=60,
                   fontsize=7, ha="right")
    ax2.set_ylabel("new lesions per year" if dated else "new lesions")
    ax2.grid(axis="y", alpha=0.25)
    ax1.set_title("lesion volume", fontsize=10)
    ax2.set_title("new-lesion rate", fontsize=10)
    return fig
