"""Many subjects on Dask: resumable, failure-isolated BIDS-App batch runs.

:func:`run_participants` runs :func:`lesiontrack.pipeline.run_subject` for every selected
subject on a Dask cluster (a local one by default, an existing one given its scheduler
address, or SLURM jobs through dask-jobqueue), one subject per worker at a time.

- **Resumable**: a subject whose outputs are complete for its current input files,
  this configuration and version (:func:`lesiontrack.pipeline.subject_is_complete`) is
  skipped unless ``force``; a new visit, or a changed input file, makes it incomplete. Outputs are written atomically, so an interrupted run leaves at most
  temporary ``.tmp-*`` files; they are removed when the run is interrupted by
  SIGINT/SIGTERM, and otherwise by the next run, which redoes every subject lacking
  its final provenance file.
- **Failure isolation**: a subject's error is written with its traceback to
  ``OUTPUT_DIR/sub-<s>/log/crash-<timestamp>.txt`` and the others go on (unless
  ``stop_on_first_crash``); ``OUTPUT_DIR/run_status.tsv`` lists every subject's outcome.
- **Threads**: each worker's SimpleITK and BLAS/OpenMP threads are capped so that
  running subjects x threads <= CPUs of the host.

:func:`run_group` gathers the per-subject session tables into ``desc-cohort_stats.tsv``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from . import bids
from ._cohort_exec import PROGRESS_TOPIC, make_client, run_one
from ._cohort_files import (CohortError, Progress, clean_temp_files, read_bids_filter,
                            write_crash_log)
from ._io import write_json, write_tsv

__all__ = ["run_participants", "run_group", "CohortError", "RunInterrupted"]

logger = logging.getLogger("lesiontrack.cohort")


class RunInterrupted(KeyboardInterrupt):
    """The cohort run was stopped by a signal (``signum``); no partial outputs remain."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def _signals_raise():
    """Turn SIGTERM (and SIGINT) into :class:`RunInterrupted` in the main thread.

    Only the first signal raises; later ones are ignored so that clean-up finishes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise RunInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _row(subject, status, message="", **extra) -> dict:
    row = {"participant_id": f"sub-{subject}", "status": status, "message": message,
           "duration_s": None, "peak_memory_mb": None, "worker": None}
    row.update(extra)
    return row


def _select(bids_dir, participant_labels, session_labels, bids_filter):
    """Subjects and sessions after labels and the BIDS filter (intersection of both), and
    the filter's selection of input files per contrast (None when it has none)."""
    filt = read_bids_filter(bids_filter)
    labels = [bids._label(x, "sub-") for x in participant_labels] if participant_labels else None
    if "subject" in filt:
        labels = [x for x in (labels or filt["subject"]) if x in filt["subject"]]
        if not labels:
            raise CohortError(f"participant labels {participant_labels} and the BIDS filter's "
                              f"subjects {filt['subject']} have no subject in common")
    sessions = [bids._label(x, "ses-") for x in session_labels] if session_labels else None
    if "session" in filt:
        sessions = [x for x in (sessions or filt["session"]) if x in filt["session"]]
        if not sessions:
            raise CohortError(f"session labels {session_labels} and the BIDS filter's "
                              f"sessions {filt['session']} have no session in common")
    return bids.find_subjects(bids_dir, labels), sessions, filt.get("inputs")


def _failed_task(output_dir, subject, exc) -> dict:
    """Row + crash log for a task that did not return (worker killed, lost, ...)."""
    from distributed import KilledWorker
    if isinstance(exc, KilledWorker):
        why = ("the worker process running it died (killed, or out of its memory limit) "
               "on every attempt")
    else:
        why = f"{type(exc).__name__}: {exc}"
    log = write_crash_log(output_dir, subject, f"{why}\n{exc!r}", {"where": "Dask scheduler"})
    return _row(subject, "failed", f"{why} (log: {log.relative_to(output_dir)})")


