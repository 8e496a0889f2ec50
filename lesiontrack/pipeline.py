"""One subject end to end: load, align, preprocess, segment, track, quantify, write, report.

Each step is a plain function call over in-memory data; input files are read once
at the start and outputs written once at the end (atomically). The provenance file
``sub-<s>/sub-<s>_provenance.json`` is written last: its presence with a matching
configuration hash and version marks the subject as complete.
"""
from __future__ import annotations

import json
import logging
import platform
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from . import __version__, bids, sitk_bridge
from ._io import write_json, write_tsv
from ._reg_core import parallel_map, usable_cpus
from .config import config_hash
from .image import Image, as_closest_ras, load_image, save_image
from .result import SubjectResult

__all__ = ["run_subject", "subject_is_complete", "PipelineError", "STRUCTURAL"]

log = logging.getLogger("lesiontrack")

STRUCTURAL = ("FLAIR", "T2w", "T1w", "ceT1w")
# modality key -> (datatype, entity prefix, BIDS suffix) for derivative names
_OUT_NAMES = {
    "FLAIR": ("anat", None, "FLAIR"),
    "T2w": ("anat", None, "T2w"),
    "T1w": ("anat", None, "T1w"),
    "ceT1w": ("anat", "gadolinium", "T1w"),
    "dwi": ("dwi", None, "dwi"),
    "b1000": ("dwi", None, "dwi"),
    "ADC": ("dwi", None, "ADC"),
}


class PipelineError(RuntimeError):
    """A subject cannot be processed; the message says which file or step and why."""


