"""The catalogue of bad input: every case gets a correct result or a clear error.

File-level cases exercise :func:`lesiontrack.image.load_image` and the atomic
writers; dataset-level cases (BIDS layout, sessions, pipeline runs) are in
``test_bad_input_pipeline.py``. docs/bad_input.md lists every case with the
test that backs it.
"""
import errno
import gzip
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lesiontrack import _io
from lesiontrack import image as image_mod
from lesiontrack import sitk_bridge as sb
from lesiontrack._io import OutputError, atomic_path, write_json, write_text, write_tsv
from lesiontrack.image import Image, ImageError, load_image, save_image

AFF = np.diag([-1.0, 1.0, 2.0, 1.0])


def _volume(shape=(8, 9, 10), seed=0):
    return np.random.default_rng(seed).normal(100, 15, shape).astype(np.float32)


def _write(path, data, affine=AFF, **hdr):
    img = nib.Nifti1Image(data, affine)
    for key, val in hdr.items():
        img.header[key] = val
    nib.save(img, str(path))
    return path


@pytest.fixture
def good(tmp_path):
    return _write(tmp_path / "sub-01_ses-01_FLAIR.nii.gz", _volume())


# --- unreadable files ------------------------------------------------------------------

def test_truncated_gzip(good):
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError, match=r"sub-01_ses-01_FLAIR\.nii\.gz.*(truncated|not a readable)"):
        load_image(good)


def test_truncated_uncompressed_nifti(tmp_path):
    path = _write(tmp_path / "scan.nii", _volume())
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageError, match=r"scan\.nii"):
        load_image(path)


def test_corrupt_gzip_stream(good):
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = os.urandom(64)
    good.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=r"sub-01_ses-01_FLAIR\.nii\.gz"):
        load_image(good)


@pytest.mark.parametrize("content", [b"not an image at all\n" * 30, b"\x89PNG\r\n\x1a\n" + bytes(400)])
def test_non_nifti_file_with_nifti_name(tmp_path, content):
    path = tmp_path / "sub-01_T2w.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"sub-01_T2w\.nii\.gz: not a readable NIfTI"):
        load_image(path)
    gz = tmp_path / "sub-02_T2w.nii.gz"  # valid gzip, garbage inside
    gz.write_bytes(gzip.compress(content))
    with pytest.raises(ImageError, match=r"sub-02_T2w\.nii\.gz"):
        load_image(gz)


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.nii.gz: file is empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="missing.nii.gz: file does not exist"):
        load_image(tmp_path / "missing.nii.gz")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    with pytest.raises(ImageError, match="folder.nii.gz: is a directory"):
        load_image(folder)


# --- dimensions --------------------------------------------------------------------------

def test_4d_where_3d_expected(tmp_path):
    path = _write(tmp_path / "flair4d.nii.gz", _volume((8, 9, 10, 3)))
    with pytest.raises(ImageError, match=r"flair4d\.nii\.gz: expected a 3D image, got 4D"):
        load_image(path)
    assert load_image(path, ndim=(3, 4)).shape == (8, 9, 10, 3)


def test_3d_where_4d_expected(tmp_path):
    path = _write(tmp_path / "dwi.nii.gz", _volume())
    with pytest.raises(ImageError, match=r"dwi\.nii\.gz: expected a 4D image, got 3D"):
        load_image(path, ndim=4)


def test_2d_image_and_single_slice(tmp_path):
    flat = _write(tmp_path / "flat.nii.gz", _volume((8, 9)))
    with pytest.raises(ImageError, match=r"flat\.nii\.gz: expected a 3D image, got 2D"):
        load_image(flat)
    one = _write(tmp_path / "slice.nii.gz", _volume((8, 9, 1)))
    with pytest.raises(ImageError, match=r"slice\.nii\.gz: .*single voxel along a spatial axis"):
        load_image(one)


