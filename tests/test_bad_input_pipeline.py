"""The bad-input catalogue at the dataset and pipeline level.

Fast tests build a tiny BIDS dataset and exercise the checking and loading
stages (``lesiontrack.bids``, ``lesiontrack.dwi``) and the core on hand-made
masks. Slow tests run the whole command line on a copy of the committed
example (``test_data/bids``), broken in ``tmp_path``: input never modified,
reruns byte for byte, an older OUTPUT_DIR, a visit without FLAIR/T2w, a corrupt
scan, lesion-free / edge / whole-hemisphere lesions through external masks.
"""
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lesiontrack import bids, cli
from lesiontrack.config import load_config
from lesiontrack.image import Image, ImageError, load_image

EXAMPLE = Path(__file__).resolve().parents[1] / "test_data" / "bids"
AFF = np.diag([2.0, 2.0, 2.0, 1.0])


# --- a tiny BIDS dataset ---------------------------------------------------------------------

def _nii(path, shape=(12, 12, 10), seed=0, affine=AFF):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _tiny_bids(root: Path, n_sessions=3, dwi=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    sub = root / "sub-01"
    for s in range(1, n_sessions + 1):
        anat = sub / f"ses-0{s}" / "anat"
        for mod in ("FLAIR", "T2w", "T1w"):
            _nii(anat / f"sub-01_ses-0{s}_{mod}.nii.gz", seed=s)
        if dwi:
            d = sub / f"ses-0{s}" / "dwi"
            _nii(d / f"sub-01_ses-0{s}_dwi.nii.gz", shape=(8, 8, 6, 4), seed=s)
            (d / f"sub-01_ses-0{s}_dwi.bval").write_text("0 1000 1000 1000\n")
            (d / f"sub-01_ses-0{s}_dwi.bvec").write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    dates = ["2020-01-10T09:00:00", "2020-06-01T10:30:00", "2021-02-03T08:15:00"][:n_sessions]
    pd.DataFrame({"session_id": [f"ses-0{s}" for s in range(1, n_sessions + 1)], "acq_time": dates,
                  "edss": [1.0, 2.5, 2.0][:n_sessions]}).to_csv(
        sub / "sub-01_sessions.tsv", sep="\t", index=False)
    return root


@pytest.fixture
def tiny(tmp_path):
    return _tiny_bids(tmp_path / "bids")


def test_visit_without_flair_and_t2w_is_reported_for_that_visit(tiny):
    for mod in ("FLAIR", "T2w"):
        (tiny / "sub-01" / "ses-02" / "anat" / f"sub-01_ses-02_{mod}.nii.gz").unlink()
    sessions = bids.find_sessions(tiny, "01")
    assert [s.reference for s in sessions] == ["FLAIR", None, "FLAIR"]
    problems = bids.check_subject(tiny, "01")
    assert len(problems) == 1
    assert "ses-02" in problems[0] and "neither FLAIR nor T2w" in problems[0]


def test_t2w_is_the_reference_when_flair_is_missing(tiny):
    (tiny / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_FLAIR.nii.gz").unlink()
    assert [s.reference for s in bids.find_sessions(tiny, "01")] == ["T2w", "FLAIR", "FLAIR"]
    assert bids.check_subject(tiny, "01") == []


def test_missing_sessions_tsv_falls_back_to_label_order(tiny):
    (tiny / "sub-01" / "sub-01_sessions.tsv").unlink()
    df = bids.read_sessions_tsv(tiny, "01")
    assert df["session_id"].tolist() == ["ses-01", "ses-02", "ses-03"]
    assert (df["acq_time"] == "").all()
    assert bids.check_subject(tiny, "01") == []


@pytest.mark.parametrize("value", ["yesterday", "2020-13-45", "10/01/2020 9am"])
def test_unparseable_acq_time_names_file_session_and_value(tiny, value):
    path = tiny / "sub-01" / "sub-01_sessions.tsv"
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.loc[1, "acq_time"] = value
    df.to_csv(path, sep="\t", index=False)
    with pytest.raises(bids.BIDSError, match=rf"sub-01_sessions\.tsv: acq_time '{value}' of ses-02"):
        bids.read_sessions_tsv(tiny, "01")
    assert any("acq_time" in p and value in p for p in bids.check_subject(tiny, "01"))


def test_sessions_out_of_date_order_are_sorted_by_time(tiny):
    path = tiny / "sub-01" / "sub-01_sessions.tsv"
    df = pd.read_csv(path, sep="\t", dtype=str)
    df["acq_time"] = ["2021-05-01T09:00:00", "2019-01-01T09:00:00", "2020-03-01T09:00:00"]
    df.iloc[::-1].to_csv(path, sep="\t", index=False)  # rows also out of order in the file
    out = bids.read_sessions_tsv(tiny, "01")
    assert out["session_id"].tolist() == ["ses-02", "ses-03", "ses-01"]
    assert out["edss"].tolist() == [2.5, 2.0, 1.0]  # clinical columns travel with their rows


def test_sessions_tsv_without_session_id_column(tiny):
    (tiny / "sub-01" / "sub-01_sessions.tsv").write_text("visit\tacq_time\n1\t2020-01-01\n")
    with pytest.raises(bids.BIDSError, match="has no 'session_id' column"):
        bids.read_sessions_tsv(tiny, "01")


def test_bad_scan_in_a_dataset_names_the_file(tiny):
    flair = tiny / "sub-01" / "ses-03" / "anat" / "sub-01_ses-03_FLAIR.nii.gz"
    flair.write_bytes(flair.read_bytes()[:200])
    with pytest.raises(ImageError, match=r"sub-01_ses-03_FLAIR\.nii\.gz"):
        load_image(bids.find_sessions(tiny, "01")[2].files["FLAIR"])
    t1 = tiny / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz"
    t1.write_bytes(b"")
    assert any("sub-01_ses-01_T1w.nii.gz: file is empty" in p for p in bids.check_subject(tiny, "01"))


def test_dwi_bvals_that_do_not_match_the_volumes(tiny):
    from lesiontrack import dwi

    si = bids.find_sessions(tiny, "01")[0]
    series = load_image(si.files["dwi"], ndim=4)
    si.bval.write_text("0 1000 1000\n")
    with pytest.raises(dwi.DWIError, match=r"sub-01_ses-01_dwi\.bval: 3 b-values for a series of 4"):
        dwi.read_bvals_bvecs(si.bval, si.bvec, series.shape[3])
    si.bval.write_text("0 1000 1000 abc\n")
    with pytest.raises(dwi.DWIError, match="whitespace-separated numbers"):
        dwi.read_bvals_bvecs(si.bval, si.bvec, series.shape[3])
    si.bval.write_text("0 1000 1000 1000\n")
    si.bvec.write_text("0 1 0\n0 0 1\n")
    with pytest.raises(dwi.DWIError, match=r"dwi\.bvec: expected 3 rows of 4 values"):
        dwi.read_bvals_bvecs(si.bval, si.bvec, series.shape[3])


def test_dwi_without_b0_volume(tiny):
    from lesiontrack import dwi

    si = bids.find_sessions(tiny, "01")[0]
    si.bval.write_text("1000 1000 1000 1000\n")
    with pytest.raises(dwi.DWIError, match=r"dwi\.bval: no b=0 volume"):
        dwi.read_bvals_bvecs(si.bval, si.bvec, 4)
    series = load_image(si.files["dwi"], ndim=4)
    with pytest.raises(dwi.DWIError, match="no b=0 volume"):
        dwi.fit_dwi(series, np.full(4, 1000.0), np.eye(4, 3), load_config()["segment"])


def test_dwi_without_bval_is_reported(tiny):
    (tiny / "sub-01" / "ses-02" / "dwi" / "sub-01_ses-02_dwi.bval").unlink()
    problems = bids.check_subject(tiny, "01")
    assert any("sub-01_ses-02_dwi.nii.gz: missing .bval/.bvec" in p for p in problems)


def test_dwi_without_bval_only_removes_the_diffusion_measures(tiny):
    """DESIGN: an optional input's absence only removes the measures that need it."""
    from lesiontrack import pipeline

    (tiny / "sub-01" / "ses-02" / "dwi" / "sub-01_ses-02_dwi.bval").unlink()
    si = bids.find_sessions(tiny, "01")[1]
    images, dwimaps, _, _ = pipeline._load_session(si, load_config())
    assert {"FLAIR", "T2w", "T1w"} <= set(images)
    assert "ADC" not in dwimaps and "dwi" not in images


def test_3d_dwi_series_is_refused(tiny):
    path = _nii(tiny / "sub-01" / "ses-01" / "dwi" / "sub-01_ses-01_dwi.nii.gz", shape=(8, 8, 6))
    with pytest.raises(ImageError, match=r"sub-01_ses-01_dwi\.nii\.gz: expected a 4D image, got 3D"):
        load_image(path, ndim=4)


@pytest.mark.parametrize("where", ["same", "subject"])
def test_output_dir_inside_the_input_is_refused(tiny, where, capsys):
    out = tiny if where == "same" else tiny / "sub-01" / "derivatives"
    before = _checksums(tiny)
    code = cli.main(["run", str(tiny), str(out), "participant"])
    assert code == 2
    err = capsys.readouterr().err
    assert "OUTPUT_DIR" in err and ("BIDS input folder" in err or "subject folder" in err)
    assert _checksums(tiny) == before


def test_derivatives_folder_of_the_input_is_allowed(tiny):
    bids.check_output_dir(tiny, tiny / "derivatives" / "lesiontrack")


# --- the core on edge cases ----------------------------------------------------------------------

def test_lesion_free_visit_edge_lesion_and_whole_hemisphere_in_the_core():
    from lesiontrack import quantify, track
    from lesiontrack.segment import SessionMasks

    shape = (24, 20, 16)
    grid = Image(np.zeros(shape, np.float32), np.diag([1.5, 1.5, 2.0, 1.0]))
    blob = np.zeros(shape, bool)
    blob[10:14, 8:12, 6:10] = True
    empty = np.zeros(shape, bool)
    edge = np.zeros(shape, bool)
    edge[0:4, 0:5, 0:3] = True                  # touches three faces of the volume
    hemi = np.zeros(shape, bool)
    hemi[:12] = True                           # the whole left half of the volume
    lesion = [blob, empty, edge, hemi]
    tr = track.track_lesions(lesion, grid.spacing, load_config()["track"])
    sids = [f"ses-0{i}" for i in range(1, 5)]
    masks = [SessionMasks(m, np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool),
                          {"lesion"}) for m in lesion]
    les = quantify.lesion_table(tr, masks, sids, grid)
    ses = quantify.session_table(tr, masks, pd.DataFrame({"session_id": sids, "acq_time": ""}),
                                 grid, les)
    vv = grid.voxel_volume
    assert ses["lesion_count"].tolist() == [1, 0, 1, 1]
    np.testing.assert_allclose(ses["lesion_volume_mm3"], [blob.sum() * vv, 0, edge.sum() * vv, hemi.sum() * vv])
    first = les[les["session_id"] == "ses-02"]
    assert first["status"].tolist() == ["resolved"] and first["volume_mm3"].tolist() == [0.0]
    for t, m in enumerate(lesion):
        np.testing.assert_array_equal(tr.labels[t] > 0, m)
    present = les[les["volume_mm3"] > 0]
    expect = [grid.world_coords([np.argwhere(m).mean(axis=0)])[0] for m in (blob, edge, hemi)]
    np.testing.assert_allclose(present[["centroid_x", "centroid_y", "centroid_z"]].to_numpy(float),
                               expect, atol=1e-6)
    assert les.loc[les["volume_mm3"] == 0, "centroid_x"].isna().all()  # n/a for a resolved lesion


# --- the whole command line on the committed example (slow) -------------------------------------

def _checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# outputs that record the run itself rather than its result
VOLATILE = ("_provenance.json", "run_status.tsv", ".html", "/log/")


def _stable(files: dict) -> dict:
    return {k: v for k, v in files.items() if not any(s in k for s in VOLATILE)}


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    if not EXAMPLE.is_dir():
        pytest.skip(f"the committed example dataset {EXAMPLE} is absent")
    dst = tmp_path_factory.mktemp("example") / "bids"
    shutil.copytree(EXAMPLE, dst)
    return dst


def _run(bids_dir, out, *extra):
    return cli.main(["run", str(bids_dir), str(out), "participant", "--nprocs", "1", *extra])


@pytest.fixture(scope="module")
def two_runs(example, tmp_path_factory):
    """The example run twice into two folders; checksums of the input before and after."""
    before = _checksums(example)
    root = tmp_path_factory.mktemp("runs")
    codes = [_run(example, root / "a"), _run(example, root / "b")]
    return before, _checksums(example), codes, root / "a", root / "b"


@pytest.mark.slow
def test_input_dataset_is_never_modified(two_runs):
    before, after, codes, _, _ = two_runs
    assert codes == [0, 0]
    assert after == before


def _is_result(name: str) -> bool:
    """Transforms, masks, label maps and tables (not the preprocessed images or figures)."""
    return name.endswith((".tsv", ".json", "_xfm.txt", "_mask.nii.gz", "_dseg.nii.gz", "_ADC.nii.gz"))


@pytest.mark.slow
def test_reruns_give_identical_results_byte_for_byte(two_runs):
    _, _, codes, a, b = two_runs
    assert codes == [0, 0]
    ca, cb = _stable(_checksums(a)), _stable(_checksums(b))
    assert ca.keys() == cb.keys()
    results = [k for k in ca if _is_result(k)]
    assert len(results) > 20
    assert sorted(k for k in results if ca[k] != cb[k]) == []
    # the configuration and its hash are recorded with every run
    prov = json.loads((a / "sub-01" / "sub-01_provenance.json").read_text())
    assert prov["config_hash"] and prov["config"] and prov["version"]


@pytest.mark.slow
def test_reruns_give_identical_images_and_figures_byte_for_byte(two_runs):
    _, _, codes, a, b = two_runs
    ca, cb = _stable(_checksums(a)), _stable(_checksums(b))
    others = [k for k in ca if not _is_result(k)]
    assert any(k.endswith("desc-preproc_FLAIR.nii.gz") for k in others)
    assert sorted(k for k in others if ca[k] != cb.get(k)) == []


@pytest.mark.slow
def test_existing_output_dir_from_an_older_version_is_recomputed(example, two_runs):
    _, _, codes, a, b = two_runs
    assert codes == [0, 0]
    prov_path = a / "sub-01" / "sub-01_provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["version"] = "0.0.1"
    prov_path.write_text(json.dumps(prov))
    stale = a / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_label-lesion_mask.nii.gz"
    stale.write_bytes(b"left by an older version")
    assert _run(example, a) == 0
    status = pd.read_csv(a / "run_status.tsv", sep="\t")
    assert status["status"].tolist() == ["ok"]  # recomputed, not skipped as complete
    assert json.loads(prov_path.read_text())["version"] != "0.0.1"
    # every output was written again: the damaged file is a valid mask on b's grid
    redone = load_image(stale, is_label=True, allow_constant=True)
    ref = load_image(b / stale.relative_to(a), is_label=True, allow_constant=True)
    assert redone.same_grid(ref)
    assert _checksums(a).keys() == _checksums(b).keys()
    # a second rerun with the same version and configuration skips the finished subject
    assert _run(example, a) == 0
    assert pd.read_csv(a / "run_status.tsv", sep="\t")["status"].tolist() == ["skipped"]


@pytest.mark.slow
def test_visit_without_flair_t2w_and_a_corrupt_subject_in_one_run(example, tmp_path):
    data = tmp_path / "bids"
    shutil.copytree(example, data)
    for mod in ("FLAIR", "T2w"):
        for p in (data / "sub-01" / "ses-02" / "anat").glob(f"*_{mod}.nii.gz"):
            p.unlink()
    # a second subject whose FLAIR is truncated
    shutil.copytree(data / "sub-01", data / "sub-02")
    for p in (data / "sub-02").rglob("sub-01_*"):
        p.rename(p.with_name(p.name.replace("sub-01_", "sub-02_")))
    flair = next((data / "sub-02" / "ses-01" / "anat").glob("*_FLAIR.nii.gz"))
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 3])
    out = tmp_path / "out"
    code = _run(data, out, "--session-label", "01", "02", "03")
    assert code == 1  # one subject failed
    status = pd.read_csv(out / "run_status.tsv", sep="\t").set_index("participant_id")
    assert status.loc["sub-01", "status"] == "ok"
    assert status.loc["sub-02", "status"] == "failed"
    assert "sub-02_ses-01_FLAIR.nii.gz" in status.loc["sub-02", "message"]
    assert list((out / "sub-02" / "log").iterdir())
    prov = json.loads((out / "sub-01" / "sub-01_provenance.json").read_text())
    assert prov["sessions"] == ["ses-01", "ses-03"]
    assert any("ses-02" in s for s in prov["skipped_sessions"])
    sessions = pd.read_csv(out / "sub-01" / "sub-01_desc-sessions_stats.tsv", sep="\t")
    assert sessions["session_id"].tolist() == ["ses-01", "ses-03"]
    assert not (out / "sub-01" / "ses-02").exists()