def _versions() -> dict:
    import importlib.metadata as md

    out = {"lesiontrack": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "scipy", "nibabel", "nilearn", "scikit-image", "SimpleITK", "pandas",
                "matplotlib", "dask"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _provenance_path(output_dir, subject) -> Path:
    return Path(output_dir) / f"sub-{subject}" / f"sub-{subject}_provenance.json"


def _input_files(sessions) -> dict:
    """``{session_id: {modality: absolute path}}`` of the sessions that have FLAIR or T2w."""
    return {si.session_id: {mod: str(bids.abs_path(p)) for mod, p in si.files.items()}
            for si in sessions if si.reference is not None}


def _modified(path) -> int:
    """When a file's content last changed: its own time, or its link's when it is a
    symbolic link (DataLad re-points the link to a new version)."""
    p = Path(path)
    return max(p.stat().st_mtime_ns, p.lstat().st_mtime_ns)


def subject_is_complete(output_dir, subject, cfg, bids_dir=None, session_labels=None,
                        input_filters=None) -> bool:
    """True when the subject's outputs exist from this version with this configuration
    and, given ``bids_dir``, from the inputs the dataset now holds: the same files (a
    visit added or removed, another file chosen, means not complete), none modified since
    the outputs were written."""
    subject = bids._label(subject, "sub-")
    prov = _provenance_path(output_dir, subject)
    try:
        info = json.loads(prov.read_text())
        written = prov.stat().st_mtime_ns
    except (OSError, ValueError):
        return False
    if info.get("version") != __version__ or info.get("config_hash") != config_hash(cfg):
        return False
    if bids_dir is not None:
        try:
            now = _input_files(bids.find_sessions(bids_dir, subject, session_labels, input_filters))
            if now != info.get("inputs") or any(_modified(p) > written
                                                for files in now.values() for p in files.values()):
                return False
        except (OSError, bids.BIDSError):
            return False
    return all((Path(output_dir) / rel).exists() for rel in info.get("outputs", []))


def _step(progress, name, i, n):
    log.info("[%d/%d] %s", i, n, name)
    if progress is not None:
        progress(name, i, n)


# --------------------------------------------------------------------------- loading
def _load_session(si: bids.SessionInputs, cfg) -> tuple[dict, dict, dict, dict]:
    """Native images of one session (3D each; ``dwi`` = b=0 mean), its DWI maps, the
    images' grids as stored in their files, and how the ADC was obtained (for the
    provenance: the b-values fitted, or a ready map's unit).

    The images and maps are conformed to the storage order closest to RAS+
    (:func:`~lesiontrack.image.as_closest_ras`), so that results do not depend on the
    files' storage order; the grids (``_grid_only``, in the files' own order) are those of
    the native-space outputs.
    """
    from . import dwi as dwi_mod

    images, dwimaps, grids, adc_info = {}, {}, {}, {}

    def load(mod, path, ndim):
        img = load_image(path, ndim=ndim)
        grids[mod] = _grid_only(img if img.data.ndim == 3 else
                                Image(img.data[..., 0], img.affine, False, img.source))
        return as_closest_ras(img)

    for mod in STRUCTURAL:
        if mod in si.files:
            images[mod] = load(mod, si.files[mod], 3)
    if "dwi" in si.files:
        if si.bval is None or not si.bval.exists() or not si.bvec.exists():
            log.warning("%s: the .bval/.bvec files beside it are missing (expected %s and %s); "
                        "diffusion measures are skipped for %s", si.files["dwi"], si.bval, si.bvec,
                        si.session_id)
        else:
            # the trace-weighted maps (mean over directions) do not use the b-vectors'
            # orientation, so reordering the voxel axes needs no b-vector rotation
            series = load("dwi", si.files["dwi"], 4)
            bvals, bvecs = dwi_mod.read_bvals_bvecs(si.bval, si.bvec, series.shape[3],
                                                    b0_max=cfg["segment"]["dwi_b0_max"])
            maps = dwi_mod.fit_dwi(series, bvals, bvecs, cfg["segment"])
            images["dwi"] = maps.b0
            dwimaps = {"b1000": maps.b1000, "ADC": maps.adc}
            adc_info = {"fitted_b_values": list(maps.b_fitted)}
    if "dwi" not in images and "ADC" in si.files:
        adc = load("dwi", si.files["ADC"], 3)
        scale, unit = dwi_mod.adc_unit_scale(adc)
        if scale != 1.0:
            log.info("%s: ADC stored in %s; converted to mm^2/s", si.files["ADC"], unit)
            adc = Image((np.asarray(adc.data, np.float32) * np.float32(scale)), adc.affine, False, adc.source)
        images["dwi"] = adc
        dwimaps = {"ADC": adc}
        adc_info = {"ready_map_unit": unit}
    return images, dwimaps, grids, adc_info


def _grid_only(img: Image) -> Image:
    """``img``'s grid (shape, affine, source) without its voxels: a zero-strided view."""
    return Image(np.broadcast_to(np.zeros((), img.data.dtype), img.shape), img.affine, img.is_label,
                 img.source)


def _external_masks(lesion_mask_dir, subject, sessions):
    if lesion_mask_dir is None:
        return {}
    out = {}
    for si in sessions:
        p = bids.deriv_path(lesion_mask_dir, subject, si.session, "anat", label="lesion", suffix="mask")
        if not p.exists() and p.with_suffix("").exists():          # uncompressed .nii
            p = p.with_suffix("")
        if not p.exists():
            raise PipelineError(f"{p}: external lesion mask not found (the --lesion-masks folder must hold "
                                "one mask per session in the session reference's space)")
        out[si.session_id] = load_image(p, ndim=3, is_label=True)
    return out


# --------------------------------------------------------------------------- main
def run_subject(bids_dir, subject, output_dir, cfg, *, session_labels=None, progress=None,
                lesion_mask_dir=None, write_report: bool = True, input_filters=None) -> SubjectResult:
    """Process one subject end to end and write all its outputs.

    Parameters
    ----------
    bids_dir, output_dir : path
        BIDS input dataset and BIDS-Derivatives output folder.
    subject : str
        Label with or without ``sub-``.
    cfg : dict
        The resolved pipeline configuration (:func:`lesiontrack.config.load_config`).
    session_labels : list of str, optional
        Only these sessions.
    progress : callable(step_name, i, n), optional
    lesion_mask_dir : path, optional
        A derivatives folder with external lesion masks (``label-lesion_mask``) per
        session, used instead of lesiontrack's own T2/FLAIR segmentation.
    write_report : bool
        Also write the HTML report and its figures.
    input_filters : dict, optional
        ``{modality: {entity: [values]}}``: which candidate file is each contrast's input
        (the ``inputs`` of :func:`lesiontrack._cohort_files.read_bids_filter`).

    Returns
    -------
    SubjectResult
    """
    from . import preprocess, quantify, registration, segment, track

    t_start = time.perf_counter()
    timing = {}
    subject = bids._label(subject, "sub-")
    output_dir = Path(output_dir)
    n_steps = 8
    bids.check_output_dir(bids_dir, output_dir)
    if cfg["registration"]["interpolation"] not in ("linear", "bspline"):
        raise PipelineError("registration.interpolation must be 'linear' or 'bspline', got "
                            f"{cfg['registration']['interpolation']!r}")

    # 1. inputs --------------------------------------------------------------------
    _step(progress, "load", 1, n_steps)
    sessions = bids.find_sessions(bids_dir, subject, session_labels, input_filters)
    skipped = []
    kept = []
    for si in sessions:
        if si.reference is None:
            unused = si.unused_images()
            msg = (f"{si.session_id}: neither FLAIR nor T2w found"
                   + (f" (images there not read: {', '.join(unused)})" if unused else "")
                   + "; session skipped")
            log.warning("sub-%s %s", subject, msg)
            skipped.append(msg)
        else:
            kept.append(si)
            for note in si.notes:
                log.warning("sub-%s %s: %s", subject, si.session_id, note)
    if not kept:
        raise PipelineError(f"sub-{subject}: no session has a FLAIR or T2w image")
    sessions_df = bids.read_sessions_tsv(bids_dir, subject, kept)
    order = list(sessions_df["session_id"])
    kept = sorted(kept, key=lambda s: order.index(s.session_id))
    sids = [s.session_id for s in kept]
    # sessions read side by side (decompression and the DWI fit release the GIL)
    loaded = parallel_map(lambda si: _load_session(si, cfg), kept)
    native = {si.session_id: imgs for si, (imgs, _, _, _) in zip(kept, loaded)}
    dwimaps = {si.session_id: maps for si, (_, maps, _, _) in zip(kept, loaded)}
    file_grids = {si.session_id: grids for si, (_, _, grids, _) in zip(kept, loaded)}
    adc_info = {si.session_id: info for si, (_, _, _, info) in zip(kept, loaded) if info}
    del loaded
    ext_masks = _external_masks(lesion_mask_dir, subject, kept)
    timing["load_s"] = time.perf_counter() - t_start

    # 2. alignment -----------------------------------------------------------------
    _step(progress, "align", 2, n_steps)
    t0 = time.perf_counter()
    al = registration.align_subject(native, cfg["registration"])
    grid = al.grid
    spacing = grid.spacing
    timing["align_s"] = time.perf_counter() - t0

    # 3. resample every image once, from native data, onto the individual grid -------
    _step(progress, "resample", 3, n_steps)
    t0 = time.perf_counter()
    interp = cfg["registration"]["interpolation"]

    def resample_one(job):
        # one SimpleITK thread per image, the images side by side (numpy conversions and
        # the interpolation both run in parallel; the result does not depend on it)
        sid, mod, img, name = job
        key = "dwi" if mod in dwimaps[sid] else mod
        # NaN outside the image: its field of view on the grid, then background (0)
        r = sitk_bridge.resample(img.with_data(img.data.astype(np.float32, copy=False)), grid,
                                 al.transforms[sid][key], interpolator=name, threads=1,
                                 default=np.nan).data
        fov = np.isfinite(r)
        r[~fov] = 0
        # "bspline": see docs/architecture.md; its undershoot next to edges is clipped
        # (magnitudes are >= 0)
        r = r.astype(np.float32, copy=False) if name == "linear" else np.maximum(r, 0, dtype=np.float32)
        return r, np.packbits(fov)

    jobs = [(sid, mod, img, interp) for sid in sids for mod, img in native[sid].items() if mod != "dwi"]
    jobs += [(sid, mod, img, "linear") for sid in sids for mod, img in dwimaps[sid].items()]
    aligned = {sid: {} for sid in sids}
    # with each image its field of view on the grid (bit-packed), for what every visit
    # observed (a visit whose slab misses part of the brain)
    fovs = {}
    for (sid, mod, _, _), (arr, fov) in zip(jobs, parallel_map(resample_one, jobs)):
        aligned[sid][mod] = arr
        fovs[sid, mod] = fov
    del jobs
    ext_aligned = {sid: sitk_bridge.resample(m, grid, al.transforms[sid][_ref(native[sid])]).data > 0
                   for sid, m in ext_masks.items()}
    # skull-stripped input is recognised on the images as stored (exact zero background)
    stripped = preprocess.stripped_inputs(native, cfg["preprocess"])
    # from here on the native images serve only as grids (native-space outputs, transform
    # files), in their files' own storage order: their voxels are released
    native = {sid: {mod: file_grids[sid][mod] for mod in mods} for sid, mods in native.items()}
    del file_grids
    del dwimaps, ext_masks
    timing["resample_s"] = time.perf_counter() - t0

    # 4. subject priors + per-session preprocessing ----------------------------------
    _step(progress, "preprocess", 4, n_steps)
    writer = _Writer()
    t0 = time.perf_counter()
    means = {}
    for mod in ("FLAIR", "T2w", "T1w", "ceT1w", "b1000", "ADC"):
        arrs = [aligned[s][mod] for s in sids if mod in aligned[s]]
        if arrs:
            means[mod] = grid.with_data(np.mean(arrs, axis=0, dtype=np.float32))
    priors = preprocess.prepare_subject(means, cfg["preprocess"], stripped)
    del means
    observed = _observed(sids, aligned, fovs, grid.shape, priors.brain_mask)
    del fovs
    for sid, frac in observed.missed.items():
        log.warning("sub-%s %s: the field of view of its %s misses %.2g %% of the brain; lesions "
                    "there are carried from the nearest visit that observed them", subject, sid,
                    observed.contrasts[sid], 100 * frac)

    def save(sid, mod, arr):
        # compressed in the background from here on, as scaled int16 (as scanners write):
        # a step of 1/65535 of the image's range, far below its noise, at half the size
        # and compression time of float32
        writer.save(grid.with_data(arr.astype(np.float32, copy=False)),
                    _preproc_path(output_dir, subject, sid, mod), np.int16)

    # every image of every session on one pool; each raw resampled array is released as
    # soon as it is taken up
    pre = preprocess.preprocess_sessions({sid: aligned.pop(sid) for sid in sids}, priors, spacing,
                                         cfg["preprocess"], done=save)
    timing["preprocess_s"] = time.perf_counter() - t0

    # 5. segmentation --------------------------------------------------------------
    _step(progress, "segment", 5, n_steps)
    t0 = time.perf_counter()
    # one set of tissue widths for all visits: every visit is thresholded alike
    widths = (segment.pooled_widths([pre[sid] for sid in sids], priors, cfg["segment"])
              if cfg["segment"]["pool_sessions"] else None)
    # a session with T2w but no FLAIR is segmented with a FLAIR imputed from the nearest
    # FLAIR visit and the T2w change (T2w alone cannot tell lesions from CSF partial volume)
    # and a session with FLAIR but no T2w with a T2w imputed alike (scored on FLAIR alone,
    # its lesions would differ from the other visits' where the lesions do not); both from
    # the sessions' own contrasts (an imputed image is never a source)
    seg_in, imputed, t2w_imputed = ([pre[sid] for sid in sids], {}, {})
    if cfg["segment"]["impute_flair"] and not ext_aligned:
        seg_in, imputed = segment.impute_flair(seg_in, priors, spacing, cfg["segment"])
    if cfg["segment"]["impute_t2w"] and not ext_aligned:
        with_t2w, t2w_imputed = segment.impute_t2w([pre[sid] for sid in sids], priors, spacing,
                                                   cfg["segment"])
        seg_in = [dict(seg_in[k], T2w=with_t2w[k]["T2w"]) if k in t2w_imputed else seg_in[k]
                  for k in range(len(sids))]
        del with_t2w
    imputed = {sids[i]: sids[j] for i, j in imputed.items()}
    t2w_imputed = {sids[i]: sids[j] for i, j in t2w_imputed.items()}
    for sid, src in imputed.items():
        log.warning("sub-%s %s: no FLAIR; segmented with a FLAIR imputed from %s and the T2w "
                    "change", subject, sid, src)
    for sid, src in t2w_imputed.items():
        log.warning("sub-%s %s: no T2w; segmented with a T2w imputed from %s and the FLAIR "
                    "change", subject, sid, src)
    if not ext_aligned and not any("FLAIR" in pre[sid] for sid in sids):
        log.warning("sub-%s: no visit has FLAIR; lesions are segmented from T2w%s with the CSF "
                    "spaces left out, which finds fewer lesions than with FLAIR", subject,
                    " and T1w" if any("T1w" in pre[sid] for sid in sids) else "")
    elif not ext_aligned:
        for k, sid in enumerate(sids):     # no visit with both FLAIR and T2w to impute from
            if "FLAIR" not in seg_in[k]:
                log.warning("sub-%s %s: no FLAIR, and no visit with both FLAIR and T2w to impute it "
                            "from; segmented from T2w with the CSF spaces left out", subject, sid)
    # the sessions side by side (numpy and scipy.ndimage release the GIL; each session's
    # result does not depend on the others)
    masks = parallel_map(lambda k: segment.segment_session(
        seg_in[k], priors, spacing, cfg["segment"], lesion_mask=ext_aligned.get(sids[k]),
        widths=widths), range(len(sids)))
    timing["segment_s"] = time.perf_counter() - t0

    # 6. tracking + tables -----------------------------------------------------------
    _step(progress, "track", 6, n_steps)
    t0 = time.perf_counter()
    # the image-evidence test subtracts one contrast between sessions: FLAIR where every
    # session has it, else T2w, else none (mask-only rules)
    change_mod = next((m for m in ("FLAIR", "T2w") if all(m in pre[sid] for sid in sids)), None)
    if change_mod is None and len(sids) > 1:
        log.warning("sub-%s: neither FLAIR nor T2w is present at every visit; lesion change is "
                    "judged on the masks alone (no subtraction evidence), and masks segmented "
                    "from different contrasts differ where the lesions do not", subject)
    flair = [pre[sid][change_mod] for sid in sids] if change_mod else None
    # per-session lesion evidence (z) lets the tracker confirm change in the images themselves
    lesion_z = (parallel_map(lambda k: segment.lesion_zmap(seg_in[k], priors, cfg["segment"],
                                                           widths, spacing), range(len(sids)))
                if change_mod else None)
    del seg_in
    # with FLAIR, the acquired T2w (never an imputed one) confirms each lesion's volume change
    t2w = [pre[sid].get("T2w") for sid in sids] if change_mod == "FLAIR" else None
    tr = track.track_lesions([m.lesion for m in masks], spacing, cfg["track"], flair=flair,
                             brain_mask=priors.brain_mask, lesion_z=lesion_z, t2w=t2w,
                             observed=observed.maps)
    del lesion_z
    # the tracked lesions are the final lesion masks (the tracker may add lesion voxels that the
    # image evidence confirms); the sub-masks stay inside them
    for m, lab in zip(masks, tr.labels):
        m.lesion = lab > 0
        m.restricted &= m.lesion
        m.blackhole &= m.lesion
        m.enhancing &= m.lesion
    lesions_df = quantify.lesion_table(tr, masks, sids, grid, priors, observed=observed.maps,
                                       measures_observed=observed.measures)
    sessions_stats = quantify.session_table(tr, masks, sessions_df, grid, lesions_df,
                                            [1.0 - observed.missed.get(s, 0.0) for s in sids])
    qc_df = pd.DataFrame([q.__dict__ for q in al.qc])
    timing["track_s"] = time.perf_counter() - t0

    # 7. outputs -------------------------------------------------------------------
    _step(progress, "write", 7, n_steps)
    t0 = time.perf_counter()
    try:
        outputs = _write_outputs(bids_dir, output_dir, subject, kept, native, grid, al, masks, tr,
                                 lesions_df, sessions_stats, qc_df, priors.brain_mask, writer,
                                 observed)
    finally:
        writer.close()
    timing["write_s"] = time.perf_counter() - t0

    images = {sid: {mod: grid.with_data(arr) for mod, arr in pre[sid].items()} for sid in sids}
    provenance = {
        "version": __version__,
        "versions": _versions(),
        "subject": subject,
        "sessions": sids,
        "skipped_sessions": skipped,
        "config_hash": config_hash(cfg),
        "config": cfg,
        "skullstripped": bool(getattr(priors, "skullstripped", False)),
        "template_registered_to": getattr(priors, "template_fit", {}),
        "brain_unobserved_fraction": {sid: round(f, 4) for sid, f in observed.missed.items()},
        "flair_imputed_from": imputed,
        "t2w_imputed_from": t2w_imputed,
        "inputs": _input_files(kept),
        "adc": adc_info,
        "external_lesion_masks": str(lesion_mask_dir) if lesion_mask_dir else None,
        "timing": timing,
    }
    result = SubjectResult(
        subject=subject, session_ids=sids, grid=grid, images=images, labels=tr.labels,
        change=tr.change, restricted=[m.restricted for m in masks],
        blackhole=[m.blackhole for m in masks], enhancing=[m.enhancing for m in masks],
        brain_mask=priors.brain_mask, sessions=sessions_stats, lesions=lesions_df, qc=qc_df,
        config=cfg, provenance=provenance, observed=observed.maps)

    # 8. report ---------------------------------------------------------------------
    if write_report:
        _step(progress, "report", 8, n_steps)
        from . import report

        t0 = time.perf_counter()
        rpath = report.build_report(result, output_dir, cfg["report"])
        outputs.append(str(Path(rpath).relative_to(output_dir)))
        timing["report_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    provenance["outputs"] = outputs
    write_json(_provenance_path(output_dir, subject), provenance)
    log.info("sub-%s done in %.1f s", subject, timing["total_s"])
    return result


class _Writer:
    """Writes images in background threads while the pipeline goes on.

    zlib releases the GIL, so compressing outputs overlaps with computation. The
    pipeline's own thread counts against the CPU budget: with one CPU (a cohort worker
    given one thread) images are written at once, in the calling thread. Each write is
    atomic; :meth:`wait` re-raises the first failure.
    """

    def __init__(self):
        n = _io_threads()
        self.pool = ThreadPoolExecutor(max_workers=n) if n > 0 else None
        self.pending = []

    def save(self, img: Image, path, dtype=None):
        if self.pool is None:
            fut = Future()
            try:
                fut.set_result(save_image(img, path, dtype))
            except Exception as exc:  # re-raised by wait(), as from a thread
                fut.set_exception(exc)
            self.pending.append(fut)
        else:
            self.pending.append(self.pool.submit(save_image, img, path, dtype))

    def wait(self) -> list:
        try:
            return [f.result() for f in self.pending]
        finally:
            self.pending = []

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _unpack(bits: np.ndarray, shape) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)


# the contrasts each lesion measure is read from (a lesion outside their view: n/a)
_MEASURE_CONTRASTS = {"restricted": ("b1000", "ADC"), "blackhole": ("T1w",),
                      "enhancing": ("ceT1w", "T1w")}


@dataclass
class _Observed:
    maps: list | None       # per session: where its lesion contrasts observe (None: all of the brain)
    missed: dict            # session -> fraction of the brain its lesion contrasts miss
    contrasts: dict         # session -> the contrasts that define what it observes
    measures: list | None   # per session: {measure: where its contrasts observe} for those
                            #   that miss part of the brain (None: no such measure)


def _observed(sids, aligned, fovs, shape, brain) -> _Observed:
    """Where each session observed the tissue: inside the fields of view of its lesion
    contrasts (FLAIR, T2w), one voxel in from their edges (where interpolation mixes in the
    outside). Sessions that observed the whole brain get None."""
    maps, missed, contrasts, measures = [], {}, {}, []
    n_brain = max(int(np.count_nonzero(brain)), 1)
    edge = ndi.generate_binary_structure(3, 1)

    def view(sid, mods):
        seen = np.ones(shape, bool)
        for m in mods:
            seen &= _unpack(fovs[sid, m], shape)
        return None if (seen | ~brain).all() else ndi.binary_erosion(seen, edge, border_value=1)

    for sid in sids:                                 # loop over sessions
        meas = {}
        for what, need in _MEASURE_CONTRASTS.items():
            have = [m for m in need if m in aligned[sid]]
            if have and (v := view(sid, have)) is not None:
                meas[what] = v
        measures.append(meas or None)
        mods = [m for m in ("FLAIR", "T2w") if m in aligned[sid]]
        seen = view(sid, mods)
        if seen is None:
            seen = np.ones(shape, bool)
        lost = np.count_nonzero(brain & ~seen) / n_brain
        if lost > 0:
            maps.append(seen)
            missed[sid] = float(lost)
            contrasts[sid] = " and ".join(mods)
        else:
            maps.append(None)
    return _Observed(maps if missed else None, missed, contrasts,
                     measures if any(m is not None for m in measures) else None)


def _preproc_path(out, subject, session, mod):
    dtype, ce, suffix = _OUT_NAMES[mod]
    return bids.deriv_path(out, subject, session, dtype, ce=ce, space="individual", desc="preproc",
                           suffix=suffix)


def _io_threads() -> int:
    """Background threads for compressing outputs: the CPUs this process may use (capped
    by ``OMP_NUM_THREADS``, which cohort workers set) less the pipeline's own, at most 3."""
    return max(0, min(3, usable_cpus() - 1))


def _ref(images: dict) -> str:
    return "FLAIR" if "FLAIR" in images else "T2w"


def _clinical_descriptions(bids_dir, subject) -> dict:
    """Column descriptions from the input's ``sub-<s>_sessions.json``, if any."""
    p = Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.json"
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in info.items() if isinstance(v, dict)}


