"""Phantom lesions: the five-visit A-E story, lesion geometry and the exact truth.

Every lesion is a union of a few randomly oriented ellipsoids ("blobs") whose
boundary is made irregular by a smooth noise field. At each visit every blob has a
scale (0 = absent); a voxel belongs to a lesion when its normalised distance to one
of the lesion's blobs, divided by that blob's scale and by ``1 + a * noise``, is
below 1. The normalised distance inside a lesion (``ratio`` in [0, 1)) also drives
the lesion's core (restricted diffusion, black hole) and rim (ring enhancement).

Identity rules of the truth (they define ``merged_into`` / ``split_from``):

* lesions are 26-connected components; when several lesions touch, the component
  keeps the ID of the earliest lesion (ties: the largest) and the others get a
  row with volume 0, status ``resolved`` and ``merged_into`` at that visit; their
  voxels carry the surviving ID from then on;
* a lesion designed to split keeps its ID on its largest part; the other part gets
  a new ID with ``split_from`` (its status compares its volume with the parent's
  previous volume);
* stray fragments a lesion may have (where it was clipped by grey matter or CSF)
  are dropped, so that every ID is exactly one connected component.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import label as cc_label

from ._phantom_anatomy import Anatomy, smooth_noise

__all__ = ["Design", "design_lesions", "render_visits", "VisitTruth", "N_VISITS", "LOCATIONS"]

N_VISITS = 5
LOCATIONS = {1: "periventricular", 2: "juxtacortical", 3: "infratentorial", 4: "deep"}
_STRUCT = np.ones((3, 3, 3), bool)
ENLARGE, SHRINK = 1.2, 0.8   # volume ratios that make a truth status enlarging / shrinking
_ALLOWED_WM = 0.2            # lesions live where the white-matter fraction exceeds this
MIN_VOLUME_MM3 = 10.0        # smaller remnants are not kept as lesions


@dataclass
class Design:
    """Designed lesions (before rasterisation). Arrays are indexed by lesion ``l``
    (IDs are ``l + 1``), blob ``b`` and visit ``t``."""

    center: np.ndarray        # (L, 3) RAS mm
    location: np.ndarray      # (L,) location class
    noise_amp: np.ndarray     # (L,) boundary irregularity
    restricted: np.ndarray    # (L, T) core fraction with restricted diffusion (0 = none)
    blackhole: np.ndarray     # (L, T) core fraction that is a T1 black hole
    enhancing: np.ndarray     # (L, T) 0 none, 1 nodular, 2 ring
    acute: np.ndarray         # (L, T) bool: active lesion (ADC of non-restricted part)
    factors: dict             # contrast -> (L,) lesion intensity factor
    blob_lesion: np.ndarray   # (B,) lesion index of each blob
    blob_center: np.ndarray   # (B, 3) RAS mm
    blob_inv: np.ndarray      # (B, 3, 3) maps (x - c) to unit-sphere coordinates
    blob_scale: np.ndarray    # (B, T)
    merge_pair: tuple = ()
    split_lesion: int = -1
    split_visit: int = N_VISITS - 1
    group: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.center)


def _rotation(rng) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _story(rng):
    """Per-lesion scales and statuses of the A-E story (visit index 0..4)."""
    rows = []  # (group, location, r0, scale[5], restricted[5], blackhole[5], enhancing[5])
    z = [0.0] * 5
    # A: present at diagnosis; 3 restricting, 2 enhancing (one nodular, one ring).
    a_loc = [1, 1, 4, 2, 1, 4, 3]
    for i, loc in enumerate(a_loc):
        scale = [1, 1, 1, 1, 1]
        if i in (0, 1):                       # acute enhancing lesions shrink after A
            scale = [1, 0.8, 0.8, 0.8, 0.7]
        elif i in (4, 5):
            scale = [1, 1, 1, 1, 0.75]
        restr = [0.7, 0, 0, 0, 0] if i in (0, 2, 3) else z
        enh = [1 if i == 0 else 2 if i == 1 else 0, 0, 0, 0, 0]
        rows.append(("A", loc, rng.uniform(4.2, 6.0), scale, restr, z, enh))
    # B: many new lesions, most restricting, none enhancing; growth at C, black holes at D,
    # resolution at E.
    b_loc = [1, 1, 1, 4, 4, 4, 2, 2, 1, 4, 1, 2, 4, 1, 4, 3]
    grow = rng.permutation(len(b_loc)) < 10
    late = rng.permutation(len(b_loc)) < 3
    gone = rng.permutation(len(b_loc)) < 5
    restr_b = rng.permutation(len(b_loc)) < 12
    for i, loc in enumerate(b_loc):
        c = 1.3 if grow[i] else 1.0
        d = c * (1.25 if late[i] else 1.0)
        e = 0.0 if gone[i] else 0.7 * d
        restr = [0, 0.75 if restr_b[i] else 0, 0.5 if (restr_b[i] and i % 2 == 0) else 0,
                 0.4 if (restr_b[i] and i % 5 == 0) else 0, 0]
        bh = [0, 0, 0, 0.55 if grow[i] or late[i] else 0, 0]
        rows.append(("B", loc, rng.uniform(3.6, 6.0), [0, 1, c, d, e], restr, bh, z))
    # C: progression with new infratentorial and juxtacortical lesions, no enhancement.
    for i, loc in enumerate([3, 3, 2, 2, 4]):
        d = 1.3 if i in (1, 3) else 1.0
        e = 0.0 if i in (0, 2) else 0.7 * d
        restr = [0, 0, 0.7 if i < 3 else 0, 0.4 if i == 1 else 0, 0]
        bh = [0, 0, 0, 0.5 if i == 4 else 0, 0]
        rows.append(("C", loc, rng.uniform(3.5, 5.0), [0, 0, 1, d, e], restr, bh, z))
    return rows


def design_lesions(anat: Anatomy, rng, lesion: dict | None = None) -> Design:
    """Place the story's lesions in white matter and build their blobs. ``lesion``: the
    lesion intensity table (default ``_phantom_anatomy.LESION``)."""
    rows = _story(rng)
    n = len(rows)
    # the merge pair and the split lesion are extra B lesions with special geometry
    merge = (n, n + 1)
    split = n + 2
    rows.append(("B", 4, 4.5, [0, 0.7, 1.3, 1.3, 1.15], [0, 0.7, 0, 0, 0], [0, 0, 0, 0.5, 0],
                 [0] * 5))
    rows.append(("B", 4, 4.0, [0, 0.7, 1.3, 1.3, 1.15], [0, 0.7, 0, 0, 0], [0] * 5, [0] * 5))
    rows.append(("B", 4, 4.0, [0, 1, 1.2, 1.2, 0.65], [0, 0.7, 0, 0, 0], [0] * 5, [0] * 5))
    n = len(rows)
    r0 = np.array([r[2] for r in rows])
    scale = np.array([r[3] for r in rows], dtype=np.float64)
    reach = r0 * scale.max(axis=1) * 1.5          # bounding radius incl. extra blobs + noise
    reach[split] = r0[split] * 1.2 * 2.2
    centers = np.zeros((n, 3))
    placed = np.zeros(n, bool)
    order = [merge[0], split] + [i for i in range(n) if i not in (merge[0], merge[1], split)]
    for l in order:                               # greedy placement, vectorised per lesion
        cls = rows[l][1]
        # candidates of the wanted location first, then any white-matter location
        loc = anat.location.ravel()
        cand = np.concatenate([rng.permutation(np.flatnonzero(loc == cls))[:3000],
                               rng.permutation(np.flatnonzero((loc > 0) & (loc != cls)))[:3000]])
        cand = anat.world_mm(cand)
        if l == merge[0]:
            # partner at a fixed distance, also in deep white matter
            dirs = rng.standard_normal((len(cand), 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            partner = cand + dirs * (r0[merge[0]] + r0[merge[1]])
            ok = _in_class(anat, partner, cls)
            cand = np.concatenate([cand[ok], partner[ok]], axis=1)
        pos = cand[:, :3]
        if placed.any():
            d = np.linalg.norm(pos[:, None, :] - centers[placed][None], axis=2)
            need = reach[l] + reach[placed] + 3.0
            ok = np.all(d > need[None, :], axis=1)
            if l == merge[0]:
                d2 = np.linalg.norm(cand[:, None, 3:] - centers[placed][None], axis=2)
                ok &= np.all(d2 > (reach[merge[1]] + reach[placed] + 3.0)[None, :], axis=1)
            if not ok.any():
                raise RuntimeError(f"phantom: no room for lesion {l + 1}")
            pick = int(np.argmax(ok))
        else:
            pick = 0
        centers[l] = cand[pick, :3]
        placed[l] = True
        if l == merge[0]:
            centers[merge[1]] = cand[pick, 3:]
            placed[merge[1]] = True

    blob_l, blob_c, blob_inv, blob_s = [], [], [], []
    for l in range(n):                            # blobs per lesion (design data only)
        rot = _rotation(rng)
        if l == split:
            axis = rot[:, 0]
            offs = [axis * r0[l] * 1.05, -axis * r0[l] * 1.05, np.zeros(3)]
            radii = [np.array([1.0, 0.9, 0.85]) * r0[l]] * 2 + [np.full(3, 0.6 * r0[l])]
            fac = [np.ones(5), np.ones(5), np.array([1, 1, 1, 1, 0.0])]
        else:
            nb = 1 + rng.integers(0, 3)
            first = r0[l] * np.array([1.0, rng.uniform(0.6, 0.95), rng.uniform(0.5, 0.85)])
            offs, radii, fac = [np.zeros(3)], [first], [np.ones(5)]
            for _ in range(nb - 1):
                v = rng.standard_normal(3)
                offs.append(v / np.linalg.norm(v) * r0[l] * rng.uniform(0.4, 0.7))
                radii.append(r0[l] * rng.uniform(0.45, 0.75, size=3))
                fac.append(np.ones(5))
        for off, rad, f in zip(offs, radii, fac):
            brot = rot if l == split else _rotation(rng)
            blob_l.append(l)
            blob_c.append(centers[l] + off)
            blob_inv.append((brot / rad[None, :]).T)
            blob_s.append(scale[l] * f)

    restricted = np.array([r[4] for r in rows], float)
    enhancing = np.array([r[6] for r in rows], int)
    first = np.argmax(scale > 0, axis=1)
    acute = (restricted > 0) | (enhancing > 0)
    acute[np.arange(n), first] |= np.array([r[0] for r in rows]) != "A"

    def uni(lo_hi):
        return rng.uniform(*lo_hi, size=n)

    from ._phantom_anatomy import LESION
    table = LESION if lesion is None else lesion
    factors = {"FLAIR": uni(table["FLAIR"]), "T2w": uni(table["T2w"]),
               "T1w": uni(table["T1w"]), "b0": uni(table["b0"]),
               "ceT1w": uni(table["enhancing_ceT1w"])}
    return Design(
        center=centers, location=np.array([r[1] for r in rows]),
        noise_amp=np.where(np.isin(np.arange(n), list(merge) + [split]), 0.08,
                           rng.uniform(0.12, 0.22, size=n)),
        restricted=restricted, blackhole=np.array([r[5] for r in rows], float),
        enhancing=enhancing, acute=acute, factors=factors,
        blob_lesion=np.array(blob_l), blob_center=np.array(blob_c),
        blob_inv=np.array(blob_inv), blob_scale=np.array(blob_s),
        merge_pair=merge, split_lesion=split, group=[r[0] for r in rows])


def _in_class(anat: Anatomy, pts, cls) -> np.ndarray:
    ijk = np.rint((pts - anat.affine[:3, 3]) @ np.linalg.inv(anat.affine[:3, :3]).T).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.array(anat.shape)), axis=1)
    ok = np.zeros(len(pts), bool)
    ok[inside] = anat.location[tuple(ijk[inside].T)] == cls
    return ok


@dataclass
class VisitTruth:
    """Rasterised truth of one visit on the world grid."""

    ids: np.ndarray          # int32 truth lesion IDs
    design: np.ndarray       # int32 design lesion index + 1 of each voxel (0 = none)
    ratio: np.ndarray        # float32 normalised depth in the lesion (0 centre .. 1 edge)
    restricted: np.ndarray   # bool
    blackhole: np.ndarray    # bool
    enhancing: np.ndarray    # bool


def render_visits(anat: Anatomy, des: Design, rng):
    """Rasterise every visit; returns (list of VisitTruth, events DataFrame)."""
    shape = anat.shape
    allowed = np.flatnonzero((anat.wm > _ALLOWED_WM).ravel())
    pts = anat.world_mm(allowed)
    bound = np.max(des.blob_scale, axis=1) / np.min(np.linalg.svd(des.blob_inv,
                                                                  compute_uv=False), axis=1)
    bound = bound * (1 + des.noise_amp[des.blob_lesion] * 4.0) + anat.spacing
    # candidate (voxel, blob) pairs within each blob's bounding radius, in one KD-tree pass
    tree = cKDTree(pts)
    sdm = tree.sparse_distance_matrix(cKDTree(des.blob_center), float(bound.max()),
                                      output_type="ndarray")
    vi, bi = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64)
    keep = sdm["v"] <= bound[bi]
    vi, bi = vi[keep], bi[keep]
    rel = pts[vi] - des.blob_center[bi]
    rnorm = np.linalg.norm(np.einsum("nij,nj->ni", des.blob_inv[bi], rel), axis=1)
    noise = smooth_noise(shape, 1.5 / anat.spacing, rng).ravel()[allowed[vi]]
    rmod = rnorm / np.maximum(1.0 + des.noise_amp[des.blob_lesion[bi]] * noise, 0.3)
    lesion_of_pair = des.blob_lesion[bi]

    # lesions smaller than MIN_VOLUME_MM3 (or 2 voxels) are below what any scan resolves
    min_vox = max(2, int(np.ceil(MIN_VOLUME_MM3 / anat.spacing ** 3)))
    visits, alias = [], np.arange(des.n + 1, dtype=np.int32)   # design id -> truth id
    next_id = des.n + 1
    first_seen = np.full(des.n + N_VISITS + 2, -1)       # visit where each truth ID appeared
    events = {"merged_into": {}, "split_from": {}}
    for t in range(N_VISITS):                      # loop over visits; vectorised inside
        s = des.blob_scale[bi, t]
        with np.errstate(divide="ignore"):
            ratio = np.where(s > 0, rmod / np.where(s > 0, s, 1.0), np.inf)
        inside = ratio < 1.0
        v_in, r_in, l_in = vi[inside], ratio[inside], lesion_of_pair[inside]
        order = np.lexsort((r_in, v_in))
        v_in, r_in, l_in = v_in[order], r_in[order], l_in[order]
        firsts = np.r_[True, v_in[1:] != v_in[:-1]]
        design = np.zeros(shape, np.int32)
        ratio_vol = np.ones(shape, np.float32)
        flat = allowed[v_in[firsts]]
        design.ravel()[flat] = l_in[firsts] + 1
        ratio_vol.ravel()[flat] = r_in[firsts]
        ids = alias[design]
        ids, merged = _merge(ids, first_seen, t)
        for old, new in merged.items():
            events["merged_into"][(old, t)] = new
            alias[alias == old] = new
        split_vis = des.split_lesion + 1 if t == des.split_visit else 0
        ids, child = _one_component(ids, alias[split_vis] if split_vis else 0, next_id, min_vox)
        if child:
            events["split_from"][(next_id, t)] = int(alias[split_vis])
            next_id += 1
        seen = np.unique(ids[ids > 0])
        first_seen[seen[first_seen[seen] < 0]] = t
        design[ids == 0] = 0
        visits.append(_masks(ids, design, ratio_vol, des, t))
    return visits, events


def _merge(ids, first_seen, t):
    """Relabel components holding several IDs to the earliest (then largest) ID."""
    comp, ncomp = ndimage.label(ids > 0, structure=_STRUCT)
    if ncomp == 0:
        return ids, {}
    m = comp > 0
    df = pd.DataFrame({"c": comp[m], "id": ids[m]}).value_counts().rename("n").reset_index()
    multi = df[df.duplicated("c", keep=False)].copy()
    if multi.empty:
        return ids, {}
    fs = first_seen[multi["id"].to_numpy()]
    multi["first"] = np.where(fs >= 0, fs, t)
    multi = multi.sort_values(["c", "first", "n", "id"], ascending=[True, True, False, True])
    surv = multi.groupby("c")["id"].transform("first")
    lut = np.arange(int(ids.max()) + 1, dtype=np.int32)
    lut[multi["id"].to_numpy()] = surv.to_numpy()
    absorbed = (multi["id"] != surv).to_numpy() & (fs >= 0)
    merged = dict(zip(multi["id"].to_numpy()[absorbed].tolist(), surv.to_numpy()[absorbed].tolist()))
    return lut[ids], merged


def _one_component(ids, split_id, next_id, min_vox):
    """Keep each ID's largest 26-connected part (if it has ``min_vox`` voxels); a designed
    split keeps its second part under a new ID."""
    regions = cc_label(ids, background=0, connectivity=3)
    nreg = int(regions.max())
    if nreg == 0:
        return ids, False
    size = np.bincount(regions.ravel(), minlength=nreg + 1)
    reg_id = np.zeros(nreg + 1, np.int64)
    reg_id[regions.ravel()] = ids.ravel()
    r = np.arange(1, nreg + 1)
    order = np.lexsort((-size[r], reg_id[r]))
    r_sorted = r[order]
    rank = np.zeros(nreg + 1, np.int64)
    ids_sorted = reg_id[r_sorted]
    start = np.r_[0, np.flatnonzero(ids_sorted[1:] != ids_sorted[:-1]) + 1]
    rank_sorted = np.arange(len(r_sorted)) - np.repeat(start, np.diff(np.r_[start, len(r_sorted)]))
    rank[r_sorted] = rank_sorted
    new_id = np.where((rank == 0) & (size >= min_vox), reg_id, 0)
    child = False
    if split_id:
        sec = np.flatnonzero((reg_id == split_id) & (rank == 1))
        main = np.flatnonzero((reg_id == split_id) & (rank == 0))
        if len(sec) and size[sec[0]] >= max(0.25 * size[main[0]], min_vox):
            new_id[sec] = next_id
            child = True
    new_id[0] = 0
    return new_id[regions].astype(np.int32), child


def _masks(ids, design, ratio, des: Design, t) -> VisitTruth:
    lesion = ids > 0
    d = np.maximum(design - 1, 0)
    restricted = lesion & (ratio < des.restricted[d, t])
    blackhole = lesion & (ratio < des.blackhole[d, t])
    enh = des.enhancing[d, t]
    enhancing = lesion & ((enh == 1) | ((enh == 2) & (ratio > 0.55)))
    return VisitTruth(ids.astype(np.int32), design, ratio, restricted, blackhole, enhancing)
