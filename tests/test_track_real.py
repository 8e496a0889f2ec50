"""Change detection on the real longitudinal patient (Lesjak et al. 2016, sub-p12).

Both FLAIR visits are carried into the database's common space with its reference
transforms, preprocessed and segmented by the package (FLAIR only: the T1w/T2w of this
case have no reference transform to the common space), tracked with the image-driven
change detector (the segmentation's lesion scores given), and the change map is
compared with the ground-truth change mask (new/enlarging and shrinking/vanished
lesion voxels in one label).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lesiontrack import metrics, sitk_bridge
from lesiontrack.config import load_config
from lesiontrack.image import load_image
from lesiontrack.track import track_lesions

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SUB = REAL / "longitudinal_bids" / "sub-p12"
TRUTH = REAL / "longitudinal_truth" / "sub-p12"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def p12():
    if not (SUB.is_dir() and (TRUTH / "gt.nii.gz").is_file()):
        pytest.skip(f"real longitudinal data not found at {REAL} (not part of the repository)")
    from lesiontrack import preprocess, segment

    cfg = load_config()
    ref = load_image(TRUTH / "brainmask.nii.gz", is_label=True)
    grid = ref.with_data(ref.data.astype(np.float32), is_label=False)
    gt = load_image(TRUTH / "gt.nii.gz", is_label=True).data > 0
    flair = []
    for s in (1, 2):                                   # loop over sessions
        img = load_image(SUB / f"ses-{s}" / "anat" / f"sub-p12_ses-{s}_FLAIR.nii.gz")
        xfm = sitk_bridge.read_transform(TRUTH / f"study{s}_FLAIR_to_common_space.txt")
        flair.append(sitk_bridge.resample(img, grid, xfm).data.astype(np.float32))
    priors = preprocess.prepare_subject({"FLAIR": grid.with_data((flair[0] + flair[1]) / 2)},
                                        cfg["preprocess"])
    pres = [preprocess.preprocess_session({"FLAIR": f}, priors, grid.spacing, cfg["preprocess"])
            for f in flair]
    widths = segment.pooled_widths(pres, priors, cfg["segment"])      # as the pipeline does
    norm = [pre["FLAIR"] for pre in pres]
    masks = [segment.segment_session(pre, priors, grid.spacing, cfg["segment"], widths=widths).lesion
             for pre in pres]
    scores = [segment.lesion_zmap(pre, priors, cfg["segment"], widths) for pre in pres]
    tr = track_lesions(masks, grid.spacing, cfg["track"], flair=norm, brain_mask=priors.brain_mask,
                       lesion_z=scores)
    change = tr.change[1] > 0
    det = metrics.lesion_detection(gt, change, spacing=grid.spacing)
    # the same masks tracked without the detector and the region-level FDR (the masks decide)
    plain = track_lesions(masks, grid.spacing, dict(cfg["track"], change_fdr_q=0.0), flair=norm,
                          brain_mask=priors.brain_mask).change[1] > 0
    det0 = metrics.lesion_detection(gt, plain, spacing=grid.spacing)
    cover = metrics.lesion_detection(gt, masks[0] | masks[1], spacing=grid.spacing)
    ceiling = _truth_ceiling(gt, norm, priors, widths, grid.spacing, cfg)
    res = {"sensitivity": det["recall"], "fp_components": det["fp"], "n_truth": det["n_truth"],
           "dice": metrics.dice(gt, change), "truth_covered_by_masks": cover["recall"],
           "plain": {"sensitivity": det0["recall"], "fp_components": det0["fp"],
                     "dice": metrics.dice(gt, plain)},
           "intervals": tr.intervals.to_dict("records"), "ceiling": ceiling}
    print(res)
    return res


def _truth_ceiling(gt, norm, priors, widths, spacing, cfg):
    """What share of the ground-truth change lesions any map could find that keeps to
    the package's two definitions: a change component is countable from
    ``[track] min_change_mm3`` (a 3 mm sphere, the smallest lesion MAGNIMS counts), and a
    lesion is FLAIR-brighter than normal grey matter (``[segment] core_above_gm_z``
    narrower half-widths above the grey-matter peak) -- judged here, optimistically, by
    the component's brightest voxel at the visit where it is lesion (the brighter one)."""
    from scipy import ndimage as ndi

    from lesiontrack import segment

    lab, n = ndi.label(gt, ndi.generate_binary_structure(3, 3))
    idx = np.arange(1, n + 1)
    vol = np.bincount(lab.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing))
    tissue = segment._Tissue(np.asarray(priors.brain_mask, bool), priors.wm_prob, priors.gm_prob,
                             cfg["segment"], widths)
    level = []
    for f in norm:                                       # loop over the two sessions
        p = tissue.peak("FLAIR", f, "gm")
        tissue._cache.clear()
        level.append(p.mode + float(cfg["segment"]["core_above_gm_z"]) * min(p.sigma_low, p.sigma_high))
    gain = ndi.mean(norm[1] - norm[0], lab, idx) > 0
    brightest = np.where(gain, ndi.maximum(norm[1], lab, idx), ndi.maximum(norm[0], lab, idx))
    visible = brightest >= np.where(gain, level[1], level[0])
    countable = vol >= float(cfg["track"]["min_change_mm3"])
    return {"countable": float(countable.mean()), "visible": float(visible.mean()),
            "both": float((countable & visible).mean()), "n": int(n)}


