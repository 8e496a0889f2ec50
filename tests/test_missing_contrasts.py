"""Visits without FLAIR or T2w, end to end on a generated phantom and on the real cross-sectional
patient, scored against their truth.

A missing FLAIR is common in clinical series (a protocol change, a lost series, an
archive that dropped large files). The phantom's FLAIR (or T2w) is deleted from some visits or
from all of them, the whole pipeline runs and ``lesiontrack.evaluate`` scores its
segmentation and lesion statuses against the exact truth.
"""
from __future__ import annotations

import json

import pytest

from lesiontrack import pipeline
from lesiontrack.config import load_config
from lesiontrack.evaluate import evaluate_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from lesiontrack.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root, n_subjects=1, seed=3, resolution=2)
    return root


def _run(phantom, tmp_path, drop_flair, contrast="FLAIR"):
    import shutil

    bids_dir = tmp_path / "bids"
    shutil.copytree(phantom / "bids", bids_dir)
    for ses in drop_flair:
        (bids_dir / "sub-01" / ses / "anat" / f"sub-01_{ses}_{contrast}.nii.gz").unlink()
    out = tmp_path / "out"
    pipeline.run_subject(bids_dir, "01", out, load_config(), write_report=False)
    sc = evaluate_run(out, phantom / "truth", bids_dir)["01"]
    prov = json.loads((out / "sub-01" / "sub-01_provenance.json").read_text())
    seg = sc["segmentation"].set_index("session_id")
    print(seg[["lesion_dice", "lesion_f1", "lesion_precision"]].round(3).to_string(), sc["status"])
    return seg, sc["status"], prov


def test_visits_without_flair_are_segmented_with_an_imputed_flair(phantom, tmp_path, caplog):
    """FLAIR missing at 2 of 5 visits. Measured: status 89.6 % (91.2 % with every FLAIR;
    56.8 % when those visits were segmented from T2w alone), Dice of the two visits
    0.67 / 0.74 (0.22 / 0.22 from T2w alone)."""
    seg, status, prov = _run(phantom, tmp_path, ["ses-02", "ses-04"])
    assert prov["flair_imputed_from"] == {"ses-02": "ses-01", "ses-04": "ses-03"}
    assert "ses-04: no FLAIR; segmented with a FLAIR imputed from ses-03" in caplog.text
    assert seg.loc[["ses-02", "ses-04"], "lesion_dice"].min() >= 0.6
    assert status["accuracy"] >= 0.78



def test_visits_without_t2w_are_segmented_with_an_imputed_t2w(phantom, tmp_path, caplog):
    """T2w missing at 2 of 5 visits (the largest files of a series, the first an archive
    drops). Scored on FLAIR alone, those visits had lesion-wise precision 0.77 / 0.74
    (status 91.2 %); with a T2w imputed from the nearest visit plus the significant FLAIR
    change, 1.00 / 1.00 and status 92.0 % (every T2w present: 0.96 / 1.00, 91.2 %); 92.8 %
    since infratentorial T2w is scored against white matter (every T2w: 92.0 %)."""
    seg, status, prov = _run(phantom, tmp_path, ["ses-02", "ses-04"], contrast="T2w")
    assert prov["t2w_imputed_from"] == {"ses-02": "ses-01", "ses-04": "ses-03"}
    assert prov["flair_imputed_from"] == {}
    assert "ses-02: no T2w; segmented with a T2w imputed from ses-01" in caplog.text
    assert seg.loc[["ses-02", "ses-04"], "lesion_precision"].min() >= 0.9
    assert status["accuracy"] >= 0.9


def test_subject_without_any_flair(phantom, tmp_path, caplog):
    """No FLAIR at any visit: T2w with T1w, CSF spaces and their rims left out. Measured:
    mean Dice 0.52 (per visit 0.41-0.62), status 66.4 % (0.55, 0.46-0.64 and 74.4 % before
    the inputs were conformed to RAS+, which moved the subject grid's sub-voxel placement;
    0.42 and 41.6 % before the CSF spaces were left out)."""
    seg, status, prov = _run(phantom, tmp_path, [f"ses-0{i}" for i in range(1, 6)])
    assert prov["flair_imputed_from"] == {}
    assert "sub-01: no visit has FLAIR; lesions are segmented from T2w and T1w" in caplog.text
    assert seg["lesion_dice"].mean() >= 0.5
    assert seg["lesion_dice"].min() >= 0.4
    assert status["accuracy"] >= 0.5


