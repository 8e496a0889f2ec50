"""The image model: construction checks, geometry, cropping, saving and loading."""
import nibabel as nib
import numpy as np
import pytest

from lesiontrack.image import Image, ImageError, as_closest_ras, crop_image, load_image, save_image


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.5, 0.5, 6.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    return aff


def test_image_copies_affine_as_float64():
    aff = np.eye(4, dtype=np.float32)
    img = Image(np.zeros((3, 4, 5), np.float32), aff)
    assert img.affine.dtype == np.float64
    aff[0, 0] = 7
    assert img.affine[0, 0] == 1.0  # copied on construction


def test_spacing_and_voxel_volume_of_oblique_anisotropic_grid():
    img = Image(np.zeros((4, 4, 4), np.float32), _oblique_affine())
    np.testing.assert_allclose(img.spacing, (0.5, 0.5, 6.0))
    assert img.voxel_volume == pytest.approx(1.5)


@pytest.mark.parametrize("shape", [(4, 4), (2, 2, 2, 2, 2), (5,)])
def test_image_rejects_wrong_dimensions(shape):
    with pytest.raises(ImageError, match="3D or 4D"):
        Image(np.zeros(shape), np.eye(4), source="scan.nii.gz")


@pytest.mark.parametrize("affine,match", [
    (np.zeros((4, 4)), "degenerate"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "degenerate"),
    (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "degenerate"),
    (np.full((4, 4), np.nan), "NaN"),
    (np.eye(3), "4x4"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float), "last row"),
])
def test_image_rejects_bad_affines(affine, match):
    with pytest.raises(ImageError, match=match):
        Image(np.zeros((3, 3, 3)), affine, source="scan.nii.gz")


def test_tiny_voxels_are_not_degenerate():
    img = Image(np.zeros((3, 3, 3)), np.diag([1e-3, 1e-3, 1e-3, 1.0]))  # microscopy-sized voxels
    assert img.voxel_volume == pytest.approx(1e-9)


def test_with_data_and_grid_checks():
    img = Image(np.zeros((4, 5, 6), np.float32), _oblique_affine(), source="a.nii.gz")
    other = img.with_data(np.ones((4, 5, 6), bool), is_label=True)
    assert other.is_label and img.same_grid(other)
    with pytest.raises(ImageError, match="does not match"):
        img.with_data(np.zeros((4, 5, 7)))
    moved = Image(img.data, img.affine @ np.diag([1, 1, 1.01, 1]), source="b.nii.gz")
    assert not img.same_grid(moved)
    with pytest.raises(ImageError, match="a.nii.gz.*b.nii.gz"):
        img.check_same_grid(moved, "FLAIR and T2w")


