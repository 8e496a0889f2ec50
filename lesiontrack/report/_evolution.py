"""The evolution grid: the same axial slices at every visit, lesion outlines by status.

Columns are visits (labelled A, B, ... with date and interval since baseline), rows
are (slice, contrast) pairs. Outlines are matplotlib contours of a status-coded map
(lesion-ID map -> status through a lookup array, one contour call per status);
black holes, enhancing and diffusion-restricted voxels are translucent fills on the
row of the contrast that shows them.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from skimage.measure import find_contours

from ..result import SubjectResult
from ._util import STATUSES, ReportError, interval_text, report_config, visit_times

__all__ = ["EvolutionFigure", "choose_slices", "evolution_figure", "status_maps"]

# which contrast row shows which mask as a fill
_MARKER_ROW = {"T1w": "blackhole", "ceT1w": "enhancing", "b1000": "restricted", "ADC": "restricted"}
_MARKER_LABEL = {"blackhole": "black hole (T1w)", "enhancing": "enhancing (ceT1w)",
                 "restricted": "restricted diffusion (DWI)"}


@dataclass
class EvolutionFigure:
    """The evolution grid and its layout.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
    axes : ndarray of Axes, shape (len(slices) * len(contrasts), len(session_ids))
        Row ``i * len(contrasts) + j`` shows slice ``slices[i]`` in ``contrasts[j]``.
    slices : list of int
        Array indices along the individual grid's axial (inferior-superior) axis.
    contrasts : list of str
        Modality shown on each row of a slice group.
    session_ids : list of str
        One column per visit.
    """

    figure: Figure
    axes: np.ndarray
    slices: list
    contrasts: list
    session_ids: list


class _AxialView:
    """Axial slices of a grid of any orientation, shown with anterior up."""

    def __init__(self, affine, orientation="radiological"):
        if orientation not in ("radiological", "neurological"):
            raise ReportError(f"report.orientation must be 'radiological' or 'neurological', "
                              f"got {orientation!r}")
        ornt = nib.orientations.io_orientation(affine)  # per array axis: (RAS axis, flip)
        self.axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        self.inplane = [i for i in range(3) if i != self.axis]
        self.ornt = ornt
        self.radiological = orientation == "radiological"
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        xs = [i for i in self.inplane if ornt[i, 0] == 0][0]
        ys = [i for i in self.inplane if ornt[i, 0] == 1][0]
        self.sx, self.sy = float(spacing[xs]), float(spacing[ys])
        self.affine = np.asarray(affine)

    def n_slices(self, shape) -> int:
        return int(shape[self.axis])

    def z_mm(self, k: int, shape) -> float:
        """World S coordinate (mm) of slice ``k`` at the grid's centre."""
        ijk = (np.asarray(shape[:3], dtype=float) - 1) / 2
        ijk[self.axis] = k
        return float((self.affine[:3, :3] @ ijk + self.affine[:3, 3])[2])

    def project(self, arr2d: np.ndarray) -> np.ndarray:
        """(in-plane axes of the array) -> display (row = anterior..posterior, col = screen x)."""
        a, b = self.inplane
        out = arr2d if self.ornt[a, 0] == 0 else arr2d.T  # -> (x, y)
        if self.ornt[a if self.ornt[a, 0] == 0 else b, 1] < 0:
            out = out[::-1, :]
        if self.ornt[b if self.ornt[a, 0] == 0 else a, 1] < 0:
            out = out[:, ::-1]
        out = out.T[::-1, :]  # rows: anterior at top; cols: patient left -> right
        return out[:, ::-1] if self.radiological else out

    def slice(self, vol: np.ndarray, k: int) -> np.ndarray:
        index = [slice(None)] * 3
        index[self.axis] = k  # basic indexing: a view, whatever the memory order
        return self.project(vol[tuple(index)])


