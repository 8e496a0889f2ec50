"""The only place that converts between :class:`~lesiontrack.image.Image` (RAS) and SimpleITK (LPS).

Conventions
-----------
* An ``Image`` has a RAS+ voxel-to-world affine; SimpleITK images live in LPS
  physical space. ``LPS = F @ RAS`` with ``F = diag(-1, -1, 1)``.
* Array axes: ``Image.data[i, j, k]`` is SimpleITK index ``(i, j, k)``;
  ``sitk.GetArrayFromImage`` returns ``[k, j, i]``, transposed here.
* A transform is always in ITK's *resampling* direction: it maps points of the
  fixed / reference space to points of the moving image, in LPS mm. This is the
  direction of the ``*_from-<MOD>_to-individual_mode-image_xfm.txt`` files.
* Label maps (``Image.is_label``) are resampled nearest-neighbour by :func:`resample`;
  :func:`resample_labels` resamples by partial volume, keeping the volume (for label
  maps written onto coarser grids, e.g. thick-slice native images).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._io import atomic_path
from .image import Image, ImageError

__all__ = [
    "to_sitk", "from_sitk", "resample", "resample_labels", "resample_array", "read_transform", "write_transform",
    "compose", "linear_to_matrix", "matrix_to_transform", "flatten", "transform_points",
    "ras_to_lps_points", "lps_to_ras_points", "identity", "inverse", "ras_matrix",
    "from_ras_matrix", "file_world_correction",
]

_F = np.diag([-1.0, -1.0, 1.0])
_F4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps_points(pts):
    pts = np.asarray(pts, dtype=np.float64)
    return pts * np.array([-1.0, -1.0, 1.0])


lps_to_ras_points = ras_to_lps_points


def _geometry(affine):
    lps = _F4 @ affine
    lin = lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    return spacing, direction, lps[:3, 3]


def to_sitk(img: Image, dtype=None) -> sitk.Image:
    """Convert a 3D :class:`Image` to a SimpleITK image with the same world geometry."""
    if img.data.ndim != 3:
        raise ImageError(f"{img.source}: to_sitk needs a 3D image, got shape {img.shape}")
    data = img.data if dtype is None else img.data.astype(dtype, copy=False)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype == np.float64 and dtype is None:
        data = data.astype(np.float32)
    simg = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    spacing, direction, origin = _geometry(img.affine)
    simg.SetSpacing(tuple(float(s) for s in spacing))
    simg.SetDirection(tuple(float(d) for d in direction.ravel()))
    simg.SetOrigin(tuple(float(o) for o in origin))
    return simg


def from_sitk(simg: sitk.Image, *, is_label: bool = False, source: str = "<sitk>") -> Image:
    """Convert a 3D SimpleITK image back to an :class:`Image` (RAS affine)."""
    if simg.GetDimension() != 3:
        raise ImageError(f"{source}: from_sitk needs a 3D image, got {simg.GetDimension()}D")
    data = sitk.GetArrayFromImage(simg).transpose(2, 1, 0)
    spacing = np.array(simg.GetSpacing())
    direction = np.array(simg.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = simg.GetOrigin()
    return Image(np.ascontiguousarray(data), _F4 @ lps, is_label, source)


def identity() -> sitk.Transform:
    return sitk.AffineTransform(3)


def linear_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 LPS matrix of a linear (rigid, affine or composite-of-linear) transform.

    Computed by mapping points, so it works for any linear transform type.
    """
    base = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=np.float64)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in base])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    return m


def matrix_to_transform(m_lps: np.ndarray) -> sitk.AffineTransform:
    """A SimpleITK AffineTransform from a 4x4 LPS point-mapping matrix."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in np.asarray(m_lps)[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in np.asarray(m_lps)[:3, 3]))
    return t


def ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """The transform's point map expressed in RAS coordinates (4x4)."""
    return _F4 @ linear_to_matrix(transform) @ _F4


def from_ras_matrix(m_ras: np.ndarray) -> sitk.AffineTransform:
    """A transform (LPS, resampling direction) from a RAS point-mapping matrix."""
    return matrix_to_transform(_F4 @ np.asarray(m_ras, dtype=np.float64) @ _F4)


def _is_linear(t: sitk.Transform) -> bool:
    try:
        m = linear_to_matrix(t)
    except Exception:
        return False
    rng = np.random.default_rng(0)
    pts = rng.uniform(-200, 200, size=(5, 3))
    expect = pts @ m[:3, :3].T + m[:3, 3]
    got = np.array([t.TransformPoint(tuple(p)) for p in pts])
    return np.allclose(expect, got, atol=1e-6)


