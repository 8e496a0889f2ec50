"""The evolution report: the A-E image grid, trajectories, swimmer plot and tables.

``build_report`` writes ``OUTPUT_DIR/sub-<s>.html`` (self-contained: figures embedded
as palette PNGs) and the figures under ``OUTPUT_DIR/sub-<s>/figures/``;
``load_result`` rebuilds the in-memory result from a finished run's derivatives;
``build_group_report`` writes ``OUTPUT_DIR/group.html``; ``plot_figure`` draws one
figure to a PNG, PDF or SVG file.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .._io import atomic_path, write_bytes, write_text
from ..result import SubjectResult
from ._evolution import EvolutionFigure, choose_slices, evolution_figure
from ._group import cohort_figure, cohort_summary
from ._html import methods_paragraphs, render, table
from ._load import load_result
from ._plots import swimmer_figure, trajectory_figure
from ._util import ReportError, data_uri, png_bytes, report_config, visit_times

__all__ = ["build_report", "load_result", "build_group_report", "plot_figure", "figure",
           "choose_slices", "evolution_figure", "EvolutionFigure", "FIGURES", "ReportError"]

#: figure names accepted by :func:`figure` and :func:`plot_figure`
FIGURES = ("evolution", "trajectories", "swimmer")
_FORMATS = (".png", ".pdf", ".svg")


def figure(result: SubjectResult, name: str, slices=None, cfg=None):
    """The matplotlib Figure called ``name`` (one of :data:`FIGURES`) for ``result``."""
    cfg = report_config(cfg)
    if name == "evolution":
        return evolution_figure(result, slices=slices, cfg=cfg).figure
    if name == "trajectories":
        return trajectory_figure(result, cfg)
    if name == "swimmer":
        return swimmer_figure(result, cfg)
    raise ReportError(f"figure name must be one of {', '.join(FIGURES)}, got {name!r}")


def _save(fig, path: Path, cfg) -> Path:
    if path.suffix.lower() == ".png":
        return write_bytes(path, png_bytes(fig, float(cfg["dpi"]), int(cfg["png_colors"])))
    with atomic_path(path) as tmp:
        fmt = path.suffix[1:].lower()
        # no creation date: the same inputs give byte-identical figures
        meta = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
        fig.savefig(tmp, format=fmt, dpi=float(cfg["dpi"]), facecolor="white", metadata=meta)
    return path


def plot_figure(result: SubjectResult, name: str, out_path, slices=None, cfg=None) -> Path:
    """Draw figure ``name`` (``evolution``, ``trajectories``, ``swimmer``) to ``out_path``.

    The format follows the extension: ``.png``, ``.pdf`` or ``.svg``. ``slices``
    (axial slice indices of the individual grid) applies to ``evolution``.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() not in _FORMATS:
        raise ReportError(f"{out_path}: figure file must end in {', '.join(_FORMATS)}")
    cfg = report_config(cfg)
    return _save(figure(result, name, slices=slices, cfg=cfg), out_path, cfg)


def _span(result: SubjectResult) -> str:
    t = visit_times(result.sessions, result.session_ids).dropna()
    if t.empty:
        return "dates not given"
    return f"{t.min():%Y-%m-%d} to {t.max():%Y-%m-%d}"


def build_report(result: SubjectResult, output_dir, cfg=None, slices=None) -> Path:
    """Write ``OUTPUT_DIR/sub-<s>.html`` and its figures; return the HTML path.

    Parameters
    ----------
    result : SubjectResult
    output_dir : path-like
        The run's output folder (BIDS-Derivatives root).
    cfg : dict, optional
        ``load_config()["report"]``; the default configuration when None.
    slices : sequence of int, optional
        Axial slice indices for the evolution grid (chosen automatically when None).

    Returns
    -------
    pathlib.Path
        The HTML report. Figures: ``sub-<s>/figures/sub-<s>_{evolution,trajectories,
        swimmer}.png`` and ``sub-<s>_evolution.pdf``.
    """
    cfg = report_config(cfg)
    out = Path(output_dir)
    sub = result.subject
    fig_dir = out / f"sub-{sub}" / "figures"
    ev = evolution_figure(result, slices=slices, cfg=cfg)
    figs = {"evolution": ev.figure, "trajectories": trajectory_figure(result, cfg),
            "swimmer": swimmer_figure(result, cfg)}
    uris = {}
    for name, fig in figs.items():  # a handful of figures
        png = png_bytes(fig, float(cfg["dpi"]), int(cfg["png_colors"]))
        write_bytes(fig_dir / f"sub-{sub}_{name}.png", png)
        uris[name] = data_uri(png)
    _save(ev.figure, fig_dir / f"sub-{sub}_evolution.pdf", cfg)
    qc = result.qc if result.qc is not None else pd.DataFrame()
    n_flagged = int(table(qc, "flagged")["flags"].count(True)) if len(qc) else 0
    html = render(
        "subject.html", subject=sub, n_sessions=len(result.session_ids), span=_span(result),
        n_lesions=int(result.lesions["lesion_id"].nunique()) if len(result.lesions) else 0,
        n_flagged=n_flagged, figures=uris, slices=ev.slices, orientation=cfg["orientation"],
        sessions=table(result.sessions), lesions=table(result.lesions), qc=table(qc, "flagged"),
        methods=methods_paragraphs(result))
    return write_text(out / f"sub-{sub}.html", html)


def build_group_report(output_dir, cohort_df: pd.DataFrame, cfg=None) -> Path:
    """Write ``OUTPUT_DIR/group.html`` (+ ``OUTPUT_DIR/figures/group_cohort.png``).

    ``cohort_df`` is the ``desc-cohort_stats`` table: the sessions tables of all
    subjects with a ``participant_id`` column.
    """
    cfg = report_config(cfg)
    out = Path(output_dir)
    if cohort_df is None or len(cohort_df) == 0:
        raise ReportError(f"{out}: the cohort table is empty; run the participant level first")
    summ = cohort_summary(cohort_df)
    png = png_bytes(cohort_figure(cohort_df), float(cfg["dpi"]), int(cfg["png_colors"]))
    write_bytes(out / "figures" / "group_cohort.png", png)
    links = []
    for pid in summ["participant_id"]:
        lbl = str(pid)[4:] if str(pid).startswith("sub-") else str(pid)
        links.append(f"sub-{lbl}.html" if (out / f"sub-{lbl}.html").exists() else "")
    html = render("group.html", n_subjects=len(summ), n_rows=len(cohort_df),
                  figures={"cohort": data_uri(png)}, summary=table(summ), links=links,
                  cohort=table(cohort_df))
    return write_text(out / "group.html", html)