def test_real_change_false_positives(p12):
    assert p12["fp_components"] <= 3


def test_real_change_detector_costs_nothing(p12):
    """The image-driven detector on top of the mask differences, on the same masks: it
    must not add false positives nor lose change. (Measured: sensitivity 0.13 -> 0.17,
    false-positive components 0 -> 0, voxel Dice 0.446 -> 0.462, the two lesions it adds
    being faint new lesions measured by their whole extent; 0.13 -> 0.13, 0 -> 0,
    0.446 -> 0.447 before that; 0.20, 1, 0.469 both
    before a lesion's core had to be brighter than grey matter. Its one extra finding
    in an earlier version was a 50 mm^3 rim piece of a 2.3 mL lesion, below that lesion's
    minimum detectable change; such rim pieces are no longer drawn for a lesion that stays
    stable, because on phantoms they were mostly rims of stable lesions: docs/tracking.md.)"""
    plain = p12["plain"]
    # and it finds what the masks miss: faint lesions that appeared whole
    assert p12["sensitivity"] > plain["sensitivity"]
    assert p12["fp_components"] <= plain["fp_components"]
    assert p12["dice"] >= plain["dice"] - 0.005


def test_real_change_sensitivity(p12):
    """The target: lesion-wise sensitivity 0.8 (measured 0.17, 8 of 46). Not reachable by
    a map that keeps to the package's definitions: 12 of the 46 ground-truth change
    lesions are smaller than the smallest countable change (3 mm sphere, 14.1 mm^3), so
    at most 34 of 46 (0.74) can be drawn; 14 of the 46 (6 of those 34) never reach the
    grey-matter level of the core rule even at their brightest voxel, so at most 28 of 46
    (0.61) are both countable and FLAIR-brighter than grey matter.
    The failure message reports these ceilings from the data."""
    c = p12["ceiling"]
    assert p12["sensitivity"] >= 0.8, (
        f"lesion-wise sensitivity {p12['sensitivity']:.2f} (Dice {p12['dice']:.3f}); the two "
        f"visits' lesion masks together cover {p12['truth_covered_by_masks']:.2f} of the "
        f"ground-truth change lesions; of those {c['n']} lesions {c['countable']:.2f} are "
        f"countable (min_change_mm3), {c['visible']:.2f} FLAIR-brighter than grey matter "
        f"(core_above_gm_z, brightest voxel) and {c['both']:.2f} both")