def _write_outputs(bids_dir, output_dir, subject, sessions, native, grid, al, masks, tr,
                   lesions_df, sessions_stats, qc_df, brain_mask, writer: _Writer,
                   observed=None) -> list[str]:
    from . import quantify

    out = Path(output_dir)
    written: list[Path] = []
    bids.write_dataset_description(out, bids_dir)
    save = writer.save   # (the preprocessed images were queued as soon as they existed)

    for i, si in enumerate(sessions):
        sid, ses = si.session_id, si.session
        ref_mod = _ref(native[sid])
        ref_img = native[sid][ref_mod]
        # transforms, in the folder of the image they come from
        for mod, t in al.transforms[sid].items():
            if mod not in native[sid]:
                continue
            dtype, ce, suffix = _OUT_NAMES[mod]
            src = "dwi" if mod == "dwi" else suffix
            p = bids.deriv_path(out, subject, ses, dtype, ce=ce, extra=f"from-{src}_to-individual_mode-image",
                                suffix="xfm", ext=".txt")
            corr = sitk_bridge.file_world_correction(native[sid][mod])
            if corr is not None:  # qform/sform disagree: write for the file as SimpleITK reads it
                t = sitk_bridge.compose(t, corr)
            written.append(sitk_bridge.write_transform(t, p))
        m = masks[i]
        for label, arr in (("lesion", m.lesion), ("restricted", m.restricted),
                           ("blackhole", m.blackhole), ("enhancing", m.enhancing)):
            save(grid.with_data(arr.astype(np.uint8), is_label=True),
                 bids.deriv_path(out, subject, ses, "anat", space="individual", label=label, suffix="mask"))
        if observed is not None and sid in observed.missed:   # a visit that missed part of the brain
            save(grid.with_data(observed.maps[i].astype(np.uint8), is_label=True),
                 bids.deriv_path(out, subject, ses, "anat", space="individual", desc="observed",
                                 suffix="mask"))
        lab = grid.with_data(tr.labels[i].astype(np.int32, copy=False), is_label=True)
        save(lab, bids.deriv_path(out, subject, ses, "anat", space="individual", desc="lesions", suffix="dseg"))
        # native space (the session reference's grid)
        back = sitk_bridge.inverse(al.transforms[sid][ref_mod])
        native_lesion = sitk_bridge.resample_labels(grid.with_data(m.lesion.astype(np.uint8), is_label=True),
                                                    ref_img, back)
        save(native_lesion, bids.deriv_path(out, subject, ses, "anat", label="lesion", suffix="mask"))
        if tr.change[i] is not None:
            ch = grid.with_data(tr.change[i].astype(np.uint8), is_label=True)
            save(ch, bids.deriv_path(out, subject, ses, "anat", space="individual", desc="change", suffix="dseg"))
            save(sitk_bridge.resample_labels(ch, ref_img, back),
                 bids.deriv_path(out, subject, ses, "anat", desc="change", suffix="dseg"))

    sdir = out / f"sub-{subject}"
    clinical = _clinical_descriptions(bids_dir, subject)
    save(grid.with_data(brain_mask.astype(np.uint8), is_label=True),
         sdir / "anat" / f"sub-{subject}_space-individual_desc-brain_mask.nii.gz")
    written.extend(writer.wait())   # every queued image; re-raises the first failed write
    written.extend(_image_sidecars(bids_dir, subject, sessions,
                                   [p for p in written if str(p).endswith(".nii.gz")]))
    tables = (
        (sdir / f"sub-{subject}_desc-lesions_stats.tsv", lesions_df, quantify.LESION_COLUMNS),
        (sdir / f"sub-{subject}_desc-sessions_stats.tsv", sessions_stats, quantify.SESSION_COLUMNS),
        (sdir / f"sub-{subject}_desc-registration_qc.tsv", qc_df, _QC_COLUMNS),
    )
    for path, df, cols in tables:
        written.append(write_tsv(path, df))
        side = {c: cols.get(c) or clinical.get(c) or {"Description": f"column '{c}' copied from sessions.tsv"}
                for c in df.columns}
        written.append(bids.sidecar(path, side))
    return [str(Path(p).relative_to(out)) for p in written]