# --- voxel values ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels(tmp_path, bad):
    data = _volume()
    data[1, 2, 3] = bad
    data[4, 4, 4] = bad
    path = _write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(ImageError, match=r"nan\.nii\.gz: 2 voxels are NaN or Inf"):
        load_image(path)


def test_all_zero_and_constant(tmp_path):
    zero = _write(tmp_path / "zero.nii.gz", np.zeros((5, 5, 5), np.float32))
    with pytest.raises(ImageError, match=r"zero\.nii\.gz: image is all zero"):
        load_image(zero)
    const = _write(tmp_path / "const.nii.gz", np.full((5, 5, 5), 7, np.int16))
    with pytest.raises(ImageError, match=r"const\.nii\.gz: image is constant \(7\)"):
        load_image(const)
    # an empty lesion mask is a legitimate all-zero label map
    assert load_image(zero, is_label=True).data.max() == 0
    assert load_image(const, allow_constant=True).data.max() == 7


def test_integer_data_with_scl_slope_and_inter(tmp_path):
    raw = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
    img = nib.Nifti1Image(raw, AFF)
    img.header.set_slope_inter(0.25, -10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    out = load_image(path)
    assert out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, raw * 0.25 - 10.0, rtol=0, atol=1e-4)
    # a label map stored with scaling keeps its integer values
    lab = nib.Nifti1Image((raw % 3).astype(np.int16), AFF)
    lab.header.set_slope_inter(2.0, 0.0)
    lpath = tmp_path / "labels.nii.gz"
    nib.save(lab, str(lpath))
    np.testing.assert_array_equal(load_image(lpath, is_label=True).data, (raw % 3) * 2)


@pytest.mark.parametrize("dtype", [np.uint8, np.float64, np.int32, np.uint16, np.int8])
def test_integer_and_double_data_read_as_float32(tmp_path, dtype):
    data = (np.arange(8 * 9 * 10).reshape(8, 9, 10) % 100).astype(dtype)
    path = _write(tmp_path / f"{np.dtype(dtype).name}.nii.gz", data)
    out = load_image(path)
    assert out.data.dtype == np.float32
    np.testing.assert_array_equal(out.data, data.astype(np.float32))


def test_huge_values(tmp_path):
    big = _volume() * 1e30
    path = _write(tmp_path / "huge.nii.gz", big)
    with pytest.raises(ImageError, match=r"huge\.nii\.gz: voxel magnitudes .* too large"):
        load_image(path)
    beyond = _volume().astype(np.float64) * 1e300
    path2 = _write(tmp_path / "beyond.nii.gz", beyond)
    with pytest.raises(ImageError, match=r"beyond\.nii\.gz: .*exceed the float32 range"):
        load_image(path2)
    scaled = nib.Nifti1Image(np.full((6, 6, 6), 30000, np.int16), AFF)
    scaled.header.set_slope_inter(1e36, 0.0)
    path3 = tmp_path / "slope.nii.gz"
    nib.save(scaled, str(path3))
    with pytest.raises(ImageError, match=r"slope\.nii\.gz: .*scl_slope"):
        load_image(path3, allow_constant=True)
    # large but usable values (e.g. a scanner's float export) are accepted unchanged
    fine = _write(tmp_path / "large.nii.gz", _volume() * 1e7)
    assert load_image(fine).data.max() > 1e8


def test_unsupported_data_type(tmp_path):
    data = (_volume() + 1j * _volume()).astype(np.complex64)
    path = _write(tmp_path / "complex.nii.gz", data)
    with pytest.raises(ImageError, match=r"complex\.nii\.gz: unsupported voxel data type"):
        load_image(path)
    rgb_type = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb = np.zeros((6, 6, 6), rgb_type)
    rgb["G"] = 200
    path = _write(tmp_path / "rgb.nii.gz", rgb)
    with pytest.raises(ImageError, match=r"rgb\.nii\.gz: unsupported voxel data type"):
        load_image(path)