# ------------------------------------------------------------------ the whole pipeline
@pytest.fixture(scope="module")
def p12_pipeline(tmp_path_factory):
    """``run_subject`` on the raw BIDS input (all of FLAIR, T2w, T1w; our own
    registration, subject space and native-grid outputs), scored in the reference space."""
    if not (SUB.is_dir() and (TRUTH / "gt.nii.gz").is_file()):
        pytest.skip(f"real longitudinal data not found at {REAL} (not part of the repository)")
    import SimpleITK as sitk

    from lesiontrack.pipeline import run_subject

    out = tmp_path_factory.mktemp("p12_pipeline")
    full = run_subject(REAL / "longitudinal_bids", "p12", out, load_config(), write_report=False)
    ref = load_image(TRUTH / "brainmask.nii.gz", is_label=True)
    gt = load_image(TRUTH / "gt.nii.gz", is_label=True).data > 0
    anat = out / "sub-p12" / "ses-2" / "anat"
    r2 = sitk_bridge.read_transform(TRUTH / "study2_FLAIR_to_common_space.txt")
    change = sitk_bridge.resample(load_image(anat / "sub-p12_ses-2_desc-change_dseg.nii.gz",
                                             is_label=True), ref, r2).data > 0
    # our brain mask (subject space) -> common space: common -> FLAIR ses-2 -> subject
    x2 = sitk_bridge.read_transform(anat / "sub-p12_ses-2_from-FLAIR_to-individual_mode-image_xfm.txt")
    chain = sitk.CompositeTransform(3)
    chain.AddTransform(x2.GetInverse())
    chain.AddTransform(r2)                   # applied first (ITK: last added, first applied)
    brain = load_image(out / "sub-p12" / "anat" / "sub-p12_space-individual_desc-brain_mask.nii.gz",
                       is_label=True)
    brain_common = sitk_bridge.resample(brain, ref, chain).data > 0
    det = metrics.lesion_detection(gt, change, spacing=ref.spacing)
    res = {"sensitivity": det["recall"], "fp_components": det["fp"], "dice": metrics.dice(gt, change),
           "brain_dice": metrics.dice(ref.data > 0, brain_common),
           "truth_outside_brain": float(np.mean(~brain_common[gt])),
           "volumes_mm3": full.sessions["lesion_volume_mm3"].to_numpy()}
    print(res)
    return res


def test_pipeline_brain_mask_on_real_patient(p12_pipeline):
    """The atlas brain mask of the whole pipeline against the dataset's brain mask. With
    the template registered to this patient's low-contrast 2D T1w it was 0.94 L, Dice
    0.77, and 5 % of the change truth fell outside it; registered to the contrast the
    atlas tissue classes fit best (T2w here), Dice 0.93."""
    assert p12_pipeline["brain_dice"] >= 0.85
    assert p12_pipeline["truth_outside_brain"] <= 0.01


def test_pipeline_change_map_on_real_patient(p12_pipeline):
    """The whole pipeline's native-grid change map. Measured: Dice 0.45, sensitivity 0.11,
    2 false-positive components (with the atlas refined by a B-spline deformation,
    ``template_warp_mm = 40``: Dice 0.51, 0.15 (7 of 46), 5; 3 before a lesion's FLAIR volume change had to be
    confirmed on T2w; Dice 0.44, 0.13 and 1 before the inputs were conformed to
    RAS+, which moved the subject grid's sub-voxel placement; 5 before each subject-space lesion was kept one piece on the
    native grid; Dice 0.42 and 6 resampled nearest-neighbour onto the native
    grid; 4 before the segmentation's tissue-mixture score; 0.43,
    0.15, 4 while rim pieces below a lesion's minimum
    detectable change were drawn); with the T1w-registered template it was Dice 0.13,
    sensitivity 0.07, 4 false positives. The sensitivity target is asserted on the
    reference alignment above."""
    assert p12_pipeline["dice"] >= 0.3
    assert p12_pipeline["fp_components"] <= 10


def _run_without(tmp_path, pattern):
    """The whole pipeline on the real patient with the files matching ``pattern`` withheld:
    its result, provenance and change map scored against the change truth."""
    if not (SUB.is_dir() and (TRUTH / "gt.nii.gz").is_file()):
        pytest.skip(f"real longitudinal data not found at {REAL} (not part of the repository)")
    import json
    import shutil

    from lesiontrack.pipeline import run_subject

    bids = tmp_path / "bids"
    shutil.copytree(REAL / "longitudinal_bids", bids, symlinks=True,
                    ignore=shutil.ignore_patterns(pattern))
    out = tmp_path / "out"
    res = run_subject(bids, "p12", out, load_config(), write_report=False)
    prov = json.loads((out / "sub-p12" / "sub-p12_provenance.json").read_text())
    ref = load_image(TRUTH / "brainmask.nii.gz", is_label=True)
    gt = load_image(TRUTH / "gt.nii.gz", is_label=True).data > 0
    r2 = sitk_bridge.read_transform(TRUTH / "study2_FLAIR_to_common_space.txt")
    change = sitk_bridge.resample(load_image(out / "sub-p12" / "ses-2" / "anat" /
                                             "sub-p12_ses-2_desc-change_dseg.nii.gz", is_label=True),
                                  ref, r2).data > 0
    return res, prov, metrics.lesion_detection(gt, change, spacing=ref.spacing)


