"""Tests of the synthetic longitudinal MS phantom and of the committed example (test_data/).

The fast tests read the committed example and regenerate it once (determinism and
reproducibility); the slow ones generate phantoms with a skull, another seed and at 1 mm.
"""
from __future__ import annotations

import functools
import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from lesiontrack import sitk_bridge
from lesiontrack.image import load_image
from lesiontrack.phantom import MODALITIES, PhantomError, make_phantom

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "test_data"
SUB = "sub-01"
SESSIONS = [f"ses-{i:02d}" for i in range(1, 6)]
FILES = {"FLAIR": "anat/{s}_{t}_FLAIR.nii.gz", "T2w": "anat/{s}_{t}_T2w.nii.gz",
         "T1w": "anat/{s}_{t}_T1w.nii.gz", "ceT1w": "anat/{s}_{t}_ce-gadolinium_T1w.nii.gz",
         "dwi": "dwi/{s}_{t}_dwi.nii.gz"}
XFMS = {"FLAIR": "from-FLAIR", "T2w": "from-T2w", "T1w": "from-T1w",
        "ceT1w": "ce-gadolinium_from-T1w", "dwi": "from-dwi"}

needs_example = pytest.mark.skipif(not (EXAMPLE / "bids").is_dir(),
                                   reason="committed example test_data/bids is missing")


def image_path(root, mod, ses, sub=SUB):
    return Path(root) / "bids" / sub / ses / FILES[mod].format(s=sub, t=ses)


def xfm_path(root, mod, ses, sub=SUB):
    return Path(root) / "truth" / sub / ses / f"{sub}_{ses}_{XFMS[mod]}_to-world_mode-image_xfm.txt"


def truth_table(root, sub=SUB):
    return pd.read_csv(Path(root) / "truth" / sub / f"{sub}_desc-truth_lesions.tsv", sep="\t",
                       na_values="n/a", keep_default_na=False)


def load_3d(path):
    img = load_image(path, ndim=(3, 4))
    return img.with_data(img.data[..., 0]) if img.data.ndim == 4 else img


@functools.lru_cache(maxsize=2)
def noiseless_world(seed, subject, resolution, skull):
    """The subject's lesion-free noiseless world image of every contrast."""
    from lesiontrack._phantom_anatomy import load_anatomy, render
    from lesiontrack.phantom import _rng

    anat = load_anatomy(resolution, _rng(seed, subject, 1), skull=skull)
    ref = {mod: render(anat, mod) for mod in ("FLAIR", "T2w", "T1w", "ceT1w")}
    ref["dwi"] = render(anat, "b0")
    return ref


def transform_correlations(root, ses, seed, sub=SUB, resolution=2, skull=False):
    """Correlation with the noiseless world image after resampling through T and T^-1."""
    world = load_image(Path(root) / "truth" / sub / f"{sub}_space-world_T1w.nii.gz")
    brain = load_image(Path(root) / "truth" / sub / f"{sub}_space-world_label-brain_mask.nii.gz",
                       is_label=True).data > 0
    refs = noiseless_world(seed, int(sub[4:]), resolution, skull)
    out = {}
    for mod in MODALITIES:
        img = load_3d(image_path(root, mod, ses, sub))
        t = sitk_bridge.read_transform(xfm_path(root, mod, ses, sub))
        fwd = sitk_bridge.resample(img, world, t).data[brain]
        inv = sitk_bridge.resample(img, world, sitk_bridge.inverse(t)).data[brain]
        ref = refs[mod][brain]
        out[mod] = (np.corrcoef(fwd, ref)[0, 1], np.corrcoef(inv, ref)[0, 1])
    return out


# ----------------------------------------------------------------------------- layout
@needs_example
def test_bids_layout_and_truth_separate():
    bids, truth = EXAMPLE / "bids", EXAMPLE / "truth"
    assert (bids / "dataset_description.json").is_file()
    assert (bids / "participants.tsv").is_file()
    for ses in SESSIONS:
        for mod in MODALITIES:
            assert image_path(EXAMPLE, mod, ses).is_file(), (mod, ses)
            assert xfm_path(EXAMPLE, mod, ses).is_file(), (mod, ses)
        for name in ("desc-lesions_dseg", "label-restricted_mask", "label-blackhole_mask",
                     "label-enhancing_mask"):
            assert (truth / SUB / ses / f"{SUB}_{ses}_space-world_{name}.nii.gz").is_file()
    # no ground truth inside the BIDS folder, and the BIDS folder only holds inputs
    names = [p.name for p in bids.rglob("*") if p.is_file()]
    assert not [n for n in names if "dseg" in n or "mask" in n or "xfm" in n or "truth" in n]
    assert bids.resolve() not in truth.resolve().parents


