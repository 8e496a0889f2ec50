"""The ``lesiontrack`` command (BIDS-App conventions: ``run BIDS_DIR OUTPUT_DIR participant``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__

__all__ = ["build_parser", "main"]

log = logging.getLogger("lesiontrack")


def _labels(values):
    out = []
    for v in values or []:
        out.extend(x for x in v.replace(",", " ").split() if x)
    return out or None


def _add_common(p):
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("--config", metavar="TOML", default=None,
                   help="pipeline configuration (a file, or a name in pipelines/; default: the bundled default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesiontrack",
        description="Longitudinal MS lesion tracking: align every visit and contrast, segment lesions, "
                    "diffusion restriction, black holes and enhancement, follow every lesion through time.")
    parser.add_argument("--version", action="version", version=f"lesiontrack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="process a BIDS dataset (BIDS-App: participant or group level)")
    run.add_argument("bids_dir", type=Path, help="the BIDS input dataset (never written to)")
    run.add_argument("output_dir", type=Path, help="the derivatives folder, e.g. BIDS_DIR/derivatives/lesiontrack")
    run.add_argument("analysis_level", choices=["participant", "group"])
    run.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                     metavar="LABEL", help="subjects to process (with or without 'sub-'); default: all")
    run.add_argument("--session-label", "--session_label", dest="session_label", nargs="+", metavar="LABEL",
                     help="sessions to use (with or without 'ses-'); default: all")
    run.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=Path,
                     help="JSON file selecting subjects/sessions, e.g. {\"subject\": [\"01\"], \"session\": [\"01\", \"02\"]}, "
                          "and each contrast's input file by its entities, e.g. {\"flair\": {\"acquisition\": \"3D\"}, "
                          "\"t1w\": {\"reconstruction\": null}} (keys flair, t2w, t1w, cet1w, dwi, adc)")
    run.add_argument("--lesion-masks", dest="lesion_masks", type=Path, metavar="DIR",
                     help="use external lesion masks (LST-AI, manual, ...) from this derivatives folder: "
                          "sub-<s>/ses-<t>/anat/sub-<s>_ses-<t>_label-lesion_mask.nii.gz in each session's "
                          "reference (FLAIR, else T2w) space")
    grp = run.add_argument_group("execution (Dask)")
    grp.add_argument("--nprocs", "--n-procs", "--n_procs", dest="nprocs", type=int, default=None,
                     help="local worker processes (default: as many as cores and memory allow)")
    grp.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=int, default=None,
                     help="threads per local worker (default: cores / nprocs)")
    grp.add_argument("--mem", "--mem-gb", "--mem_gb", dest="mem", type=float, default=None,
                     help="memory limit in GB for the local cluster")
    grp.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                     help="use an existing Dask scheduler instead of a local cluster")
    grp.add_argument("--cluster", choices=["local", "slurm"], default="local",
                     help="where workers run (slurm needs the 'slurm' extra: dask-jobqueue)")
    grp.add_argument("--queue", default=None, help="SLURM partition")
    grp.add_argument("--walltime", default="02:00:00", help="SLURM job walltime")
    grp.add_argument("--jobs", type=int, default=None, help="SLURM jobs (workers) to start")
    grp.add_argument("--job-mem", dest="job_mem", default="8GB", help="memory per SLURM job")
    grp.add_argument("--job-cores", dest="job_cores", type=int, default=2, help="cores per SLURM job")
    grp.add_argument("--force", action="store_true", help="redo subjects whose outputs are complete")
    grp.add_argument("--stop-on-first-crash", "--stop_on_first_crash", dest="stop_on_first_crash",
                     action="store_true", help="stop the whole run at the first failed subject")
    _add_common(run)

    demo = sub.add_parser("demo", help="run the whole pipeline on the bundled example subject")
    demo.add_argument("output_dir", type=Path)
    demo.add_argument("--force", action="store_true", help="recompute even if outputs are complete")
    _add_common(demo)

    ph = sub.add_parser("phantom", help="write a synthetic longitudinal MS phantom (BIDS + ground truth)")
    ph.add_argument("output_dir", type=Path, help="writes OUTPUT_DIR/bids and OUTPUT_DIR/truth")
    ph.add_argument("--subjects", type=int, default=1)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--resolution", type=int, choices=[1, 2], default=2, help="template resolution in mm")
    ph.add_argument("--skull", action=argparse.BooleanOptionalAction, default=True,
                    help="draw a skull/scalp ring around the brain (--no-skull: skull-stripped images)")
    ph.add_argument("--warp", type=float, default=0.0, metavar="MM",
                    help="RMS displacement (mm) of a random smooth warp of the anatomy away from the "
                         "MNI152 template it is drawn on (default 0: the template itself)")
    ph.add_argument("--max-rotation", type=float, default=4.0, metavar="DEG",
                    help="each image's head pose: turned by up to this about each axis (default 4)")
    ph.add_argument("--max-shift", type=float, default=5.0, metavar="MM",
                    help="each image's head pose: shifted by up to this along each axis (default 5)")
    ph.add_argument("--pitch", type=float, default=0.0, metavar="DEG",
                    help="a pitch of the head common to every image (default 0)")
    ph.add_argument("--lesion-contrast", choices=["standard", "low"], default="standard",
                    help="low: FLAIR grey matter and lesions nearer white matter, lesions faint on T2w "
                         "next to cortex (a stress test; default standard)")
    ph.add_argument("-v", "--verbose", action="count", default=0)

    rep = sub.add_parser("report", help="rebuild the HTML report from existing derivatives")
    rep.add_argument("output_dir", type=Path)
    rep.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                     metavar="LABEL")
    rep.add_argument("--slices", type=int, nargs="+", metavar="K",
                     help="axial slice indices (individual space) for the evolution grid")
    _add_common(rep)

    pl = sub.add_parser("plot", help="draw one figure of a processed subject to a file")
    pl.add_argument("output_dir", type=Path)
    pl.add_argument("figure", help="evolution, trajectories, swimmer, ...")
    pl.add_argument("out", type=Path, help="image file (.png, .pdf or .svg)")
    pl.add_argument("--participant-label", "--participant_label", dest="participant_label", required=True)
    pl.add_argument("--slices", type=int, nargs="+", metavar="K")
    _add_common(pl)

    ev = sub.add_parser("evaluate", help="score a run against phantom ground truth, or its lesion masks "
                                         "against reference masks (a rater's, another tool's)")
    ev.add_argument("output_dir", type=Path)
    ev.add_argument("truth_dir", type=Path, nargs="?", help="the phantom's truth/ folder")
    ev.add_argument("--bids-dir", type=Path, help="the phantom's bids/ folder (with truth_dir)")
    ev.add_argument("--reference-masks", type=Path, metavar="DIR",
                    help="instead of a phantom's truth: reference lesion masks laid out as for "
                         "'run --lesion-masks' (sub-<s>/ses-<t>/anat/sub-<s>_ses-<t>_label-lesion_mask.nii.gz "
                         "on the grid of each session's FLAIR, else T2w); scores each session's native "
                         "lesion mask (Dice, lesion-wise precision/recall/F1, volumes)")
    ev.add_argument("--min-lesion-mm3", type=float, default=10.0,
                    help="with --reference-masks: smallest lesion counted lesion-wise (default 10)")
    ev.add_argument("--tsv", type=Path, help="with --reference-masks: also write the table as TSV")
    ev.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+")
    ev.add_argument("--json", type=Path, help="also write the scores as JSON")
    _add_common(ev)
    return parser


def _setup_logging(verbose: int):
    level = logging.WARNING if verbose < 0 else (logging.INFO if verbose < 2 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("lesiontrack")
    root.handlers[:] = [handler]
    root.setLevel(level)


def _bids_filter(path):
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"lesiontrack: error: --bids-filter-file {path}: {exc}") from None


def example_dataset() -> tuple[Path, Path | None]:
    """The bundled example (``test_data/``): its BIDS folder and its truth folder."""
    root = Path(__file__).resolve().parents[1] / "test_data"
    bids_dir = root / "bids"
    truth = root / "truth"
    return bids_dir, (truth if truth.exists() else None)


def _run(args, cfg) -> int:
    from . import cohort

    if args.analysis_level == "group":
        df = cohort.run_group(args.output_dir)
        print(f"group: {len(df)} session rows from {df['participant_id'].nunique() if len(df) else 0} "
              f"subjects -> {args.output_dir / 'desc-cohort_stats.tsv'}")
        return 0
    filt = _bids_filter(args.bids_filter_file)
    cluster_options = {"queue": args.queue, "walltime": args.walltime, "jobs": args.jobs,
                       "memory": args.job_mem, "cores": args.job_cores}
    rows = cohort.run_participants(
        args.bids_dir, args.output_dir, cfg, participant_labels=_labels(args.participant_label),
        session_labels=_labels(args.session_label), bids_filter=filt, nprocs=args.nprocs, mem=args.mem,
        omp_nthreads=args.omp_nthreads, scheduler=args.scheduler, cluster=None if args.cluster == "local" else args.cluster,
        cluster_options=cluster_options, force=args.force, stop_on_first_crash=args.stop_on_first_crash,
        lesion_mask_dir=args.lesion_masks)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in rows:
        print(f"sub-{r['participant_id'].removeprefix('sub-')}: {r['status']}"
              + (f" ({r['message']})" if r["message"] and r["status"] != "ok" else ""))
    if failed:
        print(f"{len(failed)} of {len(rows)} subject(s) failed; tracebacks in OUTPUT_DIR/sub-<s>/log/",
              file=sys.stderr)
    return min(len(failed), 125)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0) + 1)
    from .bids import BIDSError
    from .config import ConfigError, load_config
    from .image import ImageError
    from .cohort import CohortError, RunInterrupted
    from .phantom import PhantomError
    from .evaluate import EvaluateError
    from .report import ReportError

    try:
        if args.command == "phantom":
            from .phantom import make_phantom

            make_phantom(args.output_dir, n_subjects=args.subjects, seed=args.seed,
                         resolution=args.resolution, skull=args.skull, anatomy_warp_mm=args.warp,
                         max_rotation_deg=args.max_rotation, max_shift_mm=args.max_shift,
                         pitch_deg=args.pitch, lesion_contrast=args.lesion_contrast)
            print(f"phantom written: {args.output_dir / 'bids'} (BIDS) and {args.output_dir / 'truth'} (ground truth)")
            return 0
        cfg = load_config(args.config)
        if args.command == "run":
            return _run(args, cfg)
        if args.command == "demo":
            return _demo(args, cfg)
        if args.command == "report":
            from . import report
            from .bids import _label

            labels = _labels(args.participant_label) or sorted(
                p.name[4:] for p in args.output_dir.glob("sub-*") if p.is_dir())
            for lbl in labels:
                res = report.load_result(args.output_dir, _label(lbl, "sub-"))
                print(report.build_report(res, args.output_dir, cfg["report"], slices=args.slices))
            return 0
        if args.command == "plot":
            from . import report
            from .bids import _label

            res = report.load_result(args.output_dir, _label(args.participant_label, "sub-"))
            report.plot_figure(res, args.figure, args.out, slices=args.slices)
            print(args.out)
            return 0
        if args.command == "evaluate":
            from ._io import write_json, write_tsv
            from .evaluate import (evaluate_against_masks, evaluate_run, format_reference_scores,
                                   format_scores)

            if (args.truth_dir is None) == (args.reference_masks is None):
                raise SystemExit("lesiontrack evaluate: error: give either a phantom's truth_dir (with "
                                 "--bids-dir) or --reference-masks DIR")
            if args.reference_masks is not None:
                table, notes = evaluate_against_masks(args.output_dir, args.reference_masks,
                                                      _labels(args.participant_label), args.min_lesion_mm3)
                print(format_reference_scores(table, notes, args.min_lesion_mm3))
                if args.tsv:
                    write_tsv(args.tsv, table)
                if args.json:
                    write_json(args.json, {"scores": table.to_dict(orient="records"), "notes": notes})
                return 0
            if args.bids_dir is None:
                raise SystemExit("lesiontrack evaluate: error: truth_dir needs --bids-dir (the phantom's bids/)")
            scores = evaluate_run(args.output_dir, args.truth_dir, args.bids_dir,
                                  participant_labels=_labels(args.participant_label))
            print(format_scores(scores))
            if args.json:
                write_json(args.json, scores)
            return 0
    except RunInterrupted as exc:
        print(f"lesiontrack: interrupted by signal {exc.signum}; finished subjects are kept, "
              "rerun the same command to complete the others", file=sys.stderr)
        return 128 + int(exc.signum)
    except (BIDSError, ImageError, ConfigError, ReportError, CohortError, PhantomError, EvaluateError,
            OSError) as exc:
        print(f"lesiontrack: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def _demo(args, cfg) -> int:
    import time

    bids_dir, truth = example_dataset()
    if not bids_dir.exists():
        from .phantom import make_phantom

        gen = args.output_dir.parent / (args.output_dir.name + "_example")
        print(f"bundled example not found; generating it in {gen}")
        make_phantom(gen, n_subjects=1, seed=0, resolution=2, skull=False)
        bids_dir, truth = gen / "bids", gen / "truth"
    t0 = time.perf_counter()
    args_run = build_parser().parse_args(["run", str(bids_dir), str(args.output_dir), "participant",
                                          "--nprocs", "1"] + (["--force"] if args.force else []))
    code = _run(args_run, cfg)
    if code:
        return code
    from . import cohort

    cohort.run_group(args.output_dir)
    elapsed = time.perf_counter() - t0
    print(f"demo finished in {elapsed:.1f} s; open {args.output_dir}/sub-01.html")
    if truth is not None:
        from .evaluate import evaluate_run, format_scores

        print(format_scores(evaluate_run(args.output_dir, truth, bids_dir)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
