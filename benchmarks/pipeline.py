"""One 1 mm, five-visit phantom subject end to end: wall time and peak memory.

Runs :func:`lesiontrack.pipeline.run_subject` (load, align, preprocess, segment, track,
quantify, write, report) in a fresh child process per repetition and reports

- the pipeline's own wall time (measured inside the child around ``run_subject``),
- the child process's wall time (interpreter start and imports included),
- the child's peak resident memory (``ru_maxrss`` from ``os.wait4``, exact),
- the child's CPU time (user + system), a load-independent check on a shared machine,

as medians over repetitions (the machine is shared: timings are noisy). Targets:
<= 60 s and <= 3 GB. For scale: SAMSEG takes about 10 minutes per visit, and
nnU-Net-based lesion tools tens of minutes per visit on a CPU.

Usage::

    python benchmarks/pipeline.py [--workdir DIR] [--repeat 3] [--seed 0]

The phantom is generated once into ``DIR/phantom`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S, TARGET_GB = 60.0, 3.0

_CHILD = """
import json, sys, time
from lesiontrack.config import load_config
from lesiontrack.pipeline import run_subject
cfg = load_config()
t0 = time.perf_counter()
res = run_subject(sys.argv[1], "01", sys.argv[2], cfg)
print(json.dumps({"wall_s": time.perf_counter() - t0, "timing": res.provenance.get("timing", {}),
                  "sessions": res.session_ids, "lesions": int(res.lesions["lesion_id"].nunique())}))
"""


def _phantom(workdir: Path, seed: int) -> Path:
    root = workdir / "phantom"
    bids_dir = root / "bids"
    if not (bids_dir / "sub-01").exists():
        from lesiontrack.phantom import make_phantom
        t0 = time.perf_counter()
        make_phantom(root, n_subjects=1, seed=seed, resolution=1)
        print(f"phantom (1 mm, 5 visits) generated in {time.perf_counter() - t0:.0f} s: {bids_dir}")
    return bids_dir


def run_once(bids_dir: Path, out: Path) -> dict:
    """Run the subject in a child process; wall time and exact peak RSS of the child."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [env.get("PYTHONPATH")] if p])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(bids_dir), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run_subject failed (exit {proc.returncode}); run it directly to see why")
    info = json.loads(stdout.strip().splitlines()[-1])
    info.update(process_s=wall, peak_gb=usage.ru_maxrss * 1024 / 1e9,
                cpu_s=usage.ru_utime + usage.ru_stime)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the phantom and outputs go (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lesiontrack-bench-")
        args.workdir = Path(tmp.name)
    bids_dir = _phantom(args.workdir, args.seed)
    runs = []
    for i in range(args.repeat):
        info = run_once(bids_dir, args.workdir / f"out{i}")
        runs.append(info)
        steps = "  ".join(f"{k[:-2]} {v:.1f}" for k, v in info["timing"].items() if k != "total_s")
        print(f"run {i + 1}: pipeline {info['wall_s']:.1f} s, process {info['process_s']:.1f} s "
              f"(CPU {info['cpu_s']:.1f} s), peak {info['peak_gb']:.2f} GB  [{steps}]", flush=True)
    wall = statistics.median(r["wall_s"] for r in runs)
    proc_wall = statistics.median(r["process_s"] for r in runs)
    peak = max(r["peak_gb"] for r in runs)
    print(f"\n1 mm phantom subject, {len(runs[0]['sessions'])} visits, "
          f"{runs[0]['lesions']} tracked lesions, {args.repeat} run(s)")
    print(f"  pipeline wall time (median): {wall:6.1f} s   target <= {TARGET_S:.0f} s   "
          f"{'OK' if wall <= TARGET_S else 'MISSED'}")
    print(f"  process wall time (median):  {proc_wall:6.1f} s   (with interpreter start, imports)")
    print(f"  process CPU time (median):   {statistics.median(r['cpu_s'] for r in runs):6.1f} s   "
          f"(user + system, all threads; load of the machine: {os.getloadavg()[0]:.1f})")
    print(f"  peak memory (max of runs):   {peak:6.2f} GB  target <= {TARGET_GB:.0f} GB  "
          f"{'OK' if peak <= TARGET_GB else 'MISSED'}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
