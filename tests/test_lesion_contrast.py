"""The whole pipeline on lesions of lower contrast (a known limit, README "Known limits").

``make_phantom(lesion_contrast="low")`` (``lesiontrack phantom --lesion-contrast low``)
draws FLAIR grey matter at 1.15 times white matter instead of 1.25 and lesions at
1.30-1.60 on FLAIR and 1.50-1.90 on T2w instead of 1.55-2.0 and 1.7-2.3, nearer the real
cross-sectional patient's FLAIR (grey matter 1.10, lesion mean 1.31). Juxtacortical lesions
are then barely brighter than grey matter on T2w, and the T2w factor of the lesion score
vetoes some of them: the status falls below the 90 % the standard phantoms reach. These
bounds hold the measured figures, so that the limit cannot worsen unseen.
"""
from __future__ import annotations

import pytest

from lesiontrack import pipeline
from lesiontrack.config import load_config
from lesiontrack.evaluate import evaluate_run
from lesiontrack.phantom import make_phantom

pytestmark = pytest.mark.slow


def test_pipeline_on_lesions_of_lower_contrast(tmp_path):
    """Measured (2 mm, seed 3): status 82.4 %, lesion-wise precision 0.908, recall 0.859,
    Dice 0.690 (standard contrast: 92.0 %, 0.953, 0.961, 0.777); the misses are
    juxtacortical."""
    root = tmp_path / "phantom"
    info = make_phantom(root, n_subjects=1, seed=3, resolution=2, lesion_contrast="low")
    assert info["lesion_contrast"] == "low"
    out = tmp_path / "out"
    pipeline.run_subject(root / "bids", "01", out, load_config(), write_report=False)
    sc = evaluate_run(out, root / "truth", root / "bids")["01"]
    seg, status = sc["segmentation"], sc["status"]
    print(status, seg[["session_id", "lesion_dice", "lesion_precision", "lesion_recall"]]
          .round(3).to_string(index=False))
    assert status["accuracy"] >= 0.8
    assert seg["lesion_precision"].mean() >= 0.85
    assert seg["lesion_recall"].mean() >= 0.8
