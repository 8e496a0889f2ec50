"""Dask side of cohort runs: building the cluster, thread limits, the per-subject task.

Private helpers of :mod:`lesiontrack.cohort`. The task :func:`run_one` runs inside a
Dask worker process; everything else runs in the process that drives the cohort.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from pathlib import Path

from ._cohort_files import CohortError, clean_temp_files, write_crash_log

log = logging.getLogger(__name__)

__all__ = ["CohortError", "parse_memory", "available_cpus", "make_client", "run_one",
           "thread_env", "slurm_cluster", "PROGRESS_TOPIC", "SLURM_KEYS"]

#: Dask event topic on which workers publish a subject's step progress.
PROGRESS_TOPIC = "lesiontrack-progress"
#: memory a worker is assumed to need when ``mem`` is not given (peak of one subject
#: at 1 mm, five visits, measured by ``benchmarks/pipeline.py``)
WORKER_MEMORY_ESTIMATE = 3 * 1024**3
_MIN_WORKER_MEMORY = 256 * 1024**2
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
_SLURM_DEFAULTS = {"cores": 1, "memory": "8GB", "walltime": "04:00:00"}
#: options that only mean something for cluster="slurm" (ignored by a local cluster)
SLURM_KEYS = frozenset({"queue", "walltime", "jobs", "memory", "cores", "account",
                        "job_extra_directives", "job_script_prologue", "log_directory"})


def available_cpus() -> int:
    """CPUs this process may run on (CPU affinity / cgroup-restricted count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def parse_memory(mem, what: str = "mem") -> int | None:
    """Bytes from ``"8GB"``, ``"8G"``, ``"512MB"``, or a bare number of gigabytes.

    Bare numbers are gigabytes (as ``--mem`` / ``--mem-gb`` on the command line).
    ``None`` stays ``None``.
    """
    if mem is None:
        return None
    from dask.utils import parse_bytes
    text = str(mem).strip()
    try:
        if text.replace(".", "", 1).isdigit():
            value = int(float(text) * 1024**3)
        else:
            if text[-1:].upper() in "KMGT" and text[-1:].isalpha():
                text += "iB"  # "8G" -> "8GiB", as SLURM reads it
            value = int(parse_bytes(text))
    except (ValueError, IndexError):
        raise CohortError(f"{what}: cannot read {mem!r} as an amount of memory; give e.g. "
                          f"'8GB', '8G', '512MB' or a number of gigabytes") from None
    if value <= 0:
        raise CohortError(f"{what} must be positive, got {mem!r}")
    return value


def thread_env(threads: int) -> dict:
    """Environment variables that cap BLAS/OpenMP/ITK threads at ``threads``."""
    return {name: str(int(threads)) for name in _THREAD_ENV}


def _apply_thread_limits(threads: int) -> None:
    """Cap SimpleITK and BLAS/OpenMP threads of the current (worker) process."""
    import SimpleITK as sitk
    import numpy  # noqa: F401  (load BLAS so threadpoolctl sees it)
    from threadpoolctl import threadpool_limits
    os.environ.update(thread_env(threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    threadpool_limits(limits=int(threads))


def _local_cluster(n_workers: int, threads: int, mem_per_worker, options: dict):
    import dask
    from distributed import LocalCluster
    kwargs = dict(n_workers=n_workers, threads_per_worker=1, processes=True,
                  memory_limit=mem_per_worker if mem_per_worker else "auto",
                  dashboard_address=":0")
    kwargs.update(options)
    # one retry after a killed worker (out of memory, node lost); not three
    with dask.config.set({"distributed.nanny.pre-spawn-environ": thread_env(threads),
                          "distributed.scheduler.allowed-failures": 1}):
        try:
            return LocalCluster(**kwargs)
        except TypeError as exc:
            raise CohortError(f"cluster_options: {exc} (options of "
                              f"distributed.LocalCluster allowed)") from None


def slurm_cluster(mem, options: dict):
    """A SLURMCluster running one subject at a time per job on ``cores`` CPUs."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise CohortError("cluster='slurm' needs dask-jobqueue: "
                          "pip install 'lesiontrack[slurm]'") from None
    import inspect
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob
    allowed = {p for f in (JobQueueCluster.__init__, SLURMJob.__init__, Job.__init__)
               for p in inspect.signature(f).parameters} - {"self", "job_kwargs", "job_cls",
                                                            "base_class_kwargs", "scheduler"}
    unknown = sorted(set(options) - allowed - {"jobs"})
    if unknown:
        raise CohortError(f"cluster_options for cluster='slurm': unknown option(s) {unknown}; "
                          f"allowed: {', '.join(sorted(allowed | {'jobs'}))}")
    opts = dict(_SLURM_DEFAULTS)
    if mem is not None:
        opts["memory"] = f"{max(1, mem // 1024**2)}MB"
    opts.update(options)
    parse_memory(opts["memory"], "cluster_options['memory']")
    cpus = int(opts.pop("cores"))
    if cpus < 1:
        raise CohortError(f"cluster_options['cores'] must be >= 1, got {cpus}")
    # one subject at a time per job: one Dask thread, `cores` CPUs booked for its
    # SimpleITK / BLAS threads
    prologue = [f"export {k}={v}" for k, v in thread_env(cpus).items()]
    opts["job_script_prologue"] = prologue + list(opts.get("job_script_prologue", []))
    opts.update(cores=1, processes=1, job_cpu=cpus)
    opts.setdefault("scheduler_options", {"dashboard_address": ":0"})
    try:
        cluster = SLURMCluster(**opts)
    except (TypeError, ValueError) as exc:
        raise CohortError(f"cluster_options for cluster='slurm': {exc}") from None
    return cluster, cpus


def _threads_by_host(client) -> dict:
    """CPUs per task for workers of an existing cluster: host CPUs / Dask threads on it."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # older distributed
        info = client.scheduler_info()
    cpus = client.run(available_cpus)
    per_host_threads: dict = {}
    per_host_cpus: dict = {}
    for addr, w in info.get("workers", {}).items():
        host = w.get("host") or addr.split("://")[-1].rsplit(":", 1)[0]
        per_host_threads[host] = per_host_threads.get(host, 0) + int(w.get("nthreads", 1))
        per_host_cpus[host] = int(cpus.get(addr, 1))
    return {h: max(1, per_host_cpus[h] // max(1, n)) for h, n in per_host_threads.items()}


def make_client(*, n_subjects: int, nprocs=None, mem=None, scheduler=None, cluster=None,
                cluster_options=None, omp_nthreads=None):
    """Connect to (or start) the Dask cluster for a cohort run.

    ``omp_nthreads`` (local cluster only) sets the threads of each worker's subject;
    by default the CPUs are shared out: CPUs // ``nprocs``.

    Returns
    -------
    client : distributed.Client
    cluster : Cluster or None
        The cluster this run started (to be closed by the caller), None when the
        cluster belongs to someone else (``scheduler`` address or a Cluster object).
    threads : dict
        ``{"default": n, <host>: n, ...}`` SimpleITK/BLAS threads per running subject.
    description : str
        One line saying where the work runs.
    """
    from distributed import Client
    from distributed.deploy import Cluster
    options = {k: v for k, v in (cluster_options or {}).items() if v is not None}
    if cluster != "slurm":  # SLURM job settings mean nothing to other clusters
        options = {k: v for k, v in options.items() if k not in SLURM_KEYS}
    if scheduler is not None and cluster is not None:
        raise CohortError("give either scheduler (address of a running Dask cluster) or "
                          f"cluster, not both (got scheduler={scheduler!r}, cluster={cluster!r})")
    if nprocs is not None and (not isinstance(nprocs, int) or nprocs < 1):
        raise CohortError(f"nprocs must be a positive integer, got {nprocs!r}")
    if omp_nthreads is not None and (not isinstance(omp_nthreads, int) or omp_nthreads < 1):
        raise CohortError(f"omp_nthreads must be a positive integer, got {omp_nthreads!r}")
    mem_bytes = parse_memory(mem)
    cpus = available_cpus()
    if scheduler is not None:
        if not isinstance(scheduler, str) or "://" not in scheduler:
            raise CohortError(f"scheduler must be an address like 'tcp://HOST:PORT', "
                              f"got {scheduler!r}")
        try:
            client = Client(scheduler, timeout=options.pop("timeout", "30s"))
        except OSError as exc:
            raise CohortError(f"scheduler {scheduler}: cannot connect ({exc})") from None
        threads = {"default": 1, **_threads_by_host(client)}
        return client, None, threads, f"Dask scheduler {scheduler}"
    if isinstance(cluster, Cluster):
        client = Client(cluster)
        threads = {"default": 1, **_threads_by_host(client)}
        return client, None, threads, f"Dask cluster {type(cluster).__name__}"
    if cluster == "slurm":
        n_jobs = options.pop("jobs", None) or nprocs or n_subjects
        slurm, per_job = slurm_cluster(mem_bytes, options)
        slurm.scale(jobs=max(1, n_jobs))
        return (Client(slurm), slurm, {"default": per_job},
                f"SLURM, up to {n_jobs} job(s) of {per_job} CPU(s)")
    if cluster not in (None, "local"):
        raise CohortError(f"cluster must be 'local', 'slurm' or a dask Cluster object, "
                          f"got {cluster!r}")
    if nprocs is None:
        total = mem_bytes or _available_memory()
        nprocs = max(1, min(cpus, n_subjects, total // WORKER_MEMORY_ESTIMATE))
    per_worker = mem_bytes // nprocs if mem_bytes else None
    if per_worker is not None and per_worker < _MIN_WORKER_MEMORY:
        raise CohortError(f"mem={mem!r} leaves {per_worker // 1024**2} MB per worker for "
                          f"nprocs={nprocs}; a worker needs several GB (bare numbers are MB)")
    threads = max(1, cpus // nprocs) if omp_nthreads is None else omp_nthreads
    if nprocs * threads > cpus:
        log.warning("%d worker(s) x %d thread(s) exceed the %d CPU(s) available", nprocs,
                    threads, cpus)
    local = _local_cluster(nprocs, threads, per_worker, options)
    desc = (f"local Dask cluster: {nprocs} worker process(es) x {threads} thread(s)"
            + (f", {per_worker / 1024**3:.1f} GB each" if per_worker else ""))
    return Client(local), local, {"default": threads}, desc


def _available_memory() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def run_one(bids_dir, subject, output_dir, cfg, session_labels, threads: dict,
            client_pid: int, run_kwargs: dict) -> dict:
    """Run one subject inside a worker; never raises for a subject's own error.

    Returns the status row plus ``duration_s``, ``peak_memory_mb`` (worker RSS peak)
    and ``worker`` (host:pid).
    """
    t0 = time.perf_counter()
    host = socket.gethostname()
    worker_addr = None
    try:
        from distributed import get_worker
        worker = get_worker()
        worker_addr = worker.address
    except ValueError:  # not inside a Dask worker
        worker = None
    n = threads.get("default", 1)
    if worker_addr:
        n = threads.get(worker_addr.split("://")[-1].rsplit(":", 1)[0], n)
    if os.getpid() != client_pid:  # never change the limits of the driving process
        _apply_thread_limits(n)
    clean_temp_files(output_dir, [subject])  # left by an interrupted earlier attempt

    def progress(*args, **kwargs):
        if worker is not None:
            worker.log_event(PROGRESS_TOPIC, {"subject": subject,
                                              "step": " ".join(map(str, args))})

    from . import pipeline
    row = {"participant_id": f"sub-{subject}", "status": "ok", "message": ""}
    try:
        pipeline.run_subject(bids_dir, subject, output_dir, cfg,
                             session_labels=session_labels, progress=progress, **run_kwargs)
    except Exception as exc:  # noqa: BLE001 - isolate the subject, keep its traceback
        log = write_crash_log(output_dir, subject, traceback.format_exc(),
                              context={"host": host, "pid": os.getpid(), "worker": worker_addr,
                                       "threads": n})
        first = (str(exc).strip().splitlines() or [""])[0]
        row.update(status="failed", message=f"{type(exc).__name__}: {first} "
                                            f"(traceback: {Path(log).relative_to(Path(output_dir))})")
    row.update(duration_s=round(time.perf_counter() - t0, 2), peak_memory_mb=round(_peak_rss_mb(), 1),
               worker=f"{host}:{os.getpid()}", threads=n)
    return row
