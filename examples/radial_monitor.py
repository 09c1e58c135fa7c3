"""A radial-profile and hit-rate monitor, written to OM's Processing Protocol (libs/common/processing.py).

Per frame (processing nodes): the mean intensity in rings of `bin_px` around the beam centre,
and the count of pixels above `bright_adu`; a frame with at least `min_bright_pixels` of them is
a hit. The collector averages the profiles of hits and of the other frames, keeps the hit rate of
the last `hit_rate_window` frames, previews both, and writes them when the scan ends.

    surveyor run examples/radial_monitor.toml --simulate                               # live
    surveyor process examples/radial_monitor.py:RadialMonitor out/radial_0001_raw.cxi  # offline
"""

from collections import deque

import numpy as np


class RadialMonitor:
    def __init__(self, *, parameters):
        self.bin_px = float(parameters.get("bin_px", 4.0))
        self.configure(parameters=parameters)

    def configure(self, *, parameters):
        """Also live (`configure` of the stage's parameters): the thresholds change from the next frame."""
        self.bright_adu = float(parameters.get("bright_adu", 100.0))
        self.min_bright = int(parameters.get("min_bright_pixels", 20))
        self.window = int(parameters.get("hit_rate_window", 100))

    # --- processing nodes ---------------------------------------------------------------------

    def initialize_processing_node(self, *, node_rank, node_pool_size):
        self.rings, self.ring_pixels = None, None

    def _prepare(self, data):
        """Ring index of every good pixel (the mask and the beam centre come with the scan)."""
        image = data["detector_data"]
        centre = (data["scan"].get("beam_center_px") or data["detector"].get("detector", {}).get("beam_center_px")
                  or ((image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2))
        y, x = np.indices(image.shape)
        rings = (np.hypot(y - centre[0], x - centre[1]) / self.bin_px).astype(np.int64)
        bad = data["pixel_mask"] != 0 if "pixel_mask" in data else np.zeros(image.shape, bool)
        self.good = ~bad
        self.rings = np.where(self.good, rings, rings.max() + 1).ravel()
        self.ring_pixels = np.bincount(self.rings)

    def process_data(self, *, node_rank, node_pool_size, data):
        image = data["detector_data"]
        if self.rings is None or self.rings.size != image.size:
            self._prepare(data)
        good = self.good if image.dtype.kind == "f" else self.good & (image < np.iinfo(image.dtype).max)
        sums = np.bincount(self.rings, weights=np.where(good, image, 0).ravel(), minlength=self.ring_pixels.size)
        profile = (sums / np.maximum(self.ring_pixels, 1))[:-1]
        bright = int(np.count_nonzero(good & (image > self.bright_adu)))
        return {"frame": data["frame_number"], "profile": profile, "bright_pixels": bright,
                "hit": bright >= self.min_bright}, node_rank

    # --- collecting node ----------------------------------------------------------------------

    def initialize_collecting_node(self, *, node_rank, node_pool_size):
        self.sums = {True: None, False: None}
        self.counts = {True: 0, False: 0}
        self.recent = deque(maxlen=self.window)
        self.hits_by_frame = {}

    def collect_data(self, *, node_rank, node_pool_size, processed_data):
        result, _rank = processed_data
        hit = bool(result["hit"])
        total = self.sums[hit]
        self.sums[hit] = result["profile"].copy() if total is None else total + result["profile"]
        self.counts[hit] += 1
        self.recent.append(hit)
        self.hits_by_frame[result["frame"]] = hit

    def wait_for_data(self, *, node_rank, node_pool_size):
        pass  # nothing to refresh: previews go out on the collector's own timer

    def _mean(self, hit):
        total = self.sums[hit]
        return np.zeros(0) if total is None else total / self.counts[hit]

    def preview(self, *, node_rank, node_pool_size):
        rate = np.array([np.mean(self.recent) if self.recent else 0.0])
        return {"profile_hits": self._mean(True), "profile_other": self._mean(False), "hit_rate": rate}

    def end_processing_on_collecting_node(self, *, node_rank, node_pool_size):
        frames = self.counts[True] + self.counts[False]
        numbers = np.array(sorted(self.hits_by_frame), dtype=np.int64)
        return {"profile": {"hits": self._mean(True), "other": self._mean(False), "bin_px": self.bin_px},
                "frames": frames, "hits": self.counts[True], "hit_rate": self.counts[True] / max(frames, 1),
                "frame_number": numbers, "hit": np.array([self.hits_by_frame[n] for n in numbers], dtype=bool)}
