"""The whole pipeline on skull-stripped input, and on visits that mix stripped and raw images.

Many datasets come brain-extracted (zero outside the brain, as BET, HD-BET or SynthStrip
leave them), and a cohort gathered from several sites can hold a subject whose visits were
stripped at one site and not at another. ``make_phantom(skull=False)`` draws the same
subject (lesions, head poses, noise) as with ``skull=True``, without the skull and scalp;
its truth is the same, so visits of the two can be mixed.
"""
from __future__ import annotations

import json
import shutil

import pytest

from lesiontrack import pipeline
from lesiontrack.config import load_config
from lesiontrack.evaluate import evaluate_run
from lesiontrack.phantom import make_phantom

pytestmark = pytest.mark.slow

SEED = 3


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripped")
    make_phantom(root, n_subjects=1, seed=SEED, resolution=2, skull=False)
    return root


def _run(root, out):
    pipeline.run_subject(root / "bids", "01", out, load_config(), write_report=False)
    sc = evaluate_run(out, root / "truth", root / "bids")["01"]
    seg, status = sc["segmentation"], sc["status"]
    print(sc["registration"]["max_mm"].max(), status,
          seg[["session_id", "lesion_dice", "lesion_f1"]].round(3).to_string(index=False))
    return sc


def test_pipeline_on_skull_stripped_input(stripped, tmp_path):
    """Measured (2 mm, seed 3): status 92.0 %, lesion-wise precision 0.975, recall 0.963,
    Dice 0.776 (with skull and scalp: 92.0 %, 0.953, 0.961, 0.777). The input is found
    stripped (provenance), so the brain is the images' support: before the native images
    decided, this subject's across-session mean (2.05 L) was taken for a head and the atlas
    drew the brain: 92.0 %, 0.975, 0.971, 0.778."""
    out = tmp_path / "out"
    sc = _run(stripped, out)
    assert sc["registration"]["max_mm"].max() < 1.0
    assert sc["status"]["accuracy"] >= 0.9
    assert sc["segmentation"]["lesion_f1"].mean() >= 0.9
    prov = json.loads((out / "sub-01" / "sub-01_provenance.json").read_text())
    assert prov["skullstripped"] is True


def test_pipeline_on_visits_mixing_stripped_and_raw_images(stripped, tmp_path):
    """Visits 2 and 4 skull-stripped, the others raw (the same subject and truth).
    Taken as raw (the atlas draws the brain). Measured: status 91.2 %, lesion-wise
    precision 0.944, recall 0.941, Dice 0.771."""
    root = tmp_path / "mixed"
    make_phantom(root, n_subjects=1, seed=SEED, resolution=2, skull=True)
    for ses in ("ses-02", "ses-04"):
        dst = root / "bids" / "sub-01" / ses
        shutil.rmtree(dst)
        shutil.copytree(stripped / "bids" / "sub-01" / ses, dst)
    out = tmp_path / "out"
    sc = _run(root, out)
    assert json.loads((out / "sub-01" / "sub-01_provenance.json").read_text())["skullstripped"] is False
    assert sc["registration"]["max_mm"].max() < 1.0
    assert sc["status"]["accuracy"] >= 0.9
    assert sc["segmentation"]["lesion_f1"].mean() >= 0.9
