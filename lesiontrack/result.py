"""The in-memory result of one subject's run, as the report and the writers use it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .image import Image

__all__ = ["SubjectResult"]


@dataclass
class SubjectResult:
    """Everything produced for one subject, in the individual (subject) space.

    Attributes
    ----------
    subject : str
        Label without ``sub-``.
    session_ids : list of str
        e.g. ``["ses-01", "ses-02"]``, in time order (as in ``sessions.tsv``).
    grid : Image
        The individual space (its data: mean of the aligned session references).
    images : dict
        ``images[session_id][modality] -> Image`` preprocessed, in the individual grid
        (modalities: FLAIR, T2w, T1w, ceT1w, b1000, ADC; missing ones absent).
    labels : list of ndarray (int32)
        Lesion-ID map per session (same ID = same lesion).
    change : list of ndarray (uint8) or None
        Per session; None for the first (1 = became lesion, 2 = stopped being lesion).
    restricted, blackhole, enhancing : list of ndarray (bool)
        Per-session masks (all-False where the contrast was missing).
    brain_mask : ndarray (bool)
    sessions : DataFrame
        The ``desc-sessions_stats`` table (contract columns + clinical columns).
    lesions : DataFrame
        The ``desc-lesions_stats`` table.
    qc : DataFrame
        Registration QC: session_id, modality, metric, stop_condition, iterations,
        similarity, flagged, reason.
    config : dict
        The resolved pipeline configuration.
    provenance : dict
        Versions, seeds, timing.
    observed : list of (ndarray (bool) or None) or None
        Per session, where its FLAIR/T2w observed the tissue (None: everywhere); lesions
        outside it are carried from the nearest visit that observed them.
    """

    subject: str
    session_ids: list
    grid: Image
    images: dict
    labels: list
    change: list
    restricted: list
    blackhole: list
    enhancing: list
    brain_mask: np.ndarray
    sessions: pd.DataFrame
    lesions: pd.DataFrame
    qc: pd.DataFrame
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    observed: list | None = None