def test_world_coords_follow_the_affine():
    img = Image(np.zeros((4, 5, 6), np.float32), _oblique_affine())
    ijk = np.array([[0, 0, 0], [1, 2, 3], [3, 4, 5]])
    expect = (img.affine @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(img.world_coords(ijk), expect)


def test_crop_keeps_every_voxel_on_its_world_point():
    rng = np.random.default_rng(0)
    img = Image(rng.random((10, 9, 8)).astype(np.float32), _oblique_affine())
    crop = crop_image(img, (slice(2, 7), slice(3, 9), slice(1, 5)))
    assert crop.shape == (5, 6, 4)
    ijk = np.array([[0, 0, 0], [4, 5, 3], [2, 1, 2]])
    np.testing.assert_allclose(crop.world_coords(ijk), img.world_coords(ijk + [2, 3, 1]))
    np.testing.assert_array_equal(crop.data[2, 1, 2], img.data[4, 4, 3])


@pytest.mark.parametrize("ornt", [[[0, -1], [1, 1], [2, 1]], [[0, -1], [1, -1], [2, 1]],
                                  [[1, -1], [2, 1], [0, -1]], [[2, 1], [0, 1], [1, -1]]])
@pytest.mark.parametrize("ndim", [3, 4])
def test_closest_ras_keeps_every_voxel_on_its_world_point(ornt, ndim):
    """LAS, LPS, PSL-like and permuted storage orders of an oblique image become the
    closest-RAS+ order: the same value at the same world point, the same array whatever the
    order it came in."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    shape = (7, 6, 5) + ((3,) if ndim == 4 else ())
    ras = Image(rng.random(shape).astype(np.float32), _oblique_affine())
    assert as_closest_ras(ras) is ras                       # already in that order
    stored = nib.Nifti1Image(ras.data, ras.affine).as_reoriented(np.array(ornt))
    img = Image(np.asarray(stored.dataobj), stored.affine)
    assert nib.aff2axcodes(img.affine) != nib.aff2axcodes(ras.affine)
    out = as_closest_ras(img)
    np.testing.assert_array_equal(out.data, ras.data)
    np.testing.assert_allclose(out.affine, ras.affine, atol=1e-12)
    assert out.data.flags.c_contiguous
    ijk = np.array([[0, 0, 0], [6, 5, 4], [3, 1, 2]])
    back = np.round(np.linalg.solve(img.affine, np.c_[out.world_coords(ijk), np.ones(3)].T).T[:, :3]).astype(int)
    for a, b in zip(ijk, back):
        np.testing.assert_array_equal(out.data[tuple(a)], img.data[tuple(b)])


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    img = Image(rng.normal(100, 20, (6, 7, 8)).astype(np.float32), _oblique_affine())
    path = save_image(img, tmp_path / "sub-01_FLAIR.nii.gz")
    back = load_image(path)
    assert back.data.dtype == np.float32 and back.source == str(path)
    np.testing.assert_array_equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    hdr = nib.load(str(path)).header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert hdr.get_xyzt_units()[0] == "mm"


def test_float_image_saved_as_scaled_int16(tmp_path):
    """Preprocessed images are stored as scaled int16: zero stays zero, the error is at
    most half a step of max|x| / 32767, and the file reads back as float32."""
    rng = np.random.default_rng(3)
    data = rng.normal(1.0, 0.5, (9, 8, 7)).astype(np.float32)
    data[:2] = 0.0
    path = save_image(Image(data, _oblique_affine()), tmp_path / "x.nii.gz", np.int16)
    nimg = nib.load(str(path))
    assert nimg.get_data_dtype() == np.int16 and nimg.dataobj.inter == 0.0
    back = load_image(path)
    assert back.data.dtype == np.float32
    step = np.abs(data).max() / 32767
    assert np.abs(back.data - data).max() <= 0.5 * step * 1.001
    assert np.all(back.data[:2] == 0.0)
    with pytest.raises(ImageError, match="non-finite"):
        save_image(Image(np.full((3, 3, 3), np.inf, np.float32), np.eye(4)), tmp_path / "y.nii.gz",
                   np.int16)


def test_label_maps_saved_as_integers(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    small = Image(np.array([0, 1, 5] * 9).reshape(3, 3, 3), aff, is_label=True)
    big = Image(np.array([0, 1, 300] * 9).reshape(3, 3, 3), aff, is_label=True)
    boolean = Image(np.arange(27).reshape(3, 3, 3) % 2 == 0, aff, is_label=True)
    for img, dtype in ((small, np.uint8), (big, np.int32), (boolean, np.uint8)):
        path = save_image(img, tmp_path / f"{dtype.__name__}_{img.data.dtype}.nii.gz")
        assert nib.load(str(path)).get_data_dtype() == dtype
        back = load_image(path, is_label=True, allow_constant=True)
        assert back.is_label and back.data.dtype == dtype
        np.testing.assert_array_equal(back.data, img.data.astype(dtype))


def test_save_is_reproducible_byte_for_byte(tmp_path):
    rng = np.random.default_rng(2)
    img = Image(rng.random((8, 8, 8)).astype(np.float32), _oblique_affine())
    a = save_image(img, tmp_path / "a" / "x.nii.gz").read_bytes()
    b = save_image(img, tmp_path / "b" / "x.nii.gz").read_bytes()
    assert a == b


def test_load_4d_for_dwi_and_drop_trailing_singletons(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(3)
    path4 = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((4, 5, 6, 7)).astype(np.float32), aff), str(path4))
    assert load_image(path4, ndim=4).shape == (4, 5, 6, 7)
    assert load_image(path4, ndim=(3, 4)).shape == (4, 5, 6, 7)
    path1 = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((4, 5, 6, 1)).astype(np.float32), aff), str(path1))
    assert load_image(path1).shape == (4, 5, 6)