def status_maps(result: SubjectResult, index: int) -> np.ndarray:
    """Lookup array lesion ID -> status code (1-based in :data:`STATUSES`; 6 = unlisted)."""
    labels = result.labels[index]
    top = int(labels.max()) if labels.size else 0
    lut = np.zeros(top + 1, dtype=np.uint8)
    lut[1:] = len(STATUSES) + 1
    les = result.lesions
    if len(les) and top:
        rows = les[les["session_id"] == result.session_ids[index]]
        ids = rows["lesion_id"].to_numpy(dtype=np.int64)
        codes = rows["status"].map({s: i + 1 for i, s in enumerate(STATUSES)}).fillna(len(STATUSES) + 1)
        ok = (ids > 0) & (ids <= top)
        lut[ids[ok]] = codes.to_numpy(dtype=np.uint8)[ok]
    return lut


def choose_slices(result: SubjectResult, n: int | None = None, cfg=None) -> list:
    """The ``n`` axial slices where lesion change is largest (array indices, inferior first).

    Score per slice: voxels that changed (``change != 0``, all intervals) plus
    ``lesion_weight`` x voxels lesional at any visit; picks are greedy maxima kept
    ``min_slice_gap_fraction`` of the brain's height apart, and scoring at least
    ``min_score_fraction`` of the best slice (so fewer than ``n`` slices when the
    change is concentrated). Without any lesion, slices evenly spaced through the brain.
    """
    cfg = report_config(cfg)
    n = int(cfg["n_slices"] if n is None else n)
    view = _AxialView(result.grid.affine)
    other = tuple(view.inplane)
    nz = view.n_slices(result.grid.shape)
    score = np.zeros(nz, dtype=np.float64)
    lesional = np.zeros(result.grid.shape[:3], dtype=bool)
    for ch, lab in zip(result.change, result.labels):  # loop over sessions
        if ch is not None:
            score += np.count_nonzero(ch, axis=other)
        lesional |= lab > 0
    score += float(cfg["lesion_weight"]) * np.count_nonzero(lesional, axis=other)
    in_brain = np.flatnonzero(np.any(result.brain_mask, axis=other))
    lo, hi = (int(in_brain[0]), int(in_brain[-1])) if in_brain.size else (0, nz - 1)
    gap = max(1, int(round(float(cfg["min_slice_gap_fraction"]) * (hi - lo + 1))))
    score[:lo] = -np.inf
    score[hi + 1:] = -np.inf
    picks = []
    floor = float(cfg["min_score_fraction"]) * float(np.max(score)) if np.isfinite(score).any() else 0.0
    for _ in range(n):  # n greedy picks, non-maximum suppression
        k = int(np.argmax(score))
        if not (score[k] > 0 and score[k] >= floor):
            break
        picks.append(k)
        score[max(0, k - gap + 1): k + gap] = -np.inf
    if not picks:
        picks = np.unique(np.round(np.linspace(lo, hi, n + 2)[1:-1]).astype(int)).tolist()
    return sorted(picks, key=lambda k: view.z_mm(k, result.grid.shape))


_UNSEEN_RGBA = (0.35, 0.45, 0.75, 0.45)   # veil over brain a visit did not observe


def _outline(ax, codes: np.ndarray, rgba: list):
    """Outline every status region of a status-coded slice: one LineCollection per panel.

    Iso-lines at 0.5 of each status's indicator (one pass of marching squares per status
    present, not per lesion), in display (x = column, y = row) coordinates.
    """
    segs, cols = [], []
    for code in np.unique(codes[codes > 0]):
        padded = np.pad(codes == code, 1).astype(np.float32)  # closes outlines at the border
        for line in find_contours(padded, 0.5):
            segs.append(line[:, ::-1] - 1.0)
            cols.append(rgba[code])
    if segs:
        ax.add_collection(LineCollection(segs, colors=cols, linewidths=0.9, gid="status-outlines"),
                          autolim=False)


