"""Cohort throughput: subjects per minute with 1 vs 2 Dask workers.

Runs :func:`lesiontrack.cohort.run_participants` on 4 small phantom subjects (2 mm,
five visits each) with ``nprocs=1`` and ``nprocs=2`` (alternating, ``--repeat`` times,
fresh output folder and ``force=True`` each time), timing the whole call (cluster
start included). Prints the median subjects per minute of each, their ratio
(target >= 1.7 on a 2-core machine) and the peak resident memory of every worker
process (``ru_maxrss`` measured inside the worker).

Usage::

    python benchmarks/cohort.py [--workdir DIR] [--subjects 4] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.7


def _phantom(workdir: Path, n: int, seed: int) -> Path:
    root = workdir / "phantom"
    bids_dir = root / "bids"
    if not (bids_dir / f"sub-{n:02d}").exists():
        from lesiontrack.phantom import make_phantom
        t0 = time.perf_counter()
        make_phantom(root, n_subjects=n, seed=seed, resolution=2)
        print(f"phantom ({n} subjects, 2 mm) generated in {time.perf_counter() - t0:.0f} s")
    return bids_dir


def run_once(bids_dir: Path, out: Path, nprocs: int, cfg) -> dict:
    from lesiontrack.cohort import run_participants
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows = run_participants(bids_dir, out, cfg, nprocs=nprocs, force=True, progress=False)
    wall = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"subjects failed: {failed}")
    peaks: dict = {}
    for r in rows:
        peaks[r["worker"]] = max(peaks.get(r["worker"], 0.0), r["peak_memory_mb"])
    return {"wall_s": wall, "per_min": 60.0 * len(rows) / wall, "peaks_mb": peaks,
            "subject_s": [r["duration_s"] for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from lesiontrack._cohort_exec import available_cpus
    from lesiontrack.config import load_config
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lesiontrack-bench-")
        args.workdir = Path(tmp.name)
    bids_dir = _phantom(args.workdir, args.subjects, args.seed)
    results = {1: [], 2: []}
    for i in range(args.repeat):
        for n in (1, 2):
            r = run_once(bids_dir, args.workdir / f"out-{n}", n, load_config())
            results[n].append(r)
            peaks = ", ".join(f"{v / 1024:.2f} GB" for v in r["peaks_mb"].values())
            print(f"repeat {i + 1}, {n} worker(s): {r['wall_s']:.1f} s = "
                  f"{r['per_min']:.2f} subjects/min; per subject "
                  f"{', '.join(f'{s:.0f}' for s in r['subject_s'])} s; "
                  f"worker peak memory {peaks}; load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {n: statistics.median(r["per_min"] for r in rs) for n, rs in results.items()}
    ratio = med[2] / med[1]
    print(f"\n{args.subjects} phantom subjects (2 mm, 5 visits), {available_cpus()} CPUs, "
          f"median of {args.repeat}")
    for n in (1, 2):
        peak = max(max(r["peaks_mb"].values()) for r in results[n]) / 1024
        print(f"  {n} worker(s): {med[n]:5.2f} subjects/min   peak memory per worker "
              f"<= {peak:.2f} GB")
    print(f"  ratio 2 vs 1 workers: {ratio:.2f}   target >= {TARGET_RATIO}   "
          f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
