"""Where the solver runs: on the CPU (NumPy arrays, numba's loops, scipy's FFT on `workers` threads)
or on a CUDA GPU (CuPy arrays, the same kernels as whole-array expressions, cuFFT). raar.py and
ml.py are written once against a `Device`; only its array module, kernels and FFT differ.

`select("auto")` takes the GPU when CuPy is installed (`pip install -e '.[gpu]'`) and finds a CUDA
device, the CPU otherwise; "gpu" insists and says why it cannot; "cpu" never looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft

from services.reconstruction_worker import loops
from services.reconstruction_worker.whole_arrays import Kernels


class NoGpu(RuntimeError):
    """The GPU was asked for and cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Device:
    name: str
    xp: ModuleType
    """numpy or cupy: where the solver's arrays are made."""
    kernels: Any
    """loops (the numba module) or whole_arrays.Kernels: the same functions by the same names."""
    fft: ModuleType
    """scipy.fft or cupyx.scipy.fft."""

    def fft2(self, a, *, workers: int = 1, ortho: bool = False, overwrite: bool = False):
        return self.fft.fft2(a, norm="ortho" if ortho else None, overwrite_x=overwrite, **self._threads(workers))

    def ifft2(self, a, *, workers: int = 1, ortho: bool = False, overwrite: bool = False):
        return self.fft.ifft2(a, norm="ortho" if ortho else None, overwrite_x=overwrite, **self._threads(workers))

    def _threads(self, workers: int) -> dict[str, int]:
        return {"workers": workers} if self.fft is scipy.fft else {}  # cuFFT has no thread count

    def put(self, a, dtype=None):
        """`a` (host or here) as an array of this device."""
        return self.xp.asarray(a, dtype=dtype)

    def host(self, a) -> np.ndarray:
        """A copy of `a` in host memory, as a NumPy array."""
        return self.xp.asnumpy(a) if self.xp is not np else np.array(a)


CPU = Device("cpu", np, loops, scipy.fft)
NUMPY_ARRAYS = Device("cpu, whole arrays", np, Kernels(np), scipy.fft)
"""The GPU's kernels run by NumPy: what the tests hold to the loops where no GPU is."""


def gpu() -> Device:
    try:
        import cupy
        import cupyx.scipy.fft
    except ImportError as exc:
        raise NoGpu(f"CuPy cannot be imported ({exc}): install it with pip install -e '.[gpu]' "
                    "(CuPy for CUDA 12)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDA's errors are of several kinds, all meaning "none here"
        raise NoGpu(f"CuPy finds no CUDA driver or device ({exc}): check nvidia-smi on this host") from None
    if not count:
        raise NoGpu("CuPy finds no CUDA device: check nvidia-smi on this host")
    return Device(f"gpu {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}", cupy, Kernels(cupy),
                  cupyx.scipy.fft)


def select(choice: str) -> Device:
    """The device for `choice` ("auto", "cpu" or "gpu"); NoGpu where "gpu" cannot be had."""
    if choice == "cpu":
        return CPU
    try:
        return gpu()
    except NoGpu:
        if choice == "gpu":
            raise
        return CPU
