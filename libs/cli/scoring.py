"""Scoring a written reconstruction against a simulator's ground truth (files in, a Score out)."""

from __future__ import annotations

from pathlib import Path

import h5py

from libs.ptychography.quality import Score, score


def score_reconstruction(cxi: Path, truth: Path) -> Score:
    """The NRMSE of `/entry_1/image_1/data` in `cxi` against the object in `truth`, on the
    region the truth marks as illuminated."""
    with h5py.File(cxi, "r") as result, h5py.File(truth, "r") as known:
        return score(result["entry_1/image_1/data"][()], known["object"][()], known["illuminated"][()])
