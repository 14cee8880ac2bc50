"""The array backend: dispatch on arrays, moving arrays, and clear errors for an unusable CuPy."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from npmask import backend, nn
from npmask.backend import BackendError, backend_name, get_array_module, get_backend, to_device, to_numpy

CUPY_IMPORTABLE = importlib.util.find_spec("cupy") is not None and backend._import_cupy() is not None
GPU = CUPY_IMPORTABLE and backend.cupy_available()


def test_get_array_module_defaults_to_numpy():
    assert get_array_module() is np
    assert get_array_module(np.zeros(3), np.ones(2)) is np
    assert get_array_module(1.0, [1, 2]) is np
    assert get_backend("numpy") is np
    assert backend_name(np.zeros(1)) == "numpy"


def test_to_numpy_and_to_device_on_numpy():
    x = np.arange(6.0).reshape(2, 3)
    assert to_numpy(x) is x
    assert to_device(x, "numpy") is x  # no copy when it already is a numpy array
    y = to_numpy([[1, 2], [3, 4]])
    assert isinstance(y, np.ndarray) and y.shape == (2, 2)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown backend 'torch'; choose one of numpy, cupy"):
        get_backend("torch")
    with pytest.raises(BackendError, match="unknown backend"):
        to_device(np.zeros(2), "jax")
    with pytest.raises(BackendError, match="unknown backend"):
        nn.Linear(2, 2, rng=0).to("gpu")


def test_cupy_not_installed_message(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendError, match="CuPy is not installed") as info:
        get_backend("cupy")
    assert "pip install" in str(info.value) and "cupy-cuda12x" in str(info.value)
    assert backend.cupy_available() is False
    assert get_array_module(np.zeros(2)) is np
    backend.seed(0)  # seeding works without cupy


@pytest.mark.skipif(not CUPY_IMPORTABLE, reason="cupy is not installed here: the not-installed message is tested above")
@pytest.mark.skipif(GPU, reason="a usable CUDA device is present: test_cupy_works checks the working path instead")
def test_cupy_installed_without_gpu_message():
    with pytest.raises(BackendError, match="CuPy is installed, but no usable CUDA device") as info:
        get_backend("cupy")
    assert "nvidia-smi" in str(info.value)
    assert backend.cupy_available() is False
    with pytest.raises(BackendError, match="no usable CUDA device"):
        nn.Linear(2, 2, rng=0).to("cupy")


@pytest.mark.skipif(not GPU, reason="needs cupy and a usable CUDA device")
def test_cupy_works():
    cp = get_backend("cupy")
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    xd = to_device(x, "cupy")
    assert isinstance(xd, cp.ndarray) and get_array_module(xd) is cp and get_array_module(x, xd) is cp
    assert backend_name(xd) == "cupy"
    np.testing.assert_array_equal(to_numpy(xd), x)
    assert to_device(xd, "cupy") is xd

    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1),
                          nn.GlobalAvgPool2d(), nn.Dropout(0.3, rng=0), nn.Linear(3, 5, rng=0))
    ref = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1),
                        nn.GlobalAvgPool2d(), nn.Dropout(0.3, rng=0), nn.Linear(3, 5, rng=0))
    model.to("cupy")
    assert all(isinstance(p, cp.ndarray) for _, p in model.named_parameters())
    labels = np.array([0, 1, 4, 2])
    yd, y = model.forward(xd), ref.forward(x)
    assert isinstance(yd, cp.ndarray) and yd.dtype == np.float32
    np.testing.assert_allclose(to_numpy(yd), y, rtol=1e-4, atol=1e-5)
    loss_d, dyd = nn.softmax_cross_entropy(yd, cp.asarray(labels))
    loss, dy = nn.softmax_cross_entropy(y, labels)
    assert loss_d == pytest.approx(loss, rel=1e-4)
    dxd, dx = model.backward(dyd), ref.backward(dy)
    np.testing.assert_allclose(to_numpy(dxd), dx, rtol=1e-4, atol=1e-6)
    for rd, r in zip(model.parameter_refs(), ref.parameter_refs()):
        assert isinstance(rd.grad, cp.ndarray)
        np.testing.assert_allclose(to_numpy(rd.grad), r.grad, rtol=1e-4, atol=1e-6, err_msg=rd.name)
    for (name, bd), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        np.testing.assert_allclose(to_numpy(bd), b, rtol=1e-5, atol=1e-6, err_msg=name)
    model.to("numpy")
    assert all(isinstance(p, np.ndarray) for _, p in model.named_parameters())


def test_rng_and_seed():
    g = backend.rng(5)
    assert isinstance(g, np.random.Generator)
    assert backend.rng(g) is g
    np.testing.assert_array_equal(backend.rng(5).random(3), np.random.default_rng(5).random(3))
    backend.seed(3)
    a = np.random.rand(2)
    backend.seed(3)
    np.testing.assert_array_equal(np.random.rand(2), a)


def test_importing_npmask_does_not_import_cupy():
    """Every npmask module imports without cupy being imported (it is only imported on first use).

    npmask.training.ray_executor is Ray's side of an optional extra: it imports ray itself, so it
    is imported here only where Ray is installed."""
    code = (
        "import importlib, importlib.util, pkgutil, sys, npmask\n"
        "names = [m.name for m in pkgutil.walk_packages(npmask.__path__, 'npmask.')]\n"
        "for n in names:\n"
        "    if n != 'npmask.training.ray_executor' or importlib.util.find_spec('ray'):\n"
        "        importlib.import_module(n)\n"
        "print(len(names), 'cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, imported = out.stdout.split()
    assert int(count) > 5
    assert imported == "False", "some npmask module imports cupy at import time"