_IMAGE_NAME = re.compile(r"^sub-[^_]+(?:_ses-(?P<ses>[^_]+))?(?:_ce-(?P<ce>[^_]+))?(?:_space-(?P<space>[^_]+))?"
                         r"(?:_label-(?P<label>[^_]+))?(?:_desc-(?P<desc>[^_]+))?_(?P<suffix>[^_.]+)\.nii\.gz$")
_PREPROC_MODALITY = {("T1w", True): "ceT1w", ("dwi", False): "dwi", ("ADC", False): "ADC"}
_MASKS = {
    "lesion": ("Lesion", "T2/FLAIR-hyperintense lesions (1 = lesion)"),
    "restricted": ("ROI", "lesion parts with restricted diffusion: ADC below adc_max_restricted and bright "
                          "on b1000, grown to their partial-volume edge (1 = restricted)"),
    "blackhole": ("ROI", "T1 black holes: lesion parts T1w-darker than the grey-matter peak by "
                         "blackhole_gm_z half-widths, grown to their partial-volume edge (1 = black hole)"),
    "enhancing": ("ROI", "gadolinium-enhancing lesion parts: ceT1w - T1w above its normal-appearing white-"
                         "matter distribution by enhancing_z SDs (1 = enhancing)"),
    "observed": ("ROI", "the part of the brain this visit's FLAIR/T2w field of view observed (1 = observed)"),
    "brain": ("Brain", "brain mask of the individual space"),
}


