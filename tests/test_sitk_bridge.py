"""The SimpleITK bridge: LPS<->RAS geometry, resampling and transforms.

Every geometric claim is checked against an independent computation: SimpleITK
reading the saved NIfTI file, or scipy.ndimage.affine_transform with the voxel
map worked out by hand from the affines.
"""
import errno
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lesiontrack import sitk_bridge as sb
from lesiontrack._io import OutputError
from lesiontrack.image import Image, ImageError, load_image, save_image

F4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(axes, zooms, origin, rot=(0.0, 0.0, 0.0)):
    """RAS affine: ``axes`` a signed permutation (3x3), ``zooms`` mm, then a rotation."""
    aff = np.eye(4)
    aff[:3, :3] = _rotation(*rot) @ np.asarray(axes, float) @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


ORIENTATIONS = {
    "RAS": _affine(np.eye(3), (1.0, 1.2, 1.5), (-20.0, -30.0, -10.0)),
    "LAS": _affine(np.diag([-1, 1, 1]), (1.0, 1.0, 2.0), (20.0, -30.0, -10.0)),
    "LPS": _affine(np.diag([-1, -1, 1]), (0.9, 0.9, 3.0), (20.0, 30.0, -10.0)),
    "PIR-sagittal": _affine([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], (1.0, 1.0, 1.2), (-5.0, 40.0, 35.0)),
    "oblique": _affine(np.eye(3), (1.0, 1.0, 1.0), (-12.0, 7.0, 3.0), rot=(0.2, -0.15, 0.35)),
    "oblique-anisotropic": _affine(np.diag([-1, 1, 1]), (0.5, 0.5, 6.0), (30.0, -25.0, -8.0),
                                   rot=(-0.3, 0.1, 0.25)),
}


def _smooth(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * 100 + 50


def _voxels(shape, n=50, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, shape, size=(n, 3))


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_voxel_lands_on_same_world_point_in_nibabel_and_sitk(name, tmp_path):
    img = Image(_smooth((12, 10, 8)), ORIENTATIONS[name], source=name)
    path = save_image(img, tmp_path / f"{name}.nii.gz")
    simg = sitk.ReadImage(str(path))
    ijk = _voxels(img.shape)
    ras = img.world_coords(ijk)
    lps_sitk = np.array([simg.TransformIndexToPhysicalPoint(tuple(int(v) for v in p)) for p in ijk])
    np.testing.assert_allclose(sb.ras_to_lps_points(ras), lps_sitk, atol=1e-4)
    # and the voxel there holds the same value in both libraries
    arr = sitk.GetArrayFromImage(simg)  # [k, j, i]
    np.testing.assert_array_equal(arr[ijk[:, 2], ijk[:, 1], ijk[:, 0]],
                                  img.data[ijk[:, 0], ijk[:, 1], ijk[:, 2]])
    # the in-memory conversion agrees with the file SimpleITK read
    mem = sb.to_sitk(img)
    np.testing.assert_allclose(mem.GetOrigin(), simg.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mem.GetSpacing(), simg.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mem.GetDirection(), simg.GetDirection(), atol=1e-5)
    # and nibabel reads back the affine the image was written with
    np.testing.assert_allclose(nib.load(str(path)).affine, img.affine, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int32, np.int16])
def test_to_from_sitk_round_trip_is_exact(name, dtype):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 200, size=(7, 6, 5)).astype(dtype)
    img = Image(data, ORIENTATIONS[name], is_label=dtype != np.float32)
    back = sb.from_sitk(sb.to_sitk(img), is_label=img.is_label)
    assert back.data.dtype == data.dtype
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, img.affine, rtol=0, atol=1e-12)
    assert back.is_label == img.is_label


def test_to_sitk_rejects_4d_and_from_sitk_rejects_2d():
    with pytest.raises(ImageError, match="3D"):
        sb.to_sitk(Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)))
    with pytest.raises(ImageError, match="3D"):
        sb.from_sitk(sitk.Image(4, 4, sitk.sitkFloat32))