@needs_example
def test_dwi_gradients_match_volumes():
    for ses in SESSIONS:
        path = image_path(EXAMPLE, "dwi", ses)
        nvol = nib.load(str(path)).shape[3]
        bvals = np.loadtxt(path.with_name(path.name.replace(".nii.gz", ".bval")))
        bvecs = np.loadtxt(path.with_name(path.name.replace(".nii.gz", ".bvec")))
        assert bvals.shape == (nvol,) and bvecs.shape == (3, nvol)
        assert np.sum(bvals == 0) >= 1 and np.sum(bvals == 1000) >= 6
        norms = np.linalg.norm(bvecs[:, bvals > 0], axis=0)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        assert np.linalg.matrix_rank(bvecs[:, bvals > 0]) == 3


@needs_example
def test_sessions_tsv_follows_story():
    df = pd.read_csv(EXAMPLE / "bids" / SUB / f"{SUB}_sessions.tsv", sep="\t")
    assert list(df.columns) == ["session_id", "acq_time", "edss", "event"]
    assert df["session_id"].tolist() == SESSIONS
    t = pd.to_datetime(df["acq_time"], format="ISO8601")
    assert t.is_monotonic_increasing
    days = (t - t.iloc[1]).dt.days.to_numpy()
    assert days[2] == pytest.approx(21, abs=1) and days[3] == pytest.approx(35, abs=1)
    assert days[4] > 365
    assert df["edss"].iloc[0] == 0 and df["edss"].max() == 9.5 and df["edss"].iloc[-1] == 3.5
    events = " ".join(df["event"]).lower()
    for word in ("alemtuzumab", "steroid", "plasma exchange", "rituximab", "cyclophosphamide"):
        assert word in events


@needs_example
def test_images_are_heterogeneous_acquisitions():
    """Own grid, orientation, integer scaling per image; all load without warnings."""
    spacings, orients, slopes, dtypes = set(), set(), set(), set()
    oblique = 0
    for ses in SESSIONS:
        for mod in MODALITIES:
            path = image_path(EXAMPLE, mod, ses)
            img = load_3d(path)                     # warnings are errors in this suite
            nimg = nib.load(str(path))
            spacings.add(tuple(np.round(img.spacing, 2)))
            orients.add("".join(nib.aff2axcodes(img.affine)))
            slopes.add(float(nimg.dataobj.slope))
            dtypes.add(nimg.get_data_dtype().name)
            cosines = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
            oblique += bool(np.max(np.abs(cosines)[np.abs(cosines) < 0.99], initial=0) > 0.02)
    assert len(spacings) >= 4 and len(orients) >= 3
    assert {"int16", "uint16"} <= dtypes and any(s not in (0.0, 1.0) for s in slopes)
    assert oblique >= 3


# ------------------------------------------------------------------------ transforms
@needs_example
def test_truth_transforms_align_images():
    for ses in ("ses-01", "ses-04"):
        for mod, (fwd, inv) in transform_correlations(EXAMPLE, ses, seed=0).items():
            # thick-slice T2w and 2.5 mm DWI lose detail; the inverse is far worse
            assert fwd > 0.6, (ses, mod, fwd)
            assert fwd > inv + 0.3, (ses, mod, fwd, inv)


# ----------------------------------------------------------------------------- story
@needs_example
def test_truth_table_follows_story():
    df = truth_table(EXAMPLE)
    new = df[df.status == "new"].groupby("session_id").size().reindex(SESSIONS, fill_value=0)
    assert new["ses-02"] > new["ses-01"] > 0
    assert new["ses-03"] > 0                                     # progression at C
    enh = df[df.enhancing_mm3 > 0].groupby("session_id").size().reindex(SESSIONS, fill_value=0)
    assert enh["ses-01"] == 2 and enh["ses-02"] == 0 and enh["ses-03"] == 0
    bh = df.groupby("session_id").blackhole_mm3.sum().reindex(SESSIONS, fill_value=0)
    assert bh["ses-04"] > 0 and bh["ses-05"] == 0
    b_new = df[(df.session_id == "ses-02") & (df.status == "new")]
    assert (b_new.restricted_mm3 > 0).mean() > 0.5                # most new lesions restrict
    assert (df[df.session_id == "ses-01"].restricted_mm3 > 0).sum() >= 2
    grown = df[(df.session_id == "ses-03") & (df.status == "enlarging")]
    assert len(grown) >= 5
    e = df[df.session_id == "ses-05"]
    assert (e.status == "resolved").sum() >= 3 and (e.status == "shrinking").sum() >= 5
    merged = df.dropna(subset=["merged_into"])
    split = df.dropna(subset=["split_from"])
    assert len(merged) >= 1 and len(split) >= 1
    # a merged lesion ends with volume 0; its survivor exists at that session
    for _, row in merged.iterrows():
        assert row.volume_mm3 == 0 and row.status == "resolved"
        assert ((df.lesion_id == row.merged_into) & (df.session_id == row.session_id)
                & (df.volume_mm3 > 0)).any()
    for _, row in split.iterrows():
        assert ((df.lesion_id == row.split_from) & (df.session_id == row.session_id)
                & (df.volume_mm3 > 0)).any()
    present = df[df.volume_mm3 > 0]
    assert (present.volume_mm3 >= 10).mean() > 0.95


