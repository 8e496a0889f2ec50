"""Property-based fuzzing of the loaders, the SimpleITK bridge and the core.

NIfTI files are built byte by byte from random header fields (dimensions,
data type, pixdim, qform/sform codes and matrices, scl_slope/scl_inter) and
small random volumes, so the loader also meets headers nibabel itself would
never write. The property: :func:`load_image` returns a valid Image or raises
ImageError, never any other exception or warning.

The runs are deterministic (``derandomize=True``) and bounded; set
``LESIONTRACK_FUZZ_SCALE`` (e.g. 20) for a longer search.
"""
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lesiontrack import sitk_bridge as sb
from lesiontrack.image import Image, ImageError, load_image, save_image

SCALE = max(1, int(os.environ.get("LESIONTRACK_FUZZ_SCALE", "1")))
N_HEADER, N_GEOMETRY, N_LABEL, N_CORE = 150 * SCALE, 40 * SCALE, 60 * SCALE, 25 * SCALE


def _fuzz(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


ODD_FLOATS = st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-30, 1e30, 1e38, -3e38, np.nan, np.inf, -np.inf])
FLOATS = st.one_of(st.floats(-300, 300, allow_nan=False), ODD_FLOATS)
DTYPES = st.sampled_from(["uint8", "int8", "int16", "uint16", "int32", "int64", "float32",
                          "float64", "complex64"])
CONTENT = st.sampled_from(["normal", "zeros", "constant", "nan", "inf", "huge", "integers"])


def _data(shape, dtype, content, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if content == "zeros":
        vals = np.zeros(n)
    elif content == "constant":
        vals = np.full(n, 7.0)
    elif content == "integers":
        vals = rng.integers(0, 5, n).astype(float)
    else:
        vals = rng.normal(100, 30, n)
        if content in ("nan", "inf") and n:
            vals[rng.integers(0, n)] = np.nan if content == "nan" else np.inf
        if content == "huge":
            vals *= 1e36
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        vals = np.clip(np.nan_to_num(vals, posinf=info.max, neginf=info.min), info.min, info.max)
    with np.errstate(over="ignore", invalid="ignore"):
        return vals.astype(dt).reshape(shape, order="F")


@st.composite
def nifti_files(draw):
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(DTYPES)
    data = _data(shape, dtype, draw(CONTENT), draw(st.integers(0, 2**16)))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    if draw(st.booleans()):  # dims that disagree with the stored data
        dims = hdr["dim"].copy()
        dims[1 + draw(st.integers(0, ndim - 1))] = draw(st.integers(0, 9))
        hdr["dim"] = dims
    pixdim = [draw(st.sampled_from([1.0, -1.0, 0.0]))] + [draw(FLOATS) for _ in range(7)]
    hdr["pixdim"] = pixdim
    hdr["qform_code"] = draw(st.integers(0, 5))
    hdr["sform_code"] = draw(st.integers(0, 5))
    for key in ("quatern_b", "quatern_c", "quatern_d"):
        hdr[key] = draw(st.one_of(st.floats(-1.2, 1.2), ODD_FLOATS))
    for key in ("qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[key] = draw(FLOATS)
    for key in ("srow_x", "srow_y", "srow_z"):
        hdr[key] = [draw(FLOATS) for _ in range(4)]
    hdr["scl_slope"] = draw(FLOATS)
    hdr["scl_inter"] = draw(FLOATS)
    hdr["vox_offset"] = 352
    return hdr, data, draw(st.sampled_from([3, 4, (3, 4)])), draw(st.booleans())


def _check_valid(img, wanted, is_label):
    assert isinstance(img, Image)
    assert img.data.ndim in wanted
    assert img.data.dtype == ((np.uint8, np.int32) if is_label else (np.float32,))[
        0 if not is_label or img.data.dtype == np.uint8 else 1]
    assert np.isfinite(img.data).all()
    assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 0
    assert min(img.shape[:3]) >= 2


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@_fuzz(N_HEADER)
@given(case=nifti_files())
def test_load_image_returns_a_valid_image_or_raises_image_error(case, fuzz_dir):
    hdr, data, ndim, is_label = case
    path = fuzz_dir / "fuzz.nii"
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\0" * 4)
        fh.write(data.tobytes(order="F"))
    wanted = (ndim,) if isinstance(ndim, int) else ndim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*(qform and sform disagree|neither qform|the qform is invalid)",
                                category=UserWarning)
        try:
            img = load_image(path, ndim=ndim, is_label=is_label)
        except ImageError as exc:
            assert "fuzz.nii" in str(exc)
            return
    _check_valid(img, wanted, is_label)


def _rotation(angles):
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def geometries(draw):
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    axes = np.zeros((3, 3))
    axes[perm, [0, 1, 2]] = signs
    zooms = draw(st.lists(st.sampled_from([0.5, 0.7, 0.9, 1.0, 2.0, 3.0, 6.0]), min_size=3, max_size=3))
    angles = draw(st.lists(st.floats(-0.6, 0.6), min_size=3, max_size=3))
    aff = np.eye(4)
    aff[:3, :3] = _rotation(angles) @ axes @ np.diag(zooms)
    aff[:3, 3] = draw(st.lists(st.floats(-150, 150), min_size=3, max_size=3))
    shape = tuple(draw(st.lists(st.integers(2, 7), min_size=3, max_size=3)))
    return aff, shape


@_fuzz(N_GEOMETRY)
@given(geom=geometries(), seed=st.integers(0, 2**16))
def test_any_orientation_survives_file_and_sitk_round_trips(geom, seed, fuzz_dir):
    import SimpleITK as sitk

    aff, shape = geom
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    img = Image(data, aff)
    back = sb.from_sitk(sb.to_sitk(img))
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, aff, atol=1e-9)
    path = save_image(img, fuzz_dir / "g.nii.gz")
    loaded = load_image(path)
    np.testing.assert_allclose(loaded.affine, aff, atol=1e-3)
    simg = sitk.ReadImage(str(path))
    corner = np.array(shape) - 1
    np.testing.assert_allclose(simg.TransformIndexToPhysicalPoint(tuple(int(c) for c in corner)),
                               sb.ras_to_lps_points(img.world_coords([corner]))[0], atol=1e-3)


