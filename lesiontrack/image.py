"""The one image type of lesiontrack: an array plus a float64 4x4 RAS affine.

Everything that enters the package from disk goes through :func:`load_image`
(checked once, at the boundary); the rest of the code sees only
:class:`Image` objects whose array has a known dtype and shape.
"""
from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ._io import atomic_path

__all__ = ["Image", "ImageError", "load_image", "save_image", "crop_image", "as_closest_ras"]


class ImageError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""


def _check_affine(affine, source="image"):
    """A validated float64 copy of a 4x4 voxel-to-world affine (scale-free checks)."""
    affine = np.array(affine, dtype=np.float64, copy=True)
    if affine.shape != (4, 4):
        raise ImageError(f"{source}: affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ImageError(f"{source}: affine contains NaN or Inf values")
    lin = affine[:3, :3]
    norms = np.linalg.norm(lin, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(lin / np.where(norms == 0, 1, norms))) < 1e-6:
        raise ImageError(
            f"{source}: affine is degenerate (zero or singular voxel-to-world matrix, "
            f"voxel sizes {np.round(norms, 6).tolist()}); "
            "the header's qform/sform must describe the voxel size and orientation"
        )
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ImageError(f"{source}: affine last row must be [0, 0, 0, 1], got {affine[3]}")
    return affine


@dataclass
class Image:
    """An image: ``data`` (3D, or 4D for diffusion series) and a RAS ``affine``.

    Parameters
    ----------
    data : ndarray
        Voxel array, indexed ``[i, j, k(, volume)]``.
    affine : (4, 4) array_like
        Voxel-to-world (RAS+, mm) transform; copied and stored as float64.
    is_label : bool
        Label maps (masks, segmentations) are only ever resampled with
        nearest-neighbour interpolation.
    source : str
        Where the image came from (a file name), used in error messages.
    """

    data: np.ndarray
    affine: np.ndarray
    is_label: bool = False
    source: str = field(default="<array>")

    def __post_init__(self):
        self.data = np.asarray(self.data)
        if self.data.ndim not in (3, 4):
            raise ImageError(f"{self.source}: expected a 3D or 4D image, got {self.data.ndim}D "
                             f"with shape {self.data.shape}")
        self.affine = _check_affine(self.affine, self.source)

    # --- geometry -----------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def same_grid(self, other: "Image", atol: float = 1e-3) -> bool:
        """True when both images share shape (first 3 axes) and affine."""
        return self.shape[:3] == other.shape[:3] and np.allclose(self.affine, other.affine, atol=atol)

    def check_same_grid(self, other: "Image", what: str = "images"):
        if not self.same_grid(other):
            raise ImageError(
                f"{what} do not share one grid: {self.source} {self.shape[:3]} vs "
                f"{other.source} {other.shape[:3]}")

    def with_data(self, data, *, is_label: bool | None = None, source: str | None = None) -> "Image":
        """A new image on the same grid with other voxel values."""
        data = np.asarray(data)
        if data.shape[:3] != self.shape[:3]:
            raise ImageError(f"with_data: shape {data.shape} does not match grid {self.shape[:3]}")
        return Image(data, self.affine, self.is_label if is_label is None else is_label,
                     self.source if source is None else source)

    def world_coords(self, ijk) -> np.ndarray:
        """RAS mm coordinates of voxel indices ``ijk`` (N, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_nifti(self, dtype=None) -> nib.Nifti1Image:
        """A NIfTI-1 image (qform = sform = the affine, mm units).

        A float image given a signed integer ``dtype`` is stored scaled: ``scl_slope``
        = max |value| / the dtype's maximum, ``scl_inter`` = 0 (zero stays exactly zero);
        label maps are cast.
        """
        scaled = (dtype is not None and not self.is_label
                  and np.issubdtype(np.dtype(dtype), np.signedinteger)
                  and np.issubdtype(self.data.dtype, np.floating))
        slope = 1.0
        if scaled:
            top = float(np.max(np.abs(self.data))) if self.data.size else 0.0
            slope = top / np.iinfo(dtype).max if top > 0 and np.isfinite(top) else 1.0
            if not np.isfinite(top):
                raise ImageError(f"{self.source}: non-finite values cannot be stored as {np.dtype(dtype)}")
            data = np.rint(self.data * np.float32(1.0 / slope)).astype(dtype)
        else:
            data = self.data if dtype is None else self.data.astype(dtype, copy=False)
        img = nib.Nifti1Image(data, self.affine)
        if scaled:
            img.header.set_slope_inter(slope, 0.0)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        return img


def crop_image(img: Image, slices) -> Image:
    """Crop with a tuple of 3 slices (step 1), recomputing the affine."""
    starts = np.array([s.start or 0 for s in slices[:3]], dtype=np.float64)
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ starts + img.affine[:3, 3]
    return Image(img.data[tuple(slices[:3])].copy(), aff, img.is_label, img.source)


def as_closest_ras(img: Image) -> Image:
    """``img`` with its array axes permuted and flipped to the storage order closest to
    RAS+ (lossless: the same voxels at the same world positions).

    The pipeline conforms every input this way when it reads it (as fMRIPrep conforms its
    inputs to RAS+), so that the same scan stored as LAS, LPS, PSL, ... gives the same
    arrays, hence the same results: registration samples, pyramid blocks and the subject
    grid's anchor all follow the array order. An image already in that order is returned
    as is.
    """
    ornt = nib.orientations.io_orientation(img.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return img
    data = np.ascontiguousarray(nib.orientations.apply_orientation(img.data, ornt))
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
    return Image(data, affine, img.is_label, img.source)


def _diagnose(path: Path, exc: Exception) -> str:
    """Why nibabel could not open ``path``: an unusable qform/sform, or not NIfTI at all."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            hdr = nib.Nifti1Header.from_fileobj(fh, check=False)
        is_nifti = int(hdr["sizeof_hdr"]) == 348 and bytes(hdr["magic"]).rstrip(b"\0") in (b"n+1", b"ni1")
    except Exception:
        is_nifti = False
    for which in ("sform", "qform") if is_nifti else ():
        if int(hdr[f"{which}_code"]):
            try:
                with np.errstate(all="ignore"):
                    getattr(hdr, f"get_{which}")()
            except Exception as err:
                return f"the {which} is invalid ({err}); the orientation cannot be read"
    return f"not a readable NIfTI image ({type(exc).__name__}: {exc})"


def _read_nifti(path: Path):
    if not path.exists():
        raise ImageError(f"{path}: file does not exist")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected a NIfTI file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        with np.errstate(all="ignore"):
            img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise ImageError(f"{path}: {_diagnose(path, exc)}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    return img


def _checked_shape(path, nimg, wanted) -> tuple[int, ...]:
    shape = tuple(int(s) for s in nimg.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in wanted:
        raise ImageError(f"{path}: expected a {' or '.join(f'{d}D' for d in wanted)} image, "
                         f"got {len(shape)}D with shape {tuple(nimg.shape)}")
    if min(shape) < 1:
        raise ImageError(f"{path}: image has no voxels (shape {tuple(nimg.shape)})")
    if min(shape[:3]) < 2:
        raise ImageError(f"{path}: image has a single voxel along a spatial axis (shape "
                         f"{tuple(nimg.shape)}); a 2D slice is not a volume")
    return shape


def _raw_pixdim(path, nimg) -> np.ndarray:
    """pixdim as stored in the file (nibabel silently replaces zero voxel sizes by 1)."""
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            hdr = type(nimg.header).from_fileobj(fh, check=False)
        return np.asarray(hdr["pixdim"], dtype=np.float64)
    except Exception:
        return np.asarray(nimg.header["pixdim"], dtype=np.float64)


def _read_form(nimg, which: str):
    """(matrix or None, code, problem) of the header's qform or sform."""
    code = int(nimg.header[f"{which}_code"])
    if not code:
        return None, 0, ""
    try:
        with np.errstate(all="ignore"):
            m = getattr(nimg.header, f"get_{which}")()
    except Exception as exc:  # impossible quaternion, qfac or pixdim (HeaderDataError)
        return None, code, str(exc)
    if m is None or not np.all(np.isfinite(m)):
        return None, code, "it holds NaN or Inf values"
    return m, code, ""


def _checked_affine(path, nimg) -> np.ndarray:
    """nibabel's affine (sform if coded, else qform), with the disagreement warning."""
    qform, qcode, qproblem = _read_form(nimg, "qform")
    sform, scode, sproblem = _read_form(nimg, "sform")
    if scode:
        if sproblem:
            raise ImageError(f"{path}: the sform is invalid ({sproblem})")
        if qproblem:
            warnings.warn(f"{path}: the qform is invalid ({qproblem}); using the sform",
                          UserWarning, stacklevel=3)
        elif qcode and not np.allclose(qform, sform, atol=1e-2):
            warnings.warn(f"{path}: qform and sform disagree; using the sform as nibabel does "
                          "(SimpleITK may read this file with the qform)", UserWarning, stacklevel=3)
    elif qcode:
        if qproblem:
            raise ImageError(f"{path}: the qform is invalid ({qproblem}) and no sform is set; "
                             "the orientation cannot be read")
        if np.any(_raw_pixdim(path, nimg)[1:4] == 0):
            raise ImageError(f"{path}: affine is degenerate (a voxel size in pixdim is 0 and the "
                             "qform is used); the header must describe the voxel size")
    else:
        warnings.warn(f"{path}: neither qform nor sform is set; the orientation is unknown "
                      "and the voxel axes are taken as RAS", UserWarning, stacklevel=3)
    with np.errstate(all="ignore"):
        affine = nimg.affine
    return _check_affine(affine, str(path))


def _read_data(path, nimg, is_label: bool) -> np.ndarray:
    kind = nimg.header.get_data_dtype().kind
    if kind not in "biuf":
        raise ImageError(f"{path}: unsupported voxel data type "
                         f"{nimg.header.get_data_dtype()}; expected integer or real values")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            if is_label:
                data = np.asarray(nimg.dataobj)
            else:
                data = nimg.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise ImageError(f"{path}: image data cannot be read, the file may be truncated or "
                         f"corrupt ({type(exc).__name__}: {exc})") from None
    finite = np.isfinite(data) if data.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        with np.errstate(over="ignore", invalid="ignore"):
            raw = np.asarray(nimg.dataobj, dtype=np.float64)
        bad = ~finite
        n_nan = int(np.count_nonzero(bad & ~np.isfinite(raw)))
        if n_nan:
            raise ImageError(f"{path}: {n_nan} voxels are NaN or Inf; fix or mask them "
                             "before running")
        raise ImageError(f"{path}: voxel values up to {np.abs(raw[bad]).max():.3g} exceed the "
                         "float32 range; check the scaling (scl_slope/scl_inter) in the header")
    return data


def _check_labels(path, data) -> np.ndarray:
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if data.size and float(np.max(np.abs(data - rounded))) > 1e-3:
            raise ImageError(f"{path}: a label map must hold integer values, got non-integer "
                             "values (a probability map? threshold it first)")
        data = rounded
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int32).max):
        raise ImageError(f"{path}: label values must be non-negative integers below 2^31, "
                         f"got range [{data.min():g}, {data.max():g}]")
    return data.astype(np.uint8 if data.size and data.max() <= 255 else np.int32)


def _check_intensities(path, data, allow_constant: bool):
    lo, hi = float(data.min()), float(data.max())
    if hi == lo and not allow_constant:
        what = "all zero" if hi == 0 else f"constant ({hi:g})"
        raise ImageError(f"{path}: image is {what}; it carries no contrast")
    # sums and sums of squares over the whole image must stay finite in float32
    limit = float(np.sqrt(np.finfo(np.float32).max / data.size))
    peak = max(abs(lo), abs(hi))
    if peak > limit:
        raise ImageError(f"{path}: voxel magnitudes up to {peak:.3g} are too large (limit "
                         f"{limit:.3g} for {data.size} voxels in float32); check the scaling "
                         "(scl_slope/scl_inter) in the header")


def load_image(path, *, ndim: int | tuple[int, ...] = 3, is_label: bool = False,
               allow_constant: bool = False) -> Image:
    """Load a NIfTI file as an :class:`Image` with float32 data (uint8/int32 for labels).

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file.
    ndim : int or tuple of int
        Allowed numbers of dimensions (3 for structural images, 4 or ``(3, 4)``
        for diffusion series); trailing singleton axes are dropped first.
    is_label : bool
        Read a label map: integer values, kept as uint8 (int32 above 255).
    allow_constant : bool
        Accept an all-zero or constant image (e.g. an empty lesion mask).

    Returns
    -------
    Image

    Raises
    ------
    ImageError
        Naming the file, when it is missing, empty, not NIfTI, truncated, has the
        wrong number of dimensions, a degenerate affine, NaN/Inf voxels, values
        too large for float32 arithmetic, an unsupported data type, or is constant.

    Notes
    -----
    A disagreement between qform and sform is a warning; nibabel's choice of
    affine (the sform when it is set) is followed. Integer data with
    ``scl_slope``/``scl_inter`` is scaled to float32.
    """
    path = Path(path)
    nimg = _read_nifti(path)
    wanted = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    shape = _checked_shape(path, nimg, wanted)
    affine = _checked_affine(path, nimg)
    data = _read_data(path, nimg, is_label).reshape(shape)
    if is_label:
        data = _check_labels(path, data)
    else:
        _check_intensities(path, data, allow_constant)
    return Image(data, affine, is_label, str(path))


def save_image(img: Image, path, dtype=None) -> Path:
    """Write ``img`` to ``path`` atomically (temporary file, then rename).

    Label maps are written as uint8 (int32 when values exceed 255); other images
    as float32 unless ``dtype`` says otherwise (an integer ``dtype`` for a float image
    stores it scaled: see :meth:`Image.to_nifti`).
    """
    path = Path(path)
    if dtype is None:
        if img.is_label:
            dtype = np.uint8 if (img.data.size == 0 or img.data.max() <= 255) else np.int32
        else:
            dtype = np.float32
    nimg = img.to_nifti(dtype)
    with atomic_path(path) as tmp:
        _write_nifti(nimg, Path(tmp))
    return path


def _write_nifti(nimg, filename: Path):
    """``nimg`` to ``filename``; a ``.gz`` is standard gzip (zlib level 1, mtime 0).

    Integer data (label maps and scaled int16 images, all the pipeline writes) are
    deflated with zlib's run-length strategy: 2.5x faster than the default one at level 1
    and no larger (smaller for masks), while writing was a tenth of a 1 mm subject's CPU
    time. Float data keep the default strategy (run-length matches would leave them a
    third larger). zlib's output depends only on its input, so reruns give byte-identical
    files (ISA-L, 10x faster, did not: its stream for the same bytes differed between two
    runs once in four).
    """
    if not filename.name.endswith(".gz"):
        nib.save(nimg, str(filename))
        return
    strategy = zlib.Z_RLE if nimg.get_data_dtype().kind in "iu" else zlib.Z_DEFAULT_STRATEGY
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8, strategy)   # gzip wrapper
    raw = nimg.to_bytes()
    with open(filename, "wb") as fh:
        fh.write(comp.compress(raw))
        del raw
        fh.write(comp.flush())