def _panel(ax, grey, shape, window, aspect, fill):
    """One panel: the grey image (or 'not acquired') and an optional RGBA fill."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    for sp in ax.spines.values():
        sp.set_visible(False)
    if grey is None:
        ax.imshow(np.zeros(shape, np.float32), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        ax.text(0.5, 0.5, "not\nacquired", color="0.7", ha="center", va="center", fontsize=7,
                transform=ax.transAxes)
    else:
        ax.imshow(grey, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect,
                  interpolation="nearest")
    if fill is not None:
        ax.imshow(fill, aspect=aspect, interpolation="nearest")


def _rows(result: SubjectResult, cfg) -> list:
    present = {m for s in result.session_ids for m in result.images.get(s, {})}
    out = []
    for group in cfg["rows"]:
        pick = next((m for m in group if m in present), None)
        if pick is not None:
            out.append(pick)
    return out


def _crop_box(view: _AxialView, brain: np.ndarray, margin_mm: float):
    proj = view.project(np.any(brain, axis=view.axis))
    if not proj.any():
        return slice(None), slice(None)
    r = np.flatnonzero(proj.any(axis=1))
    c = np.flatnonzero(proj.any(axis=0))
    mr, mc = int(np.ceil(margin_mm / view.sy)), int(np.ceil(margin_mm / view.sx))
    return (slice(max(0, r[0] - mr), r[-1] + mr + 1), slice(max(0, c[0] - mc), c[-1] + mc + 1))


def _column_titles(result: SubjectResult) -> list:
    t = visit_times(result.sessions, result.session_ids)
    base = t.iloc[0] if len(t) else None
    titles = []
    for i, sid in enumerate(result.session_ids):
        letter = f"{chr(65 + i)}  " if len(result.session_ids) <= 26 else ""
        ti = t.iloc[i]
        date = ti.strftime("%Y-%m-%d") if pd.notna(ti) else "date n/a"
        if i == 0:
            since = "baseline"
        elif pd.isna(ti) or pd.isna(base):
            since = ""
        else:
            since = interval_text((ti - base).total_seconds() / 86400.0)
            prev = t.iloc[i - 1]
            if i > 1 and pd.notna(prev):
                since += f" (\u0394 {interval_text((ti - prev).total_seconds() / 86400.0)})"
        titles.append(f"{letter}{sid}\n{date}\n{since}")
    return titles


def evolution_figure(result: SubjectResult, slices=None, cfg=None) -> EvolutionFigure:
    """Draw the evolution grid of ``result``.

    Parameters
    ----------
    result : SubjectResult
    slices : sequence of int, optional
        Axial slice indices of the individual grid; chosen by :func:`choose_slices`
        when None.
    cfg : dict, optional
        The ``[report]`` configuration section.

    Returns
    -------
    EvolutionFigure
    """
    cfg = report_config(cfg)
    view = _AxialView(result.grid.affine, cfg["orientation"])
    shape = result.grid.shape[:3]
    nz = view.n_slices(shape)
    if slices is None:
        slices = choose_slices(result, cfg=cfg)
    slices = [int(k) for k in slices]
    bad = [k for k in slices if not 0 <= k < nz]
    if not slices or bad:
        raise ReportError(f"slices must be axial slice indices in 0..{nz - 1} of the individual grid "
                          f"of sub-{result.subject}, got {slices}")
    contrasts = _rows(result, cfg)
    if not contrasts:
        raise ReportError(f"sub-{result.subject}: none of the report.rows contrasts "
                          f"{cfg['rows']} is among the images")
    n_ses = len(result.session_ids)
    box = _crop_box(view, result.brain_mask, float(cfg["crop_margin_mm"]))
    brain2d = {k: view.slice(result.brain_mask, k)[box] for k in slices}
    luts = [status_maps(result, i) for i in range(n_ses)]

    # one grey window per contrast: brain voxels of the shown slices at every visit
    windows = {}
    for m in contrasts:
        vals = [view.slice(result.images[s][m].data, k)[box][brain2d[k]]
                for s in result.session_ids if m in result.images.get(s, {}) for k in slices]
        vals = np.concatenate(vals) if vals else np.zeros(1, np.float32)
        vals = vals[np.isfinite(vals)]
        lo, hi = np.percentile(vals, cfg["window_percentiles"]) if vals.size else (0.0, 1.0)
        windows[m] = (float(lo), float(hi if hi > lo else lo + 1.0))

    # brain a visit did not observe (its lesions there are carried from another visit)
    unseen = [None if o is None else result.brain_mask & ~o
              for o in (result.observed or [None] * n_ses)]
    status_rgba = [to_rgba(cfg["status_colors"][s]) for s in STATUSES]
    outline_rgba = [(0, 0, 0, 0)] + status_rgba + [to_rgba("white")]  # by status code
    shown = {_MARKER_ROW[m] for m in contrasts if m in _MARKER_ROW}
    handles = [Line2D([], [], color=status_rgba[i], lw=1.5, label=s) for i, s in enumerate(STATUSES[:4])]
    handles += [Patch(color=cfg["marker_colors"][k], alpha=min(1.0, float(cfg["marker_alpha"]) + 0.2),
                      label=_MARKER_LABEL[k]) for k in ("restricted", "blackhole", "enhancing") if k in shown]
    if any(u is not None and u.any() for u in unseen):
        handles.append(Patch(color=_UNSEEN_RGBA, label="outside the visit's view (carried)"))

    h_px, w_px = next(iter(brain2d.values())).shape
    panel_w = float(cfg["panel_inches"])
    panel_h = panel_w * (h_px * view.sy) / max(w_px * view.sx, 1e-6)
    n_rows = len(slices) * len(contrasts)
    left, right, top = 0.85, 0.1, 0.75
    fig_w = left + right + n_ses * panel_w
    ncol = int(np.clip((fig_w - 0.2) // 1.7, 1, len(handles)))  # legend entries ~1.7 in wide
    bottom = 0.2 + 0.17 * int(np.ceil(len(handles) / ncol))
    fig_h = top + bottom + n_rows * panel_h
    fig = Figure(figsize=(fig_w, fig_h))
    axes = fig.subplots(n_rows, n_ses, squeeze=False, gridspec_kw=dict(
        left=left / fig_w, right=1 - right / fig_w, top=1 - top / fig_h, bottom=bottom / fig_h,
        wspace=0.03, hspace=0.03))
    aspect = view.sy / view.sx
    for i, k in enumerate(slices):
        lab2d = [view.slice(lab, k)[box] for lab in result.labels]
        for j, m in enumerate(contrasts):
            r = i * len(contrasts) + j
            marker = _MARKER_ROW.get(m)
            for c, sid in enumerate(result.session_ids):  # loop over visits
                ax = axes[r, c]
                img = result.images.get(sid, {}).get(m)
                grey = None if img is None else view.slice(img.data, k)[box]
                fill = None
                if marker is not None:
                    mk = view.slice(getattr(result, marker)[c], k)[box]
                    if mk.any():
                        fill = np.zeros(mk.shape + (4,), np.float32)
                        fill[mk] = to_rgba(cfg["marker_colors"][marker], float(cfg["marker_alpha"]))
                _panel(ax, grey, (h_px, w_px), windows[m], aspect, fill)
                if unseen[c] is not None:    # outside the visit's field of view: veiled
                    off = view.slice(unseen[c], k)[box]
                    if off.any():
                        veil = np.zeros(off.shape + (4,), np.float32)
                        veil[off] = _UNSEEN_RGBA
                        ax.imshow(veil, aspect=aspect, interpolation="nearest")
                _outline(ax, luts[c][lab2d[c]], outline_rgba)
                if c == 0:
                    ax.set_ylabel(f"{m}\nz {view.z_mm(k, shape):+.0f} mm", fontsize=8)
    for c, title in enumerate(_column_titles(result)):
        axes[0, c].set_title(title, fontsize=8, linespacing=1.2)
    side = ("R", "L") if view.radiological else ("L", "R")
    for x, t in zip((0.04, 0.96), side):
        axes[0, 0].text(x, 0.96, t, color="white", fontsize=7, ha="center", va="top",
                        transform=axes[0, 0].transAxes)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return EvolutionFigure(fig, axes, slices, contrasts, list(result.session_ids))