@pytest.mark.parametrize("withheld, source, max_fp, min_found",
                         [("ses-1", "ses-2", 6, 5), ("ses-2", "ses-1", 8, 3)])
def test_pipeline_with_a_visit_without_flair(tmp_path, withheld, source, max_fp, min_found):
    """The real patient with one FLAIR withheld (T2w, 3.3 mm slices, and T1w only at that
    visit); the change is then scored on the T2w pair. Segmented from T2w/T1w, visit 1 had
    2.6 mL of lesions against 10 mL at the other and 214 false-positive change components.
    With a FLAIR imputed from the other visit plus the significant T2w change, and the
    T2w difference's noise calibrated by intensity: visit 1 withheld, 3 false-positive
    components and 6 of 46 change lesions found, volumes 12.6 / 12.2 mL (7 found, 10.6 /
    10.3 mL before the inputs were conformed to RAS+; 14 false positives and 7 found before
    the intensity calibration; 52 false positives before the CSF guard of the imputation);
    visit 2 withheld, 2 false positives and 4 found, volumes 12.9 / 11.8 mL (4 false
    positives, 14.1 / 12.7 mL before the conforming; 9 and 5 before the calibration)."""
    res, prov, det = _run_without(tmp_path, f"sub-p12_{withheld}_FLAIR.nii.gz")
    assert prov["flair_imputed_from"] == {withheld: source}
    vols = res.sessions["lesion_volume_mm3"].to_numpy()
    print(det, vols)
    assert det["fp"] <= max_fp
    assert det["tp_truth"] >= min_found
    assert abs(vols[0] - vols[1]) <= 0.25 * max(vols)


@pytest.mark.parametrize("withheld, source", [("ses-1", "ses-2"), ("ses-2", "ses-1")])
def test_pipeline_with_a_visit_without_t2w(tmp_path, p12_pipeline, withheld, source):
    """The real patient with one T2w withheld (its T2w files are just under the 4 MiB at
    which the source archive dropped files). Scored on FLAIR alone, that visit's lesion
    volume moved away from the full run's (visit 1 withheld: 15.0 / 10.4 mL, 8
    false-positive change components; visit 2 withheld: 12.7 / 14.1 mL; with every
    contrast: 12.6 / 10.9 mL). With a T2w imputed from the other visit plus the significant
    FLAIR change: 11.6 / 10.4 mL, 6 of 46 found, 6 false positives (visit 1 withheld);
    12.7 / 11.1 mL, 7 found, 5 false positives (visit 2 withheld)."""
    res, prov, det = _run_without(tmp_path, f"sub-p12_{withheld}_T2w.nii.gz")
    assert prov["t2w_imputed_from"] == {withheld: source}
    vols = res.sessions["lesion_volume_mm3"].to_numpy()
    full = p12_pipeline["volumes_mm3"]
    print(det, vols, full)
    assert np.all(np.abs(vols - full) <= 0.1 * full)
    assert det["fp"] <= 8
    assert det["tp_truth"] >= 4


def test_pipeline_without_any_flair(tmp_path):
    """The real patient with both FLAIRs withheld (T2w and T1w only). Measured: lesion
    volumes 14.5 / 12.1 mL (with its FLAIRs the pipeline finds about 12.6 / 10.9 mL; the
    T2w-only segmentation of the old code 2.0 / 2.5 mL), 4 false-positive change
    components and 5 of 46 found (2 and 4 before the inputs were conformed to RAS+; 5 before each lesion was kept one piece on the native
    grid, 4 with the native change map resampled nearest-neighbour; 29 on the old code; 32 with a lesion score that counted CSF as
    lesion-like). The change map, on visit 2's T2w grid, is carried into the reference
    space with the FLAIR's transform: both scans share the scanner space of that visit."""
    res, _, det = _run_without(tmp_path, "*_FLAIR.nii.gz")
    vols = res.sessions["lesion_volume_mm3"].to_numpy() / 1000.0
    print(det, vols)
    assert ((vols >= 8.0) & (vols <= 20.0)).all()
    assert det["fp"] <= 10
