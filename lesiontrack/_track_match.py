"""Overlap-based matching of lesion components between two consecutive visits.

The components of two visits form a bipartite graph whose edges are voxel overlaps.
Everything here is computed in one pass over the voxels (``np.unique`` on paired
label values) and then on the edge list; nothing loops over lesions.

Decision rules (all invariant to how the components happen to be numbered: ties are
broken by overlap, then volume, then the component's first voxel in array order):

* each current component continues, among the previous components it overlaps, the
  one with the best ``prev_rank`` (the tracker passes the session where the lesion
  was first seen, so the oldest lesion keeps its ID through a merge), then the one
  it overlaps most;
* a previous component continued by several current ones has **split**: the part with
  the largest overlap keeps the lineage, the others are split-off children;
* a previous component that no current component continues but that overlaps one has
  **merged** into the lesion of the current component it overlaps most;
* a previous component with no overlap has vanished; a current one with none is a
  candidate new lesion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["label_components", "match_components", "Match", "first_voxel"]


def label_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (labels numbered in raster order).

    ``connectivity`` 1, 2 or 3 selects the 6-, 18- or 26-neighbourhood.
    """
    structure = ndi.generate_binary_structure(3, connectivity)
    lab, n = ndi.label(mask, structure=structure)
    return lab.astype(np.int32, copy=False), int(n)


def first_voxel(lab: np.ndarray, n: int) -> np.ndarray:
    """Flat index of each component's first voxel (array order); index 0 unused."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    out = np.full(n + 1, -1, dtype=np.int64)
    if nz.size:
        vals, first = np.unique(flat[nz], return_index=True)
        out[vals] = nz[first]
    return out


@dataclass
class Match:
    """Result of :func:`match_components` (arrays indexed by component label, 0 unused).

    Attributes
    ----------
    parent : ndarray (n_cur + 1,)
        Previous component each current component continues (0: none, a candidate
        new lesion).
    keeps : ndarray of bool (n_cur + 1,)
        True when the current component carries its parent's lineage; False for the
        split-off children (and for components without a parent).
    dest : ndarray (n_prev + 1,)
        Current component that receives each previous component: its keeper, or the
        component it merged into (0: vanished).
    merged : ndarray of bool (n_prev + 1,)
        True when the previous component merged into another lesion.
    edges : tuple of ndarray
        ``(prev, cur, overlap_voxels)`` of the bipartite overlap graph.
    """

    parent: np.ndarray
    keeps: np.ndarray
    dest: np.ndarray
    merged: np.ndarray
    edges: tuple


def _first_per_group(group: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Positions of the first element of each ``group`` after sorting by ``keys``."""
    if group.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(tuple(reversed(keys)) + (group,))
    g = group[order]
    start = np.ones(g.size, dtype=bool)
    start[1:] = g[1:] != g[:-1]
    return order[start]


def match_components(prev_lab: np.ndarray, n_prev: int, cur_lab: np.ndarray, n_cur: int,
                     min_overlap_voxels: int = 1, prev_rank=None) -> Match:
    """Match the components of two visits by voxel overlap.

    Parameters
    ----------
    prev_lab, cur_lab : ndarray of int
        Component labels (0 = background, 1..n) on one grid.
    n_prev, n_cur : int
        Number of components in each.
    min_overlap_voxels : int
        Overlaps smaller than this are not edges of the graph.
    prev_rank : ndarray (n_prev + 1,), optional
        Preference among previous components (lower first) when a current component
        overlaps several; default: no preference (overlap decides).

    Returns
    -------
    Match
    """
    if prev_lab.shape != cur_lab.shape:
        raise ValueError(f"label maps must share one grid, got {prev_lab.shape} and {cur_lab.shape}")
    both = (prev_lab > 0) & (cur_lab > 0)
    key = prev_lab[both].astype(np.int64) * (n_cur + 1) + cur_lab[both]
    uk, w = np.unique(key, return_counts=True)
    ea, eb = uk // (n_cur + 1), uk % (n_cur + 1)
    ok = w >= max(1, int(min_overlap_voxels))
    ea, eb, w = ea[ok], eb[ok], w[ok]

    vol_prev = np.bincount(prev_lab.ravel(), minlength=n_prev + 1)
    vol_cur = np.bincount(cur_lab.ravel(), minlength=n_cur + 1)
    pos_prev, pos_cur = first_voxel(prev_lab, n_prev), first_voxel(cur_lab, n_cur)

    rank = np.zeros(n_prev + 1) if prev_rank is None else np.asarray(prev_rank, dtype=np.float64)
    # 1. each current component -> the best-ranked previous one, then the largest overlap
    best = _first_per_group(eb, rank[ea], -w, -vol_prev[ea], pos_prev[ea])
    parent = np.zeros(n_cur + 1, dtype=np.int64)
    parent[eb[best]] = ea[best]
    w_parent = np.zeros(n_cur + 1, dtype=np.int64)
    w_parent[eb[best]] = w[best]

    # 2. among the children of one previous component, the largest overlap keeps it
    children = np.flatnonzero(parent)
    keeper = children[_first_per_group(parent[children], -w_parent[children],
                                       -vol_cur[children], pos_cur[children])]
    keeps = np.zeros(n_cur + 1, dtype=bool)
    keeps[keeper] = True
    dest = np.zeros(n_prev + 1, dtype=np.int64)
    dest[parent[keeper]] = keeper

    # 3. previous components nobody continues but that overlap someone: merged
    orphan = np.ones(n_prev + 1, dtype=bool)
    orphan[0] = False
    orphan[parent[keeper]] = False
    sel = orphan[ea]
    pick = _first_per_group(ea[sel], -w[sel], -vol_cur[eb[sel]], pos_cur[eb[sel]])
    merged = np.zeros(n_prev + 1, dtype=bool)
    dest[ea[sel][pick]] = eb[sel][pick]
    merged[ea[sel][pick]] = True
    return Match(parent, keeps, dest, merged, (ea, eb, w))
