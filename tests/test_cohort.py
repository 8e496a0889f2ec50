"""Cohort runs with a quick stand-in for the per-subject pipeline (in-process Dask).

The stand-in writes real files atomically and a provenance file last, exactly as
:func:`lesiontrack.pipeline.run_subject` does, so resumption goes through the real
:func:`lesiontrack.pipeline.subject_is_complete`.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from lesiontrack import __version__, bids, cohort, pipeline
from lesiontrack._cohort_exec import make_client, parse_memory, slurm_cluster, thread_env
from lesiontrack._cohort_files import Progress, clean_temp_files, read_bids_filter
from lesiontrack._io import write_json, write_text
from lesiontrack.config import config_hash, load_config

INPROC = {"processes": False}  # workers as threads of this process: monkeypatch reaches them


def fake_run_subject(bids_dir, subject, output_dir, cfg, *, session_labels=None,
                     progress=None, **kwargs):
    """Stand-in: fails for subjects whose BIDS folder holds a BROKEN file."""
    subject = subject.removeprefix("sub-")
    if (Path(bids_dir) / f"sub-{subject}" / "BROKEN").exists():
        raise RuntimeError(f"sub-{subject}: FLAIR is truncated (deliberately broken)")
    if (Path(bids_dir) / f"sub-{subject}" / "SLOW").exists():
        time.sleep(float((Path(bids_dir) / f"sub-{subject}" / "SLOW").read_text()))
    if progress is not None:
        progress("write", 1, 1)
    out = Path(output_dir) / f"sub-{subject}"
    rel = f"sub-{subject}/sub-{subject}_desc-sessions_stats.tsv"
    ses = session_labels or ["01", "02"]
    cols = ("session_id\tlesion_count\tedss\tacq_time\tlesion_volume_mm3\tnew_count\t"
            "enlarging_count\tresolved_count\trestricted_volume_mm3\tblackhole_volume_mm3\t"
            "enhancing_count\n")
    write_text(Path(output_dir) / rel, cols + "".join(
        f"ses-{s}\t{i + 3}\tn/a\t2020-0{i + 1}-01T10:00:00\t{100.5 * (i + 1)}\t{i}\t0\t0\t"
        f"{10.0 * i}\t0.0\t{2 - i}\n" for i, s in enumerate(ses)))
    write_json(out / f"sub-{subject}_desc-sessions_stats.json",
               {"lesion_count": {"Description": "number of lesions"}})
    write_json(out / f"sub-{subject}_provenance.json",
               {"version": __version__, "config_hash": config_hash(cfg), "outputs": [rel],
                "sessions": ses,
                "inputs": pipeline._input_files(bids.find_sessions(bids_dir, subject, session_labels,
                                                                   kwargs.get("input_filters")))})


@pytest.fixture
def cfg():
    return load_config()


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    bids_dir = tmp_path / "bids"
    for s in ("01", "02", "03"):
        (bids_dir / f"sub-{s}" / "ses-01" / "anat").mkdir(parents=True)
    (bids_dir / "sub-02" / "BROKEN").write_text("x")
    calls = []

    def run(*args, **kwargs):
        calls.append(args[1])
        return fake_run_subject(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_subject", run)
    return bids_dir, tmp_path / "out", calls


def _run(bids_dir, out, cfg, **kw):
    kw.setdefault("nprocs", 2)
    kw.setdefault("cluster_options", INPROC)
    kw.setdefault("progress", False)
    return cohort.run_participants(bids_dir, out, cfg, **kw)


def test_failure_isolated_status_and_crash_log(dataset, cfg):
    bids_dir, out, calls = dataset
    rows = _run(bids_dir, out, cfg)
    assert [(r["participant_id"], r["status"]) for r in rows] == [
        ("sub-01", "ok"), ("sub-02", "failed"), ("sub-03", "ok")]
    assert "deliberately broken" in rows[1]["message"]
    crash = list((out / "sub-02" / "log").glob("crash-*.txt"))
    assert len(crash) == 1
    text = crash[0].read_text()
    assert "Traceback" in text and "fake_run_subject" in text and "RuntimeError" in text
    status = pd.read_csv(out / "run_status.tsv", sep="\t")
    assert list(status.columns) == ["participant_id", "status", "message"]
    assert list(status["status"]) == ["ok", "failed", "ok"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert sorted(calls) == ["01", "02", "03"]


def test_resume_skips_complete_and_force_redoes(dataset, cfg):
    bids_dir, out, calls = dataset
    _run(bids_dir, out, cfg)
    (bids_dir / "sub-02" / "BROKEN").unlink()
    calls.clear()
    rows = _run(bids_dir, out, cfg)
    assert [r["status"] for r in rows] == ["skipped", "ok", "skipped"]
    assert calls == ["02"]
    # a changed configuration invalidates every subject
    cfg2 = load_config(overrides=None)
    cfg2["segment"] = dict(cfg2["segment"], _probe=1)
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg2)] == ["ok"] * 3
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg2, force=True)] == ["ok"] * 3
    assert sorted(calls) == ["01", "02", "03"]


def test_resume_redoes_a_subject_whose_inputs_changed(dataset, cfg):
    """A longitudinal study is run again after each round of visits: a subject with a new
    visit, a visit removed or an input file replaced is redone, the others are skipped."""
    import os

    bids_dir, out, calls = dataset
    (bids_dir / "sub-02" / "BROKEN").unlink()
    for s in ("01", "02", "03"):
        (bids_dir / f"sub-{s}" / "ses-01" / "anat" / f"sub-{s}_ses-01_FLAIR.nii.gz").write_text("x")
    assert [r["status"] for r in _run(bids_dir, out, cfg)] == ["ok"] * 3
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg)] == ["skipped"] * 3 and calls == []
    new = bids_dir / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_FLAIR.nii.gz"
    new.parent.mkdir(parents=True)
    new.write_text("x")                                                   # a new visit
    flair = bids_dir / "sub-03" / "ses-01" / "anat" / "sub-03_ses-01_FLAIR.nii.gz"
    later = (out / "sub-03" / "sub-03_provenance.json").stat().st_mtime_ns + 10 ** 6
    os.utime(flair, ns=(later, later))                                    # replaced after the run
    rows = _run(bids_dir, out, cfg)
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok"] and sorted(calls) == ["01", "03"]
    assert "these inputs" in rows[1]["message"]
    # a DataLad dataset gets a new version of a scan by re-pointing its link into the
    # object store, whose files keep their old times
    store = bids_dir / ".git" / "annex" / "objects"
    store.mkdir(parents=True)
    old_obj, new_obj = store / "a.nii.gz", store / "b.nii.gz"
    old_obj.write_text("x")
    new_obj.write_text("y")
    os.utime(new_obj, ns=(10 ** 9, 10 ** 9))
    f2 = bids_dir / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_FLAIR.nii.gz"
    f2.unlink()
    f2.symlink_to(old_obj)
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg)] == ["skipped", "ok", "skipped"]
    f2.unlink()
    f2.symlink_to(new_obj)
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg)] == ["skipped", "ok", "skipped"]
    calls.clear()
    new.unlink()                                                          # a visit removed
    assert [r["status"] for r in _run(bids_dir, out, cfg)] == ["ok", "skipped", "skipped"]
    # with a session selection, only the selected visits count
    calls.clear()
    assert [r["status"] for r in _run(bids_dir, out, cfg, session_labels=["01"])] == ["skipped"] * 3


def test_interrupted_leftovers_cleaned_and_incomplete_subject_redone(dataset, cfg):
    bids_dir, out, calls = dataset
    _run(bids_dir, out, cfg, participant_labels=["sub-01", "03"])
    # what a killed run leaves: temp files, and a subject without its provenance file
    (out / "sub-03" / "sub-03_provenance.json").unlink()
    leftovers = [out / "sub-03" / ".tmp-sub-03_desc-lesions_stats.tsv-abc.tsv",
                 out / "sub-01" / "ses-01" / "anat" / ".tmp-sub-01_ses-01_x.nii.gz-q.nii.gz",
                 out / ".tmp-run_status.tsv-zz.tsv", out / ".tmp-sub-03.html-k.html"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    calls.clear()
    rows = _run(bids_dir, out, cfg, participant_labels=["01", "03"])
    assert [r["status"] for r in rows] == ["skipped", "ok"]
    assert calls == ["03"]
    assert not [p for p in out.rglob(".tmp-*")]


def test_stop_on_first_crash(dataset, cfg):
    bids_dir, out, calls = dataset
    (bids_dir / "sub-01" / "BROKEN").write_text("x")
    (bids_dir / "sub-02" / "BROKEN").unlink()
    (bids_dir / "sub-02" / "SLOW").write_text("0.5")
    rows = _run(bids_dir, out, cfg, nprocs=1, stop_on_first_crash=True)
    assert rows[0]["status"] == "failed"
    # one worker runs subjects in order: sub-02 is running, sub-03 waiting at the failure
    assert [r["status"] for r in rows[1:]] == ["skipped", "skipped"]
    assert all("stop_on_first_crash" in r["message"] for r in rows[1:])
    time.sleep(0.7)
    assert not (out / "sub-03").exists()
    assert list(pd.read_csv(out / "run_status.tsv", sep="\t")["status"]) == [
        "failed", "skipped", "skipped"]


def test_labels_and_bids_filter(dataset, cfg, tmp_path):
    bids_dir, out, calls = dataset
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"subject": ["sub-01", "03"], "session": "01"}))
    rows = _run(bids_dir, out, cfg, bids_filter=filt, session_labels=["ses-01", "02"])
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-03"]
    tsv = pd.read_csv(out / "sub-01" / "sub-01_desc-sessions_stats.tsv", sep="\t")
    assert list(tsv["session_id"]) == ["ses-01"]  # intersection of labels and filter
    rows = _run(bids_dir, out, cfg, bids_filter={"subject": ["01", "03"]},
                participant_labels=["03"], force=True)
    assert [r["participant_id"] for r in rows] == ["sub-03"]
    with pytest.raises(cohort.CohortError, match="no subject in common"):
        _run(bids_dir, out, cfg, bids_filter={"subject": ["01"]}, participant_labels=["02"])


def test_bids_filter_chooses_each_contrast_file(dataset, cfg, tmp_path):
    """The filter's contrast entries reach every subject's run, its input check and its
    completeness: choosing another file redoes the subject."""
    bids_dir, out, calls = dataset
    (bids_dir / "sub-02" / "BROKEN").unlink()
    got = {}

    def run(*args, **kwargs):
        got[args[1]] = kwargs.get("input_filters")
        return fake_run_subject(*args, **kwargs)

    import lesiontrack.pipeline as pl
    pl_run = pl.run_subject
    pl.run_subject = run
    try:
        anat = bids_dir / "sub-01" / "ses-01" / "anat"
        for acq in ("2D", "3D"):
            (anat / f"sub-01_ses-01_acq-{acq}_FLAIR.nii.gz").write_text("x")
        rows = _run(bids_dir, out, cfg, participant_labels=["01"], bids_filter={"flair": {"acquisition": "3D"}})
        assert rows[0]["status"] == "ok" and got["01"] == {"FLAIR": {"acq": ["3D"]}}
        prov = json.loads((out / "sub-01" / "sub-01_provenance.json").read_text())
        assert prov["inputs"]["ses-01"]["FLAIR"].endswith("sub-01_ses-01_acq-3D_FLAIR.nii.gz")
        assert _run(bids_dir, out, cfg, participant_labels=["01"],
                    bids_filter={"flair": {"acquisition": "3D"}})[0]["status"] == "skipped"
        # without the filter the rule chooses another file (unreadable headers: name order),
        # so the subject is redone
        assert _run(bids_dir, out, cfg, participant_labels=["01"])[0]["status"] == "ok"
    finally:
        pl.run_subject = pl_run


def test_bids_filter_errors(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text("{not json")
    with pytest.raises(cohort.CohortError, match="f.json: not valid JSON"):
        read_bids_filter(bad)
    with pytest.raises(cohort.CohortError, match="unknown filter entities \\['bold'\\]"):
        read_bids_filter({"bold": {"task": "rest"}})
    with pytest.raises(cohort.CohortError, match="'t1w' filters on 'session', which inputs do not carry"):
        read_bids_filter({"t1w": {"session": "01"}})
    with pytest.raises(cohort.CohortError, match="'flair' must be an object of entities"):
        read_bids_filter({"flair": "3D"})
    with pytest.raises(cohort.CohortError, match="'flair.acquisition' must be a label"):
        read_bids_filter({"flair": {"acquisition": {"3D": 1}}})
    assert read_bids_filter({"flair": {"acquisition": "3D"}, "cet1w": {"ce": ["Gd", "gadolinium"]},
                             "t1w": {"reconstruction": None, "run": 2}}) == {
        "inputs": {"FLAIR": {"acq": ["3D"]}, "ceT1w": {"ce": ["Gd", "gadolinium"]},
                   "T1w": {"rec": [None], "run": [2]}}}
    with pytest.raises(cohort.CohortError, match="does not exist"):
        read_bids_filter(tmp_path / "missing.json")
    with pytest.raises(cohort.CohortError, match="'subject' must be a label"):
        read_bids_filter({"subject": 3})
    assert read_bids_filter({"session": ["ses-02", "03"]}) == {"session": ["02", "03"]}


def test_execution_settings_errors(tmp_path):
    assert parse_memory("8GB") == 8 * 10**9
    assert parse_memory("8G") == 8 * 1024**3
    assert parse_memory(2.5) == int(2.5 * 1024**3)
    assert parse_memory(None) is None
    with pytest.raises(cohort.CohortError, match="mem: cannot read 'lots'"):
        parse_memory("lots")
    with pytest.raises(cohort.CohortError, match="either scheduler"):
        make_client(n_subjects=1, scheduler="tcp://127.0.0.1:1", cluster="slurm")
    with pytest.raises(cohort.CohortError, match="tcp://HOST:PORT"):
        make_client(n_subjects=1, scheduler="127.0.0.1:8786")
    with pytest.raises(cohort.CohortError, match="nprocs must be a positive integer"):
        make_client(n_subjects=1, nprocs=0)
    with pytest.raises(cohort.CohortError, match="cluster must be 'local', 'slurm'"):
        make_client(n_subjects=1, cluster="pbs")
    with pytest.raises(cohort.CohortError, match="MB per worker"):
        make_client(n_subjects=4, nprocs=4, mem="100MB")
    assert thread_env(3)["OMP_NUM_THREADS"] == "3"
    assert thread_env(3)["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "3"


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    cluster, cpus = slurm_cluster(None, {"queue": "short", "walltime": "01:30:00", "cores": 4,
                                         "memory": "12GB", "account": "mslab"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert cpus == 4
    for line in ("#SBATCH -p short", "#SBATCH -t 01:30:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH -A mslab", "#SBATCH --mem=12G", "export OMP_NUM_THREADS=4",
                 "export ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=4"):
        assert line in script, line
    assert "--nthreads 1" in script  # one subject at a time per job
    with pytest.raises(cohort.CohortError, match="cluster_options for cluster='slurm'.*bogus"):
        slurm_cluster(None, {"bogus": 1})


def test_clean_temp_files_only_touches_given_subjects(tmp_path):
    keep = tmp_path / "sub-02" / ".tmp-sub-02_x.tsv-a.tsv"
    gone = tmp_path / "sub-01" / "ses-01" / "anat" / ".tmp-y.nii.gz-b.nii.gz"
    for p in (keep, gone):
        p.parent.mkdir(parents=True)
        p.write_text("x")
    (tmp_path / "sub-01" / "real.tsv").write_text("x")
    removed = clean_temp_files(tmp_path, ["01"])
    assert removed == [gone] and keep.exists() and (tmp_path / "sub-01" / "real.tsv").exists()


def test_run_group(dataset, cfg):
    bids_dir, out, calls = dataset
    _run(bids_dir, out, cfg)
    # sub-02 failed: no table; add an incomplete subject (table without provenance)
    (out / "sub-04").mkdir()
    (out / "sub-04" / "sub-04_desc-sessions_stats.tsv").write_text("session_id\nses-01\n")
    df = cohort.run_group(out)
    assert list(df.columns[:3]) == ["participant_id", "session_id", "lesion_count"]
    assert list(df["participant_id"]) == ["sub-01", "sub-01", "sub-03", "sub-03"]
    assert list(df["lesion_count"]) == [3, 4, 3, 4]
    written = pd.read_csv(out / "desc-cohort_stats.tsv", sep="\t", keep_default_na=False)
    assert list(written["edss"]) == ["n/a"] * 4
    side = json.loads((out / "desc-cohort_stats.json").read_text())
    assert set(side) == set(df.columns)
    assert side["lesion_count"]["Description"] == "number of lesions"
    assert list(cohort.run_group(out, participant_labels=["sub-03"])["participant_id"]) == \
        ["sub-03", "sub-03"]
    assert (out / "group.html").exists()  # the group report
    with pytest.raises(cohort.CohortError, match="no complete subject"):
        cohort.run_group(out / "sub-02")


def test_progress_bar_and_lines():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    tty, plain = TTY(), io.StringIO()
    for stream in (tty, plain):
        p = Progress(2, stream=stream)
        p.update({"participant_id": "sub-01", "status": "ok", "message": "", "duration_s": 1.5})
        p.substep("02", "align")
        p.update({"participant_id": "sub-02", "status": "failed", "message": "boom"})
        p.close()
    assert "\r" in tty.getvalue() and "2/2 subjects" in tty.getvalue()
    assert "sub-02: align" in tty.getvalue()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and len(lines) == 2
    assert lines[0].endswith("[1/2] sub-01: ok in 1.5 s")
    assert lines[1].endswith("[2/2] sub-02: failed - boom")
    silent = io.StringIO()
    Progress(1, enabled=False, stream=silent).update(
        {"participant_id": "sub-01", "status": "ok", "message": ""})
    assert silent.getvalue() == ""


def test_progress_bar_on_terminal(dataset, cfg, monkeypatch):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    err = TTY()
    monkeypatch.setattr("sys.stderr", err)
    _run(dataset[0], dataset[1], cfg, progress=True)
    text = err.getvalue()
    assert "\r" in text and "3/3 subjects  ok 2  failed 1  skipped 0" in text
    assert "sub-02: failed" in text
