"""Benchmark: lesiontrack rigid registration vs ANTsPy QuickRigid on one 1 mm pair.

The pair: the MNI152 T1 template (1 mm, shipped with nilearn) as fixed image, and the
same template moved by a known rigid transform (rotation of a few degrees about each
axis plus a shift) and resampled onto a different, oblique grid as moving image, with
a little noise. Errors are distances (mean / max, mm) between where the estimated and
the known transforms send the brain voxels of the fixed image.

Run ``python benchmarks/registration.py [--repeats N] [--no-ants]``. ANTsPy
(``antspyx``) is in the optional ``bench`` extra.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from lesiontrack import sitk_bridge
from lesiontrack.config import load_config
from lesiontrack.image import Image, save_image
from lesiontrack.registration import register_rigid


def rigid_ras(angles_deg, shift_mm, centre_ras) -> np.ndarray:
    """A RAS point map rotating by ``angles_deg`` (x, y, z) about ``centre_ras`` then shifting."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    c = np.asarray(centre_ras, float)
    m[:3, 3] = c - m[:3, :3] @ c + np.asarray(shift_mm, float)
    return m


def make_pair(seed: int = 0, angles=(6.0, -4.0, 8.0), shift=(5.0, -7.0, 4.0), noise=0.02):
    """Fixed MNI template, moving = template seen through a known rigid map on another grid.

    Returns ``fixed, moving, t_true, brain_points_lps`` where ``t_true`` maps fixed
    points to moving points (ITK resampling direction, LPS).
    """
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=1)
    fixed = Image(np.asarray(tpl.get_fdata(), np.float32), tpl.affine, source="MNI152 1mm")
    centre = fixed.world_coords((np.asarray(fixed.shape) - 1) / 2.0)
    m_true = rigid_ras(angles, shift, centre)          # fixed RAS point -> moving RAS point
    # moving grid: oblique (10 deg about z), 1 mm, different field of view and origin
    obl = rigid_ras((0, 0, 10.0), (0, 0, 0), (0, 0, 0))[:3, :3]
    shape = (180, 200, 170)
    aff = np.eye(4)
    aff[:3, :3] = obl
    aff[:3, 3] = m_true[:3, :3] @ centre + m_true[:3, 3] - obl @ ((np.asarray(shape) - 1) / 2.0)
    grid = Image(np.zeros(shape, np.float32), aff)
    t_true = sitk_bridge.from_ras_matrix(m_true)
    # moving image: resample the fixed through the inverse map (moving point -> fixed point)
    moving = sitk_bridge.resample(fixed, grid, sitk_bridge.inverse(t_true))
    rng = np.random.default_rng(seed)
    data = moving.data + rng.normal(0, noise * float(fixed.data.max()), moving.shape).astype(np.float32)
    moving = moving.with_data(np.abs(data).astype(np.float32), source="MNI152 moved")
    brain = np.argwhere(fixed.data > 0.2 * fixed.data.max())
    pts = sitk_bridge.ras_to_lps_points(fixed.world_coords(brain[:: 97]))
    return fixed, moving, t_true, pts


def error(t_est, t_true, pts) -> tuple[float, float]:
    d = np.linalg.norm(sitk_bridge.transform_points(t_est, pts) - sitk_bridge.transform_points(t_true, pts), axis=1)
    return float(d.mean()), float(d.max())


def run_lesiontrack(fixed, moving, cfg):
    t0, c0 = time.perf_counter(), time.process_time()
    t, qc = register_rigid(fixed, moving, cfg)
    return time.perf_counter() - t0, time.process_time() - c0, t, qc


def run_ants(fixed, moving, tmp: Path):
    import ants
    import SimpleITK as sitk

    f, m = tmp / "fixed.nii.gz", tmp / "moving.nii.gz"
    save_image(fixed, f)
    save_image(moving, m)
    fa, ma = ants.image_read(str(f)), ants.image_read(str(m))
    t0, c0 = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed=fa, moving=ma, type_of_transform="QuickRigid")
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    t = sitk.ReadTransform(reg["fwdtransforms"][0])  # fixed -> moving points, LPS
    return dt, dc, sitk_bridge.flatten(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-ants", action="store_true", help="skip ANTsPy")
    ap.add_argument("--threads", type=int, default=None,
                    help="SimpleITK threads for lesiontrack (default: the pipeline config's, 1 = "
                         "reproducible; 0 = all cores, as ANTs uses)")
    args = ap.parse_args(argv)
    cfg = load_config()["registration"]
    if args.threads is not None:
        cfg["threads"] = args.threads
    print(f"lesiontrack registration threads: {cfg['threads']} (0 = all cores)")
    fixed, moving, t_true, pts = make_pair()
    lt_times, lt_cpu, lt_err = [], [], None
    for _ in range(args.repeats):
        dt, dc, t, qc = run_lesiontrack(fixed, moving, cfg)
        lt_times.append(dt)
        lt_cpu.append(dc)
        lt_err = error(t, t_true, pts)
    lt, ltc = statistics.median(lt_times), statistics.median(lt_cpu)
    print(f"lesiontrack register_rigid: median wall {lt:.2f} s, CPU {ltc:.2f} s over {args.repeats} "
          f"(wall: {', '.join(f'{x:.2f}' for x in lt_times)}); error mean {lt_err[0]:.3f} mm, "
          f"max {lt_err[1]:.3f} mm; similarity {qc.similarity:.3f}; stop: {qc.stop_condition}")
    if args.no_ants:
        return 0
    try:
        import ants  # noqa: F401
    except ImportError:
        print("ANTsPy not installed (pip install 'lesiontrack[bench]'); skipping the comparison")
        return 0
    import os
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(len(os.sched_getaffinity(0))))
    a_times, a_cpu, a_errs = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            dt, dc, t = run_ants(fixed, moving, Path(d))
            a_times.append(dt)
            a_cpu.append(dc)
            a_errs.append(error(t, t_true, pts))
    # ANTs samples randomly without a fixed seed: its error varies; report the median run
    a_err = sorted(a_errs)[len(a_errs) // 2]
    at, atc = statistics.median(a_times), statistics.median(a_cpu)
    print(f"ANTsPy QuickRigid:          median wall {at:.2f} s, CPU {atc:.2f} s over {args.repeats} "
          f"(wall: {', '.join(f'{x:.2f}' for x in a_times)}); error mean {a_err[0]:.3f} mm, "
          f"max {a_err[1]:.3f} mm (median run; means of all runs: "
          f"{', '.join(f'{e[0]:.3f}' for e in a_errs)})")
    print(f"speed ratio (ANTsPy / lesiontrack): wall {at / lt:.1f}x, CPU {atc / ltc:.1f}x; "
          f"mean error lesiontrack {lt_err[0]:.3f} mm vs ANTsPy {a_err[0]:.3f} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