def compose(*transforms: sitk.Transform) -> sitk.Transform:
    """Point map ``p -> tN(...t2(t1(p)))``: the first argument is applied first.

    Linear transforms are flattened into a single AffineTransform (exactly).
    """
    if all(_is_linear(t) for t in transforms):
        m = np.eye(4)
        for t in transforms:
            m = linear_to_matrix(t) @ m
        return matrix_to_transform(m)
    comp = sitk.CompositeTransform(3)
    for t in reversed(transforms):  # ITK applies the last added first
        comp.AddTransform(t)
    return comp


def flatten(transform: sitk.Transform) -> sitk.Transform:
    return compose(transform)


def transform_points(transform: sitk.Transform, pts_lps) -> np.ndarray:
    """Map (N, 3) LPS points; vectorised for linear transforms."""
    pts = np.asarray(pts_lps, dtype=np.float64)
    if _is_linear(transform):
        m = linear_to_matrix(transform)
        return pts @ m[:3, :3].T + m[:3, 3]
    return np.array([transform.TransformPoint(tuple(p)) for p in pts])


def inverse(transform: sitk.Transform) -> sitk.Transform:
    if _is_linear(transform):
        return matrix_to_transform(np.linalg.inv(linear_to_matrix(transform)))
    return transform.GetInverse()


#: Interpolators by name (``resample(..., interpolator="bspline")``; "bspline" is cubic).
INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}


def resample(moving: Image, reference: Image, transform: sitk.Transform | None = None, *,
             is_label: bool | None = None, default: float = 0.0,
             interpolator: int | None = None, threads: int | None = None) -> Image:
    """Resample ``moving`` onto ``reference``'s grid through ``transform``.

    ``transform`` maps reference points to moving points (LPS, ITK resampling
    direction); ``None`` means identity (the two share world coordinates). Label
    maps are resampled nearest-neighbour; other images linearly (or with
    ``interpolator``: a SimpleITK interpolator or a name in :data:`INTERPOLATORS`).
    4D images are resampled volume by volume. ``threads``: SimpleITK threads of this call
    (default: the global setting); the result does not depend on it.
    """
    label = moving.is_label if is_label is None else is_label
    if isinstance(interpolator, str):
        if interpolator not in INTERPOLATORS:
            raise ValueError(f"unknown interpolator {interpolator!r}; one of {sorted(INTERPOLATORS)}")
        interpolator = INTERPOLATORS[interpolator]
    if label:
        interp = sitk.sitkNearestNeighbor
        if interpolator not in (None, sitk.sitkNearestNeighbor):
            raise ValueError("label maps are resampled nearest-neighbour only")
    else:
        interp = sitk.sitkLinear if interpolator is None else interpolator
    t = identity() if transform is None else transform
    ref = to_sitk(reference.with_data(np.zeros(reference.shape[:3], np.uint8)))

    def one(vol):
        src = to_sitk(moving.with_data(vol))
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(ref)
        f.SetTransform(t)
        f.SetInterpolator(interp)
        f.SetDefaultPixelValue(float(default))
        f.SetOutputPixelType(src.GetPixelID())
        if threads is not None:
            f.SetNumberOfThreads(int(threads))
        return sitk.GetArrayFromImage(f.Execute(src)).transpose(2, 1, 0)

    if moving.data.ndim == 4:
        data = np.stack([one(moving.data[..., v]) for v in range(moving.shape[3])], axis=-1)
    else:
        data = one(moving.data)
    return Image(np.ascontiguousarray(data), reference.affine, label, moving.source)


def _voxel_extent_in_moving(moving: Image, reference: Image, t: sitk.Transform) -> np.ndarray:
    """Effective extent (mm) of one reference voxel along each array axis of ``moving``."""
    sp_ref, dir_ref, _ = _geometry(reference.affine)
    _, dir_mov, _ = _geometry(moving.affine)
    centre = (_F4 @ reference.affine @ np.r_[np.array(reference.shape[:3]) / 2.0, 1.0])[:3]
    p0 = np.array(t.TransformPoint(tuple(float(v) for v in centre)))
    step = dir_ref * sp_ref                              # reference voxel edges (LPS columns)
    edges = np.stack([np.array(t.TransformPoint(tuple(float(v) for v in centre + step[:, j]))) - p0
                      for j in range(3)], axis=1)        # ... mapped into the moving image
    # root of the summed squared projections: a voxel box's variance along an axis is
    # sum(edge_component ** 2) / 12, unchanged by rotating a cube
    return np.sqrt(((dir_mov.T @ edges) ** 2).sum(axis=1))


