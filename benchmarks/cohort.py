"""Cohort throughput: subjects per minute with 1 vs 2 Dask workers.

Runs :func:`lesiontrack.cohort.run_participants` on 4 small phantom subjects (2 mm,
five visits each) with ``nprocs=1`` and ``nprocs=2`` workers of one thread each (the
default layout of a cohort run on 2 CPUs: CPUs // nprocs threads per worker), timing
the whole call (cluster start included), alternating, ``--repeat`` times, with a fresh
output folder and ``force=True`` each time. Prints the median subjects per minute of
each, their ratio (target >= 1.7 on a 2-core machine) and the peak resident memory of
every worker process (``ru_maxrss`` measured inside the worker).

For reference it also times one worker given both CPUs (``omp_nthreads=2``: output
compression then overlaps computation), the fastest single-worker layout; the ratio
of 2 workers to that one is printed too.

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


def run_once(bids_dir: Path, out: Path, nprocs: int, cfg, threads: int = 1) -> dict:
    from lesiontrack.cohort import run_participants
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows = run_participants(bids_dir, out, cfg, nprocs=nprocs, omp_nthreads=threads, force=True,
                            progress=False)
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
    layouts = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}   # workers x threads
    results = {k: [] for k in layouts}
    for i in range(args.repeat):
        for key, (n, th) in layouts.items():
            r = run_once(bids_dir, args.workdir / f"out-{key}", n, load_config(), th)
            results[key].append(r)
            peaks = ", ".join(f"{v / 1024:.2f} GB" for v in r["peaks_mb"].values())
            print(f"repeat {i + 1}, {n} worker(s) x {th} thread(s): {r['wall_s']:.1f} s = "
                  f"{r['per_min']:.2f} subjects/min; per subject "
                  f"{', '.join(f'{s:.0f}' for s in r['subject_s'])} s; "
                  f"worker peak memory {peaks}; load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: statistics.median(r["per_min"] for r in rs) for k, rs in results.items()}
    ratio = med["2x1"] / med["1x1"]
    print(f"\n{args.subjects} phantom subjects (2 mm, 5 visits), {available_cpus()} CPUs, "
          f"median of {args.repeat}")
    for key, (n, th) in layouts.items():
        peak = max(max(r["peaks_mb"].values()) for r in results[key]) / 1024
        print(f"  {n} worker(s) x {th} thread(s): {med[key]:5.2f} subjects/min   peak memory "
              f"per worker <= {peak:.2f} GB")
    print(f"  ratio 2 vs 1 workers: {ratio:.2f}   target >= {TARGET_RATIO}   "
          f"{'OK' if ratio >= TARGET_RATIO else 'MISSED'}")
    print(f"  (2 workers vs 1 worker with both CPUs: {med['2x1'] / med['1x2']:.2f})")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
