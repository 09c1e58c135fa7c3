"""Refinement by regularised maximum likelihood (Thibault and Guizar-Sicairos 2012, the method of
PtyPy's ML engine), started from the streaming RAAR's object and probe.

The negative log-likelihood of the measured photons I (Poisson, in its Gaussian form) given the
model intensities |F(P O_j)|^2, plus a smoothness prior on the object:

    L = sum_j sum_q w_jq (|F(P O_j)|^2 - I_jq)^2  +  lambda sum_r |grad O(r)|^2,   w = mask / (I + 1)

is minimised over object and probe together by nonlinear conjugate gradients (Polak-Ribiere), each
step along the search direction the minimum of L's second-order expansion in the step length.
Counts near zero weigh little error each, so the read noise of a dark detector region is not fitted
as if it were signal. The probe's gradient is rescaled to the object's (the two differ by orders of
magnitude). It is not cut to RAAR's probe support: that support steadies RAAR's probe while few
frames are in, but every frame holds the probe's tails beyond it, and cutting them is an error in
every frame (on the quality matrix's raster scan, 100 steps reach NRMSE 0.042 inside RAAR's
support, 0.034 inside 0.45 of the window, 0.033 with no bound). lambda follows the data:
`smoothness` times the data term's own curvature (4 sum_j |P_j|^2 at a lit pixel) times the data's
relative noise, sqrt(REFERENCE_PHOTONS / the photons per frame): the fewer the photons, the more
the prior counts against them (on the quality matrix, a prior of fixed relative weight that suits
2e6 photons per frame was too weak for 1e5 and too strong for 1e8).
"""

from __future__ import annotations

import numpy as np

from services.reconstruction_worker.raar import StreamingRaar

REFERENCE_PHOTONS = 1e6
"""Photons per frame at which `smoothness` is the prior's weight relative to the data."""