def resample_labels(moving: Image, reference: Image, transform: sitk.Transform | None = None) -> Image:
    """Resample a label map onto a coarser grid by partial volume, keeping its volume.

    Nearest-neighbour sampling of a fine label map onto a coarser grid (a 1 mm mask
    onto 3 mm slices) keeps whatever lies at each voxel centre: thin or oblique
    structures break into pieces and edges jitter by the slice thickness. Here the
    foreground's indicator is averaged over each reference voxel's footprint (a Gaussian
    with the variance of the footprint's box, in the moving grid, then linear
    interpolation); the voxels it covers most become foreground, as many as its volume
    inside the reference grid fills (the sum of those partial volumes), so the volume is
    kept (a plain one-half threshold shrinks thin structures); each foreground voxel
    keeps the label nearest to it. Onto a grid no coarser than the
    moving one along every axis this is :func:`resample`'s nearest-neighbour sampling.
    ``transform`` is as in :func:`resample`.

    Each connected component of the moving map stays one piece (as far as it fills one
    reference voxel): a cut-off on the covered fraction alone breaks a thin or oblique
    lesion into islands (it is covered less where it crosses from one thick slice to the
    next), and each island would count as a lesion. Each component owns the covered
    reference voxels nearest to it (:func:`_owners`). Among its most-covered
    voxels, islands that do not fill one voxel (fractions summing to less than one) are
    dropped, larger ones are joined to its largest piece by the most-covered path, and
    the component is grown back to its share by its most-covered neighbouring voxels.
    The volume is kept but for the joining paths (a few voxels per joined island).
    """
    from scipy import ndimage as ndi

    t = identity() if transform is None else transform
    data = np.asarray(moving.data)
    if data.ndim != 3:
        raise ValueError(f"resample_labels: a 3D label map is needed, got shape {data.shape}")
    fg = data > 0
    out = np.zeros(reference.shape[:3], data.dtype)
    if not fg.any():
        return Image(out, reference.affine, True, moving.source)
    spacing = np.array(_geometry(moving.affine)[0])
    ext = _voxel_extent_in_moving(moving, reference, t)
    sigma = np.sqrt(np.maximum(ext ** 2 - spacing ** 2, 0.0) / 12.0) / spacing   # voxels
    if sigma.max() <= 0.05:          # not coarser along any axis: nothing to average
        return resample(moving, reference, t, is_label=True)
    # work inside the labels' bounding box (with room for the smoothing)
    pad = np.ceil(4 * sigma).astype(int) + 2
    idx = np.argwhere(fg)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, fg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    frac = ndi.gaussian_filter(fg[box].astype(np.float32), sigma, mode="constant", truncate=3.0)
    shift = np.eye(4)
    shift[:3, 3] = lo
    # and, for a linear transform, inside the part of the reference grid that box covers
    window = (slice(None),) * 3
    target = reference
    if _is_linear(t):
        corners = np.array(np.meshgrid(*[(a - 0.5, b - 0.5) for a, b in zip(lo, hi)], indexing="ij")).reshape(3, -1).T
        ijk = _reference_ijk(reference, moving.world_coords(corners), t)
        rlo = np.maximum(np.floor(ijk.min(0)).astype(int) - 1, 0)
        rhi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 2, reference.shape[:3])
        if np.any(rhi <= rlo):
            return Image(out, reference.affine, True, moving.source)
        window = tuple(slice(a, b) for a, b in zip(rlo, rhi))
        rshift = np.eye(4)
        rshift[:3, 3] = rlo
        target = Image(np.zeros(tuple(rhi - rlo), np.uint8), reference.affine @ rshift)
    frac = resample(Image(frac, moving.affine @ shift, False, moving.source), target, t, is_label=False).data
    # keep the most-covered voxels up to the foreground's volume inside the reference
    # grid (the sum of the partial volumes), so the volume is kept as well
    n = int(round(float(frac.sum(dtype=np.float64))))
    if n < 1:
        return Image(out, reference.affine, True, moving.source)
    comps, _ = ndi.label(fg[box], np.ones((3, 3, 3), bool))
    owner = _owners(comps, Image(comps, moving.affine @ shift, True, moving.source), target, t, frac)
    keep = _keep_whole(frac, owner, n)
    values = np.unique(data[fg])
    part = np.zeros(target.shape[:3], data.dtype)
    if values.size == 1:
        part[keep] = values[0]
    else:
        near = resample(Image(data[box], moving.affine @ shift, True, moving.source), target, t,
                        is_label=True).data
        if (near > 0).any():          # fill the foreground's rim from the nearest label
            pts = np.argwhere(keep | (near > 0))
            sub = tuple(slice(a, b + 1) for a, b in zip(pts.min(0), pts.max(0)))
            n = near[sub]
            _, ind = ndi.distance_transform_edt(n == 0, return_indices=True)
            near[sub] = n[tuple(ind)]
        part[keep] = near[keep]
    out[window] = part
    return Image(out, reference.affine, True, moving.source)