def test_bad_label_maps(tmp_path):
    prob = _write(tmp_path / "prob.nii.gz", np.random.default_rng(0).random((5, 5, 5)).astype(np.float32))
    with pytest.raises(ImageError, match=r"prob\.nii\.gz: a label map must hold integer values"):
        load_image(prob, is_label=True)
    neg = _write(tmp_path / "neg.nii.gz", np.full((5, 5, 5), -1, np.int16))
    with pytest.raises(ImageError, match=r"neg\.nii\.gz: label values must be non-negative"):
        load_image(neg, is_label=True)
    near = _write(tmp_path / "near.nii.gz", (np.arange(125).reshape(5, 5, 5) % 2 + 1e-6).astype(np.float32))
    np.testing.assert_array_equal(load_image(near, is_label=True).data, np.arange(125).reshape(5, 5, 5) % 2)


# --- geometry ----------------------------------------------------------------------------

def test_qform_sform_disagreement_warns_and_follows_nibabel(tmp_path):
    img = nib.Nifti1Image(_volume(), None)
    img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_sform(AFF, code=1)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match=r"qs\.nii\.gz: qform and sform disagree; using the sform"):
        out = load_image(path)
    np.testing.assert_allclose(out.affine, nib.load(str(path)).affine)
    np.testing.assert_allclose(out.affine, AFF)


def test_qform_only_is_used_without_warning(tmp_path):
    img = nib.Nifti1Image(_volume(), None)
    img.set_qform(AFF, code=1)
    img.set_sform(np.eye(4), code=0)
    path = tmp_path / "q.nii.gz"
    nib.save(img, str(path))
    np.testing.assert_allclose(load_image(path).affine, AFF, atol=1e-5)


def test_no_qform_no_sform_warns(tmp_path):
    img = nib.Nifti1Image(_volume(), None)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "bare.nii.gz"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match=r"bare\.nii\.gz: neither qform nor sform"):
        load_image(path)


@pytest.mark.parametrize("affine", [np.zeros((4, 4)),
                                    np.array([[2, 2, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]])])
def test_zero_or_singular_affine(tmp_path, affine):
    img = nib.Nifti1Image(_volume(), None)
    img.set_sform(affine, code=2)
    img.set_qform(None, code=0)
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(ImageError, match=r"singular\.nii\.gz: affine is degenerate"):
        load_image(path)


def test_zero_voxel_size_in_qform(tmp_path):
    img = nib.Nifti1Image(_volume(), None)
    img.set_sform(None, code=0)
    img.set_qform(AFF, code=1)
    path = tmp_path / "pixdim0.nii"
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[84:88] = np.float32(0).tobytes()  # pixdim[2] = 0 (nibabel would silently read 1 mm)
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match=r"pixdim0\.nii: affine is degenerate \(a voxel size"):
        load_image(path)


@pytest.mark.parametrize("sform", [False, True])
def test_impossible_qform_quaternion(tmp_path, sform):
    img = nib.Nifti1Image(_volume(), None)
    img.set_qform(AFF, code=1)
    img.set_sform(AFF if sform else None, code=1 if sform else 0)
    path = tmp_path / "quat.nii"
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[256:268] = np.array([0.0, 1.0, 1.0], "<f4").tobytes()  # b^2 + c^2 + d^2 > 1
    path.write_bytes(bytes(raw))
    if sform:
        with pytest.warns(UserWarning, match=r"quat\.nii: the qform is invalid .*using the sform"):
            np.testing.assert_allclose(load_image(path).affine, AFF)
    else:
        with pytest.raises(ImageError, match=r"quat\.nii: the qform is invalid .*orientation cannot be read"):
            load_image(path)


