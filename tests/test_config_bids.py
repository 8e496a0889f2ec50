"""Configuration loading, BIDS discovery and derivative names."""
import filecmp
from pathlib import Path

import pandas as pd
import pytest

from lesiontrack import bids
from lesiontrack.config import ConfigError, config_hash, default_config_path, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_shipped_and_copied():
    assert filecmp.cmp(default_config_path(), ROOT / "pipelines" / "default.toml", shallow=False), \
        "pipelines/default.toml must be a copy of the packaged default"
    cfg = load_config()
    assert {"registration", "preprocess", "segment", "track", "report"} <= set(cfg)


def test_config_override_and_unknown_key(tmp_path):
    cfg = load_config()
    sec = next(k for k, v in cfg["segment"].items() if not isinstance(v, dict)) if cfg["segment"] else None
    bad = tmp_path / "bad.toml"
    bad.write_text("[segment]\nno_such_setting = 3\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_config(bad)
    old = tmp_path / "old.toml"                     # a setting that was replaced says by what
    old.write_text("[segment]\nblackhole_t1_max = 0.55\n")
    with pytest.raises(ConfigError, match="blackhole_t1_max' was replaced by segment.blackhole_gm_z"):
        load_config(old)
    broken = tmp_path / "broken.toml"
    broken.write_text("[segment\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    if sec is not None:
        good = tmp_path / "good.toml"
        val = cfg["segment"][sec]
        good.write_text(f"[segment]\n{sec} = {repr(val).lower() if isinstance(val, bool) else repr(val)}\n")
        assert config_hash(load_config(good)) == config_hash(cfg)


def _touch(p: Path, text="x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_find_sessions_and_sessions_tsv(tmp_path):
    b = tmp_path / "bids"
    _touch(b / "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz")
    _touch(b / "sub-01/ses-01/anat/sub-01_ses-01_T2w.nii.gz")
    _touch(b / "sub-01/ses-01/anat/sub-01_ses-01_ce-gadolinium_T1w.nii.gz")
    _touch(b / "sub-01/ses-03/anat/sub-01_ses-03_T1w.nii.gz")
    _touch(b / "sub-01/sub-01_sessions.tsv",
           "session_id\tacq_time\tedss\tevent\nses-02\t2020-05-01\t3.5\tsteroids\n"
           "ses-01\t2020-01-01\t1.0\tn/a\nses-03\t2020-09-01\tn/a\t\n")
    ses = bids.find_sessions(b, "sub-01")
    assert [s.session_id for s in ses] == ["ses-01", "ses-02", "ses-03"]
    assert ses[0].reference == "T2w" and "ceT1w" in ses[0].files
    assert ses[2].reference is None
    problems = bids.check_subject(b, "01")
    assert any("neither FLAIR nor T2w" in p and "ses-03" in p for p in problems)
    df = bids.read_sessions_tsv(b, "01")
    assert list(df["session_id"]) == ["ses-01", "ses-02", "ses-03"]   # time order
    assert df["edss"].iloc[1] == 3.5 and pd.isna(df["edss"].iloc[2])


def _nii(p: Path, zooms):
    import nibabel as nib
    import numpy as np
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag(list(zooms) + [1.0])), p)


def test_inputs_with_bids_entities_and_uncompressed_files(tmp_path):
    """Real BIDS datasets name their scans with acq-, rec-, run- and dir- entities, any
    ce- label and .nii files: those are inputs too; a phase image, another session's file
    or an unknown entity is not."""
    b = tmp_path / "bids"
    a = b / "sub-01/ses-01/anat"
    _touch(a / "sub-01_ses-01_acq-3D_FLAIR.nii")
    _touch(a / "sub-01_ses-01_rec-norm_run-2_T2w.nii.gz")
    _touch(a / "sub-01_ses-01_acq-mprage_T1w.nii.gz")
    _touch(a / "sub-01_ses-01_acq-mprage_ce-Gd_T1w.nii.gz")
    _touch(a / "sub-01_ses-01_part-phase_T2w.nii.gz")          # a phase image
    _touch(a / "sub-01_ses-01_acq-mprage_part-mag_T1w.nii.gz")  # a magnitude image is one
    _touch(a / "sub-01_ses-02_FLAIR.nii.gz")                   # another session's
    _touch(b / "sub-01/ses-01/dwi/sub-01_ses-01_dir-AP_dwi.nii")
    _touch(b / "sub-01/ses-01/dwi/sub-01_ses-01_dir-AP_dwi.bval")
    _touch(b / "sub-01/ses-01/dwi/sub-01_ses-01_dir-AP_dwi.bvec")
    (si,) = bids.find_sessions(b, "01")
    assert {m: p.name for m, p in si.files.items()} == {
        "FLAIR": "sub-01_ses-01_acq-3D_FLAIR.nii", "T2w": "sub-01_ses-01_rec-norm_run-2_T2w.nii.gz",
        "T1w": "sub-01_ses-01_acq-mprage_T1w.nii.gz", "ceT1w": "sub-01_ses-01_acq-mprage_ce-Gd_T1w.nii.gz",
        "dwi": "sub-01_ses-01_dir-AP_dwi.nii"}
    assert si.bval.name == "sub-01_ses-01_dir-AP_dwi.bval" and si.bval.exists() and si.bvec.exists()
    (note,) = si.notes                                   # two T1w: the finest voxels, then names
    assert "sub-01_ses-01_acq-mprage_T1w.nii.gz is used" in note and "part-mag" in note
    assert bids.check_subject(b, "01") == [f"sub-01 ses-01: {note}"]
    assert si.unused_images() == ["sub-01_ses-01_acq-mprage_part-mag_T1w.nii.gz",
                                  "sub-01_ses-01_part-phase_T2w.nii.gz", "sub-01_ses-02_FLAIR.nii.gz"]


def _anat(tmp_path, names_zooms) -> Path:
    """A one-visit dataset whose anat/ holds NIfTI headers of these voxel sizes."""
    b = tmp_path / "bids"
    for name, zooms in names_zooms.items():
        _nii(b / "sub-01/ses-01/anat" / f"sub-01_ses-01_{name}.nii.gz", zooms)
    return b


def test_several_candidates_choose_the_contract_name_then_finest_then_last_run(tmp_path):
    b = _anat(tmp_path, {"acq-2D_FLAIR": (0.7, 0.7, 3.0), "acq-3D_FLAIR": (1.0, 1.0, 1.0),
                         "run-1_T2w": (1.0, 1.0, 3.0), "run-2_T2w": (1.0, 1.0, 3.0),
                         "T1w": (1.0, 1.0, 1.0), "acq-fast_T1w": (0.5, 0.5, 0.5)})
    (si,) = bids.find_sessions(b, "01")
    assert si.files["FLAIR"].name == "sub-01_ses-01_acq-3D_FLAIR.nii.gz"     # 1 mm³ < 1.47 mm³
    assert si.files["T2w"].name == "sub-01_ses-01_run-2_T2w.nii.gz"          # the repeat
    assert si.files["T1w"].name == "sub-01_ses-01_T1w.nii.gz"                # the contract's name
    problems = bids.check_subject(b, "01")
    assert len(problems) == 3 and all("several candidate files" in p for p in problems)
    assert any("not used: sub-01_ses-01_acq-2D_FLAIR.nii.gz" in p for p in problems)


def test_input_filters_choose_among_candidates(tmp_path):
    b = _anat(tmp_path, {"acq-2D_FLAIR": (0.7, 0.7, 3.0), "acq-3D_FLAIR": (1.0, 1.0, 1.0),
                         "run-1_T2w": (1.0, 1.0, 3.0), "run-02_T2w": (1.0, 1.0, 3.0),
                         "rec-norm_T1w": (1.0, 1.0, 1.0), "T1w": (1.0, 1.0, 1.0)})
    flt = {"FLAIR": {"acq": ["2D"]}, "T2w": {"run": [1]}, "T1w": {"rec": ["norm"]}}
    (si,) = bids.find_sessions(b, "01", input_filters=flt)
    assert [si.files[m].name for m in ("FLAIR", "T2w", "T1w")] == [
        "sub-01_ses-01_acq-2D_FLAIR.nii.gz", "sub-01_ses-01_run-1_T2w.nii.gz", "sub-01_ses-01_rec-norm_T1w.nii.gz"]
    assert si.notes == []
    (si,) = bids.find_sessions(b, "01", input_filters={"T2w": {"run": [2]}, "T1w": {"rec": [None]}})
    assert si.files["T2w"].name == "sub-01_ses-01_run-02_T2w.nii.gz"       # runs compare as numbers
    assert si.files["T1w"].name == "sub-01_ses-01_T1w.nii.gz"              # null: without the entity
    problems = bids.check_subject(b, "01", input_filters={"FLAIR": {"acq": ["FLAIR3D"]}})
    assert any("FLAIR: the BIDS filter {'acq': ['FLAIR3D']} leaves none of" in p for p in problems)
    (si,) = bids.find_sessions(b, "01", input_filters={"FLAIR": {"acq": ["FLAIR3D"]}})
    assert "FLAIR" not in si.files and si.reference == "T2w"


def test_session_without_reference_names_the_images_not_read(tmp_path):
    b = tmp_path / "bids"
    _touch(b / "sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz")
    _touch(b / "sub-01/ses-02/anat/sub-01_ses-01_FLAIR.nii.gz")     # copied, not renamed
    _touch(b / "sub-01/ses-02/anat/flair.nii.gz")
    problems = bids.check_subject(b, "01")
    assert len(problems) == 1 and "ses-02: neither FLAIR nor T2w found" in problems[0]
    assert "images there not read: flair.nii.gz, sub-01_ses-01_FLAIR.nii.gz" in problems[0]


def test_inputs_that_are_links_into_an_annex_keep_their_bids_names(tmp_path):
    """DataLad / git-annex datasets hold their scans as links into an object store: the
    inputs, and their BIDS URIs in the sidecars, keep the dataset's names."""
    b = tmp_path / "bids"
    obj = b / ".git" / "annex" / "objects" / "Xy" / "MD5E-s1--abc.nii.gz"
    _touch(obj)
    link = b / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_FLAIR.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(obj)
    (si,) = bids.find_sessions(b, "01")
    assert si.files["FLAIR"] == link
    assert bids.raw_uri(b, link) == "bids:raw:sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz"
    # content not fetched: a broken link, which the input check names
    t2w = link.with_name("sub-01_ses-01_T2w.nii.gz")
    t2w.symlink_to(obj.with_name("MD5E-s1--def.nii.gz"))
    (si,) = bids.find_sessions(b, "01")
    assert "T2w" not in si.files
    (problem,) = bids.check_subject(b, "01")
    assert problem.startswith(f"{t2w}: a link whose content is not here") and "datalad get" in problem


def test_visit_dates_from_scans_tsv(tmp_path):
    """Datasets converted by dcm2bids or HeuDiConv date their scans in scans.tsv and often
    have no sessions.tsv: a visit without an acq_time takes its scans' earliest."""
    b = tmp_path / "bids"
    for ses, times in (("a", ["2021-03-01T10:20:00", "2021-03-01T10:05:00"]), ("b", ["n/a", "2020-01-05T09:00:00"]),
                       ("c", ["n/a"])):
        _touch(b / f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_FLAIR.nii.gz")
        rows = "".join(f"anat/f{i}.nii.gz\t{t}\n" for i, t in enumerate(times))
        _touch(b / f"sub-01/ses-{ses}/sub-01_ses-{ses}_scans.tsv", "filename\tacq_time\n" + rows)
    df = bids.read_sessions_tsv(b, "01")
    assert list(df["session_id"]) == ["ses-a", "ses-b", "ses-c"]           # ses-c undated: label order
    assert list(df["acq_time"]) == ["2021-03-01T10:05:00", "2020-01-05T09:00:00", ""]
    _touch(b / "sub-01/ses-c/sub-01_ses-c_scans.tsv", "filename\tacq_time\nanat/f.nii.gz\t2022-06-01T08:00:00\n")
    df = bids.read_sessions_tsv(b, "01")
    assert list(df["session_id"]) == ["ses-b", "ses-a", "ses-c"]           # every visit dated: time order
    # sessions.tsv's own date wins; its undated visit takes the scans' date
    _touch(b / "sub-01/sub-01_sessions.tsv", "session_id\tacq_time\tedss\nses-a\t2019-01-01\t2\nses-b\tn/a\t3\n")
    df = bids.read_sessions_tsv(b, "01")
    assert list(df["session_id"]) == ["ses-a", "ses-b", "ses-c"]
    assert list(df["acq_time"]) == ["2019-01-01", "2020-01-05T09:00:00", "2022-06-01T08:00:00"]
    # a subject without session folders
    _touch(b / "sub-02/anat/sub-02_FLAIR.nii.gz")
    _touch(b / "sub-02/sub-02_scans.tsv", "filename\tacq_time\nanat/sub-02_FLAIR.nii.gz\t2020-02-02T02:02:02\n")
    assert list(bids.read_sessions_tsv(b, "02")["acq_time"]) == ["2020-02-02T02:02:02"]


def test_bad_acq_time_and_missing_sessions_tsv(tmp_path):
    b = tmp_path / "bids"
    _touch(b / "sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz")
    _touch(b / "sub-01/ses-02/anat/sub-01_ses-02_FLAIR.nii.gz")
    df = bids.read_sessions_tsv(b, "01")                  # no sessions.tsv: label order
    assert list(df["session_id"]) == ["ses-01", "ses-02"]
    _touch(b / "sub-01/sub-01_sessions.tsv", "session_id\tacq_time\nses-01\tyesterday\nses-02\t2020-01-01\n")
    with pytest.raises(bids.BIDSError, match="yesterday.*ISO 8601"):
        bids.read_sessions_tsv(b, "01")


def test_participant_filter_and_output_dir(tmp_path):
    b = tmp_path / "bids"
    for s in ("01", "02"):
        _touch(b / f"sub-{s}/ses-01/anat/sub-{s}_ses-01_FLAIR.nii.gz")
    assert bids.find_subjects(b) == ["01", "02"]
    assert bids.find_subjects(b, ["sub-02"]) == ["02"]
    with pytest.raises(bids.BIDSError, match="not found: 07"):
        bids.find_subjects(b, ["07"])
    with pytest.raises(bids.BIDSError, match="is the BIDS input"):
        bids.check_output_dir(b, b)
    with pytest.raises(bids.BIDSError, match="inside the subject folder"):
        bids.check_output_dir(b, b / "sub-01" / "out")
    bids.check_output_dir(b, b / "derivatives" / "lesiontrack")


def test_deriv_names():
    p = bids.deriv_path("/o", "01", "02", "anat", ce="gadolinium", space="individual", desc="preproc",
                        suffix="T1w")
    assert str(p) == "/o/sub-01/ses-02/anat/sub-01_ses-02_ce-gadolinium_space-individual_desc-preproc_T1w.nii.gz"
    p = bids.deriv_path("/o", "01", "ses-02", "dwi", extra="from-dwi_to-individual_mode-image", suffix="xfm",
                        ext=".txt")
    assert str(p) == "/o/sub-01/ses-02/dwi/sub-01_ses-02_from-dwi_to-individual_mode-image_xfm.txt"
    p = bids.deriv_path("/o", "01", "02", "anat", space="individual", label="lesion", suffix="mask")
    assert p.name == "sub-01_ses-02_space-individual_label-lesion_mask.nii.gz"


def test_unknown_interpolation_is_refused_before_any_work(tmp_path):
    from lesiontrack.pipeline import PipelineError, run_subject

    cfg = load_config(overrides={"registration": {"interpolation": "sinc"}})
    (tmp_path / "bids").mkdir()
    with pytest.raises(PipelineError, match="interpolation must be 'linear' or 'bspline', got 'sinc'"):
        run_subject(tmp_path / "bids", "01", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