def _reference_ijk(reference: Image, ras: np.ndarray, t: sitk.Transform) -> np.ndarray:
    """Voxel coordinates in ``reference`` of moving points ``ras`` (RAS mm), through the
    inverse of the linear transform ``t`` (reference -> moving points, LPS)."""
    flip = np.array([-1.0, -1.0, 1.0])                         # RAS <-> LPS (ITK)
    ref_ras = transform_points(inverse(t), ras * flip) * flip
    return (ref_ras - reference.affine[:3, 3]) @ np.linalg.inv(reference.affine[:3, :3]).T


def _owners(comps: np.ndarray, moving: Image, reference: Image, t: sitk.Transform,
            frac: np.ndarray) -> np.ndarray:
    """The moving component nearest to each covered reference voxel (``frac`` > 0).

    Nearest-neighbour samples of the component labels, plus, for a linear ``t``, the
    reference voxel holding each moving voxel's centre (so a component thinner than a
    reference voxel is not missed), filled into the other covered voxels from the
    nearest labelled one; for other transforms, the moving grid's Voronoi cells.
    """
    from scipy import ndimage as ndi

    if not _is_linear(t):
        _, ind = ndi.distance_transform_edt(comps == 0, sampling=_geometry(moving.affine)[0],
                                            return_indices=True)
        return resample(moving.with_data(comps[tuple(ind)].astype(np.int32)), reference, t,
                        is_label=True).data
    own = resample(moving.with_data(comps.astype(np.int32)), reference, t, is_label=True).data
    src = np.argwhere(comps > 0)
    ijk = np.rint(_reference_ijk(reference, moving.world_coords(src), t)).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.array(own.shape)), axis=1)
    ijk, lab = ijk[ok], comps[tuple(src[ok].T)]
    empty = own[tuple(ijk.T)] == 0
    own[tuple(ijk[empty].T)] = lab[empty]
    cover = frac > 0
    pts = np.argwhere(cover | (own > 0))
    sub = tuple(slice(a, b + 1) for a, b in zip(pts.min(0), pts.max(0)))
    o = own[sub]
    if (o > 0).any():
        _, ind = ndi.distance_transform_edt(o == 0, sampling=_geometry(reference.affine)[0],
                                            return_indices=True)
        own[sub] = np.where(cover[sub], o[tuple(ind)], 0)
    return own


