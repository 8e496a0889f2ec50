"""Tests of lesiontrack.preprocess: skull-strip detection, atlas priors, N4 and normalisation."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from _segment_synthetic import synthetic_subject
from lesiontrack import preprocess, sitk_bridge
from lesiontrack._seg_atlas import load_templates
from lesiontrack._seg_stats import tissue_peak
from lesiontrack.config import load_config
from lesiontrack.image import Image
from lesiontrack.metrics import dice

CFG = load_config()["preprocess"]
SP = (2.0, 2.0, 2.0)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _ball(shape, radius_vox, value=1.0):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum((g[a] - shape[a] / 2) ** 2 for a in range(3))
    return np.where(d2 <= radius_vox ** 2, value, 0.0).astype(np.float32)


def test_detect_skullstripped():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = _ball((100, 100, 100), 33)                   # ~1200 mL sphere, zero outside
    assert preprocess.detect_skullstripped(Image(brain + 10 * (brain > 0), aff), CFG)
    head = _ball((100, 100, 100), 45) + 0.5              # ~3000 mL head, noisy non-zero background
    assert not preprocess.detect_skullstripped(Image(head, aff), CFG)
    big = _ball((100, 100, 100), 45)                     # zero background but head-sized
    assert not preprocess.detect_skullstripped(Image(big, aff), CFG)


def test_stripped_inputs_decide_from_every_native_image(monkeypatch):
    """Each template contrast is stripped when every session's native image of it is; the
    priors follow the contrast they are drawn on, also where the across-session mean would
    not pass as a brain (a union of the visits' brains, widened by misalignment and the
    interpolation: a 2 mm phantom's 1.89 L brain became a 2.05 L mean)."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = Image(_ball((100, 100, 100), 33, 10.0), aff)
    head = Image(_ball((100, 100, 100), 45) + 0.5, aff)
    sessions = {"ses-1": {"T1w": brain, "FLAIR": brain, "dwi": head},
                "ses-2": {"T1w": brain, "FLAIR": head}}
    assert preprocess.stripped_inputs(sessions, CFG) == {"T1w": True, "FLAIR": False}
    assert preprocess.stripped_inputs(sessions, dict(CFG, skullstripped=True)) is None

    seen = []

    def fake_register(fixed, skullstripped, cfg, init=None, stages=("similarity", "affine")):
        seen.append(skullstripped)
        return sitk.Transform()

    monkeypatch.setattr(preprocess, "register_template", fake_register)
    wide = Image(_ball((100, 100, 100), 42, 10.0), aff)   # 2.5 L: no brain by volume
    cfg = dict(CFG, template_resolution=2)
    assert not preprocess.prepare_subject({"T1w": wide}, cfg).skullstripped
    pr = preprocess.prepare_subject({"T1w": wide}, cfg, {"T1w": True, "FLAIR": False})
    assert pr.skullstripped and seen[-1] is True
    assert pr.brain_mask.sum() == np.count_nonzero(wide.data)   # the support is the brain
    assert not preprocess.prepare_subject({"T1w": wide}, dict(cfg, skullstripped=False),
                                          {"T1w": True}).skullstripped


def test_tissue_peak_ignores_lesion_tail():
    rng = np.random.default_rng(0)
    wm = rng.normal(100, 5, 200_000)
    p0 = tissue_peak(wm)
    p1 = tissue_peak(np.concatenate([wm, rng.normal(150, 15, 40_000)]))   # 20 % lesion load
    assert abs(p0.mode - 100) < 1 and abs(p1.mode - 100) < 1.5
    assert p1.sigma_low == pytest.approx(5, rel=0.15)


def test_preprocess_session_bias_and_normalisation():
    imgs, priors, truth, _ = synthetic_subject(resolution=2, seed=1)
    shape = priors.brain_mask.shape
    g = np.indices(shape, dtype=np.float32)
    bias = np.exp(0.25 * (g[0] / shape[0] - 0.5) + 0.2 * (g[2] / shape[2] - 0.5)).astype(np.float32)
    biased = {"FLAIR": imgs["FLAIR"] * bias, "ADC": imgs["ADC"]}
    cfg = dict(CFG, n4_modalities=["FLAIR"])
    out = preprocess.preprocess_session(biased, priors, SP, cfg)
    assert np.array_equal(out["ADC"], imgs["ADC"])      # physical units, unchanged
    nawm = priors.brain_mask & (priors.wm_prob > 0.95) & ~truth["lesion"]
    cv_before = biased["FLAIR"][nawm].std() / biased["FLAIR"][nawm].mean()
    cv_after = out["FLAIR"][nawm].std() / out["FLAIR"][nawm].mean()
    assert cv_after < 0.8 * cv_before
    assert out["FLAIR"].dtype == np.float32
    assert abs(np.median(out["FLAIR"][nawm]) - 1.0) < 0.03


def test_prepare_subject_on_shifted_template():
    """The template itself, shifted by 6 mm: priors land back on the brain."""
    t = load_templates(2)
    shifted = t["T1w"].affine.copy()
    shifted[:3, 3] += [6.0, -4.0, 3.0]
    img = Image(t["T1w"].data * (t["brain"].data > 0.5) * 500, shifted)
    cfg = dict(CFG, template_resolution=2, registration_iterations=60)
    pr = preprocess.prepare_subject({"T1w": img}, cfg)
    assert pr.skullstripped
    assert pr.brain_mask.dtype == bool and pr.wm_prob.dtype == np.float32
    truth_brain = t["brain"].data > 0.5
    assert dice(truth_brain, pr.brain_mask) > 0.95
    wm_ref = t["wm"].data > 0.5
    assert dice(wm_ref, pr.wm_prob > 0.5) > 0.85
    assert set(np.unique(pr.location)) == {0, 1, 2, 3, 4}
    assert not (pr.location[~pr.brain_mask]).any()
    with pytest.raises(preprocess.PreprocessError, match="skullstripped"):
        preprocess.prepare_subject({"T1w": img}, dict(cfg, skullstripped="maybe"))
    with pytest.raises(preprocess.PreprocessError, match="template_modalities"):
        preprocess.prepare_subject({"ceT1w": img}, cfg)
    for bad in (5, 500, -1, True, "40"):
        with pytest.raises(preprocess.PreprocessError, match="template_warp_mm"):
            preprocess.prepare_subject({"T1w": img}, dict(cfg, template_warp_mm=bad))
    for key, value in (("template_search_range_deg", -1), ("template_search_starts", 1.5),
                       ("template_search_min_gain", "5 %")):
        with pytest.raises(preprocess.PreprocessError, match=key):
            preprocess.prepare_subject({"T1w": img}, dict(cfg, **{key: value}))
    with pytest.raises(preprocess.PreprocessError, match="template_warp_iterations"):
        preprocess.prepare_subject({"T1w": img}, dict(cfg, template_warp_mm=40, template_warp_iterations=0))


def test_prepare_subject_on_a_head_pitched_beyond_the_optimisers_reach():
    """The template turned by 30 degrees of pitch and 10 of yaw about the brain centre, as
    a head lies in a scanner: from the centre-of-mass start alone the similarity stage
    stops in a wrong optimum (white-matter Dice 0.51); the rotated starts find it."""
    t = load_templates(2)
    brain = t["brain"].data > 0.5
    ax, az = np.radians(-30.0), np.radians(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    c = t["T1w"].world_coords(np.argwhere(brain).mean(axis=0))
    turn = np.eye(4)
    turn[:3, :3] = rz @ rx
    turn[:3, 3] = c - turn[:3, :3] @ c
    img = Image(t["T1w"].data * brain * 500, turn @ t["T1w"].affine)   # same voxels, head turned
    cfg = dict(CFG, template_resolution=2, registration_iterations=60)
    pr = preprocess.prepare_subject({"T1w": img}, cfg)
    assert dice(t["wm"].data > 0.5, pr.wm_prob > 0.5) > 0.85


def test_template_warp_follows_an_anatomy_the_affine_map_cannot():
    """The template, warped by a smooth random deformation (4 mm RMS), as the subject: the
    B-spline refinement carries the atlas white matter onto the warped white matter
    better than the affine map does (here the identity, the right affine answer)."""
    from scipy import ndimage

    from lesiontrack._phantom_anatomy import smooth_noise
    from lesiontrack._seg_atlas import warp_template

    t = load_templates(2)
    shape = t["T1w"].shape
    rng = np.random.default_rng(3)
    disp = [smooth_noise(shape, 15.0 / 2.0, rng) * np.float32(4.0 / np.sqrt(3) / 2.0) for _ in range(3)]
    coords = np.indices(shape, dtype=np.float32) + np.stack(disp)

    def warp(a):
        return ndimage.map_coordinates(a.astype(np.float32), coords, order=1, mode="nearest")

    brain = warp(t["brain"].data) > 0.5
    subject = Image(warp(t["T1w"].data) * brain * 500, t["T1w"].affine)
    wm_true = warp(t["wm"].data) > 0.5
    cfg = dict(CFG, template_warp_mm=40)
    identity = sitk_bridge.identity()
    refined = warp_template(subject, True, cfg, identity)
    wm_affine = sitk_bridge.resample(t["wm"], subject, identity).data > 0.5
    wm_warped = sitk_bridge.resample(t["wm"], subject, refined).data > 0.5
    d0, d1 = dice(wm_true, wm_affine), dice(wm_true, wm_warped)
    print(f"white matter Dice: affine {d0:.3f}, with the B-spline refinement {d1:.3f}")
    assert d1 >= d0 + 0.05
    # the warp is carried as a displacement field sampled on the registration grid
    assert isinstance(refined, sitk.CompositeTransform)
    assert refined.GetNthTransform(1).GetName() == "DisplacementFieldTransform"


def test_template_warp_that_fails_falls_back_to_the_affine_map(monkeypatch, caplog):
    """A warp whose optimisation breaks down (here: the metric raises, as when a diverging
    optimisation carries the template out of the image) leaves the affine map, with a
    warning, instead of failing the subject."""
    from lesiontrack import _seg_atlas

    t = load_templates(2)
    subject = Image(t["T1w"].data * (t["brain"].data > 0.5) * 500, t["T1w"].affine)

    def broken(self, fixed, moving):
        raise RuntimeError("ITK ERROR: All samples map outside moving image buffer.")

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", broken)
    identity = sitk_bridge.identity()
    with caplog.at_level("WARNING"):
        out = _seg_atlas.warp_template(subject, True, dict(CFG, template_warp_mm=40), identity)
    assert out is identity
    assert "template warp (L-BFGS-B) failed" in caplog.text
    assert "template warp (gradient descent) failed" in caplog.text
    assert "the affine alignment is used" in caplog.text


def test_template_warp_that_does_not_move_tries_the_second_optimiser(monkeypatch, caplog):
    """An L-BFGS-B whose line search fails at its first step leaves the deformation at zero
    (seen on a warped phantom); the warp is then run by a gradient descent, which moves."""
    from lesiontrack import _seg_atlas

    t = load_templates(2)
    shifted = np.roll(t["T1w"].data * (t["brain"].data > 0.5), 3, axis=0) * 500
    subject = Image(shifted, t["T1w"].affine)

    def stuck(self, **kw):          # an optimiser that never moves
        self.SetOptimizerAsGradientDescent(learningRate=0.0, numberOfIterations=2)

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "SetOptimizerAsLBFGSB", stuck)
    with caplog.at_level("INFO"):
        out = _seg_atlas.warp_template(subject, True, dict(CFG, template_warp_mm=40,
                                                           template_warp_iterations=10),
                                       sitk_bridge.identity())
    assert "L-BFGS-B): metric" in caplog.text and "largest control-point shift 0.0 mm" in caplog.text
    assert "gradient descent): metric" in caplog.text
    assert isinstance(out, sitk.CompositeTransform)


def test_preprocess_session_same_with_one_or_more_threads(monkeypatch):
    """The contrasts are bias-corrected side by side; the result does not depend on it."""
    imgs, priors, _, _ = synthetic_subject(resolution=2, seed=2)
    cfg = dict(CFG, n4_modalities=["FLAIR", "T2w", "T1w"])
    monkeypatch.setattr(preprocess, "usable_cpus", lambda: 3)
    par = preprocess.preprocess_session(imgs, priors, SP, cfg)
    monkeypatch.setattr(preprocess, "usable_cpus", lambda: 1)
    seq = preprocess.preprocess_session(imgs, priors, SP, cfg)
    assert list(par) == list(seq) == list(imgs)
    for mod in seq:
        assert np.array_equal(par[mod], seq[mod]), mod
    bad = dict(imgs, T2w=np.zeros_like(imgs["T2w"]))
    monkeypatch.setattr(preprocess, "usable_cpus", lambda: 3)
    with pytest.raises(preprocess.PreprocessError, match="T2w"):
        preprocess.preprocess_session(bad, priors, SP, cfg)


def test_preprocess_sessions_on_one_pool_as_session_by_session(monkeypatch):
    """Every image of several sessions on one pool: the results are those of each session
    alone, in the input order; each input is released when taken up and ``done`` sees
    every result in order."""
    imgs, priors, _, _ = synthetic_subject(resolution=2, seed=2)
    cfg = dict(CFG, n4_modalities=["FLAIR", "T2w", "T1w"])
    other = {m: a * np.float32(1.3) for m, a in imgs.items() if m != "T1w"}
    monkeypatch.setattr(preprocess, "usable_cpus", lambda: 2)
    alone = [preprocess.preprocess_session(x, priors, SP, cfg) for x in (imgs, other)]
    sessions = {"ses-1": dict(imgs), "ses-2": dict(other)}
    seen = []
    both = preprocess.preprocess_sessions(sessions, priors, SP, cfg,
                                          done=lambda s, m, a: seen.append((s, m, a)))
    assert sessions == {"ses-1": {}, "ses-2": {}}           # inputs released
    assert list(both) == ["ses-1", "ses-2"]
    assert [(s, m) for s, m, _ in seen] == [(s, m) for s in both for m in both[s]]
    for (s, ref) in zip(both, alone):
        assert list(both[s]) == list(ref)
        for mod in ref:
            assert np.array_equal(both[s][mod], ref[mod]), (s, mod)
    assert all(a is both[s][m] for s, m, a in seen)


def _scaled(scale, shift=(0.0, 0.0, 0.0)):
    """A subject -> template transform that scales about the template centre (LPS mm)."""
    import SimpleITK as sitk

    t = load_templates(2)["brain"]
    centre = t.affine[:3, :3] @ (np.array(t.shape) / 2.0) + t.affine[:3, 3]
    tr = sitk.AffineTransform(3)
    tr.SetCenter(tuple(float(c) for c in centre * [-1, -1, 1]))
    tr.SetMatrix(tuple((np.eye(3) * scale).ravel()))
    tr.SetTranslation(tuple(float(v) for v in shift))
    return tr


def test_tissue_fit_prefers_the_true_alignment_for_any_contrast():
    """The template's own T1 (CSF dark) and an inverted copy (CSF bright, like T2w): the
    identity explains both better than a brain scaled by 15 % or shifted by 8 mm."""
    import SimpleITK as sitk

    t = load_templates(2)
    brain = t["brain"].data > 0.5
    t1 = t["T1w"].data * brain
    inv = np.where(brain, t1.max() * 1.05 - t1, 0).astype(np.float32)
    imgs = [t["T1w"].with_data(t1.astype(np.float32)), t["T1w"].with_data(inv)]
    cfg = dict(CFG, registration_template_resolution=2)
    right = preprocess.tissue_fit(imgs, sitk.Transform(), cfg)
    for wrong in (_scaled(0.85), _scaled(1.0, (8.0, 0.0, 0.0))):
        assert right > preprocess.tissue_fit(imgs, wrong, cfg) + 0.05
    for img in imgs:                                   # each contrast on its own, too
        assert preprocess.tissue_fit([img], sitk.Transform(), cfg) > \
            preprocess.tissue_fit([img], _scaled(0.85), cfg) + 0.05


def test_prepare_subject_keeps_the_alignment_that_fits_all_contrasts(monkeypatch):
    """A contrast whose template registration fails (here: forced to a brain 15 % too
    small, as on a low-contrast 2D T1w) is outvoted; with ``template_selection = "first"``
    its alignment is used."""
    import SimpleITK as sitk

    t = load_templates(2)
    brain = t["brain"].data > 0.5
    t1 = (t["T1w"].data * brain * 500).astype(np.float32)
    flair = np.where(brain, 2.0 * t1.max() - t1, 0) * (t["wm"].data + t["gm"].data > 0.2)
    imgs = {"T1w": t["T1w"].with_data(t1), "FLAIR": t["T1w"].with_data(flair.astype(np.float32))}
    calls = []

    def fake_register(fixed, skullstripped, cfg, init=None, stages=("similarity", "affine")):
        calls.append(stages)
        if init is not None:
            return init
        return _scaled(0.85) if fixed is imgs["T1w"] else sitk.Transform()

    monkeypatch.setattr(preprocess, "register_template", fake_register)
    monkeypatch.setattr(preprocess, "coarse_fixed", lambda img, cfg: img)   # keep the identity
    cfg = dict(CFG, template_resolution=2)
    wm = t["wm"].data > 0.5                          # skull-stripped: the priors tell
    good = preprocess.prepare_subject(imgs, cfg)
    assert calls.count(("similarity",)) == 2 and dice(wm, good.wm_prob > 0.5) > 0.97
    assert good.template_fit["chosen"] == "FLAIR"
    assert good.template_fit["tissue_fit"]["FLAIR"] > good.template_fit["tissue_fit"]["T1w"]
    calls.clear()
    first = preprocess.prepare_subject(imgs, dict(cfg, template_selection="first"))
    assert len(calls) == 1 and dice(wm, first.wm_prob > 0.5) < 0.8
    with pytest.raises(preprocess.PreprocessError, match="template_selection"):
        preprocess.prepare_subject(imgs, dict(cfg, template_selection="best"))


def test_every_contrast_has_one_vote_in_the_template_choice(monkeypatch):
    """The alignment is chosen by each contrast's tissue fit relative to that contrast's
    best, averaged: a contrast with a wide scale of fit (a T1w's rank fit can be five
    times a FLAIR's) no longer picks its own alignment alone. The fits are those measured
    on the real longitudinal patient with no T2w (rows: alignment to T1w, to FLAIR;
    columns: the T1w and FLAIR images), where the T1w alignment shrank the brain by 11 %:
    plain means 0.055 / 0.049 chose T1w, relative 0.58 / 0.86 choose FLAIR."""
    import SimpleITK as sitk

    t = load_templates(2)
    imgs = {"T1w": t["T1w"], "FLAIR": t["T1w"].with_data(t["T1w"].data * 0.5)}
    made = {}

    def fake_register(fixed, skullstripped, cfg, init=None, stages=("similarity", "affine")):
        if init is not None:
            return init
        tr = sitk.AffineTransform(3)
        made[id(tr)] = "T1w" if fixed is imgs["T1w"] else "FLAIR"
        tr.SetTranslation((1.0, 0.0, 0.0) if made[id(tr)] == "T1w" else (0.0, 0.0, 0.0))
        return tr

    table = {"T1w": [0.1052, 0.0038], "FLAIR": [0.0754, 0.0231]}
    monkeypatch.setattr(preprocess, "register_template", fake_register)
    monkeypatch.setattr(preprocess, "coarse_fixed", lambda img, cfg: img)
    monkeypatch.setattr(preprocess, "_tissue_fits", lambda images, tr, cfg:
                        table["T1w" if tr.GetTranslation()[0] == 1.0 else "FLAIR"])
    pr = preprocess.prepare_subject(imgs, dict(CFG, template_resolution=2))
    assert pr.template_fit["chosen"] == "FLAIR"
    assert pr.template_fit["tissue_fit"] == {"T1w": 0.0545, "FLAIR": 0.0492}
    assert pr.template_fit["relative_fit"] == {"T1w": 0.5823, "FLAIR": 0.8584}
    table["FLAIR"] = [0.0754, 0.0030]                # the FLAIR alignment fits neither better
    assert preprocess.prepare_subject(imgs, dict(CFG, template_resolution=2)) \
        .template_fit["chosen"] == "T1w"


@pytest.mark.slow
def test_prepare_subject_raw_longitudinal():
    """Raw (not skull-stripped) FLAIR of sub-p12: detected as such; atlas brain mask vs reference."""
    from lesiontrack.image import load_image

    truth = REAL / "longitudinal_truth" / "sub-p12"
    if not (truth / "brainmask.nii.gz").exists():
        pytest.skip(f"real data not present at {REAL}")
    ref = load_image(truth / "brainmask.nii.gz", is_label=True)
    flair = load_image(REAL / "longitudinal_bids" / "sub-p12" / "ses-1" / "anat" / "sub-p12_ses-1_FLAIR.nii.gz")
    t = sitk_bridge.read_transform(truth / "study1_FLAIR_to_common_space.txt")
    aligned = sitk_bridge.resample(flair, ref, t)
    pr = preprocess.prepare_subject({"FLAIR": aligned}, CFG)
    assert not pr.skullstripped
    assert dice(ref.data > 0, pr.brain_mask) >= 0.85