def test_real_crosssectional_patient_without_flair(tmp_path):
    """sub-p19 with its FLAIR withheld (T2w, T1w, ceT1w), the whole pipeline, its native
    lesion mask against the consensus mask (same 1 mm grid). Measured: Dice 0.51, lesion
    F1 0.21, volume -7 % (with the FLAIR: Dice 0.78; segmenting T2w like a FLAIR gave
    Dice 0.02, volume -98 %)."""
    import shutil
    from pathlib import Path

    from lesiontrack.image import load_image
    from lesiontrack.metrics import dice, lesion_detection, volume_error

    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
    src = real / "crosssectional_bids"
    truth_path = real / "crosssectional_truth" / "sub-p19" / "gold_standard.nii.gz"
    if not truth_path.is_file():
        pytest.skip(f"real cross-sectional data not found at {real} (not part of the repository)")
    bids_dir = tmp_path / "bids"
    shutil.copytree(src, bids_dir, ignore=shutil.ignore_patterns("*_FLAIR.nii.gz"))
    out = tmp_path / "out"
    pipeline.run_subject(bids_dir, "p19", out, load_config(), write_report=False)
    pred = load_image(out / "sub-p19" / "ses-1" / "anat" / "sub-p19_ses-1_label-lesion_mask.nii.gz",
                      is_label=True)
    gt = load_image(truth_path, is_label=True)
    assert pred.shape == gt.shape and pred.affine == pytest.approx(gt.affine, abs=1e-3)
    d = dice(gt.data > 0, pred.data > 0)
    det = lesion_detection(gt.data > 0, pred.data > 0, spacing=gt.spacing, min_volume_mm3=10)
    vol = volume_error(gt.data > 0, pred.data > 0, spacing=gt.spacing)
    print(f"sub-p19 without FLAIR: Dice {d:.3f}, lesion F1 {det['f1']:.3f}, volume error {vol['rel']:+.3f}")
    assert d >= 0.4
    assert abs(vol["rel"]) <= 0.5
    # the same scores from `lesiontrack evaluate --reference-masks`, the consensus mask
    # laid out as a rater's masks
    from lesiontrack import bids
    from lesiontrack.evaluate import evaluate_against_masks

    ref = bids.deriv_path(tmp_path / "raters", "p19", "1", "anat", label="lesion", suffix="mask")
    ref.parent.mkdir(parents=True)
    shutil.copy(truth_path, ref)
    table, notes = evaluate_against_masks(out, tmp_path / "raters")
    (row,) = table.to_dict(orient="records")
    assert notes == [] and row["session_id"] == "ses-1"
    assert row["dice"] == pytest.approx(d) and row["f1"] == pytest.approx(det["f1"])
    assert row["volume_rel_error"] == pytest.approx(vol["rel"])


def test_flair_alone_normal_grey_matter_is_no_lesion(phantom, tmp_path):
    """FLAIR alone (every T2w, T1w, ceT1w and DWI deleted). Deep and thick grey matter is
    brighter than the partial-volumed grey-matter peak and, without T2w to veto it, was
    found as lesions: lesion-wise precision 0.616 over the visits. A lesion must now stand
    out from the tissue it touches (``local_contrast_z``): measured 0.763, recall 0.961 and
    status 90.4 % either way."""
    import shutil

    bids_dir = tmp_path / "bids"
    shutil.copytree(phantom / "bids", bids_dir)
    for f in bids_dir.rglob("*.nii.gz"):
        if not f.name.endswith("_FLAIR.nii.gz"):
            f.unlink()
    for f in bids_dir.rglob("*dwi.*"):
        f.unlink()
    scores = {}
    for name, over in (("on", {}), ("off", {"segment": {"local_contrast_z": 0}})):
        out = tmp_path / f"out_{name}"
        pipeline.run_subject(bids_dir, "01", out, load_config(overrides=over), write_report=False)
        sc = evaluate_run(out, phantom / "truth", bids_dir)["01"]
        seg = sc["segmentation"]
        scores[name] = (seg["lesion_precision"].mean(), seg["lesion_recall"].mean(), sc["status"]["accuracy"])
    print(scores)
    (p_on, r_on, s_on), (p_off, r_off, s_off) = scores["on"], scores["off"]
    assert p_on >= 0.7 and p_on >= p_off + 0.1
    assert r_on >= r_off - 0.01
    assert s_on >= 0.88