def test_left_right_flipped_copy_is_the_same_world_image(tmp_path):
    data = _volume((10, 9, 8))
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    aff[:3, 3] = [-5, -4, -6]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1  # voxel i -> n-1-i
    a = load_image(_write(tmp_path / "ras.nii.gz", data, aff))
    b = load_image(_write(tmp_path / "las.nii.gz", data[::-1].copy(), aff @ flip))
    assert np.linalg.det(b.affine[:3, :3]) < 0 < np.linalg.det(a.affine[:3, :3])
    np.testing.assert_allclose(sb.resample(b, a).data, a.data, atol=1e-4)
    np.testing.assert_allclose(b.world_coords([[9, 0, 0]]), a.world_coords([[0, 0, 0]]))


def test_extreme_anisotropy_loads_and_resamples(tmp_path):
    aff = np.diag([0.5, 0.5, 6.0, 1.0])
    data = _volume((40, 40, 4))
    img = load_image(_write(tmp_path / "aniso.nii.gz", data, aff))
    assert img.spacing == pytest.approx((0.5, 0.5, 6.0))
    iso = Image(np.zeros((10, 10, 12), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    out = sb.resample(img, iso)
    assert out.shape == (10, 10, 12) and np.isfinite(out.data).all() and out.data.max() > 0


def test_different_fields_of_view_need_a_common_grid(tmp_path):
    a = load_image(_write(tmp_path / "ses-01.nii.gz", _volume((10, 10, 10))))
    shifted = AFF.copy()
    shifted[:3, 3] = [3.0, -2.0, 4.0]
    b = load_image(_write(tmp_path / "ses-02.nii.gz", _volume((12, 8, 9), seed=1), shifted))
    with pytest.raises(ImageError, match=r"ses-01\.nii\.gz.*ses-02\.nii\.gz"):
        a.check_same_grid(b, "sessions")
    on_a = sb.resample(b, a)
    assert on_a.same_grid(a)
    # outside b's field of view the resampled image is the background value, not garbage
    ijk = np.indices(a.shape).reshape(3, -1).T
    vox_b = np.linalg.solve(b.affine, np.c_[a.world_coords(ijk), np.ones(len(ijk))].T).T[:, :3]
    outside = np.any((vox_b < -0.5) | (vox_b > np.array(b.shape) - 0.5), axis=1)
    assert outside.any() and np.all(on_a.data.reshape(-1)[outside] == 0)


# --- outputs -------------------------------------------------------------------------------

def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out" / "table.tsv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a table")
            raise RuntimeError("boom")
    assert list((tmp_path / "out").iterdir()) == []
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.tsv"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "mask.nii.gz"
    old = Image(np.ones((3, 3, 3), np.uint8), AFF, is_label=True)
    save_image(old, target)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"\x1f\x8b partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_read_only_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "derivatives"
    out.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_io.tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match=r"cannot write into .*derivatives: Permission denied"):
        save_image(Image(_volume(), AFF), out / "x.nii.gz")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="file permissions do not bind the root user")
def test_read_only_output_dir_real_permissions(tmp_path):
    out = tmp_path / "derivatives"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="derivatives"):
            write_json(out / "dataset_description.json", {"Name": "x"})
    finally:
        out.chmod(0o755)


def test_full_disk_save_image(tmp_path, monkeypatch):
    target = tmp_path / "sub-01_label-lesion_mask.nii.gz"
    save_image(Image(np.zeros((3, 3, 3), np.uint8), AFF, is_label=True), target)
    before = target.read_bytes()

    def full(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"\x1f\x8b\x08" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_mod, "_write_nifti", full)
    with pytest.raises(OutputError, match=r"cannot write .*lesion_mask\.nii\.gz: No space left") as info:
        save_image(Image(np.ones((3, 3, 3), np.uint8), AFF, is_label=True), target)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_full_disk_tables_and_json(tmp_path, monkeypatch):
    real_write_text = type(tmp_path).write_text

    def full(self, *args, **kwargs):
        real_write_text(self, "partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(OutputError, match=r"stats\.tsv"):
        write_tsv(tmp_path / "stats.tsv", pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(OutputError, match=r"sidecar\.json"):
        write_json(tmp_path / "sidecar.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