def _euler(angles, translation, center=(0.0, 0.0, 0.0)):
    t = sitk.Euler3DTransform()
    t.SetCenter(center)
    t.SetRotation(*angles)
    t.SetTranslation(translation)
    return t


def _voxel_map(moving, reference, transform):
    """Reference voxel -> moving voxel, worked out from the affines (independent of resample)."""
    t_lps = sb.linear_to_matrix(transform)
    return np.linalg.inv(moving.affine) @ F4 @ t_lps @ F4 @ reference.affine


def _interior(vox_map, ref_shape, mov_shape, margin=1.0):
    grid = np.indices(ref_shape).reshape(3, -1).T.astype(float)
    src = grid @ vox_map[:3, :3].T + vox_map[:3, 3]
    inside = np.all((src >= margin) & (src <= np.array(mov_shape) - 1 - margin), axis=1)
    return inside.reshape(ref_shape), src.reshape(ref_shape + (3,))


@pytest.mark.parametrize("mov_name,ref_name", [("RAS", "LPS"), ("oblique-anisotropic", "RAS"),
                                               ("LAS", "oblique"), ("PIR-sagittal", "LAS")])
def test_resample_matches_scipy_affine_transform(mov_name, ref_name):
    moving = Image(_smooth((24, 22, 20), seed=4), ORIENTATIONS[mov_name])
    ref_aff = ORIENTATIONS[ref_name].copy()
    reference = Image(np.zeros((18, 16, 14), np.float32), ref_aff)
    # a transform that carries the reference into the moving image's field of view
    centre_mov = sb.ras_to_lps_points(moving.world_coords([np.array(moving.shape) / 2 - 0.5]))[0]
    centre_ref = sb.ras_to_lps_points(reference.world_coords([np.array(reference.shape) / 2 - 0.5]))[0]
    t = _euler((0.08, -0.05, 0.12), tuple(centre_mov - centre_ref + [0.7, -1.3, 0.4]), tuple(centre_ref))
    out = sb.resample(moving, reference, t)
    assert out.same_grid(reference) and out.data.dtype == np.float32
    vox = _voxel_map(moving, reference, t)
    expect = ndimage.affine_transform(moving.data, vox[:3, :3], offset=vox[:3, 3],
                                      output_shape=reference.shape, order=1, mode="constant")
    inside, _ = _interior(vox, reference.shape, moving.shape)
    assert inside.sum() > 500  # compared on enough voxels
    np.testing.assert_allclose(out.data[inside], expect[inside], rtol=1e-4, atol=1e-3)


def test_resample_identity_and_4d_volume_by_volume():
    aff = ORIENTATIONS["oblique"]
    data = np.stack([_smooth((9, 8, 7), seed=s) for s in range(3)], axis=-1)
    img = Image(data, aff)
    same = sb.resample(img, Image(np.zeros((9, 8, 7), np.float32), aff))
    assert same.shape == data.shape
    np.testing.assert_allclose(same.data, data, atol=1e-4)


@pytest.mark.parametrize("interpolator", ["linear", "bspline"])
def test_resample_result_does_not_depend_on_its_thread_count(interpolator):
    """The pipeline resamples images side by side with one SimpleITK thread each; the
    result must be that of the default (all-thread) call, bit for bit."""
    rng = np.random.default_rng(3)
    img = Image(rng.random((40, 36, 30)).astype(np.float32), ORIENTATIONS["oblique"])
    ref = Image(np.zeros((45, 41, 33), np.float32), np.diag([0.9, 0.9, 0.9, 1.0]) @ ORIENTATIONS["oblique"])
    t = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.05, -0.03, 0.02, (0.4, -0.3, 0.2))
    one = sb.resample(img, ref, t, interpolator=interpolator, threads=1).data
    for n in (None, 2, 4):
        np.testing.assert_array_equal(sb.resample(img, ref, t, interpolator=interpolator, threads=n).data, one)


