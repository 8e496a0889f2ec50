"""HTML assembly: the Jinja2 environment (autoescaping), tables and the methods text."""
from __future__ import annotations

import base64
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from .. import __version__

__all__ = ["render", "table", "methods_paragraphs"]

_STEPS = (  # config section -> what the step does (the methods text)
    ("registration", "Every contrast was rigidly aligned to its visit's reference (FLAIR, else "
                     "T2w) and every visit to an unbiased subject space; each image was resampled "
                     "once from its native data"),
    ("preprocess", "Images were bias-field corrected and intensity-normalised to the normal-"
                   "appearing white-matter peak within a brain mask, with tissue priors from the "
                   "MNI152 templates"),
    ("segment", "T2/FLAIR lesions, diffusion restriction, T1 black holes and gadolinium "
                "enhancement were segmented at every visit; within the lesions, restricted "
                "diffusion (ADC, fitted on b-values up to adc_fit_b_max, below adc_max_restricted, "
                "bright on b1000) and black holes (T1w "
                "darker than the grey-matter peak by blackhole_gm_z half-widths) were grown from "
                "such voxels to their partial-volume edge"),
    ("track", "Lesions were matched across visits to give each one identity, and classified per "
              "interval as new, enlarging, stable, shrinking or resolved: a change had to exceed "
              "each lesion's minimum detectable change and, with images at both visits, be "
              "measured on the subtraction image (boundary shift integral, against a relative "
              "and a noise threshold); a region a visit's segmentation missed but a "
              "neighbouring visit found was kept where it reached the growth level "
              "(rescue_missed)"),
)


def _status_script() -> str:
    return (resources.files("lesiontrack.report") / "templates" / "status.js").read_text("utf-8")


def _env() -> Environment:
    env = Environment(loader=PackageLoader("lesiontrack.report", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    return env


def render(template: str, **context) -> str:
    """Render ``template`` with autoescaping; adds the status script and its CSP hash."""
    js = _status_script()
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    return _env().get_template(template).render(
        status_js=Markup(js), script_hash=f"sha256-{digest}", version=__version__, **context)


def _fmt(v, col: str) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and not col.endswith("mm3"):
            return f"{v:.0f}" if abs(v) >= 10 or col.endswith("count") else f"{v:g}"
        return f"{v:,.1f}" if col.endswith("mm3") else f"{v:.4g}"
    return str(v)


def table(df: pd.DataFrame, flag_column: str | None = None, max_rows: int | None = None) -> dict:
    """A table for the templates: ``columns``, ``rows`` (strings, escaped later), ``flags``."""
    if df is None:
        df = pd.DataFrame()
    shown = df if max_rows is None else df.head(max_rows)
    flags = [False] * len(shown)
    if flag_column and flag_column in shown.columns:
        f = shown[flag_column].astype("string").str.lower().isin(["true", "1", "yes"])
        flags = f.fillna(False).tolist()
    rows = [[_fmt(v, str(c)) for c, v in zip(shown.columns, rec)]
            for rec in shown.itertuples(index=False, name=None)]
    return dict(columns=[str(c) for c in shown.columns], rows=rows, flags=flags,
                n_total=len(df), n_shown=len(shown))


def _settings(section) -> str:
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat.append(f"{prefix}{k} = {v}")
    if isinstance(section, dict):
        walk(section)
    return "; ".join(flat)


def _imputed_text(imputed: dict, target: str, by: str) -> str:
    """'Without T2w, ses-2 was segmented with a T2w imputed from ses-1 plus ...' (methods)."""
    return f"Without {target}, " + "; ".join(
        f"{ses} was segmented with a {target} imputed from {src} plus the significant {by} change"
        for ses, src in imputed.items())


def methods_paragraphs(result) -> list:
    """The methods text, generated from the run's configuration and software versions.

    Returns a list of ``dict(text, settings)``: a sentence per processing step and the
    step's settings as given in the configuration (``key = value; ...``).
    """
    cfg, prov = result.config or {}, result.provenance or {}
    sids = list(result.session_ids)
    mods = sorted({m for s in sids for m in result.images.get(s, {})})
    version = prov.get("lesiontrack_version") or (prov.get("versions") or {}).get("lesiontrack") \
        or __version__
    first = (f"Images of sub-{result.subject} ({len(sids)} visit{'s' if len(sids) != 1 else ''}: "
             f"{', '.join(sids)}; contrasts {', '.join(mods) or 'none'}) were processed with "
             f"lesiontrack {version}")
    if prov.get("config_hash"):
        first += f" (pipeline configuration {prov['config_hash']})"
    paras = [dict(text=first + ".", settings="")]
    for key, text in _STEPS:
        if key in cfg:
            paras.append(dict(text=text, settings=_settings(cfg[key])))
    imputed = prov.get("flair_imputed_from") or {}
    if imputed:
        paras.append(dict(text=_imputed_text(imputed, "FLAIR", "T2w") + " (lesiontrack.segment."
                          "impute_flair); lesion change was tested on T2w, the contrast every "
                          "visit has.", settings=""))
    elif sids and mods and "FLAIR" not in mods:
        paras.append(dict(text="No visit had FLAIR: lesions were segmented from T2w (and T1w) with the "
                          "CSF spaces and their partial-volume rims left out, which finds fewer "
                          "lesions, periventricular ones especially, than with FLAIR.", settings=""))
    t2w_imputed = prov.get("t2w_imputed_from") or {}
    if t2w_imputed:
        paras.append(dict(text=_imputed_text(t2w_imputed, "T2w", "FLAIR") + " (lesiontrack.segment."
                          "impute_t2w), so that every visit's lesions were scored on the same "
                          "contrasts.", settings=""))
    unseen = prov.get("brain_unobserved_fraction") or {}
    if unseen:
        paras.append(dict(text="The field of view of " + "; ".join(
            f"{ses} missed {100 * f:.2g} % of the brain" for ses, f in unseen.items())
            + ": lesions there were carried from the nearest visit that observed them (stable, "
            "with their last observed volume; observed_fraction in the lesions table) "
            "instead of being called resolved and new again (lesiontrack.track."
            "carry_unobserved).", settings=""))
    inputs = prov.get("inputs") or {}
    if inputs:
        paras.append(dict(text="Input files: " + "; ".join(
            f"{ses}: " + ", ".join(Path(f).name for f in files.values()) for ses, files in inputs.items())
            + ".", settings=""))
    adc = prov.get("adc") or {}
    if adc:
        paras.append(dict(text="ADC: " + "; ".join(
            f"{ses} fitted on b = {', '.join(f'{b:g}' for b in a['fitted_b_values'])} s/mm²"
            if "fitted_b_values" in a else f"{ses} a ready map stored in {a.get('ready_map_unit')}"
            for ses, a in adc.items()) + ".", settings=""))
    vers = prov.get("versions") or {}
    if vers:
        paras.append(dict(text="Software: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
                          settings=""))
    other = {k: v for k, v in prov.items()
             if k not in ("versions", "config_hash", "lesiontrack_version", "version", "subject")
             and v is not None and not isinstance(v, (dict, list))}
    if other:
        paras.append(dict(text="Run: " + "; ".join(f"{k} = {v}" for k, v in other.items()) + ".",
                          settings=""))
    return paras