@needs_example
def test_truth_maps_match_table():
    df = truth_table(EXAMPLE)
    for ses in SESSIONS:
        d = EXAMPLE / "truth" / SUB / ses
        lab = load_image(d / f"{SUB}_{ses}_space-world_desc-lesions_dseg.nii.gz", is_label=True)
        ids = lab.data.astype(np.int64)
        counts = np.bincount(ids.ravel())
        present = np.flatnonzero(counts)[1:]
        rows = df[(df.session_id == ses) & (df.volume_mm3 > 0)].set_index("lesion_id")
        assert sorted(rows.index) == present.tolist()
        np.testing.assert_allclose(rows.loc[present, "volume_mm3"],
                                   counts[present] * lab.voxel_volume)
        # every ID is exactly one 26-connected component
        _, ncomp = ndimage.label(ids > 0, structure=np.ones((3, 3, 3)))
        assert ncomp == len(present)
        for name in ("restricted", "blackhole", "enhancing"):
            m = load_image(d / f"{SUB}_{ses}_space-world_label-{name}_mask.nii.gz",
                           is_label=True).data > 0
            assert not np.any(m & (ids == 0))                    # inside lesions only
            vol = np.bincount(ids[m], minlength=ids.max() + 1)[present] * lab.voxel_volume
            np.testing.assert_allclose(rows.loc[present, f"{name}_mm3"], vol)