def test_label_maps_are_resampled_nearest_neighbour_only():
    rng = np.random.default_rng(5)
    labels = np.array([0, 3, 7, 200], np.uint8)
    blocks = rng.integers(0, 4, size=(6, 6, 5))
    data = labels[np.kron(blocks, np.ones((3, 3, 3), int))]  # 18x18x15 blocky label map
    moving = Image(data, ORIENTATIONS["oblique-anisotropic"], is_label=True)
    reference = Image(np.zeros((16, 15, 14), np.float32), ORIENTATIONS["LPS"])
    cm = sb.ras_to_lps_points(moving.world_coords([np.array(moving.shape) / 2]))[0]
    cr = sb.ras_to_lps_points(reference.world_coords([np.array(reference.shape) / 2]))[0]
    t = _euler((0.11, 0.07, -0.09), tuple(cm - cr + [0.37, 0.21, -0.43]), tuple(cr))
    out = sb.resample(moving, reference, t)
    assert out.is_label and out.data.dtype == np.uint8
    assert set(np.unique(out.data)) <= set(labels.tolist())
    vox = _voxel_map(moving, reference, t)
    expect = ndimage.affine_transform(data, vox[:3, :3], offset=vox[:3, 3],
                                      output_shape=reference.shape, order=0, mode="constant")
    inside, src = _interior(vox, reference.shape, moving.shape, margin=0.0)
    frac = np.abs(src - np.floor(src) - 0.5)
    clear = inside & np.all(frac > 1e-3, axis=-1)  # away from exact rounding ties
    assert clear.sum() > 0.3 * clear.size
    np.testing.assert_array_equal(out.data[clear], expect[clear])
    # a linear interpolator is refused for a label map
    for interp in (sitk.sitkLinear, sitk.sitkLabelGaussian):   # the latter erodes thin lesions
        with pytest.raises(ValueError, match="nearest-neighbour"):
            sb.resample(moving, reference, t, interpolator=interp)
    # is_label=True forces nearest-neighbour on an image not flagged as labels
    forced = sb.resample(Image(data.astype(np.float32), moving.affine), reference, t, is_label=True)
    assert set(np.unique(forced.data)) <= set(labels.astype(float).tolist())


def _ellipsoids(points, n=12, seed=4):
    """Whether each point (mm, N x 3) lies in one of ``n`` random ellipsoids (radii 1.5-5 mm)."""
    rng = np.random.default_rng(seed)
    inside = np.zeros(len(points), bool)
    for centre, radii in zip(rng.uniform(6, 42, (n, 3)) * [1, 1, 0.75], rng.uniform(1.5, 5, (n, 3))):
        inside |= (((points - centre) / radii) ** 2).sum(axis=1) <= 1
    return inside


