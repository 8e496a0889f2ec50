"""The whole pipeline on a phantom whose anatomy is not the atlas.

The phantom is drawn on the MNI152 template, the atlas the segmentation carries into
each subject by an affine registration; on it the atlas fits exactly. Real brains differ
from the template by a few millimetres after an affine alignment, so here the phantom's
anatomy is warped by a random smooth deformation of 4 mm RMS
(``make_phantom(anatomy_warp_mm=4)``, ``lesiontrack phantom --warp 4``) and the run is
scored against its truth.
"""
from __future__ import annotations

import pytest

from lesiontrack import pipeline
from lesiontrack.config import load_config
from lesiontrack.evaluate import evaluate_run
from lesiontrack.phantom import make_phantom

pytestmark = pytest.mark.slow


def test_pipeline_on_an_anatomy_warped_away_from_the_atlas(tmp_path):
    """Measured (2 mm, seed 3): status 92.0 % (92.0 % unwarped), lesion-wise recall 0.96
    (0.94), precision 0.43 (0.96): grey matter the affine-carried atlas takes for white
    matter is found brighter than white matter, the known cost of an atlas carried by an
    affine registration only."""
    make_phantom(tmp_path, n_subjects=1, seed=3, resolution=2, anatomy_warp_mm=4.0)
    out = tmp_path / "out"
    pipeline.run_subject(tmp_path / "bids", "01", out, load_config(), write_report=False)
    sc = evaluate_run(out, tmp_path / "truth", tmp_path / "bids")["01"]
    seg = sc["segmentation"]
    print(seg[["session_id", "lesion_dice", "lesion_f1", "lesion_precision", "lesion_recall"]].round(3)
          .to_string(index=False), sc["status"])
    assert sc["status"]["accuracy"] >= 0.9
    assert seg["lesion_recall"].mean() >= 0.9
    assert seg["lesion_precision"].mean() >= 0.35
