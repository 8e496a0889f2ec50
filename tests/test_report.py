"""Tests of the evolution report: figures, HTML, escaping, rebuilding from derivatives."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from _report_synth import DATES, SCRIPT, make_result
from lesiontrack._io import write_json, write_tsv
from lesiontrack.bids import deriv_path
from lesiontrack.config import load_config
from lesiontrack.image import save_image
from lesiontrack.report import (EvolutionFigure, ReportError, build_group_report, build_report,
                                choose_slices, evolution_figure, load_result, plot_figure)
from lesiontrack.report._evolution import _AxialView, status_maps
from lesiontrack.report._group import cohort_summary
from lesiontrack.report._plots import swimmer_figure, trajectory_figure
from lesiontrack.report._util import STATUSES, interval_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def result():
    return make_result()


@pytest.fixture(scope="module")
def cfg():
    return load_config()["report"]


@pytest.fixture(scope="module")
def fast(cfg):
    """Fewer slices and pixels, for tests about content rather than looks."""
    return dict(cfg, n_slices=2, dpi=50)


# --- slice choice -----------------------------------------------------------------------
def test_choose_slices_picks_the_slice_of_largest_change(result, cfg):
    picks = choose_slices(result, cfg=cfg)
    assert 1 <= len(picks) <= cfg["n_slices"]
    # independent score: changed voxels per axial slice (array axis 2 here), lesions at any visit
    changed = sum(np.count_nonzero(c, axis=(0, 1)) for c in result.change if c is not None)
    lesional = np.count_nonzero(np.any(np.stack(result.labels) > 0, axis=0), axis=(0, 1))
    score = changed + cfg["lesion_weight"] * lesional
    assert int(np.argmax(score)) in picks
    assert all(score[k] >= cfg["min_score_fraction"] * score.max() for k in picks)
    assert len(set(picks)) == len(picks)


def test_choose_slices_without_lesions_spreads_through_the_brain(cfg):
    r = make_result()
    r.labels = [np.zeros_like(lab) for lab in r.labels]
    r.change = [None] + [np.zeros_like(c) for c in r.change[1:]]
    picks = choose_slices(r, n=3, cfg=cfg)
    brain_z = np.flatnonzero(r.brain_mask.any(axis=(0, 1)))
    assert len(picks) == 3 and all(brain_z[0] < k < brain_z[-1] for k in picks)


# --- evolution grid -------------------------------------------------------------------
def test_evolution_grid_layout_columns_are_visits(result, cfg):
    ev = evolution_figure(result, cfg=cfg)
    assert isinstance(ev, EvolutionFigure)
    assert ev.contrasts == ["FLAIR", "b1000", "T1w", "ceT1w"]  # b1000 preferred over ADC
    assert ev.axes.shape == (len(ev.slices) * 4, len(result.session_ids))
    titles = [ax.get_title() for ax in ev.axes[0]]
    for t, sid, date in zip(titles, result.session_ids, DATES):
        assert sid in t and date in t
    assert "baseline" in titles[0] and "+9 mo" in titles[1]
    assert "+10 mo" in titles[2] and "+3 wk" in titles[2]  # since baseline, and since B
    assert "+27 mo" in titles[4]


def test_evolution_grid_given_slices_and_bad_slices(result, cfg):
    ev = evolution_figure(result, slices=[10, 20], cfg=cfg)
    assert ev.slices == [10, 20] and ev.axes.shape[0] == 8
    with pytest.raises(ReportError, match="slice"):
        evolution_figure(result, slices=[500], cfg=cfg)


def test_evolution_grid_absent_contrasts(cfg):
    r = make_result(contrasts=("FLAIR", "T1w"))
    del r.images["ses-03"]["T1w"]
    ev = evolution_figure(r, slices=[18], cfg=cfg)
    assert ev.contrasts == ["FLAIR", "T1w"]
    assert ev.axes.shape == (2, 5)
    texts = [t.get_text() for t in ev.axes[1, 2].texts]
    assert any("not" in t and "acquired" in t for t in texts)


def test_evolution_grid_veils_what_a_visit_did_not_observe(cfg):
    """A visit whose field of view missed part of the brain: that part is veiled in its
    panels (its lesions there are carried) and the legend says so; other visits are not."""
    import dataclasses

    from lesiontrack.report._evolution import _UNSEEN_RGBA

    r = make_result(contrasts=("FLAIR",))
    seen = np.ones(r.brain_mask.shape, bool)
    seen[:, : seen.shape[1] // 2] = False             # ses-03 missed half of every slice
    r = dataclasses.replace(r, observed=[None, None, seen, None, None])
    ev = evolution_figure(r, slices=[18], cfg=cfg)

    def veils(ax):
        return [im for im in ax.get_images() if im.get_array().ndim == 3
                and np.allclose(im.get_array()[..., :3].max(axis=(0, 1)), _UNSEEN_RGBA[:3])]

    assert len(veils(ev.axes[0, 2])) == 1 and not veils(ev.axes[0, 1])
    legend = [t.get_text() for t in ev.figure.legends[0].get_texts()]
    assert "outside the visit's view (carried)" in legend
    plain = evolution_figure(make_result(contrasts=("FLAIR",)), slices=[18], cfg=cfg)
    assert "outside the visit's view (carried)" not in [t.get_text() for t in plain.figure.legends[0].get_texts()]


def test_outline_colours_follow_status(result, cfg):
    codes = {s: i + 1 for i, s in enumerate(STATUSES)}
    lut = status_maps(result, 1)  # ses-02: lesion 2 new, 1 stable, 3 shrinking
    assert lut[2] == codes["new"] and lut[1] == codes["stable"] and lut[3] == codes["shrinking"]
    ev = evolution_figure(result, slices=[12, 18], cfg=cfg)
    from matplotlib.colors import to_rgba

    def drawn(ax):
        return {tuple(np.round(col, 3)) for c in ax.collections if c.get_gid() == "status-outlines"
                for col in c.get_edgecolor()}

    def colour(s):
        return tuple(np.round(to_rgba(cfg["status_colors"][s]), 3))
    # ses-03 (column 2): lesion 4 is new (slice 12), lesion 2 enlarging (slice 18); FLAIR rows 0, 4
    assert drawn(ev.axes[0, 2]) == {colour("new")}
    # slice 18 also cuts the stable lesion 1
    assert drawn(ev.axes[4, 2]) == {colour("enlarging"), colour("stable")}
    assert drawn(ev.axes[4, 3]) == {colour("shrinking"), colour("stable")}  # ses-04
    assert drawn(ev.axes[4, 4]) == {colour("stable")}  # ses-05: lesion 2 resolved, not outlined


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, 1), (-1, -1, 1), (1, 1, -1)])
def test_axial_view_independent_of_array_orientation(order, flips):
    """The same world content shows the same panel whatever the array layout."""
    rng = np.random.default_rng(1)
    ras = rng.random((6, 7, 5)).astype(np.float32)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    ref = _AxialView(aff).slice(ras, 2)
    # permute axes / flip them, with the matching affine
    arr = ras
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for ax, f in enumerate(flips):
        if f < 0:
            arr = np.flip(arr, axis=ax)
    arr = np.transpose(arr, order)
    for new_ax, old_ax in enumerate(order):
        m[old_ax, new_ax] = flips[old_ax] * aff[old_ax, old_ax]
        if flips[old_ax] < 0:
            m[old_ax, 3] = aff[old_ax, old_ax] * (ras.shape[old_ax] - 1)
    view = _AxialView(m)
    k = 2 if flips[2] > 0 else ras.shape[2] - 1 - 2
    np.testing.assert_array_equal(view.slice(arr, k), ref)
    assert (view.sx, view.sy) == (2.0, 3.0)


def test_radiological_convention_puts_patient_right_on_the_left():
    vol = np.zeros((10, 8, 3), np.float32)
    vol[8, 4, 1] = 1  # large i = patient's right in a RAS grid
    aff = np.eye(4)
    rad = _AxialView(aff, "radiological").slice(vol, 1)
    neu = _AxialView(aff, "neurological").slice(vol, 1)
    assert np.argwhere(rad)[0, 1] < rad.shape[1] / 2 < np.argwhere(neu)[0, 1]
    with pytest.raises(ReportError, match="orientation"):
        _AxialView(aff, "sideways")


# --- trajectory and swimmer plots -----------------------------------------------------
def test_trajectory_figure_has_edss_axis_and_event_markers(result, cfg):
    fig = trajectory_figure(result, cfg)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "EDSS" in labels and "lesion volume (mL)" in labels and "lesions" in labels
    n_events = int((result.sessions["event"].astype(str).str.strip() != "").sum())
    main = fig.axes[0]
    vlines = [ln for ln in main.lines if ln.get_linestyle() == ":"]
    assert len(vlines) == n_events == 4
    numbered = [t.get_text() for t in main.texts]
    assert numbered == [str(i) for i in range(1, n_events + 1)]
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "plasma exchange" in notes


def test_trajectory_figure_without_dates_or_clinical_columns(cfg):
    r = make_result(n_sessions=3)
    r.sessions = r.sessions.drop(columns=["edss", "event"]).assign(acq_time="n/a")
    fig = trajectory_figure(r, cfg)
    assert "EDSS" not in [ax.get_ylabel() for ax in fig.axes]
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == r.session_ids


def test_unmeasured_activity_is_not_drawn_as_zero(cfg):
    r = make_result(n_sessions=3)
    r.sessions = r.sessions.assign(restricted_volume_mm3=np.nan, enhancing_count=[np.nan, 0, 0])
    ax = trajectory_figure(r, cfg).axes[2]  # axes: volume, count, activity, then the EDSS twin
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "restricted diffusion: not measured" in labels and "black holes" in labels
    enh = next(ln for ln in ax.lines if ln.get_label() == "enhancing").get_ydata()
    assert np.isnan(enh[0]) and np.all(np.isfinite(enh[1:]))
    assert ax.get_ylabel() == "volume (mm\u00b3)"  # small volumes in mm3


def test_swimmer_one_row_per_lesion(result, cfg):
    fig = swimmer_figure(result, cfg)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L1", "L3", "L2", "L4"]
    few = dict(cfg, swimmer_max_lesions=2)
    ax = swimmer_figure(result, few).axes[0]
    assert len(ax.get_yticklabels()) == 2 and "largest 2 of 4" in ax.get_title()


def test_plot_figure_formats_and_errors(result, tmp_path, cfg, fast):
    for name, ext in (("evolution", ".pdf"), ("trajectories", ".svg"), ("swimmer", ".png")):
        p = plot_figure(result, name, tmp_path / f"f{ext}", cfg=fast)
        assert p.exists() and p.stat().st_size > 1000
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:500]
    with pytest.raises(ReportError, match="must be one of"):
        plot_figure(result, "histogram", tmp_path / "x.png", cfg=cfg)
    with pytest.raises(ReportError, match="must end in"):
        plot_figure(result, "swimmer", tmp_path / "x.jpg", cfg=cfg)


def test_dollar_signs_in_events_are_not_mathtext(cfg):
    r = make_result(event_text="copay $100 and $200")
    fig = trajectory_figure(r, cfg)
    fig.canvas.draw()  # would raise on malformed mathtext


def test_interval_text():
    assert interval_text(0) == "+0 d" and interval_text(21) == "+3 wk"
    assert interval_text(517) == "+17 mo" and interval_text(4 * 365.25) == "+4.0 y"


# --- the HTML report ------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(result, tmp_path_factory, cfg):
    out = tmp_path_factory.mktemp("report")
    return out, build_report(result, out, cfg)


def test_report_files_and_self_contained(built):
    out, html_path = built
    assert html_path == out / "sub-01.html"
    figs = out / "sub-01" / "figures"
    for name in ("evolution.png", "evolution.pdf", "trajectories.png", "swimmer.png"):
        assert (figs / f"sub-01_{name}").stat().st_size > 1000
    with PILImage.open(figs / "sub-01_evolution.png") as im:
        assert im.mode == "P"  # palette-quantised
    html = html_path.read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:|file:|//)', html)
    assert html_path.stat().st_size < 1024 * 1024
    assert not list(out.rglob(".tmp-*"))


def test_report_escapes_sessions_text(built):
    html = built[1].read_text()
    assert SCRIPT not in html
    assert "&lt;script&gt;window.__pwned = 1;" in html
    assert html.count("<script>") == 1  # the page's own status script only


def test_report_tables_qc_flags_and_methods(built, result):
    html = built[1].read_text()
    assert re.search(r'<tr class="flag"><td[^>]*>ses-03</td><td[^>]*>T1w</td>', html)
    assert html.count('<tr class="flag">') == int(result.qc["flagged"].sum())
    assert "1 flagged" in html
    for col in ("edss", "event", "lesion_volume_mm3", "blackhole_mm3", "similarity"):
        assert f"<th>{col}</th>" in html
    assert "bins = 32" in html and "SimpleITK 2.3.1" in html and "abc123" in html


def test_report_with_given_slices(result, tmp_path, fast):
    p = build_report(result, tmp_path, fast, slices=[12])
    assert "slice indices 12;" in p.read_text()


def test_report_single_visit_without_lesions(tmp_path, fast):
    r = make_result(n_sessions=1)
    r.labels = [np.zeros_like(r.labels[0])]
    r.lesions = pd.DataFrame()
    r.sessions = r.sessions.assign(lesion_count=0, lesion_volume_mm3=0.0, new_count=0)
    html = build_report(r, tmp_path, fast).read_text()
    assert "0 lesions tracked" in html and html.count("data:image/png;base64,") == 3
    ax = swimmer_figure(r, fast).axes[0]
    assert [t.get_text() for t in ax.texts] == ["no lesions"]


# --- rebuilding from derivatives --------------------------------------------------------
def _write_derivatives(r, out: Path):
    sub = r.subject
    for i, sid in enumerate(r.session_ids):
        for mod, img in r.images[sid].items():
            kw = dict(desc="preproc", suffix="dwi" if mod == "b1000" else mod)
            dt = "dwi" if mod in ("ADC", "b1000") else "anat"
            if mod == "ceT1w":
                kw = dict(ce="gadolinium", desc="preproc", suffix="T1w")
            save_image(img, deriv_path(out, sub, sid, dt, space="individual", **kw))
        g = r.grid
        save_image(g.with_data(r.labels[i], is_label=True),
                   deriv_path(out, sub, sid, "anat", space="individual", desc="lesions", suffix="dseg"))
        if r.change[i] is not None:
            save_image(g.with_data(r.change[i], is_label=True),
                       deriv_path(out, sub, sid, "anat", space="individual", desc="change", suffix="dseg"))
        for m in ("restricted", "blackhole", "enhancing"):
            save_image(g.with_data(getattr(r, m)[i].astype(np.uint8), is_label=True),
                       deriv_path(out, sub, sid, "anat", space="individual", label=m, suffix="mask"))
    write_tsv(out / f"sub-{sub}" / f"sub-{sub}_desc-sessions_stats.tsv", r.sessions)
    write_tsv(out / f"sub-{sub}" / f"sub-{sub}_desc-lesions_stats.tsv", r.lesions)
    write_tsv(out / f"sub-{sub}" / f"sub-{sub}_desc-registration_qc.tsv", r.qc)
    write_json(out / f"sub-{sub}" / f"sub-{sub}_provenance.json", dict(r.provenance, config=r.config))


def test_load_result_round_trip(result, tmp_path, fast):
    _write_derivatives(result, tmp_path)
    back = load_result(tmp_path, "sub-01")
    assert back.subject == "01" and back.session_ids == result.session_ids
    assert back.grid.same_grid(result.grid)
    for a, b in zip(back.labels, result.labels):
        np.testing.assert_array_equal(a, b)
    assert back.change[0] is None
    np.testing.assert_array_equal(back.change[2], result.change[2])
    np.testing.assert_array_equal(back.blackhole[3], result.blackhole[3])
    assert set(back.images["ses-02"]) == {"FLAIR", "T1w", "ceT1w", "b1000", "ADC"}
    np.testing.assert_allclose(back.images["ses-02"]["FLAIR"].data, result.images["ses-02"]["FLAIR"].data,
                               atol=1e-6)
    assert back.config == result.config and back.provenance["config_hash"] == "abc123"
    pd.testing.assert_frame_equal(back.lesions[["lesion_id", "session_id", "status"]],
                                  result.lesions[["lesion_id", "session_id", "status"]])
    assert back.sessions["event"].iloc[1] == SCRIPT
    # the Otsu brain mask recovers the synthetic brain
    dice = 2 * np.sum(back.brain_mask & result.brain_mask) / (back.brain_mask.sum() + result.brain_mask.sum())
    assert dice > 0.95
    html = build_report(back, tmp_path, fast).read_text()
    assert "&lt;script&gt;" in html and "ADC" in html
    assert back.observed is None                       # every visit observed everything
    seen = result.brain_mask.copy()
    seen[:, :10] = False
    save_image(result.grid.with_data(seen.astype(np.uint8), is_label=True),
               deriv_path(tmp_path, "01", "ses-04", "anat", space="individual", desc="observed",
                          suffix="mask"))
    back = load_result(tmp_path, "sub-01")
    assert [o is None for o in back.observed] == [True, True, True, False, True]
    np.testing.assert_array_equal(back.observed[3], seen)


def test_load_result_errors(tmp_path):
    with pytest.raises(ReportError, match="no derivatives for sub-zz"):
        load_result(tmp_path, "zz")
    (tmp_path / "sub-zz").mkdir()
    with pytest.raises(ReportError, match="desc-sessions_stats.tsv"):
        load_result(tmp_path, "zz")


# --- group level ----------------------------------------------------------------------
def test_group_report(result, tmp_path, cfg):
    s1 = result.sessions.assign(participant_id="sub-01")
    s2 = make_result(n_sessions=3).sessions.assign(participant_id="sub-02")
    cohort = pd.concat([s1, s2], ignore_index=True)
    (tmp_path / "sub-01.html").write_text("<html></html>")  # a subject report to link to
    p = build_group_report(tmp_path, cohort, cfg)
    html = p.read_text()
    assert p == tmp_path / "group.html" and (tmp_path / "figures" / "group_cohort.png").exists()
    assert 'href="sub-01.html"' in html and 'href="sub-02.html"' not in html
    assert SCRIPT not in html and "&lt;script&gt;" in html
    summ = cohort_summary(cohort).set_index("participant_id")
    years = (pd.Timestamp(DATES[4]) - pd.Timestamp(DATES[0])).days / 365.25
    assert summ.loc["sub-01", "visits"] == 5 and summ.loc["sub-02", "visits"] == 3
    assert summ.loc["sub-01", "new_lesions"] == 2  # lesion 2 at ses-02, lesion 4 at ses-03
    assert summ.loc["sub-01", "new_per_year"] == pytest.approx(2 / years, rel=1e-3)
    with pytest.raises(ReportError, match="participant_id"):
        build_group_report(tmp_path, cohort.drop(columns="participant_id"), cfg)


def test_report_png_is_small_and_keeps_the_outline_colours(built, cfg):
    png = built[0] / "sub-01" / "figures" / "sub-01_evolution.png"
    assert png.stat().st_size < 400 * 1024
    with PILImage.open(png) as im:
        assert im.mode == "P" and im.size[0] < 1200
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 16)}
    # the palette keeps the rare status colours exactly (a plain median cut merges them)
    for status in ("new", "enlarging", "stable", "shrinking"):
        hexcol = cfg["status_colors"][status].lstrip("#")
        assert tuple(int(hexcol[i:i + 2], 16) for i in (0, 2, 4)) in colours, status


def test_methods_say_how_visits_without_flair_were_segmented(result):
    """The methods text names the visits segmented with an imputed FLAIR (or T2w), or says
    that no visit had FLAIR; with every FLAIR it says neither."""
    import dataclasses

    from lesiontrack.report._html import methods_paragraphs

    def text(res):
        return " ".join(p["text"] for p in methods_paragraphs(res))

    assert "imputed" not in text(result) and "No visit had FLAIR" not in text(result)
    # the lesion parts' definitions, with the names of their settings
    assert "darker than the grey-matter peak by blackhole_gm_z" in text(result)
    prov = dict(result.provenance, flair_imputed_from={"ses-02": "ses-01"})
    t = text(dataclasses.replace(result, provenance=prov))
    assert "ses-02 was segmented with a FLAIR imputed from ses-01" in t
    images = {s: {m: a for m, a in im.items() if m != "FLAIR"} for s, im in result.images.items()}
    assert "No visit had FLAIR" in text(dataclasses.replace(result, images=images))
    prov = dict(result.provenance, t2w_imputed_from={"ses-03": "ses-02"})
    t = text(dataclasses.replace(result, provenance=prov))
    assert "ses-03 was segmented with a T2w imputed from ses-02" in t
    assert "field of view" not in text(result)
    prov = dict(result.provenance, brain_unobserved_fraction={"ses-02": 0.163})
    t = text(dataclasses.replace(result, provenance=prov))
    assert "The field of view of ses-02 missed 16 % of the brain" in t and "carried" in t


def test_methods_name_the_input_files_and_the_adc_fit(result):
    import dataclasses

    from lesiontrack.report._html import methods_paragraphs

    prov = dict(result.provenance,
                inputs={"ses-01": {"FLAIR": "/data/sub-01/ses-01/anat/sub-01_ses-01_acq-3D_FLAIR.nii.gz",
                                   "dwi": "/data/sub-01/ses-01/dwi/sub-01_ses-01_dwi.nii.gz"},
                        "ses-02": {"T2w": "/data/sub-01/ses-02/anat/sub-01_ses-02_T2w.nii"}},
                adc={"ses-01": {"fitted_b_values": [0.0, 1000.0]}, "ses-02": {"ready_map_unit": "1e-6 mm^2/s"}})
    t = " ".join(p["text"] for p in methods_paragraphs(dataclasses.replace(result, provenance=prov)))
    assert ("Input files: ses-01: sub-01_ses-01_acq-3D_FLAIR.nii.gz, sub-01_ses-01_dwi.nii.gz; "
            "ses-02: sub-01_ses-02_T2w.nii.") in t
    assert "ADC: ses-01 fitted on b = 0, 1000 s/mm²; ses-02 a ready map stored in 1e-6 mm^2/s." in t