def test_resample_labels_matches_the_partial_volume_of_thick_slices():
    """Lesions drawn on a 1 mm grid, written onto 1 x 1 x 3 mm slices (a native FLAIR grid).
    The truth on the slices is where the lesions fill at least half of a voxel, from the
    shapes themselves; nearest-neighbour sampling sees only the middle millimetre of each
    slice."""
    shape = (48, 48, 36)
    moving = Image(_ellipsoids(np.indices(shape).reshape(3, -1).T.astype(float)).reshape(shape)
                   .astype(np.uint8), np.eye(4), is_label=True)
    thick = np.diag([1.0, 1.0, 3.0, 1.0])
    thick[:3, 3] = [0.3, -0.2, 1.4]
    reference = Image(np.zeros((48, 48, 12), np.float32), thick)
    sub = (np.stack(np.meshgrid(*[(np.arange(k) + 0.5) / k - 0.5 for k in (4, 4, 12)], indexing="ij"),
                    -1).reshape(-1, 3) * [1, 1, 3])                          # 192 points per voxel
    centres = reference.world_coords(np.indices(reference.shape).reshape(3, -1).T)
    frac = np.mean([_ellipsoids(centres + d) for d in sub], axis=0).reshape(reference.shape)
    truth = frac >= 0.5
    near = sb.resample(moving, reference).data > 0
    pv = sb.resample_labels(moving, reference)
    assert pv.is_label and pv.data.dtype == np.uint8 and pv.shape == reference.shape
    d_near = 2 * (near & truth).sum() / (near.sum() + truth.sum())
    d_pv = 2 * (pv.data.astype(bool) & truth).sum() / (pv.data.astype(bool).sum() + truth.sum())
    print(f"Dice against the partial-volume truth: nearest {d_near:.3f}, resample_labels {d_pv:.3f}")
    assert d_pv >= d_near + 0.02
    vol = float(moving.data.sum())
    assert abs(pv.data.astype(bool).sum() * 3.0 - vol) <= 0.05 * vol   # volume kept



def test_resample_labels_keeps_thin_oblique_lesions_whole():
    """Two thin tubes, 5 mm apart, that cross 3 mm slices steeply: a cut-off on the covered
    fraction (and nearest-neighbour sampling) breaks each into islands, one per slice;
    each must come out as one piece, and the two must not be joined."""
    g = np.indices((48, 48, 48)).astype(float)
    tubes = [np.hypot(g[0] - g[2], g[1] - (y0 + 0.3 * g[2])) <= 0.9 for y0 in (10, 15)]
    data = np.zeros((48, 48, 48), np.uint8)
    for k, tube in enumerate(tubes, 1):
        data[tube] = k
    data[:, :, :4] = 0
    data[:, :, 40:] = 0
    moving = Image(data, np.eye(4), is_label=True)
    thick = np.diag([1.0, 1.0, 3.0, 1.0])
    thick[:3, 3] = [0.3, -0.2, 1.4]
    reference = Image(np.zeros((48, 48, 16), np.float32), thick)
    full = np.ones((3, 3, 3), bool)
    near = sb.resample(moving, reference).data
    out = sb.resample_labels(moving, reference).data
    pieces, n = ndimage.label(out > 0, full)
    print(f"pieces: nearest {ndimage.label(near > 0, full)[1]}, resample_labels {n}")
    assert ndimage.label(near > 0, full)[1] > 2 * 2          # the islands are there to join
    assert n == 2
    for k in (1, 2):                                           # one piece per tube, its label
        assert len(np.unique(pieces[out == k])) == 1

def test_resample_labels_keeps_each_label_and_its_volume():
    data = np.zeros((30, 30, 30), np.uint8)
    data[5:15, 8:20, 6:24] = 1
    data[15:24, 8:20, 6:24] = 2                      # touching the first
    moving = Image(data, np.eye(4), is_label=True)
    coarse = np.diag([1.5, 1.5, 3.0, 1.0])
    coarse[:3, 3] = [0.2, 0.4, 0.9]
    reference = Image(np.zeros((20, 20, 10), np.float32), coarse)
    out = sb.resample_labels(moving, reference).data
    assert set(np.unique(out)) == {0, 1, 2}
    for v in (1, 2):
        src = (data == v).sum()
        assert abs((out == v).sum() * 6.75 - src) <= 0.1 * src
    # onto a grid as fine as the source, it is nearest-neighbour sampling
    t = _euler((0.1, -0.05, 0.08), (0.3, -0.4, 0.2), (15.0, 15.0, 15.0))
    same = Image(np.zeros((30, 30, 30), np.float32), np.eye(4))
    np.testing.assert_array_equal(sb.resample_labels(moving, same, t).data,
                                  sb.resample(moving, same, t).data)
    # no label: an empty map on the reference grid; 4D: an error
    empty = sb.resample_labels(moving.with_data(np.zeros_like(data)), reference)
    assert empty.shape == reference.shape and not empty.data.any()
    with pytest.raises(ValueError, match="3D"):
        sb.resample_labels(Image(np.zeros((4, 4, 4, 2), np.uint8), np.eye(4), is_label=True), reference)


