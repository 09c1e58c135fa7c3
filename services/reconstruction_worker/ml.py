"""Refinement by regularised maximum likelihood (Thibault and Guizar-Sicairos 2012, the method of
PtyPy's ML engine), started from the streaming RAAR's object and probe.

The negative log-likelihood of the measured photons I (Poisson, in its Gaussian form) given the
model intensities |F(P O_j)|^2, plus a smoothness prior on the object:

    L = sum_j sum_q w_jq (|F(P O_j)|^2 - I_jq)^2  +  lambda sum_r |grad O(r)|^2,   w = mask / (I + 1)

is minimised over object and probe together by nonlinear conjugate gradients (Polak-Ribiere), each
step along the search direction the minimum of L's second-order expansion in the step length.
Counts near zero weigh little error each, so the read noise of a dark detector region is not fitted
as if it were signal. The probe's gradient is rescaled to the object's (the two differ by orders of
magnitude) and kept inside the probe support. lambda follows the data: `smoothness` times the
data term's own curvature (4 sum_j |P_j|^2 at a lit pixel), so it weighs alike at any photon count.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft

from services.reconstruction_worker.raar import StreamingRaar, object_sums


class MaximumLikelihood:
    def __init__(self, solver: StreamingRaar, *, smoothness: float = 0.01, probe: bool = True) -> None:
        self.solver = solver
        self.smoothness = smoothness
        self.refine_probe = probe
        taken = np.flatnonzero(solver.received)
        self.corners = np.ascontiguousarray(solver.corners[taken])
        self.classes = solver.classes[taken]
        intensity = solver.amplitudes[taken] ** 2
        valid = solver.valid[taken]
        self.intensity = np.where(valid, intensity, 0).astype(np.float32)
        self.weight = (valid / (intensity + 1)).astype(np.float32)
        self.reg: float | None = None
        """The prior's weight, set at the first step from the illumination (the module's docstring)."""
        self._previous: tuple[np.ndarray, np.ndarray] | None = None
        self._direction: tuple[np.ndarray, np.ndarray] | None = None
        self._probe_scale: float | None = None
        self.error = float("nan")

    def iterate(self, count: int = 1) -> float:
        """`count` conjugate-gradient steps; the data term of L per measured pixel after the last."""
        for _ in range(count):
            self._step()
        return self.error

    def _step(self) -> None:
        s = self.solver
        probes = s.shifted_probes()
        views = _views(s.object, self.corners, s.size)
        waves = scipy.fft.fft2(probes[self.classes] * views, norm="ortho", workers=s.workers)
        residual = np.abs(waves) ** 2 - self.intensity
        self.error = float(np.sum(self.weight * residual**2) / max(np.count_nonzero(self.weight), 1))
        chi = scipy.fft.ifft2(2 * self.weight * residual * waves, norm="ortho", workers=s.workers)
        grad_object = np.zeros_like(s.object)
        illumination = np.zeros(s.object.shape, np.float32)
        object_sums(grad_object, illumination, probes, self.classes, chi, self.corners)
        if self.reg is None:
            # The data term's curvature at an object pixel is about 4 sum_j |P_j|^2 (w I = 1): the
            # prior weighs `smoothness` of its mean over the illuminated pixels.
            lit = illumination[illumination > 0.1 * illumination.max()]
            self.reg = self.smoothness * 4 * float(lit.mean()) if lit.size else 0.0
        grad_object += self.reg * _laplacian_negative(s.object)
        grad_probe = s.unshift_sum(np.conj(views) * chi) if self.refine_probe else np.zeros_like(s.probe)
        if s.support is not None:
            grad_probe *= s.support
        # The probe's gradient in the object's units (PtyPy's preconditioner): a running ratio.
        if self.refine_probe:
            ratio = _norm2(grad_object) / max(_norm2(grad_probe), 1e-30)
            self._probe_scale = ratio if self._probe_scale is None else 0.9 * self._probe_scale + 0.1 * ratio
            grad_probe = grad_probe * np.float32(self._probe_scale)

        if self._previous is None:
            beta = 0.0
        else:
            old_o, old_p = self._previous
            beta = (np.vdot(grad_object, grad_object - old_o).real + np.vdot(grad_probe, grad_probe - old_p).real) \
                / max(_norm2(old_o) + _norm2(old_p), 1e-30)
            beta = max(0.0, beta)
        self._previous = (grad_object, grad_probe)
        if self._direction is None or beta == 0.0:
            h_object, h_probe = -grad_object, -grad_probe
        else:
            h_object = beta * self._direction[0] - grad_object
            h_probe = beta * self._direction[1] - grad_probe
        self._direction = (h_object, h_probe)

        # The step: the minimum of L's expansion to second order along (h_object, h_probe).
        h_probes = s.shifted(h_probe)[self.classes]
        h_views = _views(h_object, self.corners, s.size)
        first = scipy.fft.fft2(h_probes * views + probes[self.classes] * h_views, norm="ortho", workers=s.workers)
        second = scipy.fft.fft2(h_probes * h_views, norm="ortho", workers=s.workers)
        d1 = 2 * (np.conj(waves) * first).real
        d2 = np.abs(first) ** 2 + 2 * (np.conj(waves) * second).real
        numerator = float(np.sum(self.weight * residual * d1))
        denominator = float(np.sum(self.weight * (d1**2 + 2 * residual * d2)))
        grad_o, grad_h = _gradients(s.object), _gradients(h_object)
        numerator += self.reg * sum(np.vdot(a, b).real for a, b in zip(grad_o, grad_h))
        denominator += self.reg * sum(_norm2(b) for b in grad_h)
        if denominator <= 0:
            self._direction = None
            return
        step = -numerator / denominator
        s.object = (s.object + np.complex64(step) * h_object).astype(np.complex64)
        if self.refine_probe:
            s.probe = (s.probe + np.complex64(step) * h_probe).astype(np.complex64)
        s.iterations += 1


def _norm2(a: np.ndarray) -> float:
    return float(np.vdot(a, a).real)


def _gradients(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.diff(a, axis=0), np.diff(a, axis=1)


def _laplacian_negative(a: np.ndarray) -> np.ndarray:
    """d/dO* of sum |grad O|^2: the negative discrete Laplacian (zero flux at the edges)."""
    out = np.zeros_like(a)
    dy, dx = _gradients(a)
    out[:-1] -= dy
    out[1:] += dy
    out[:, :-1] -= dx
    out[:, 1:] += dx
    return out


@numba.njit(cache=True, fastmath=True, nogil=True)
def _views(obj, corners, n):
    """The object under each frame's window: (frames, n, n)."""
    out = np.empty((corners.shape[0], n, n), obj.dtype)
    for k in range(corners.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        for i in range(n):
            for j in range(n):
                out[k, i, j] = obj[y + i, x + j]
    return out
