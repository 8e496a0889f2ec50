"""A quick stand-in for :func:`lesiontrack.pipeline.run_subject`, loaded into Dask workers.

Used as a Dask worker preload (``distributed.worker.preload`` = this file), it replaces
``run_subject`` inside every worker process, so cohort runs on real worker processes
take seconds. Behaviour per subject, from marker files in ``BIDS_DIR/sub-<s>/``:
``BROKEN`` raises; ``SLOW`` (seconds) sleeps while an output is half written (on the
first attempt only, when ``LT_FAKE_PIDDIR`` records attempts and worker PIDs).
Outputs are written atomically with the provenance file last, like the pipeline.
The worker's thread settings are recorded in ``sub-<s>/sub-<s>_threads.json``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lesiontrack import __version__
from lesiontrack._io import atomic_path, write_json, write_text
from lesiontrack.bids import find_sessions
from lesiontrack.pipeline import _input_files
from lesiontrack.config import config_hash


def run_subject(bids_dir, subject, output_dir, cfg, *, session_labels=None, progress=None,
                **kwargs):
    import SimpleITK as sitk
    from threadpoolctl import threadpool_info

    subject = str(subject).removeprefix("sub-")
    src = Path(bids_dir) / f"sub-{subject}"
    out = Path(output_dir) / f"sub-{subject}"
    piddir = os.environ.get("LT_FAKE_PIDDIR")
    if piddir:
        Path(piddir, f"sub-{subject}.pid").write_text(str(os.getpid()))
    if (src / "BROKEN").exists():
        raise RuntimeError(f"sub-{subject}: FLAIR is truncated (deliberately broken)")
    rel = [f"sub-{subject}/sub-{subject}_threads.json",
           f"sub-{subject}/sub-{subject}_desc-sessions_stats.tsv",
           f"sub-{subject}/sub-{subject}_desc-big_T2w.nii.gz"]
    write_json(Path(output_dir) / rel[0], {
        "pid": os.getpid(),
        "sitk": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "blas": sorted({d["num_threads"] for d in threadpool_info()}),
        "omp_env": os.environ.get("OMP_NUM_THREADS")})
    write_text(Path(output_dir) / rel[1], "session_id\tlesion_count\nses-01\t3\n")
    with atomic_path(Path(output_dir) / rel[2]) as tmp:
        tmp.write_bytes(b"half written")
        first = not (piddir and Path(piddir, f"sub-{subject}.attempted").exists())
        if piddir:
            Path(piddir, f"sub-{subject}.attempted").write_text("")
        if (src / "SLOW").exists() and first:  # a retry of the subject runs at full speed
            time.sleep(float((src / "SLOW").read_text()))
    write_json(out / f"sub-{subject}_provenance.json",
               {"version": __version__, "config_hash": config_hash(cfg), "outputs": rel,
                "inputs": _input_files(find_sessions(bids_dir, subject, session_labels,
                                                     kwargs.get("input_filters")))})


def dask_setup(worker=None):
    """Preload hook: swap the pipeline's ``run_subject`` in this worker process."""
    import lesiontrack.pipeline

    lesiontrack.pipeline.run_subject = run_subject
