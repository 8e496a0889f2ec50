"""Benchmark: whole-subject alignment of a phantom subject, wall time and accuracy.

Generates (or reuses) a phantom with ``lesiontrack.phantom.make_phantom``, aligns all
sessions and contrasts of one subject with ``registration.align_subject`` and prints
the median wall time over repeats and, for every image, the target registration error
against the phantom's known transforms: the estimated map from the first session's
reference into the image, ``T_sm o T_ref^-1``, against the true one, over brain points.

Run ``python benchmarks/align_subject.py [--resolution 1] [--phantom DIR] [--repeats N]``.
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

from lesiontrack import sitk_bridge  # noqa: E402
from lesiontrack.config import load_config  # noqa: E402
from lesiontrack.image import load_image  # noqa: E402
from lesiontrack.registration import align_subject  # noqa: E402

# modality key -> (datatype folder, file suffix, truth transform file part)
FILES = {"FLAIR": ("anat", "FLAIR", "from-FLAIR"), "T2w": ("anat", "T2w", "from-T2w"),
         "T1w": ("anat", "T1w", "from-T1w"), "ceT1w": ("anat", "ce-gadolinium_T1w", "ce-gadolinium_from-T1w"),
         "dwi": ("dwi", "dwi", "from-dwi")}


def load_subject(bids: Path, sub: str):
    """Native images of every session (dwi = mean of its b=0 volumes)."""
    images = {}
    for ses in sorted(p.name for p in (bids / sub).glob("ses-*")):
        mods = {}
        for mod, (dt, suffix, _) in FILES.items():
            f = bids / sub / ses / dt / f"{sub}_{ses}_{suffix}.nii.gz"
            if not f.exists():
                continue
            if mod == "dwi":
                img = load_image(f, ndim=4)
                bval = np.loadtxt(f.with_name(f.name.replace(".nii.gz", ".bval")), ndmin=1)
                img = img.with_data(img.data[..., bval < 50].mean(axis=-1).astype(np.float32))
            else:
                img = load_image(f)
            mods[mod] = img
        images[ses] = mods
    return images


def truth_transforms(truth: Path, sub: str, images: dict):
    out = {}
    for ses, mods in images.items():
        out[ses] = {m: sitk_bridge.read_transform(
            truth / sub / ses / f"{sub}_{ses}_{FILES[m][2]}_to-world_mode-image_xfm.txt") for m in mods}
    return out


def brain_points(truth: Path, sub: str, step: int = 11) -> np.ndarray:
    mask = load_image(truth / sub / f"{sub}_space-world_label-brain_mask.nii.gz", is_label=True)
    return sitk_bridge.ras_to_lps_points(mask.world_coords(np.argwhere(mask.data > 0)[::step]))


def tre(al, true, pts) -> dict:
    """Per image (session, modality): (mean, max) mm of T_sm o T_ref0^-1 vs the truth."""
    s0 = next(iter(true))
    ref = al.reference[s0]
    q = sitk_bridge.transform_points(true[s0][ref], pts)
    back = sitk_bridge.transform_points(sitk_bridge.inverse(al.transforms[s0][ref]), q)
    out = {}
    for ses, mods in true.items():
        for mod, t in mods.items():
            d = np.linalg.norm(sitk_bridge.transform_points(al.transforms[ses][mod], back)
                               - sitk_bridge.transform_points(t, pts), axis=1)
            out[(ses, mod)] = (float(d.mean()), float(d.max()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1, choices=(1, 2))
    ap.add_argument("--phantom", type=Path, help="existing make_phantom output folder")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = None
    root = args.phantom
    if root is None:
        from lesiontrack.phantom import make_phantom

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
        make_phantom(root, n_subjects=1, seed=0, resolution=args.resolution)
    bids, truth = root / "bids", root / "truth"
    sub = sorted(p.name for p in bids.glob("sub-*") if p.is_dir())[0]
    images = load_subject(bids, sub)
    n_img = sum(len(m) for m in images.values())
    cfg = load_config()["registration"]
    walls, cpus = [], []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        al = align_subject(images, cfg)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    errs = tre(al, truth_transforms(truth, sub, images), brain_points(truth, sub))
    print(f"{sub}: {len(images)} sessions, {n_img} images; grid {al.grid.shape} at {al.grid.spacing[0]:g} mm")
    print(f"align_subject wall: median {statistics.median(walls):.2f} s "
          f"(all {', '.join(f'{x:.2f}' for x in walls)}); process CPU median {statistics.median(cpus):.2f} s")
    by_mod: dict = {}
    for (ses, mod), (mean, mx) in errs.items():
        by_mod.setdefault(mod, []).append((mean, mx))
    for mod, v in by_mod.items():
        print(f"  TRE {mod:6s}: mean of means {np.mean([a for a, _ in v]):.3f} mm, worst mean "
              f"{max(a for a, _ in v):.3f} mm, max {max(b for _, b in v):.3f} mm")
    flagged = [(q.session_id, q.modality, q.reason) for q in al.qc if q.flagged]
    print(f"  QC flagged: {flagged if flagged else 'none'}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