@_fuzz(N_LABEL)
@given(src=geometries(), ref=geometries(), seed=st.integers(0, 2**16),
       angles=st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
       shift=st.lists(st.floats(-5, 5), min_size=3, max_size=3))
def test_resampled_label_values_stay_in_the_label_set(src, ref, seed, angles, shift):
    import SimpleITK as sitk

    labels = np.array([0, 2, 9, 250], np.uint8)
    data = labels[np.random.default_rng(seed).integers(0, 4, size=src[1])]
    moving = Image(data, src[0], is_label=True)
    reference = Image(np.zeros(ref[1], np.float32), ref[0])
    t = sitk.Euler3DTransform()
    t.SetRotation(*angles)
    t.SetTranslation(tuple(shift))
    out = sb.resample(moving, reference, t)
    assert out.is_label and out.shape == reference.shape
    assert set(np.unique(out.data).tolist()) <= set(labels.tolist())


# --- the core: tracking over random masks --------------------------------------------------

@st.composite
def mask_series(draw):
    shape = tuple(draw(st.lists(st.integers(3, 9), min_size=3, max_size=3)))
    n = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    density = draw(st.sampled_from([0.0, 0.05, 0.2, 0.6, 1.0]))
    return [rng.random(shape) < density for _ in range(n)]


