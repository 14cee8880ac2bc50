"""Optional: runs only where torch and torchvision are installed (the test environment has neither;
the torch-free round trips are in tests/test_convert_export.py). torchvision weights in through
``python -m npmask.convert`` and a domain out through ``python -m npmask.export`` give the same
logits in both libraries (benchmarks/interop_torch.py; its full-size results are in
benchmarks/results/interop_torch.md)."""
import importlib.util
import os

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
    # (inside: a stock torchvision model loads the export with strict=True)
    assert r_out["spread_float32"] > 1e-3        # the images reach the head: a real comparison
    assert r_out["float64"][0] < 1e-10 * max(1.0, r_out["float64"][1])
    assert r_out["float32"][0] < 1e-4 * max(1.0, r_out["float32"][1])


def test_pth_state_dict_is_read_and_a_pickled_model_is_refused(tmp_path):
    import torch
    import torchvision
    from npmask.convert import ConvertError, convert
    m = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save({"state_dict": m.state_dict(), "epoch": 1}, tmp_path / "ckpt.pth")
    info = convert(tmp_path / "ckpt.pth", "resnet18", tmp_path / "a.npz")
    assert info["num_classes"] == 3 and len(info["dropped"]) == 20          # num_batches_tracked
    torch.save(m, tmp_path / "whole.pth")                                  # a pickled module
    with pytest.raises(ConvertError, match="weights_only=True") as err:
        convert(tmp_path / "whole.pth", "resnet18", tmp_path / "b.npz")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert not (tmp_path / "b.npz").exists()