class MaximumLikelihood:
    def __init__(self, solver: StreamingRaar, *, smoothness: float = 0.02, probe: bool = True) -> None:
        self.solver = solver
        self.smoothness = smoothness
        self.refine_probe = probe
        self.xp = xp = solver.device.xp
        self.corners, self.classes, amplitudes, valid = solver.arrived()
        intensity = amplitudes**2
        self.intensity = xp.where(valid, intensity, 0).astype(np.float32)
        self.weight = (valid / (intensity + 1)).astype(np.float32)
        self._measured = max(int(xp.count_nonzero(self.weight)), 1)
        self._photons = float(self.intensity.sum(axis=(1, 2), dtype=np.float64).mean())
        self.reg: float | None = None
        """The prior's weight, set at the first step from the illumination (the module's docstring)."""
        self._previous: tuple | None = None
        """The last step's object gradient, probe gradient and preconditioned probe gradient."""
        self._direction: tuple | None = None
        self._probe_scale: float | None = None
        self.error = float("nan")
        # One set of frame-sized buffers for every step: each is a scan's worth of exit waves, and
        # memory handed out afresh costs more here than the arithmetic done in it.
        shape = self.intensity.shape
        self._waves = xp.empty(shape, np.complex64)
        self._chi = xp.empty(shape, np.complex64)
        """The gradient's exit waves, then the first derivative of the waves along the direction."""
        self._second = xp.empty(shape, np.complex64)
        self._residual = xp.empty(shape, np.float32)

    def iterate(self, count: int = 1) -> float:
        """`count` conjugate-gradient steps; the data term of L per measured pixel after the last."""
        for _ in range(count):
            self._step()
        return self.error

    def _fft(self, a):
        return self.solver.device.fft2(a, ortho=True, workers=self.solver.workers, overwrite=True)

    def _step(self) -> None:
        s, xp = self.solver, self.xp
        k = s.device.kernels
        probes = s.shifted_probes()
        k.exit_waves(self._waves, probes, self.classes, s.object, self.corners)
        waves = self._fft(self._waves)
        residual = self._residual
        self.error = k.residual_gradient(self._chi, residual, waves, self.intensity, self.weight) / self._measured
        chi = s.device.ifft2(self._chi, ortho=True, workers=s.workers, overwrite=True)
        grad_object = xp.zeros_like(s.object)
        illumination = xp.zeros(s.object.shape, np.float32)
        k.object_sums(grad_object, illumination, probes, self.classes, chi, self.corners)
        if self.reg is None:
            # The data term's curvature at an object pixel is about 4 sum_j |P_j|^2 (w I = 1): the
            # prior weighs `smoothness` of its mean over the illuminated pixels, scaled with the
            # data's relative noise (the module's docstring).
            lit = illumination[illumination > 0.1 * illumination.max()]
            noise = np.sqrt(REFERENCE_PHOTONS / max(self._photons, 1.0))
            self.reg = self.smoothness * noise * 4 * float(lit.mean()) if lit.size else 0.0
        grad_object += self.reg * _laplacian_negative(s.object)
        if self.refine_probe:
            per_class, lit = xp.zeros(probes.shape, np.complex64), xp.zeros(probes.shape, np.complex64)
            k.gather(per_class, lit, s.object, self.classes, chi, self.corners)  # the sums of conj(O_j) chi_j
            grad_probe = s.unshift(per_class)
        else:
            grad_probe = xp.zeros_like(s.probe)
        # The probe's gradient in the object's units (PtyPy's preconditioner): a running ratio.
        # Polak-Ribiere then takes the preconditioned gradient against the plain one, for the probe
        # as for the object: the preconditioned one against itself weighs the probe's part by the
        # ratio once more, and that ratio goes with the fourth power of the object's scale, which the
        # data leave free (from one RAAR result, the tests' exact-model scan reached 0.0129 at the
        # scale RAAR left and 0.0084 at twice it; now 0.0058 at any).
        preconditioned = grad_probe
        if self.refine_probe:
            ratio = _norm2(grad_object) / max(_norm2(grad_probe), 1e-30)
            self._probe_scale = ratio if self._probe_scale is None else 0.9 * self._probe_scale + 0.1 * ratio
            preconditioned = grad_probe * np.float32(self._probe_scale)

        if self._previous is None:
            beta = 0.0
        else:
            old_o, old_p, old_preconditioned = self._previous
            beta = (_dot(grad_object, grad_object - old_o) + _dot(preconditioned, grad_probe - old_p)) \
                / max(_norm2(old_o) + _dot(old_preconditioned, old_p), 1e-30)
            beta = max(0.0, beta)
        self._previous = (grad_object, grad_probe, preconditioned)
        if self._direction is None or beta == 0.0:
            h_object, h_probe = -grad_object, -preconditioned
        else:
            h_object = beta * self._direction[0] - grad_object
            h_probe = beta * self._direction[1] - preconditioned
        self._direction = (h_object, h_probe)

        # The step: the minimum of L's expansion to second order along (h_object, h_probe).
        first, second = chi, self._second
        k.directional_waves(first, second, probes, s.shifted(h_probe), self.classes, s.object, h_object, self.corners)
        numerator, denominator = k.step_sums(waves, self._fft(first), self._fft(second), residual, self.weight)
        grad_o, grad_h = _gradients(s.object), _gradients(h_object)
        numerator += self.reg * sum(_dot(a, b) for a, b in zip(grad_o, grad_h))
        denominator += self.reg * sum(_norm2(b) for b in grad_h)
        step = -numerator / denominator if denominator > 0 else float("nan")
        if not np.isfinite(step):  # no minimum along this direction: the next step starts from the gradient
            self._direction = None
            return
        s.object = (s.object + h_object * np.complex64(step)).astype(np.complex64)
        if self.refine_probe:
            s.probe = (s.probe + h_probe * np.complex64(step)).astype(np.complex64)
        s.iterations += 1


def _dot(a, b) -> float:
    """Re <a, b>. Here and below NumPy hands CuPy's arrays to CuPy (__array_function__)."""
    return float(np.vdot(a, b).real)


def _norm2(a) -> float:
    return _dot(a, a)


def _gradients(a) -> tuple:
    return np.diff(a, axis=0), np.diff(a, axis=1)


def _laplacian_negative(a):
    """d/dO* of sum |grad O|^2: the negative discrete Laplacian (zero flux at the edges)."""
    out = np.zeros_like(a)
    dy, dx = _gradients(a)
    out[:-1] -= dy
    out[1:] += dy
    out[:, :-1] -= dx
    out[:, 1:] += dx
    return out
