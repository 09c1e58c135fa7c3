"""Found peaks against true ones: how many pairs lie within a tolerance, each peak used once."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def matched(found: np.ndarray, true: np.ndarray, tolerance_px: float = 1.0) -> int:
    """Pairs of a found and a true position ((n, 2) arrays, pixels) within `tolerance_px`, each
    position in at most one pair, the closest pairs first."""
    if len(found) == 0 or len(true) == 0:
        return 0
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(true), tolerance_px, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used_found, used_true, count = set(), set(), 0
    for i, j in zip(pairs["i"][order], pairs["j"][order], strict=True):
        if i not in used_found and j not in used_true:
            used_found.add(i)
            used_true.add(j)
            count += 1
    return count
