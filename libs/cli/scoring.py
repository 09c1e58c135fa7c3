"""Scoring what a simulated scan produced against the simulator's ground truth (files in, numbers out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.ndimage

from libs.crystallography.matching import matched
from libs.ptychography.quality import Score, score


def score_reconstruction(cxi: Path, truth: Path) -> Score:
    """The NRMSE of `/entry_1/image_1/data` in `cxi` against the object in `truth`, on the
    region the truth marks as illuminated; a reconstruction on other pixels than the truth's is
    resampled onto them first."""
    with h5py.File(cxi, "r") as result, h5py.File(truth, "r") as known:
        image = result["entry_1/image_1"]
        return score(resampled(image["data"][()], image["x_pixel_size"][()] / known["pixel_size_m"][()]),
                     known["object"][()], known["illuminated"][()])


def resampled(image: np.ndarray, zoom: float) -> np.ndarray:
    """`image` on pixels `zoom` times smaller (cubic splines of its real and imaginary parts)."""
    if abs(zoom - 1) < 1e-3:
        return image
    return scipy.ndimage.zoom(image.real, zoom, order=3) + 1j * scipy.ndimage.zoom(image.imag, zoom, order=3)


@dataclass(frozen=True)
class PeakScore:
    recall: float
    """True peaks of the hits written that were found within the tolerance."""
    precision: float
    """Peaks written that are true peaks."""
    hits: int
    true_hits: int
    """Frames with spots among those searched."""


def score_peaks(cxi: Path, truth: Path, tolerance_px: float = 1.0) -> PeakScore:
    """The written hits' peak lists against the true spots of those frames."""
    with h5py.File(cxi, "r") as result, h5py.File(truth, "r") as known:
        peaks, every = result["entry_1/result_1"], result["entry_1/result_2"]
        spots = known["peaks"]
        spot_frame = spots["frame"][()]
        true_xy = np.stack([spots["fs"][()], spots["ss"][()]], axis=1)
        found_total = true_total = pairs = 0
        for row, frame in enumerate(peaks["frame_number"][()]):
            n = int(peaks["nPeaks"][row])
            found = np.stack([peaks["peakXPosRaw"][row, :n], peaks["peakYPosRaw"][row, :n]], axis=1)
            true = true_xy[spot_frame == frame]
            pairs += matched(found, true, tolerance_px)
            found_total += n
            true_total += len(true)
        searched = every["frame_number"][()]
        return PeakScore(recall=pairs / max(true_total, 1), precision=pairs / max(found_total, 1),
                         hits=len(peaks["frame_number"]), true_hits=int(known["hit"][()][searched].sum()))


def against_truth(result: Path, truth: Path) -> tuple[dict[str, Any], str, bool]:
    """The figures for the summary, a line for the operator, and whether the targets are met
    (NRMSE at most 0.15; peak recall and precision at least 0.95)."""
    with h5py.File(truth, "r") as known:
        crystallography = "peaks" in known
    if crystallography:
        p = score_peaks(result, truth)
        return ({"recall": round(p.recall, 4), "precision": round(p.precision, 4)},
                f"peaks against the truth: recall {p.recall:.3f}, precision {p.precision:.3f} within 1 px "
                f"({p.hits} hits written, {p.true_hits} frames with spots)", min(p.recall, p.precision) >= 0.95)
    s = score_reconstruction(result, truth)
    return ({"nrmse": round(s.nrmse, 4)},
            f"reconstruction NRMSE {s.nrmse:.3f} against the truth (a constant object scores {s.baseline:.3f}; "
            f"phase error {s.phase_rms_rad:.3f} rad RMS)", s.nrmse <= 0.15)
