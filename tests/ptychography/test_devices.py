"""The solver on a GPU runs whole-array kernels (whole_arrays.py) where the CPU runs numba loops
(loops.py). Where no GPU is, the whole-array kernels run on NumPy and are held to the loops, kernel
by kernel and over a whole reconstruction; where CuPy finds a GPU, the same checks run on it."""

from __future__ import annotations

import numpy as np
import pytest

from libs.ptychography.quality import score
from services.reconstruction_worker import device, loops
from services.reconstruction_worker.ml import MaximumLikelihood
from tests.ptychography.test_geometry_and_solver import noisy_scan, raar_start


@pytest.fixture(params=["numpy", "gpu"])
def arrays(request) -> device.Device:
    """The whole-array kernels on NumPy, and on the GPU where there is one."""
    if request.param == "numpy":
        return device.NUMPY_ARRAYS
    try:
        return device.gpu()
    except device.NoGpu as exc:
        pytest.skip(str(exc))


def complex_field(rng, shape) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def test_whole_array_kernels_compute_what_the_loops_do(arrays):
    rng = np.random.default_rng(0)
    frames, n, classes_n, side = 23, 8, 3, 20
    corners = rng.integers(0, side - n, size=(frames, 2)).astype(np.int64)  # windows overlap, many times over
    classes = rng.integers(0, classes_n, size=frames).astype(np.int64)
    probes, obj, h_obj = complex_field(rng, (classes_n, n, n)), complex_field(rng, (side, side)), complex_field(rng, (side, side))
    h_probes = complex_field(rng, (classes_n, n, n))
    psi, data, waves = (complex_field(rng, (frames, n, n)) for _ in range(3))
    amplitudes = rng.random((frames, n, n)).astype(np.float32)
    intensity, weight = (rng.random((frames, n, n)).astype(np.float32) for _ in range(2))
    valid = rng.random((frames, n, n)) > 0.2
    put = arrays.put

    def both(kernel: str, make, *inputs) -> None:
        """Run `kernel` with fresh outputs from `make` and `inputs` on both; outputs and returns agree."""
        expected_out, got_out = make(), [put(a) for a in make()]
        expected = getattr(loops, kernel)(*expected_out, *inputs)
        got = getattr(arrays.kernels, kernel)(*got_out, *(put(a) if isinstance(a, np.ndarray) else a for a in inputs))
        for want, have in zip(expected_out, got_out, strict=True):
            np.testing.assert_allclose(arrays.host(have), want, rtol=1e-4, atol=1e-4, err_msg=kernel)
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(expected, float), rtol=1e-4, err_msg=kernel)

    both("fourier_constraint", lambda: [psi.copy()], amplitudes, valid)
    both("reflect", lambda: [psi.copy()], data)
    both("exit_waves", lambda: [np.zeros_like(psi)], probes, classes, obj, corners)
    both("object_sums", lambda: [obj.copy(), np.ones((side, side), np.float32)], probes, classes, psi, corners)
    both("gather", lambda: [np.zeros_like(probes), np.zeros_like(probes)], obj, classes, psi, corners)
    both("mix", lambda: [psi.copy()], data, obj, probes, classes, corners, np.float32(0.8))
    both("residual_gradient", lambda: [np.zeros_like(psi), np.zeros(psi.shape, np.float32)], waves, intensity, weight)
    both("directional_waves", lambda: [np.zeros_like(psi), np.zeros_like(psi)], probes, h_probes, classes, obj,
         h_obj, corners)
    both("step_sums", lambda: [], waves, psi, data, intensity, weight)


def test_a_reconstruction_on_whole_arrays_ends_where_the_loops_end(arrays):
    """RAAR then ML, the same scan on both: the same image, to float32's rounding over 40 steps."""
    scan, noisy, centres, mask = noisy_scan(36, seed=4)
    results = []
    for where in (device.CPU, arrays):
        solver = raar_start(scan, noisy, centres, support_radius=scan.size / 4, iterations=20, device=where)
        MaximumLikelihood(solver).iterate(20)
        obj, probe = solver.host()
        assert isinstance(obj, np.ndarray) and isinstance(probe, np.ndarray)
        results.append((obj, score(obj, scan.object, mask).nrmse))
    (cpu, cpu_nrmse), (other, other_nrmse) = results
    print(f"NRMSE after 20 RAAR iterations and 20 ML steps: loops {cpu_nrmse:.5f}, {arrays.name} {other_nrmse:.5f}")
    assert other_nrmse == pytest.approx(cpu_nrmse, rel=0.01)
    assert np.abs(other - cpu).max() < 2e-3 * np.abs(cpu).max()


def test_the_cpu_is_chosen_where_no_gpu_is_and_asking_for_one_says_why_there_is_none():
    assert device.select("cpu") is device.CPU
    try:
        found = device.gpu()
    except device.NoGpu as exc:
        assert device.select("auto") is device.CPU
        with pytest.raises(device.NoGpu) as raised:
            device.select("gpu")
        assert str(raised.value) == str(exc) and ("pip install" in str(exc) or "nvidia-smi" in str(exc))
    else:
        assert device.select("auto").name == found.name and device.select("auto").xp.__name__ == "cupy"