@needs_example
def test_lesion_contrast_and_diffusion_physics():
    """FLAIR lesions ~1.5-2x NAWM, not separable by one global threshold; ADC values."""
    truth = EXAMPLE / "truth" / SUB
    world = load_image(truth / f"{SUB}_space-world_T1w.nii.gz")
    brain = load_image(truth / f"{SUB}_space-world_label-brain_mask.nii.gz", is_label=True).data > 0
    ses = "ses-02"
    ids = load_image(truth / ses / f"{SUB}_{ses}_space-world_desc-lesions_dseg.nii.gz",
                     is_label=True).data > 0
    restricted = load_image(truth / ses / f"{SUB}_{ses}_space-world_label-restricted_mask.nii.gz",
                            is_label=True).data > 0

    def to_world(mod, volume=0):
        img = load_image(image_path(EXAMPLE, mod, ses), ndim=(3, 4))
        if img.data.ndim == 4:
            img = img.with_data(img.data[..., volume])
        return sitk_bridge.resample(img, world, sitk_bridge.read_transform(xfm_path(EXAMPLE, mod, ses))).data

    flair = to_world("FLAIR")
    core = ndimage.binary_erosion(ids)
    nawm = ndimage.binary_erosion(brain & (world.data > 0.9 * 500) & ~ndimage.binary_dilation(ids, iterations=2))
    ratio = np.median(flair[core]) / np.median(flair[nawm])
    assert 1.4 < ratio < 2.2
    # a global threshold cannot separate lesions from the rest of the brain
    thr = np.percentile(flair[ids], 10)
    assert np.sum(flair[brain & ~ids] > thr) > ids.sum()
    b0, b1000 = to_world("dwi", 0), to_world("dwi", 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(b0 / b1000) / 1000.0
    rcore = ndimage.binary_erosion(restricted)
    if not rcore.any():
        rcore = restricted
    assert 0.6e-3 < np.nanmedian(adc[nawm]) < 0.9e-3
    assert np.nanmedian(adc[rcore]) < 0.75 * np.nanmedian(adc[nawm])


# ----------------------------------------------------------------- determinism & API
@needs_example
def test_regenerating_reproduces_committed_example(tmp_path):
    """Same seed -> byte-identical files (the committed example is reproducible)."""
    t0 = time.perf_counter()
    res = make_phantom(tmp_path, n_subjects=1, seed=0, resolution=2, skull=False)
    elapsed = time.perf_counter() - t0
    assert res["subjects"] == ["01"] and res["bids"] == tmp_path / "bids"
    for sub in ("bids", "truth"):
        ref = sorted(p.relative_to(EXAMPLE / sub) for p in (EXAMPLE / sub).rglob("*") if p.is_file())
        new = sorted(p.relative_to(tmp_path / sub) for p in (tmp_path / sub).rglob("*") if p.is_file())
        assert ref == new
        for rel in ref:
            # NIfTI content (header + data) compared after decompression, so that another
            # zlib build cannot make a difference; every other file byte for byte
            a, b = (EXAMPLE / sub / rel).read_bytes(), (tmp_path / sub / rel).read_bytes()
            if rel.name.endswith(".gz"):
                a, b = gzip.decompress(a), gzip.decompress(b)
            assert a == b, f"{sub}/{rel} differs from the committed example"
    assert elapsed < 120          # generous: the machine may be shared


def test_bad_arguments():
    with pytest.raises(PhantomError, match="resolution"):
        make_phantom("unused", resolution=3)
    with pytest.raises(PhantomError, match="n_subjects"):
        make_phantom("unused", n_subjects=0)
    with pytest.raises(PhantomError, match="seed"):
        make_phantom("unused", seed=-1)
    for warp in (-1, 11, float("nan"), "far"):
        with pytest.raises(PhantomError, match="anatomy_warp_mm"):
            make_phantom("unused", anatomy_warp_mm=warp)
    for name, bad in (("max_rotation_deg", -1), ("max_rotation_deg", 46), ("max_shift_mm", 51),
                      ("max_shift_mm", "far"), ("pitch_deg", -46), ("pitch_deg", float("nan"))):
        with pytest.raises(PhantomError, match=name):
            make_phantom("unused", **{name: bad})
    with pytest.raises(PhantomError, match="lesion_contrast"):
        make_phantom("unused", lesion_contrast="faint")


def test_low_lesion_contrast_changes_only_the_intensities():
    """``lesion_contrast="low"``: the same lesions (placement, story), fainter on FLAIR and
    T2w, with FLAIR grey matter nearer white matter; the other contrasts are the standard's."""
    from lesiontrack._phantom_anatomy import CONTRAST_TABLES, load_anatomy, render
    from lesiontrack._phantom_lesions import design_lesions

    anat = load_anatomy(2, np.random.default_rng(0), skull=False)
    (t_std, l_std), (t_low, l_low) = CONTRAST_TABLES["standard"], CONTRAST_TABLES["low"]
    std = design_lesions(anat, np.random.default_rng(1), l_std)
    low = design_lesions(anat, np.random.default_rng(1), l_low)
    assert np.array_equal(std.center, low.center)
    for con in ("FLAIR", "T2w"):
        assert low.factors[con].max() < std.factors[con].max()
        assert low.factors[con].min() >= l_low[con][0] and low.factors[con].max() <= l_low[con][1]
    assert np.array_equal(std.factors["T1w"], low.factors["T1w"])
    gm = anat.gm > 0.9
    ratio = {k: float(np.median(render(anat, "FLAIR", texture_amp=0, tissue=t)[gm]))
             for k, t in (("std", t_std), ("low", t_low))}
    assert ratio["low"] < ratio["std"]
    assert np.array_equal(render(anat, "T1w", tissue=t_low), render(anat, "T1w", tissue=t_std))


def test_head_pose_options_turn_the_head_as_asked():
    """The acquisitions' poses stay within the asked bounds, around the asked pitch; the
    other random draws are those of the default poses (same lesions, grids and noise)."""
    from lesiontrack._phantom_acquire import plan_acquisition

    box, centre = [(-80.0, 80.0), (-110.0, 80.0), (-70.0, 90.0)], np.array([0.0, -18.0, 18.0])
    for mod in ("FLAIR", "T1w", "dwi"):
        for k in range(20):
            a = plan_acquisition(mod, 2, box, centre, np.random.default_rng(k))
            b = plan_acquisition(mod, 2, box, centre, np.random.default_rng(k), max_rotation_deg=15,
                                 max_shift_mm=20, pitch_deg=30)
            assert np.all(np.abs(a.rotation_deg) <= 4) and np.all(np.abs(a.shift_mm) <= 5)
            assert np.allclose(b.rotation_deg - [30, 0, 0], a.rotation_deg * 15 / 4)
            assert np.allclose(b.shift_mm, a.shift_mm * 4)
            assert a.orientation == b.orientation and np.array_equal(a.bias_coef, b.bias_coef)


def test_anatomy_warp_moves_every_map_by_the_asked_displacement():
    """Ramps along each axis, warped, give back the displacement field itself."""
    from lesiontrack._phantom_anatomy import Anatomy, warp_anatomy

    shape, vox = (48, 56, 44), 2.0
    ijk = np.indices(shape, dtype=np.float32)
    brain = ((ijk - np.array(shape).reshape(3, 1, 1, 1) / 2) ** 2).sum(0) < 18 ** 2
    anat = Anatomy(np.diag([vox, vox, vox, 1.0]), gm=ijk[0], wm=ijk[1], csf=ijk[2],
                   skull=np.zeros(shape, np.float32), scalp=np.zeros(shape, np.float32),
                   brain=brain, texture=np.zeros(shape, np.float32),
                   location=(brain * 4).astype(np.uint8), t1_template=np.zeros(shape, np.float32))
    assert warp_anatomy(anat, 0.0, np.random.default_rng(0)) is anat
    out = warp_anatomy(anat, 4.0, np.random.default_rng(0))
    again = warp_anatomy(anat, 4.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out.gm, again.gm)                    # deterministic
    inner = (slice(8, -8),) * 3                                          # away from the clamped edges
    disp = np.stack([(out.gm - ijk[0]), (out.wm - ijk[1]), (out.csf - ijk[2])])[(slice(None),) + inner] * vox
    rms = float(np.sqrt((disp ** 2).sum(0).mean()))
    assert 3.0 <= rms <= 5.0, rms
    assert out.brain.dtype == bool and 0.8 < out.brain.sum() / brain.sum() < 1.2
    assert set(np.unique(out.location)) <= {0, 4}
    assert out.gm.dtype == np.float32 and out.gm.shape == shape


def test_design_depends_on_seed():
    from lesiontrack._phantom_anatomy import load_anatomy
    from lesiontrack._phantom_lesions import design_lesions, render_visits

    rng = np.random.default_rng
    anat = load_anatomy(2, rng(0), skull=False)
    maps = []
    for seed in (0, 1):
        des = design_lesions(anat, rng(seed))
        visits, events = render_visits(anat, des, rng(seed + 100))
        maps.append(np.stack([v.ids for v in visits]))
        assert events["merged_into"] and events["split_from"]
    assert maps[0].shape == maps[1].shape and not np.array_equal(maps[0], maps[1])


# ------------------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_phantom_with_skull_other_seeds(tmp_path, seed):
    res = make_phantom(tmp_path, n_subjects=2, seed=seed, resolution=2, skull=True)
    assert res["subjects"] == ["01", "02"]
    for ses in ("ses-01", "ses-05"):
        for mod, (fwd, inv) in transform_correlations(tmp_path, ses, seed, "sub-02",
                                                      skull=True).items():
            assert fwd > 0.6 and fwd > inv + 0.3, (ses, mod, fwd, inv)
    # skull present: signal outside the brain in the T1w
    df1, df2 = truth_table(tmp_path, "sub-01"), truth_table(tmp_path, "sub-02")
    assert not df1[["volume_mm3"]].equals(df2[["volume_mm3"]])
    for df in (df1, df2):
        assert df.merged_into.notna().any() and df.split_from.notna().any()
        enh = df[df.enhancing_mm3 > 0].groupby("session_id").size()
        assert enh.get("ses-01", 0) == 2 and "ses-02" not in enh and "ses-03" not in enh
    if EXAMPLE.is_dir():
        a = nib.load(str(image_path(tmp_path, "FLAIR", "ses-01"))).get_fdata()
        b = nib.load(str(image_path(EXAMPLE, "FLAIR", "ses-01"))).get_fdata()
        assert a.shape != b.shape or not np.array_equal(a, b)


@pytest.mark.slow
def test_phantom_1mm(tmp_path):
    t0 = time.perf_counter()
    make_phantom(tmp_path, n_subjects=1, seed=3, resolution=1)
    elapsed = time.perf_counter() - t0
    flair = load_image(image_path(tmp_path, "FLAIR", "ses-02"))
    np.testing.assert_allclose(flair.spacing, (0.9, 0.9, 3.0), atol=1e-4)
    for mod, (fwd, inv) in transform_correlations(tmp_path, "ses-02", 3, resolution=1,
                                                  skull=True).items():
        assert fwd > 0.7 and fwd > inv + 0.3, (mod, fwd, inv)
    assert elapsed < 600          # generous: the machine may be shared
