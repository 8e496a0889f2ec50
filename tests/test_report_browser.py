"""The HTML report as a user sees it: headless Chromium opens it from disk.

The page's own inline script sets ``data-status`` on ``<html>`` after the load event:
``ok`` when every ``<img>`` decoded (``complete && naturalWidth > 0``) and no error
event fired, else ``error: ...``. Chromium's ``--dump-dom`` returns the DOM after
load; ``--enable-logging=stderr`` prints every console message as a ``:CONSOLE``
line, and the page writes none, so any such line is an error.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image as PILImage

from _report_synth import make_result
from lesiontrack.config import load_config
from lesiontrack.report import build_group_report, build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                       "(apt-get install -y chromium); the CI installs it"),
]


def _chromium(tmp_path, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _open(tmp_path, html_path):
    proc = _chromium(tmp_path, "--dump-dom", html_path.resolve().as_uri())
    root = re.search(r"<html[^>]*>", proc.stdout)
    assert root, f"chromium returned no DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return root.group(0), proc.stdout, console


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser")
    return build_report(make_result(), out, load_config()["report"])


def test_report_opens_from_disk_images_load_no_console_error(report, tmp_path):
    root, dom, console = _open(tmp_path, report)
    assert 'data-status="ok"' in root, root
    assert 'data-images="3"' in root
    assert console == [], console
    # the <script> of sessions.tsv is shown as text and never ran
    assert "&lt;script&gt;window.__pwned = 1;" in dom
    assert re.search(r"<title>sub-01 · lesion evolution</title>", dom)


def test_report_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.resolve().as_uri())
    assert shot.exists(), proc.stderr[-2000:]
    with PILImage.open(shot) as im:
        assert im.size == (1280, 2400)
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    # the page is not blank: the grid's black panels and the white page are both there
    assert arr.std() > 20
    assert (arr < 30).mean() > 0.05 and (arr > 240).mean() > 0.2


def test_status_check_detects_a_broken_image(report, tmp_path):
    """Negative control: the page reports a figure that cannot be decoded."""
    html = report.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    root, _, _ = _open(tmp_path, broken)
    assert 'data-status="error: 1 image(s) not loaded' in root, root


def test_group_report_opens(report, tmp_path):
    cohort = make_result().sessions.assign(participant_id="sub-01")
    group = build_group_report(report.parent, cohort, load_config()["report"])
    root, dom, console = _open(tmp_path, group)
    assert 'data-status="ok"' in root and 'data-images="1"' in root, root
    assert console == [], console
    assert 'href="sub-01.html"' in dom