def _image_sidecars(bids_dir, subject, sessions, images) -> list[Path]:
    """A JSON sidecar for every image written (BIDS-Derivatives): ``Description``,
    ``Sources`` (BIDS URIs of the input files it was computed from), ``SpatialReference``
    (the brain mask that defines the individual space, or the native input's file), a
    mask's ``Type`` and an image's ``Units``."""
    by_ses = {si.session: si for si in sessions}
    order = [si.session for si in sessions]
    brain = f"bids::sub-{subject}/anat/sub-{subject}_space-individual_desc-brain_mask.nii.gz"

    def uris(si, mods=None):
        return [bids.raw_uri(bids_dir, p) for m, p in si.files.items() if mods is None or m in mods]

    out = []
    for path in images:
        path = Path(path)
        m = _IMAGE_NAME.match(path.name)
        if m is None:
            continue
        si = by_ses.get(m["ses"])
        kind = m["label"] or m["desc"]
        meta = {}
        if m["desc"] == "preproc":
            mod = _PREPROC_MODALITY.get((m["suffix"], m["ce"] is not None), m["suffix"])
            mods = {"dwi", "ADC"} if mod in ("dwi", "ADC") else {mod}
            meta["Description"] = {
                "ADC": "apparent diffusion coefficient (trace) in the individual space",
                "dwi": "mean b=0 diffusion image in the individual space (used to register the series)",
            }.get(mod, f"{mod} in the individual space, bias-field corrected and scaled to the normal-"
                       "appearing white-matter peak")
            meta["Units"] = "mm^2/s" if mod == "ADC" else "arbitrary"
            meta["Sources"] = uris(si, mods)
        elif m["suffix"] == "mask" and kind in _MASKS:
            meta["Type"], meta["Description"] = _MASKS[kind]
            meta["Sources"] = (uris(si) if si is not None
                               else [u for s in sessions for u in uris(s, {s.reference})])
        elif m["suffix"] == "dseg" and kind == "lesions":
            meta["Description"] = ("lesion identities: each value > 0 is one lesion, the same value for the "
                                   f"same lesion at every session (lesion_id of sub-{subject}_desc-lesions_stats.tsv)")
            meta["Sources"] = [u for s in sessions for u in uris(s)]
        elif m["suffix"] == "dseg" and kind == "change":
            prev = by_ses[order[order.index(m["ses"]) - 1]]
            meta["Description"] = ("lesion change since the previous session " + prev.session_id
                                   + ": 1 = became lesion, 2 = stopped being lesion (desc-change_dseg.tsv)")
            meta["Sources"] = uris(prev) + uris(si)
        else:
            continue
        if kind != "brain":
            meta["SpatialReference"] = (brain if m["space"] == "individual"
                                        else bids.raw_uri(bids_dir, si.files[si.reference]))
        out.append(write_json(path.parent / (path.name[: -len(".nii.gz")] + ".json"), meta))
    return out


_QC_COLUMNS = {
    "session_id": {"Description": "session of the registered image"},
    "modality": {"Description": "registered contrast (FLAIR, T2w, T1w, ceT1w, dwi)"},
    "fixed": {"Description": "what the image was registered to"},
    "metric": {"Description": "final value of the optimised metric (Mattes mutual information, lower is better)"},
    "stop_condition": {"Description": "the optimiser's stop condition"},
    "iterations": {"Description": "optimiser iterations at the last level"},
    "similarity": {"Description": "post-registration similarity to the fixed image"},
    "flagged": {"Description": "true when the alignment looks wrong"},
    "reason": {"Description": "why the alignment was flagged"},
}
