"""The solver's kernels on the CPU: numba loops, each one fused pass over a scan's worth of exit
waves where NumPy would make several, into buffers the caller allocated once (on this machine fresh
memory costs more than the arithmetic done in it). whole_arrays.py computes the same for CuPy.

Shapes: exit waves and their kin (frames, N, N); probes (classes, N, N), one per sub-pixel shift;
`classes[k]`, `corners[k]` ([y, x]): frame k's probe and the corner of its window on the object."""

from __future__ import annotations

import numba
import numpy as np

@numba.njit(cache=True, fastmath=True, nogil=True)
def fourier_constraint(spectrum, amplitudes, valid):
    """In place: the measured modulus on valid pixels, the phase kept."""
    frames, rows, cols = spectrum.shape
    for k in range(frames):
        for i in range(rows):
            for j in range(cols):
                if valid[k, i, j]:
                    value = spectrum[k, i, j]
                    modulus = abs(value)
                    spectrum[k, i, j] = value * (amplitudes[k, i, j] / modulus) if modulus > 1e-12 else 0


@numba.njit(cache=True, fastmath=True, nogil=True)
def reflect(psi, data):
    """In place: psi <- 2 D - psi."""
    frames, rows, cols = psi.shape
    for k in range(frames):
        for i in range(rows):
            for j in range(cols):
                psi[k, i, j] = np.float32(2) * data[k, i, j] - psi[k, i, j]


@numba.njit(cache=True, fastmath=True, nogil=True)
def exit_waves(out, probes, classes, obj, corners):
    """out_j = P_j O_j: each frame's (shifted) probe times the object under its window."""
    n = probes.shape[1]
    for k in range(out.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        c = classes[k]
        for i in range(n):
            for j in range(n):
                out[k, i, j] = probes[c, i, j] * obj[y + i, x + j]


@numba.njit(cache=True, fastmath=True, nogil=True)
def object_sums(numerator, weight, probes, classes, psi, corners):
    """Object update sums: conj(P_j) psi_j and |P_j|^2 added under each frame's window."""
    n = probes.shape[1]
    for k in range(psi.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        c = classes[k]
        for i in range(n):
            for j in range(n):
                p = probes[c, i, j]
                numerator[y + i, x + j] += p.conjugate() * psi[k, i, j]
                weight[y + i, x + j] += p.real * p.real + p.imag * p.imag


@numba.njit(cache=True, fastmath=True, nogil=True)
def gather(numerator, weight, obj, classes, psi, corners):
    """Probe update sums per class: conj(O_j) psi_j and |O_j|^2 over the frames."""
    n = numerator.shape[1]
    for k in range(psi.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        c = classes[k]
        for i in range(n):
            for j in range(n):
                o = obj[y + i, x + j]
                numerator[c, i, j] += o.conjugate() * psi[k, i, j]
                weight[c, i, j] += o.real * o.real + o.imag * o.imag


@numba.njit(cache=True, fastmath=True, nogil=True)
def mix(reflected, data, obj, probes, classes, corners, beta):
    """In place, from R = 2 D - Psi: Psi <- beta (Psi + P_j O_j) + (1 - 2 beta) D, which is
    beta (P_j O_j - R) + D; returns |change of Psi|^2."""
    n = probes.shape[1]
    change = 0.0
    for k in range(reflected.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        c = classes[k]
        for i in range(n):
            for j in range(n):
                r, d = reflected[k, i, j], data[k, i, j]
                new = beta * (probes[c, i, j] * obj[y + i, x + j] - r) + d
                reflected[k, i, j] = new
                delta = new - (np.float32(2) * d - r)
                change += delta.real * delta.real + delta.imag * delta.imag
    return change


@numba.njit(cache=True, fastmath=True, nogil=True)
def residual_gradient(chi, residual, waves, intensity, weight):
    """residual = |waves|^2 - I and chi = 2 w residual waves (dL/dwaves*); returns the data term."""
    total = 0.0
    for k in range(waves.shape[0]):
        for i in range(waves.shape[1]):
            for j in range(waves.shape[2]):
                v = waves[k, i, j]
                r = v.real * v.real + v.imag * v.imag - intensity[k, i, j]
                w = weight[k, i, j]
                residual[k, i, j] = r
                chi[k, i, j] = np.float32(2) * w * r * v
                total += w * r * r
    return total


@numba.njit(cache=True, fastmath=True, nogil=True)
def directional_waves(first, second, probes, h_probes, classes, obj, h_obj, corners):
    """The exit waves' derivatives along (h_object, h_probe): h_P O + P h_O and h_P h_O."""
    n = probes.shape[1]
    for k in range(first.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        c = classes[k]
        for i in range(n):
            for j in range(n):
                o, h = obj[y + i, x + j], h_obj[y + i, x + j]
                hp = h_probes[c, i, j]
                first[k, i, j] = hp * o + probes[c, i, j] * h
                second[k, i, j] = hp * h


@numba.njit(cache=True, fastmath=True, nogil=True)
def step_sums(waves, first, second, residual, weight):
    """L's first and second derivative in the step length (data term): sum w r d1 and
    sum w (d1^2 + 2 r d2), with d1 = 2 Re(conj(waves) first), d2 = |first|^2 + 2 Re(conj(waves) second)."""
    numerator = 0.0
    denominator = 0.0
    for k in range(waves.shape[0]):
        for i in range(waves.shape[1]):
            for j in range(waves.shape[2]):
                v, a, b = waves[k, i, j], first[k, i, j], second[k, i, j]
                d1 = np.float32(2) * (v.real * a.real + v.imag * a.imag)
                d2 = a.real * a.real + a.imag * a.imag + np.float32(2) * (v.real * b.real + v.imag * b.imag)
                w, r = weight[k, i, j], residual[k, i, j]
                numerator += w * r * d1
                denominator += w * (d1 * d1 + np.float32(2) * r * d2)
    return numerator, denominator