@_fuzz(N_CORE)
@given(masks=mask_series())
def test_track_lesions_on_random_masks(masks):
    track = pytest.importorskip("lesiontrack.track")
    from lesiontrack.config import load_config

    if not hasattr(track, "track_lesions"):
        pytest.skip("lesiontrack.track.track_lesions is not available")
    out = track.track_lesions(masks, (1.0, 1.0, 1.0), load_config()["track"])
    assert len(out.labels) == len(masks) and len(out.change) == len(masks)
    assert out.change[0] is None
    for t, (mask, lab) in enumerate(zip(masks, out.labels)):
        assert lab.shape == mask.shape and lab.dtype == np.int32
        np.testing.assert_array_equal(lab > 0, mask)
        if t:
            assert set(np.unique(out.change[t]).tolist()) <= {0, 1, 2}
            # change maps hold detectable changes only: subsets of the voxelwise difference
            assert not np.any((out.change[t] == 1) & ~(mask & ~masks[t - 1]))
            assert not np.any((out.change[t] == 2) & ~(~mask & masks[t - 1]))
    ids = set(np.unique(np.concatenate([lab.ravel() for lab in out.labels])).tolist()) - {0}
    assert ids <= set(out.events["lesion_id"].astype(int).tolist())


@st.composite
def sessions(draw):
    shape = tuple(draw(st.lists(st.integers(6, 14), min_size=3, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    brain_kind = draw(st.sampled_from(["ball", "full", "empty", "random"]))
    grid = np.indices(shape).transpose(1, 2, 3, 0) - (np.array(shape) - 1) / 2
    brain = {"ball": (grid ** 2).sum(-1) <= (min(shape) / 2.2) ** 2, "full": np.ones(shape, bool),
             "empty": np.zeros(shape, bool), "random": rng.random(shape) < 0.5}[brain_kind]
    mods = draw(st.sets(st.sampled_from(["FLAIR", "T2w", "T1w", "ceT1w", "b1000", "ADC"]), min_size=1))
    content = draw(st.sampled_from(["noise", "blobs", "constant", "zeros"]))
    images = {}
    for mod in sorted(mods):
        base = 8e-4 if mod == "ADC" else 1.0
        if content == "zeros":
            arr = np.zeros(shape)
        elif content == "constant":
            arr = np.full(shape, base)
        else:
            arr = base * (1 + 0.1 * rng.normal(size=shape))
            if content == "blobs":
                arr[rng.random(shape) < 0.05] *= 2.5
        images[mod] = np.clip(arr, 0, None).astype(np.float32)
    wm = rng.random(shape).astype(np.float32)
    gm = ((1 - wm) * rng.random(shape)).astype(np.float32)
    priors = {"brain_mask": brain, "wm_prob": wm, "gm_prob": gm, "csf_prob": 1 - wm - gm,
              "location": rng.integers(0, 5, shape).astype(np.uint8), "skullstripped": True}
    external = (rng.random(shape) < 0.1) if draw(st.booleans()) else None
    spacing = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=3, max_size=3)))
    return images, priors, spacing, external


@_fuzz(N_CORE)
@given(case=sessions())
def test_segment_session_on_random_sessions(case):
    segment = pytest.importorskip("lesiontrack.segment")
    from lesiontrack.config import load_config
    from lesiontrack.preprocess import Priors

    images, priors, spacing, external = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out = segment.segment_session(images, Priors(**priors), spacing, load_config()["segment"],
                                          lesion_mask=external)
        except ValueError as exc:  # the module's own error, with a message
            assert str(exc)
            return
    shape = priors["brain_mask"].shape
    for name in ("lesion", "restricted", "blackhole", "enhancing"):
        m = getattr(out, name)
        assert m.shape == shape and m.dtype == bool
    for name in ("restricted", "blackhole", "enhancing"):
        assert not np.any(getattr(out, name) & ~out.lesion)
    if external is not None:
        np.testing.assert_array_equal(out.lesion, external)
    else:
        assert not np.any(out.lesion & ~priors["brain_mask"])
    assert "lesion" in out.available
    assert ("restricted" in out.available) == ("ADC" in images)