@pytest.mark.slow
def test_lesion_free_edge_and_hemisphere_lesions_through_the_pipeline(example, tmp_path):
    """External masks in each visit's reference space: empty, touching the edge, a hemisphere."""
    masks_dir = tmp_path / "masks"
    wanted = {}
    for ses in ("01", "02", "03"):
        ref = next(p for mod in ("FLAIR", "T2w")
                   for p in (example / "sub-01" / f"ses-{ses}" / "anat").glob(f"*_{mod}.nii.gz"))
        img = load_image(ref)
        mask = np.zeros(img.shape, np.uint8)
        if ses == "02":
            mask[:6, :, img.shape[2] // 2 - 2: img.shape[2] // 2 + 2] = 1  # a slab on the volume edge
        elif ses == "03":
            left = img.world_coords(np.indices(img.shape).reshape(3, -1).T)[:, 0] < img.world_coords(
                [np.array(img.shape) / 2])[0, 0]
            mask = left.reshape(img.shape).astype(np.uint8)
        wanted[ses] = mask.sum() * img.voxel_volume
        path = bids.deriv_path(masks_dir, "01", ses, "anat", label="lesion", suffix="mask")
        if ses == "03":
            path = path.with_suffix("")                       # an uncompressed .nii is read too
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, img.affine), str(path))
    out = tmp_path / "out"
    assert _run(example, out, "--session-label", "01", "02", "03", "--lesion-masks", str(masks_dir)) == 0
    sessions = pd.read_csv(out / "sub-01" / "sub-01_desc-sessions_stats.tsv", sep="\t")
    assert sessions["lesion_count"].iloc[0] == 0 and sessions["lesion_volume_mm3"].iloc[0] == 0
    assert sessions["lesion_count"].iloc[1] >= 1 and sessions["lesion_count"].iloc[2] >= 1
    # volumes survive the trip into the individual space (clipped only by its field of view)
    assert 0 < sessions["lesion_volume_mm3"].iloc[1] <= 1.2 * wanted["02"]
    assert 0.5 * wanted["03"] < sessions["lesion_volume_mm3"].iloc[2] <= 1.2 * wanted["03"]
    native = load_image(out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_label-lesion_mask.nii.gz",
                        is_label=True, allow_constant=True)
    assert native.data.max() == 0
    assert (out / "sub-01.html").exists()