def _random_affine_transform(seed):
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = _rotation(*rng.uniform(-0.5, 0.5, 3)) @ np.diag(rng.uniform(0.8, 1.2, 3))
    m[:3, 3] = rng.uniform(-20, 20, 3)
    return sb.matrix_to_transform(m)


def _points(n=20, seed=9):
    return np.random.default_rng(seed).uniform(-100, 100, size=(n, 3))


def _apply(t, pts):
    return np.array([t.TransformPoint(tuple(p)) for p in pts])


@pytest.mark.parametrize("kind", ["euler", "affine", "composite", "similarity"])
def test_write_read_transform_round_trip(kind, tmp_path):
    if kind == "euler":
        t = _euler((0.1, -0.2, 0.3), (4.0, -5.0, 6.0), (10.0, 20.0, -5.0))
    elif kind == "affine":
        t = _random_affine_transform(0)
    elif kind == "similarity":
        t = sitk.Similarity3DTransform()
        t.SetScale(1.1)
        t.SetTranslation((1.0, 2.0, 3.0))
        t.SetCenter((5.0, 5.0, 5.0))
    else:
        t = sitk.CompositeTransform([_euler((0.1, 0, 0), (1.0, 0, 0)), _random_affine_transform(1)])
    path = sb.write_transform(t, tmp_path / "sub-01_from-T2w_to-individual_mode-image_xfm.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left over
    back = sb.read_transform(path)
    np.testing.assert_allclose(_apply(back, _points()), _apply(t, _points()), atol=1e-6)
    # SimpleITK itself reads the file as the same map
    np.testing.assert_allclose(_apply(sitk.ReadTransform(str(path)), _points()), _apply(t, _points()),
                               atol=1e-6)


def test_read_transform_bad_files(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        sb.read_transform(tmp_path / "missing.txt")
    bad = tmp_path / "bad_xfm.txt"
    bad.write_text("this is not an ITK transform\n")
    with pytest.raises(ImageError, match="bad_xfm.txt"):
        sb.read_transform(bad)


def test_write_transform_full_disk_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "xfm.txt"

    def full(transform, path):
        with open(path, "w") as fh:
            fh.write("#Insight Transform File V1.0\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sb.sitk, "WriteTransform", full)
    with pytest.raises(OutputError, match="xfm.txt") as info:
        sb.write_transform(_euler((0, 0, 0), (1.0, 0, 0)), target)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_compose_applies_first_argument_first():
    t1, t2, t3 = _random_affine_transform(2), _euler((0.2, 0.1, -0.3), (3.0, 1.0, 2.0)), \
        _random_affine_transform(3)
    pts = _points()
    comp = sb.compose(t1, t2, t3)
    assert isinstance(comp, sitk.AffineTransform)  # linear transforms flattened
    np.testing.assert_allclose(_apply(comp, pts), _apply(t3, _apply(t2, _apply(t1, pts))), atol=1e-8)
    np.testing.assert_allclose(sb.transform_points(comp, pts), _apply(comp, pts), atol=1e-8)


def test_compose_with_a_nonlinear_transform_keeps_order():
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((40.0, 40.0, 40.0))
    field.SetOrigin((-140.0, -140.0, -140.0))
    arr = np.zeros((8, 8, 8, 3))
    arr[..., 0] = np.linspace(0, 5, 8)[:, None, None]  # displacement in x grows with z
    disp = sitk.GetImageFromArray(arr, isVector=True)
    disp.CopyInformation(field)
    nonlin = sitk.DisplacementFieldTransform(disp)
    aff = _random_affine_transform(4)
    pts = _points(seed=11) * 0.8
    comp = sb.compose(aff, nonlin)
    np.testing.assert_allclose(_apply(comp, pts), _apply(nonlin, _apply(aff, pts)), atol=1e-6)
    np.testing.assert_allclose(sb.transform_points(comp, pts), _apply(comp, pts), atol=1e-6)
    comp2 = sb.compose(nonlin, aff)
    np.testing.assert_allclose(_apply(comp2, pts), _apply(aff, _apply(nonlin, pts)), atol=1e-6)


def test_inverse_undoes_the_transform():
    for t in (_random_affine_transform(5), _euler((0.3, -0.1, 0.2), (5.0, 6.0, 7.0), (1.0, 2.0, 3.0))):
        pts = _points()
        np.testing.assert_allclose(_apply(sb.inverse(t), _apply(t, pts)), pts, atol=1e-8)
        np.testing.assert_allclose(sb.linear_to_matrix(sb.compose(t, sb.inverse(t))), np.eye(4),
                                   atol=1e-10)


def test_ras_matrix_is_the_same_map_in_ras():
    t = _random_affine_transform(6)
    m_ras = sb.ras_matrix(t)
    pts_ras = _points()
    via_lps = sb.lps_to_ras_points(_apply(t, sb.ras_to_lps_points(pts_ras)))
    np.testing.assert_allclose(pts_ras @ m_ras[:3, :3].T + m_ras[:3, 3], via_lps, atol=1e-8)
    np.testing.assert_allclose(sb.linear_to_matrix(sb.from_ras_matrix(m_ras)),
                               sb.linear_to_matrix(t), atol=1e-10)


def test_resample_a_saved_image_with_sitk_agrees_with_bridge(tmp_path):
    """The contract: sitk.Resample(sitk.ReadImage(file), ref, T) == bridge resample of the loaded image."""
    moving = Image(_smooth((20, 18, 16), seed=8), ORIENTATIONS["oblique-anisotropic"])
    path = save_image(moving, tmp_path / "mov.nii.gz")
    loaded = load_image(path)
    reference = Image(np.zeros((14, 12, 10), np.float32), ORIENTATIONS["RAS"])
    cm = sb.ras_to_lps_points(moving.world_coords([np.array(moving.shape) / 2]))[0]
    cr = sb.ras_to_lps_points(reference.world_coords([np.array(reference.shape) / 2]))[0]
    t = _euler((0.05, 0.1, -0.07), tuple(cm - cr), tuple(cr))
    ours = sb.resample(loaded, reference, t)
    theirs = sitk.Resample(sitk.ReadImage(str(path)), sb.to_sitk(reference), t, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(ours.data, sitk.GetArrayFromImage(theirs).transpose(2, 1, 0), atol=1e-3)


def test_file_world_correction_for_qform_sform_disagreement(tmp_path):
    data = _smooth((12, 11, 10), seed=12)
    qform = ORIENTATIONS["RAS"]
    sform = ORIENTATIONS["LAS"]
    nimg = nib.Nifti1Image(data, None)
    nimg.set_qform(qform, code=1)
    nimg.set_sform(sform, code=1)
    path = tmp_path / "disagree.nii.gz"
    nib.save(nimg, str(path))
    with pytest.warns(UserWarning, match="qform and sform disagree"):
        img = load_image(path)
    np.testing.assert_allclose(img.affine, sform, atol=1e-4)  # nibabel's choice
    corr = sb.file_world_correction(img)
    assert corr is not None
    reference = Image(np.zeros((12, 11, 10), np.float32), sform)
    t = _euler((0.03, 0.0, 0.02), (0.5, -0.4, 0.3))
    ours = sb.resample(img, reference, t)
    theirs = sitk.Resample(sitk.ReadImage(str(path)), sb.to_sitk(reference), sb.compose(t, corr),
                           sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(ours.data, sitk.GetArrayFromImage(theirs).transpose(2, 1, 0), atol=1e-3)
    # a file both libraries read alike needs no correction
    agree = load_image(save_image(img, tmp_path / "agree.nii.gz"))
    assert sb.file_world_correction(agree) is None
    assert sb.file_world_correction(Image(data, sform)) is None  # not from a file


def test_file_world_correction_of_a_4d_series(tmp_path):
    data = np.stack([_smooth((10, 9, 8), seed=s) for s in range(3)], axis=-1)
    nimg = nib.Nifti1Image(data, None)
    nimg.set_qform(ORIENTATIONS["RAS"], code=1)
    nimg.set_sform(ORIENTATIONS["oblique"], code=1)
    path = tmp_path / "dwi.nii.gz"
    nib.save(nimg, str(path))
    with pytest.warns(UserWarning, match="disagree"):
        img = load_image(path, ndim=4)
    corr = sb.file_world_correction(img)
    # the correction carries nibabel's world point of a voxel onto SimpleITK's
    ijk = np.array([[0, 0, 0], [9, 8, 7], [3, 4, 5]])
    itk = np.array([sitk.ReadImage(str(path))[:, :, :, 0].TransformIndexToPhysicalPoint(tuple(int(v) for v in p))
                    for p in ijk])
    np.testing.assert_allclose(sb.transform_points(corr, sb.ras_to_lps_points(img.world_coords(ijk))), itk,
                               atol=1e-3)


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.mark.slow
def test_real_scans_load_and_agree_with_sitk():
    """Every real scan (LPS uint16 2D FLAIR at 0.72x0.72x3 mm, LAS 1 mm MNI) loads cleanly
    and its corner voxels land on the same world points in both libraries."""
    files = sorted(REAL.glob("*/**/*.nii.gz"))
    if not files:
        pytest.skip(f"real data not found at {REAL}")
    for path in files:
        is_label = path.name.startswith(("gold", "gt", "brainmask"))
        img = load_image(path, is_label=is_label, allow_constant=True)
        assert sb.file_world_correction(img) is None, path
        simg = sitk.ReadImage(str(path))
        corners = np.array([[0, 0, 0], np.array(img.shape) - 1, [img.shape[0] - 1, 0, img.shape[2] - 1]])
        itk = np.array([simg.TransformIndexToPhysicalPoint(tuple(int(v) for v in c)) for c in corners])
        np.testing.assert_allclose(sb.ras_to_lps_points(img.world_coords(corners)), itk, atol=1e-3,
                                   err_msg=str(path))


def test_cubic_interpolation_keeps_the_noise_a_grid_shift_would_average_away():
    """Resampled half a voxel off the input's lattice, linear interpolation averages 8
    samples and keeps an eighth of white noise's variance (a quarter a quarter-voxel
    off, all of it on the lattice): what a threshold sees then depends on the grid's
    sub-voxel placement. The cubic B-spline ("bspline") keeps 0.4-0.65 of it."""
    rng = np.random.default_rng(0)
    img = Image(rng.normal(100, 10, (40, 40, 40)).astype(np.float32), np.eye(4))
    ratios = {}
    for interp in ("linear", "bspline"):
        for off in (0.0, 0.25, 0.5):
            aff = np.eye(4)
            aff[:3, 3] = off
            out = sb.resample(img, Image(np.zeros((30, 30, 30), np.float32), aff),
                                       interpolator=interp).data[3:-3, 3:-3, 3:-3]
            ratios[interp, off] = out.var() / img.data.var()
    assert ratios["linear", 0.0] > 0.95 and ratios["bspline", 0.0] > 0.95
    assert ratios["linear", 0.5] < 0.14 and ratios["linear", 0.25] < 0.26
    assert ratios["bspline", 0.5] > 0.4 and ratios["bspline", 0.25] > 0.6
    with pytest.raises(ValueError, match="unknown interpolator"):
        sb.resample(img, img, interpolator="sinc")
