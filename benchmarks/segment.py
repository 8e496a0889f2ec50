"""Benchmark: the segmentation core on one 1 mm visit, beside a full memory pass as the floor.

The input is one visit after registration and bias correction: the real cross-sectional
patient in ``../shared/data/real`` (1 mm MNI grid) when present, else (or with
``--synthetic``) a synthetic 1 mm subject on the MNI152 grid. Timed: ``segment_session``
(lesions, restricted diffusion, black holes, enhancement). Floor: one pass over every
input volume (``np.copy`` of each modality), what any voxelwise method must at least pay.
Both are medians of ``--repeats`` runs.

Usage: ``python benchmarks/segment.py [--repeats 7] [--synthetic]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lesiontrack import preprocess, segment
from lesiontrack.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def _real_visit(cfg):
    from lesiontrack.image import load_image

    base = REAL / "crosssectional_bids" / "sub-p19" / "ses-1" / "anat"
    names = {"FLAIR": "FLAIR", "T2w": "T2w", "T1w": "T1w", "ceT1w": "ce-gadolinium_T1w"}
    imgs = {m: load_image(base / f"sub-p19_ses-1_{n}.nii.gz") for m, n in names.items()}
    priors = preprocess.prepare_subject(imgs, cfg["preprocess"])
    sp = imgs["FLAIR"].spacing
    pre = preprocess.preprocess_session({m: i.data for m, i in imgs.items()}, priors, sp,
                                        cfg["preprocess"])
    return "real sub-p19 (1 mm, 182x218x182)", pre, priors, sp


def _synthetic_visit(cfg):
    sys.path.insert(0, str(ROOT / "tests"))
    from _segment_synthetic import synthetic_subject

    imgs, priors, _, _ = synthetic_subject(resolution=1, seed=0, n_lesions=40)
    sp = (1.0, 1.0, 1.0)
    pre = preprocess.preprocess_session(imgs, priors, sp, dict(cfg["preprocess"], n4_modalities=[]))
    return f"synthetic (1 mm, {'x'.join(map(str, priors.brain_mask.shape))})", pre, priors, sp


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic subject")
    args = ap.parse_args(argv)
    cfg = load_config()
    use_real = not args.synthetic and (REAL / "crosssectional_bids" / "sub-p19").exists()
    name, pre, priors, sp = (_real_visit if use_real else _synthetic_visit)(cfg)
    segment.segment_session(pre, priors, sp, cfg["segment"])          # warm-up
    t_seg = _median_time(lambda: segment.segment_session(pre, priors, sp, cfg["segment"]), args.repeats)
    t_floor = _median_time(lambda: [np.copy(a) for a in pre.values()], args.repeats)
    nvox = priors.brain_mask.size
    print(f"input: {name}, {len(pre)} contrasts ({', '.join(pre)}), {nvox / 1e6:.1f} M voxels each")
    print(f"{'segment_session':<34}{t_seg:8.3f} s   (target <= 0.5 s)")
    print(f"{'floor: one copy of every input':<34}{t_floor:8.3f} s")
    print(f"{'ratio segment / floor':<34}{t_seg / t_floor:8.1f} x")
    print(f"median of {args.repeats} runs each")


if __name__ == "__main__":
    main()