def run_participants(bids_dir, output_dir, cfg, *, participant_labels=None, session_labels=None,
                     bids_filter=None, nprocs=None, mem=None, omp_nthreads=None, scheduler=None,
                     cluster=None, cluster_options=None, force=False, stop_on_first_crash=False,
                     progress=True, lesion_mask_dir=None) -> list[dict]:
    """Process many subjects on Dask; skip finished ones; isolate failures.

    Parameters
    ----------
    bids_dir, output_dir : path
        BIDS input dataset and BIDS-Derivatives output folder.
    cfg : dict
        Resolved pipeline configuration (:func:`lesiontrack.config.load_config`).
    participant_labels, session_labels : list of str, optional
        Subjects / sessions to use (with or without ``sub-`` / ``ses-``); default all.
    bids_filter : dict or path, optional
        ``{"subject": [...], "session": [...]}`` or a JSON file holding it;
        intersected with the labels; it may also choose each contrast's input file by its
        entities (``{"flair": {"acquisition": "3D"}}``, see
        :func:`lesiontrack._cohort_files.read_bids_filter`).
    nprocs : int, optional
        Local worker processes (default: as many as CPUs, subjects and memory allow,
        assuming about 3 GB per subject); with ``cluster="slurm"`` the number of jobs
        unless ``cluster_options["jobs"]`` is given.
    mem : str or float, optional
        Memory for the local cluster (``"16GB"``, or a number of GB), shared equally
        between its workers; each worker is held to its share.
    omp_nthreads : int, optional
        Threads of each local worker's subject (SimpleITK, BLAS, output compression);
        default CPUs // ``nprocs``.
    scheduler : str, optional
        ``"tcp://HOST:PORT"`` of a running Dask scheduler; its workers must see
        ``bids_dir`` and ``output_dir`` at the same paths and have lesiontrack installed.
    cluster : {None, "local", "slurm"} or distributed Cluster, optional
        ``"slurm"``: dask-jobqueue SLURM jobs, one subject at a time per job.
    cluster_options : dict, optional
        For SLURM: ``queue``, ``walltime``, ``jobs``, ``memory`` (per job), ``cores``
        (CPUs per job, all used by the subject's threads), ``account`` and any other
        ``SLURMCluster`` argument. For the local cluster: ``distributed.LocalCluster``
        arguments (SLURM-only keys are ignored there).
    force : bool
        Redo subjects whose outputs are complete.
    stop_on_first_crash : bool
        Stop at the first failed subject (the others are reported ``skipped``).
    progress : bool
        A bar over subjects on a terminal (stderr), plain log lines otherwise.
    lesion_mask_dir : path, optional
        Passed to :func:`lesiontrack.pipeline.run_subject` (external lesion masks).

    Returns
    -------
    list of dict
        One row per subject, in label order: ``participant_id``, ``status``
        (``ok``, ``failed`` or ``skipped``), ``message``, plus ``duration_s``,
        ``peak_memory_mb`` (peak RSS of the worker process) and ``worker`` (None when
        not run). The same rows (first three columns) go to
        ``OUTPUT_DIR/run_status.tsv``.

    Raises
    ------
    CohortError
        Invalid execution settings or filters.
    RunInterrupted
        SIGINT/SIGTERM: running subjects are stopped, temporary files removed and
        ``run_status.tsv`` written (unfinished subjects ``failed``, "interrupted").
    """
    from . import pipeline
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    bids.check_output_dir(bids_dir, output_dir)
    subjects, sessions, inputs = _select(bids_dir, participant_labels, session_labels, bids_filter)
    show = Progress(len(subjects), enabled=bool(progress))
    output_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_temp_files(output_dir, subjects, root=True)
    if removed:
        show.info(f"removed {len(removed)} temporary file(s) left by an interrupted run")

    rows: dict[str, dict] = {}
    todo = []
    for s in subjects:
        if not force and pipeline.subject_is_complete(output_dir, s, cfg, bids_dir, sessions, inputs):
            rows[s] = _row(s, "skipped", "outputs complete for these inputs, this configuration and version")
        else:
            todo.append(s)
    # every subject's input problems, before any work starts
    for s in todo:
        for problem in bids.check_subject(bids_dir, s, sessions, inputs):
            show.info(f"input problem: {problem}", warn=True)
    bids.write_dataset_description(output_dir, bids_dir)
    for s in subjects:
        if s in rows:
            show.update(rows[s])
    if todo:
        _run_on_dask(todo, rows, show, bids_dir, output_dir, cfg, sessions,
                     dict(nprocs=nprocs, mem=mem, scheduler=scheduler, cluster=cluster,
                          cluster_options=cluster_options, omp_nthreads=omp_nthreads),
                     stop_on_first_crash,
                     {k: v for k, v in (("lesion_mask_dir", lesion_mask_dir), ("input_filters", inputs))
                      if v})
    show.close()
    out = [rows[s] for s in subjects]
    bids.write_run_status(output_dir, out)
    return out


