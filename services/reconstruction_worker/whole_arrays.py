"""The solver's kernels as whole-array expressions, for any NumPy-like module: CuPy runs them on a
GPU, where a numba loop cannot go. Each computes what its namesake in loops.py does, into the same
buffers; the tests hold the two to each other on NumPy.

A frame's window on the object is a block of flat indices into it; the sums over overlapping
windows (the object's update, the probe's per class) are weighted `bincount`s, which add what
lands on the same pixel where fancy-index assignment would keep only one (and which CuPy runs
with atomic adds). They sum in float64, the loops in float32: the two differ by rounding only.
"""

from __future__ import annotations

from types import ModuleType


class Kernels:
    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp

    def _windows(self, corners, n: int, width: int):
        """Flat indices of each frame's N x N window into an object `width` pixels wide."""
        xp = self.xp
        rows = xp.arange(n, dtype=xp.int64)
        local = rows[:, None] * width + rows[None, :]
        return (corners[:, 0] * width + corners[:, 1])[:, None, None] + local[None]

    def _add(self, target, index, values) -> None:
        """target.flat[index] += values, every value counted where indices repeat."""
        xp, size = self.xp, target.size
        flat = index.ravel()
        total = xp.bincount(flat, weights=values.real.ravel(), minlength=size)
        if values.dtype.kind == "c":
            total = total + 1j * xp.bincount(flat, weights=values.imag.ravel(), minlength=size)
        target += total.reshape(target.shape).astype(target.dtype)

    def fourier_constraint(self, spectrum, amplitudes, valid) -> None:
        xp = self.xp
        modulus = xp.abs(spectrum)
        factor = xp.where(modulus > 1e-12, amplitudes / xp.maximum(modulus, 1e-30), 0)
        spectrum *= xp.where(valid, factor, 1).astype(spectrum.real.dtype)

    def reflect(self, psi, data) -> None:
        psi *= -1
        psi += 2 * data

    def exit_waves(self, out, probes, classes, obj, corners) -> None:
        out[...] = probes[classes] * obj.ravel()[self._windows(corners, probes.shape[1], obj.shape[1])]

    def object_sums(self, numerator, weight, probes, classes, psi, corners) -> None:
        index = self._windows(corners, probes.shape[1], numerator.shape[1])
        p = probes[classes]
        self._add(numerator, index, p.conj() * psi)
        self._add(weight, index, p.real**2 + p.imag**2)

    def gather(self, numerator, weight, obj, classes, psi, corners) -> None:
        xp, n = self.xp, numerator.shape[1]
        o = obj.ravel()[self._windows(corners, n, obj.shape[1])]
        index = classes[:, None, None] * (n * n) + xp.arange(n * n, dtype=xp.int64).reshape(1, n, n)
        self._add(numerator, index, o.conj() * psi)
        self._add(weight, index, o.real**2 + o.imag**2)

    def mix(self, reflected, data, obj, probes, classes, corners, beta) -> float:
        model = probes[classes] * obj.ravel()[self._windows(corners, probes.shape[1], obj.shape[1])]
        new = (model - reflected) * beta + data  # the device array first: CuPy, not NumPy, does the product
        delta = new - (2 * data - reflected)
        reflected[...] = new
        return float((delta.real**2 + delta.imag**2).sum())

    def residual_gradient(self, chi, residual, waves, intensity, weight) -> float:
        residual[...] = waves.real**2 + waves.imag**2 - intensity
        chi[...] = 2 * weight * residual * waves
        return float((weight * residual**2).sum())

    def directional_waves(self, first, second, probes, h_probes, classes, obj, h_obj, corners) -> None:
        index = self._windows(corners, probes.shape[1], obj.shape[1])
        o, h, hp = obj.ravel()[index], h_obj.ravel()[index], h_probes[classes]
        first[...] = hp * o + probes[classes] * h
        second[...] = hp * h

    def step_sums(self, waves, first, second, residual, weight) -> tuple[float, float]:
        d1 = 2 * (waves.real * first.real + waves.imag * first.imag)
        d2 = first.real**2 + first.imag**2 + 2 * (waves.real * second.real + waves.imag * second.imag)
        return float((weight * residual * d1).sum()), float((weight * (d1 * d1 + 2 * residual * d2)).sum())