def _rank_within(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rank of each value within its group, largest first (0 for each group's largest)."""
    order = np.lexsort((-values, groups))
    g = groups[order]
    r = np.empty(values.size, np.int64)
    r[order] = np.arange(values.size) - np.searchsorted(g, g, side="left")
    return r


def _keep_whole(frac: np.ndarray, owner: np.ndarray, n: int, max_rounds: int = 50) -> np.ndarray:
    """The ``n`` most-covered voxels of ``frac``, with each owner's part made one piece.

    An owner is a connected part of the covered voxels (``frac`` > 0) with one ``owner``
    value (the moving component nearest to them). Of its most-covered voxels, pieces that
    do not fill one voxel (their fractions sum to less than one) are dropped unless the
    largest, pieces that do are joined to the largest by the path of highest coverage
    inside the owner, and the owner is grown back to its count by its most-covered
    neighbouring voxels.
    """
    from scipy import ndimage as ndi
    from skimage import graph, measure

    pts = np.argwhere(frac > 0)
    sub = tuple(slice(a, b + 1) for a, b in zip(pts.min(0), pts.max(0)))
    f = frac[sub]
    own = measure.label(np.where(f > 0, owner[sub], 0), background=0, connectivity=3)
    n_own = int(own.max())
    inside = f[f > 0]
    k = inside.size - min(n, inside.size)
    top = (f >= np.partition(inside, k)[k]) & (own > 0)
    want = np.bincount(own[top], minlength=n_own + 1)
    # the pieces of each owner's share: the largest stays, small ones go
    pieces = measure.label(np.where(top, own, 0), background=0, connectivity=3)
    n_pieces = int(pieces.max())
    pv = pieces[top]
    size = np.bincount(pv, minlength=n_pieces + 1)
    mass = np.bincount(pv, weights=f[top], minlength=n_pieces + 1)
    p_owner = np.zeros(n_pieces + 1, np.int64)
    p_owner[pv] = own[top]
    ids = np.arange(1, n_pieces + 1)
    largest = np.zeros(n_pieces + 1, bool)
    largest[ids[_rank_within(size[1:].astype(np.float64), p_owner[1:]) == 0]] = True
    lobes = np.flatnonzero(~largest & (mass >= 1.0))
    keep = (largest | (mass >= 1.0))[pieces] & top
    struct = np.ones((3, 3, 3), bool)
    if lobes.size:
        # join each lobe to its owner's largest piece along the most-covered path inside
        # the owner (a graph search per owner that has lobes, on the owner's box)
        boxes = ndi.find_objects(own)
        main = largest[pieces] & top
        for o in np.unique(p_owner[lobes]):
            bb = boxes[o - 1]
            cost = np.where(own[bb] == o, 1.0 - f[bb] + 0.01, np.inf)
            mcp = graph.MCP_Geometric(cost, fully_connected=True)
            reached, _ = mcp.find_costs(np.argwhere(main[bb] & (own[bb] == o)))
            pc = pieces[bb]
            for lobe in lobes[p_owner[lobes] == o]:
                vox = np.flatnonzero(pc == lobe)
                end = vox[np.argmin(reached.ravel()[vox])]
                if np.isfinite(reached.ravel()[end]):
                    path = np.array(mcp.traceback(np.unravel_index(end, cost.shape)))
                    keep[bb][tuple(path.T)] = True
    # grow each owner back to its count, most-covered neighbour first
    big_id = np.iinfo(np.int64).max
    for _ in range(max_rounds):
        short = want - np.bincount(own[keep], minlength=n_own + 1)
        if not (short > 0).any():
            break
        hi = ndi.maximum_filter(np.where(keep, own, 0), footprint=struct)
        lo = ndi.minimum_filter(np.where(keep, own, big_id), footprint=struct)
        cand = np.flatnonzero(~keep & (own > 0) & ((hi == own) | (lo == own)) & (short[own] > 0))
        if cand.size == 0:
            break
        co = own.ravel()[cand]
        keep.ravel()[cand[_rank_within(f.ravel()[cand], co) < short[co]]] = True
    out = np.zeros(frac.shape, bool)
    out[sub] = keep
    return out


def resample_array(array, moving_affine, reference: Image, transform=None, *, is_label=False):
    """Convenience: resample a bare array given its affine."""
    return resample(Image(array, moving_affine, is_label), reference, transform).data


def read_transform(path) -> sitk.Transform:
    """Read an ITK transform file (flattened to one AffineTransform when linear)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: transform file does not exist")
    try:
        t = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise ImageError(f"{path}: not a readable ITK transform ({str(exc).strip().splitlines()[-1]})") from None
    # a single linear transform is returned exactly as written; anything else is flattened
    t = t.Downcast()
    if isinstance(t, sitk.CompositeTransform) and t.GetNumberOfTransforms() == 1:
        t = t.GetNthTransform(0).Downcast()
    if isinstance(t, (sitk.AffineTransform, sitk.Euler3DTransform, sitk.VersorRigid3DTransform,
                      sitk.Similarity3DTransform, sitk.TranslationTransform)):
        return t
    return flatten(t)


def file_world_correction(img: Image) -> sitk.Transform | None:
    """The map from ``img``'s world to the world SimpleITK reads from ``img.source``.

    nibabel (hence :func:`~lesiontrack.image.load_image`) takes the sform when
    it is set; SimpleITK takes the qform when both are set with code 1 and they
    disagree. Transforms written for such a file must include this correction:
    ``compose(T, file_world_correction(img))`` maps reference points into the
    file as SimpleITK reads it. Returns None when both readers agree (the usual
    case) or when ``img.source`` is not a readable file with ``img``'s grid.
    """
    path = Path(img.source)
    if not path.is_file():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if tuple(reader.GetSize()[:3]) != tuple(img.shape[:3]):
        return None
    dim = reader.GetDimension()
    spacing = np.array(reader.GetSpacing())[:3]
    direction = np.array(reader.GetDirection()).reshape(dim, dim)[:3, :3]
    itk = np.eye(4)
    itk[:3, :3] = direction * spacing
    itk[:3, 3] = reader.GetOrigin()[:3]
    corr = itk @ np.linalg.inv(_F4 @ img.affine)
    if np.allclose(corr, np.eye(4), atol=1e-4):
        return None
    return matrix_to_transform(corr)


def write_transform(transform: sitk.Transform, path) -> Path:
    """Write an ITK text transform atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path
