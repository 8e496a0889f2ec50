"""Cohort runs on real Dask worker processes: thread limits, interruption, resumption,
a standalone ``dask scheduler`` with two ``dask worker`` processes.

The fast tests swap the per-subject pipeline for a quick stand-in
(``tests/_cohort_fake.py``, loaded into every worker as a Dask preload); the slow
ones run the real pipeline on phantom subjects.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dask
import distributed  # noqa: F401  (its config defaults must exist before dask.config.set)
import pandas as pd
import pytest

from lesiontrack import cohort
from lesiontrack._cohort_exec import available_cpus
from lesiontrack.config import load_config

FAKE = Path(__file__).resolve().parent / "_cohort_fake.py"


def _bids(root: Path, n=3) -> Path:
    bids_dir = root / "bids"
    for i in range(1, n + 1):
        (bids_dir / f"sub-{i:02d}" / "ses-01" / "anat").mkdir(parents=True)
    return bids_dir


def _no_temp_files(out: Path) -> list:
    return [str(p) for p in out.rglob(".tmp-*")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("nprocs", [1, 2])
def test_worker_threads_capped(tmp_path, nprocs):
    bids_dir = _bids(tmp_path, n=2)
    (bids_dir / "sub-02" / "BROKEN").write_text("x")
    out = tmp_path / "out"
    with dask.config.set({"distributed.worker.preload": [str(FAKE)]}):
        rows = cohort.run_participants(bids_dir, out, load_config(), nprocs=nprocs,
                                       progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    # the broken subject's traceback was written by the worker process
    crash = next((out / "sub-02" / "log").glob("crash-*.txt")).read_text()
    assert "deliberately broken" in crash and "_cohort_fake.py" in crash
    assert rows[0]["worker"] and rows[0]["peak_memory_mb"] > 10
    info = json.loads((out / "sub-01" / "sub-01_threads.json").read_text())
    want = max(1, available_cpus() // nprocs)
    assert info["pid"] != os.getpid()
    assert info["sitk"] == want
    assert info["blas"] == [want]
    assert info["omp_env"] == str(want)


REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    """Environment of child processes: this source tree first on the path."""
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path, **extra)


def _cli(bids_dir, out, *extra, env_extra=None, log=None):
    env = _env(DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(FAKE)]), **(env_extra or {}))
    cmd = [sys.executable, "-m", "lesiontrack.cli", "run", str(bids_dir), str(out),
           "participant", "--nprocs", "1", *extra]
    log = log or Path(out).parent / "run.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def _wait_for(cond, timeout, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): "
                                 f"{proc.log.read_text()[-3000:]}")
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_killed_run_resumes(tmp_path, sig):
    """Kill ``lesiontrack run`` while a subject is half written; the rerun completes it."""
    bids_dir = _bids(tmp_path)
    (bids_dir / "sub-02" / "SLOW").write_text("60")
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _cli(bids_dir, out, env_extra={"LT_FAKE_PIDDIR": str(pids)})
    try:
        assert _wait_for(lambda: (out / "sub-01" / "sub-01_provenance.json").exists()
                         and list((out / "sub-02").glob(".tmp-*")), 120, proc)
        worker_pid = int((pids / "sub-02.pid").read_text())
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    # the worker busy with sub-02 died with the run; it will never finish the file
    assert _wait_for(lambda: not _alive(worker_pid), 30)
    assert not (out / "sub-02" / "sub-02_provenance.json").exists()
    assert not (out / "sub-02" / "sub-02_desc-big_T2w.nii.gz").exists()
    if sig == signal.SIGTERM:  # handled: nothing partial is left behind at all
        assert _no_temp_files(out) == []
        status = pd.read_csv(out / "run_status.tsv", sep="\t")
        assert list(status["status"]) == ["ok", "failed", "failed"]
        assert "interrupted by SIGTERM" in status["message"][1]
    else:  # SIGKILL cannot be handled: the half-written file is a temporary one
        assert _no_temp_files(out)
    (bids_dir / "sub-02" / "SLOW").unlink()
    rerun = _cli(bids_dir, out, log=tmp_path / "rerun.log")
    rerun.wait(timeout=120)
    assert rerun.returncode == 0, rerun.log.read_text()[-3000:]
    status = pd.read_csv(out / "run_status.tsv", sep="\t")
    assert list(status["status"]) == ["skipped", "ok", "ok"]
    assert _no_temp_files(out) == []
    assert (out / "sub-02" / "sub-02_desc-big_T2w.nii.gz").read_bytes() == b"half written"


@pytest.mark.slow
def test_killed_worker_is_retried(tmp_path):
    """SIGKILL the worker busy with a subject: Dask retries it on a fresh worker."""
    bids_dir = _bids(tmp_path, n=2)
    (bids_dir / "sub-02" / "SLOW").write_text("60")
    out = tmp_path / "out"
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = _cli(bids_dir, out, env_extra={"LT_FAKE_PIDDIR": str(pids)})
    try:
        assert _wait_for(lambda: list((out / "sub-02").glob(".tmp-*")), 120, proc)
        os.kill(int((pids / "sub-02.pid").read_text()), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, proc.log.read_text()[-3000:]
    assert list(pd.read_csv(out / "run_status.tsv", sep="\t")["status"]) == ["ok", "ok"]
    assert _no_temp_files(out) == []  # the killed attempt's temporary file is gone


# --------------------------------------------------------------------------- real pipeline
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def phantom3(tmp_path_factory):
    from lesiontrack.phantom import make_phantom
    root = tmp_path_factory.mktemp("phantom3")
    make_phantom(root, n_subjects=3, seed=11, resolution=2)
    return root / "bids"


@contextmanager
def _dask_processes(tmp_path, preload=None):
    """A ``dask scheduler`` and two single-threaded ``dask worker`` processes on 127.0.0.1."""
    from distributed import Client
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = _env()
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        for i in range(2):
            procs.append(subprocess.Popen(
                ["dask", "worker", addr, "--host", "127.0.0.1", "--nthreads", "1",
                 "--nworkers", "1", "--no-dashboard", "--memory-limit", "6GB",
                 "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")]
                + (["--preload", str(preload)] if preload else []),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        with Client(addr, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield addr
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def dask_scheduler(tmp_path):
    with _dask_processes(tmp_path) as addr:
        yield addr


def test_scheduler_cohort_quick(tmp_path):
    """Fast variant: real scheduler and worker processes, quick stand-in pipeline."""
    bids_dir = _bids(tmp_path)
    (bids_dir / "sub-02" / "BROKEN").write_text("x")
    out = tmp_path / "out"
    with _dask_processes(tmp_path, preload=FAKE) as addr:
        rows = cohort.run_participants(bids_dir, out, load_config(), scheduler=addr,
                                       progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "deliberately broken" in next((out / "sub-02" / "log").glob("crash-*")).read_text()
    pids = {json.loads((out / f"sub-{s}" / f"sub-{s}_threads.json").read_text())["pid"]
            for s in ("01", "03")}
    assert os.getpid() not in pids
    # two single-threaded workers on one host share its CPUs
    info = json.loads((out / "sub-01" / "sub-01_threads.json").read_text())
    assert info["sitk"] == max(1, available_cpus() // 2) and info["blas"] == [info["sitk"]]


def _outputs_complete(out: Path, subject: str) -> bool:
    prov = json.loads((out / f"sub-{subject}" / f"sub-{subject}_provenance.json").read_text())
    return bool(prov["outputs"]) and all((out / rel).exists() for rel in prov["outputs"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scheduler_cohort_with_broken_subject(phantom3, dask_scheduler, tmp_path):
    import shutil
    bids_dir = tmp_path / "bids"
    shutil.copytree(phantom3, bids_dir)
    for p in sorted((bids_dir / "sub-02").glob("ses-*/anat/*_[FT][L2]*.nii.gz")):
        data = p.read_bytes()  # FLAIR and T2w cut in half
        p.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lesiontrack.cli", "run", str(bids_dir), str(out),
           "participant", "--scheduler", dask_scheduler]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1700)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert f"Dask scheduler {dask_scheduler}" in res.stderr
    status = pd.read_csv(out / "run_status.tsv", sep="\t")
    assert list(status["status"]) == ["ok", "failed", "ok"], status.to_string()
    crash = next((out / "sub-02" / "log").glob("crash-*.txt")).read_text()
    assert "Traceback" in crash and "sub-02_ses-01_FLAIR.nii.gz" in crash
    assert not (out / "sub-02" / "sub-02_provenance.json").exists()
    for s in ("01", "03"):
        assert _outputs_complete(out, s)
        assert (out / f"sub-{s}.html").exists()
    assert _no_temp_files(out) == []
    res = subprocess.run([*cmd[:6], "group"], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    cohort_df = pd.read_csv(out / "desc-cohort_stats.tsv", sep="\t")
    assert sorted(set(cohort_df["participant_id"])) == ["sub-01", "sub-03"]
    assert len(cohort_df) == 10


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_run_killed_midway_then_resumed(phantom3, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lesiontrack.cli", "run", str(phantom3), str(out),
           "participant", "--participant-label", "01", "03", "--nprocs", "1"]
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    try:
        assert _wait_for(lambda: (out / "sub-01" / "sub-01_provenance.json").exists(), 1200, proc)
        time.sleep(3)  # well into the second subject
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert _no_temp_files(out) == []
    assert not (out / "sub-03" / "sub-03_provenance.json").exists()
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1700)
    assert res.returncode == 0, res.stderr[-3000:]
    status = pd.read_csv(out / "run_status.tsv", sep="\t")
    assert list(status["status"]) == ["skipped", "ok"], status.to_string()
    assert _no_temp_files(out) == []
    assert _outputs_complete(out, "01") and _outputs_complete(out, "03")
    # a third run has nothing to do (with the configuration the outputs record, so that
    # edits of the default configuration meanwhile do not matter)
    recorded = json.loads((out / "sub-03" / "sub-03_provenance.json").read_text())["config"]
    t0 = time.monotonic()
    rows = cohort.run_participants(phantom3, out, recorded, participant_labels=["01", "03"],
                                   progress=False)
    assert [r["status"] for r in rows] == ["skipped"] * 2
    assert time.monotonic() - t0 < 30
