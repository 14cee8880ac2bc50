"""Optional: runs only where torch and torchvision are installed (the test environment has neither;
the torch-free round trips are in tests/test_convert_export.py). torchvision weights in through
``python -m npmask.convert`` and a domain out through ``python -m npmask.export`` give the same
logits in both libraries (benchmarks/interop_torch.py; its full-size results are in
benchmarks/results/interop_torch.md)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("interop_torch", os.path.join(ROOT, "benchmarks", "interop_torch.py"))
interop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interop)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_in_and_out(tmp_path, name):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    r_in = interop.weights_in(name, tmp_path, x, num_classes=10)
    assert r_in["npmask_params"] == r_in["torch_params"]
    assert r_in["float64"][0] < 1e-10 * max(1.0, r_in["float64"][1])
    assert r_in["float32"][0] < 1e-4 * max(1.0, r_in["float32"][1])
    r_out = interop.domain_out(name, r_in["backbone"], tmp_path, x, num_classes=4)
    assert r_out["missing"] > 0                  # num_batches_tracked only (checked inside)
    assert r_out["float64"][0] < 1e-10 * max(1.0, r_out["float64"][1])
    assert r_out["float32"][0] < 1e-4 * max(1.0, r_out["float32"][1])