def _run_on_dask(todo, rows, show, bids_dir, output_dir, cfg, sessions, where,
                 stop_on_first_crash, run_kwargs) -> None:
    from distributed import as_completed
    client, own_cluster, threads, desc = make_client(n_subjects=len(todo), **where)
    show.info(f"{len(todo)} subject(s) to process on {desc}; "
              f"{len(rows)} already complete")
    interrupted = None
    futures = {}
    try:
        with _signals_raise():
            try:
                client.subscribe_topic(
                    PROGRESS_TOPIC, lambda ev: show.substep(ev[1]["subject"], ev[1]["step"]))
            except Exception:  # noqa: BLE001 - progress of steps is a nicety
                pass
            token = uuid.uuid4().hex[:8]
            for s in todo:
                fut = client.submit(run_one, str(bids_dir), s, str(output_dir), cfg, sessions,
                                    threads, os.getpid(), run_kwargs, pure=False,
                                    key=f"lesiontrack-sub-{s}-{token}")
                futures[fut] = s
            for fut in as_completed(list(futures)):
                s = futures[fut]
                try:
                    row = fut.result()
                except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - worker or
                    # scheduler lost, result unreadable: the subject fails, the run goes on
                    row = _failed_task(output_dir, s, exc)
                rows[s] = row
                show.update(row)
                bids.write_run_status(output_dir, [rows[x] for x in sorted(rows)])
                if row["status"] == "failed" and stop_on_first_crash:
                    show.info(f"stopping: sub-{s} failed and stop_on_first_crash is set")
                    _stop(client, futures, rows, show)
                    break
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:
        try:
            client.close()
        finally:
            if own_cluster is not None:
                own_cluster.close()  # stops workers still busy with a subject
                clean_temp_files(output_dir, todo)  # no live worker writes here any more
        if interrupted is not None:
            from . import pipeline
            why = str(interrupted) or "interrupted"
            for s in todo:
                if s in rows:
                    continue
                if pipeline.subject_is_complete(output_dir, s, cfg, bids_dir, sessions,  # result not yet seen
                                                run_kwargs.get("input_filters")):
                    rows[s] = _row(s, "ok", f"finished before the run was {why}")
                else:
                    rows[s] = _row(s, "failed", f"{why} before it finished; rerun to complete it")
            show.close()
            bids.write_run_status(output_dir, [rows[s] for s in sorted(rows)])
    if interrupted is not None:
        raise interrupted


def _stop(client, futures, rows, show) -> None:
    """Cancel what has not finished; keep the rows of subjects that did finish."""
    pending = [f for f, s in futures.items() if s not in rows and not f.done()]
    client.cancel(pending)
    for fut, s in futures.items():
        if s in rows:
            continue
        if fut.done() and fut.status == "finished":
            rows[s] = fut.result()
        else:
            rows[s] = _row(s, "skipped", "not finished: stopped after the first failure "
                                         "(stop_on_first_crash)")
        show.update(rows[s])


def run_group(output_dir, participant_labels=None) -> pd.DataFrame:
    """Concatenate every subject's sessions table into ``desc-cohort_stats.tsv``.

    Reads ``OUTPUT_DIR/sub-*/sub-*_desc-sessions_stats.tsv`` of complete subjects
    (those with their provenance file), puts ``participant_id`` first, writes
    ``OUTPUT_DIR/desc-cohort_stats.tsv`` with its JSON sidecar, and builds the group
    report when :func:`lesiontrack.report.build_group_report` exists.

    Parameters
    ----------
    output_dir : path
        The derivatives folder of a participant-level run.
    participant_labels : list of str, optional
        Only these subjects (default: all found).

    Returns
    -------
    DataFrame
        The cohort table (one row per subject and session).
    """
    out = Path(output_dir)
    wanted = {bids._label(x, "sub-") for x in participant_labels} if participant_labels else None
    frames, sidecars, incomplete = [], {}, []
    for tsv in sorted(out.glob("sub-*/sub-*_desc-sessions_stats.tsv")):
        sub = tsv.parent.name[4:]
        if wanted is not None and sub not in wanted:
            continue
        if not (tsv.parent / f"sub-{sub}_provenance.json").exists():
            incomplete.append(f"sub-{sub}")
            continue
        df = pd.read_csv(tsv, sep="\t", na_values=["n/a"], keep_default_na=False)
        if "participant_id" not in df:
            df.insert(0, "participant_id", f"sub-{sub}")
        frames.append(df[["participant_id"] + [c for c in df.columns if c != "participant_id"]])
        side = tsv.with_suffix(".json")
        if side.exists():
            sidecars.update(json.loads(side.read_text(encoding="utf-8")))
    if incomplete:
        logger.warning("group: skipped incomplete subject(s) without provenance: %s",
                       ", ".join(incomplete))
    if not frames:
        raise CohortError(f"{out}: no complete subject with a sub-<s>_desc-sessions_stats.tsv; "
                          f"run the participant level first")
    df = pd.concat(frames, ignore_index=True, sort=False)
    path = out / "desc-cohort_stats.tsv"
    write_tsv(path, df)
    side = {"participant_id": {"Description": "subject label (sub-<label>)"}}
    side.update({c: sidecars.get(c, {"Description": f"column '{c}' of the subjects' "
                                                    f"sessions tables"})
                 for c in df.columns if c != "participant_id"})
    write_json(path.with_suffix(".json"), side)
    from . import report
    build = getattr(report, "build_group_report", None)
    if build is not None:
        build(out, df)
    return df
