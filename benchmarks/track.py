"""Benchmark: lesion tracking and quantification of five 1 mm sessions.

Builds a synthetic subject on the 1 mm MNI152 grid (182 x 218 x 182): ~60 lesions
(balls) that appear, grow, shrink and resolve over five sessions, with a noisy FLAIR
per session, and prints the median wall time over repeats of
``track.track_lesions`` (with and without FLAIR) and of ``quantify.lesion_table``
beside the floor: one pass over the same data (copying every mask and FLAIR once).

Run ``python benchmarks/track.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from lesiontrack.config import load_config  # noqa: E402
from lesiontrack.image import Image  # noqa: E402
from lesiontrack.quantify import lesion_table  # noqa: E402
from lesiontrack.track import track_lesions  # noqa: E402

SHAPE = (182, 218, 182)


@dataclass
class _Masks:
    restricted: np.ndarray
    blackhole: np.ndarray
    enhancing: np.ndarray


def subject(n_lesions=60, n_sessions=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform([40, 50, 40], [142, 168, 142], size=(n_lesions, 3))
    radius = rng.uniform(2.0, 6.0, size=(n_lesions, 1)) * rng.choice(
        [0.0, 0.8, 1.0, 1.3], size=(n_lesions, n_sessions), p=[0.15, 0.2, 0.45, 0.2])
    brain = np.zeros(SHAPE, bool)
    brain[20:162, 25:193, 20:162] = True
    masks, flair = [], []
    for t in range(n_sessions):                       # loop over sessions
        m = np.zeros(SHAPE, bool)
        for c, r in zip(centres, radius[:, t]):       # synthetic data only, not the core
            if r > 0:
                lo = np.maximum(np.floor(c - r).astype(int), 0)
                hi = np.ceil(c + r).astype(int) + 1
                g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= (
                    (g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2 <= r * r)
        f = (1.0 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32) * brain
        f[m] += 0.6
        masks.append(m)
        flair.append(f)
    return masks, flair, brain


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = load_config()["track"]
    masks, flair, brain = subject()
    grid = Image(np.zeros(SHAPE, np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    z = np.zeros(SHAPE, bool)
    sm = [_Masks(z, z, z)] * len(masks)
    floor = median_time(lambda: [(m.copy(), f.copy()) for m, f in zip(masks, flair)], args.repeats)
    t_masks = median_time(lambda: track_lesions(masks, (1, 1, 1), cfg), args.repeats)
    t_flair = median_time(lambda: track_lesions(masks, (1, 1, 1), cfg, flair=flair, brain_mask=brain),
                          args.repeats)
    tr = track_lesions(masks, (1, 1, 1), cfg, flair=flair, brain_mask=brain)
    t_table = median_time(lambda: lesion_table(tr, sm, [f"ses-{i}" for i in range(len(masks))], grid),
                          args.repeats)
    print(f"5 sessions of {SHAPE} voxels, {tr.events.lesion_id.nunique()} lesions, "
          f"median of {args.repeats}:")
    print(f"  floor (copy masks + FLAIR once)   {floor:7.2f} s")
    print(f"  track_lesions, masks only         {t_masks:7.2f} s  ({t_masks / floor:5.1f} x floor)")
    print(f"  track_lesions, with FLAIR         {t_flair:7.2f} s  ({t_flair / floor:5.1f} x floor)")
    print(f"  quantify.lesion_table             {t_table:7.2f} s  ({t_table / floor:5.1f} x floor)")
    print(tr.intervals.to_string())


if __name__ == "__main__":
    main()
