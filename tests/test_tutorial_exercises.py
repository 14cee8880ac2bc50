"""The solutions of the tutorials' exercises (tutorials/solutions/), checked as the notebooks ask.

The notebooks show each exercise with a TODO cell; the solutions live beside them, not in them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from npmask.gradcheck import check_layer, rel_error
from npmask.nn import conv2d_backward, conv2d_forward

ROOT = Path(__file__).resolve().parents[1]


def solution(name):
    spec = importlib.util.spec_from_file_location(f"tutorial_solution_{name}",
                                                  ROOT / "tutorials" / "solutions" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_exercises_whose_solutions_are_not_shown():
    sources = sorted((ROOT / "tutorials" / "src").glob("[0-9][0-9]_*.py"))
    for src in sources:
        text = src.read_text(encoding="utf-8")
        assert "## Exercises" in text, src.name
        assert text.count("**Exercise ") >= 2, src.name
        assert f"tutorials/solutions/ex{src.name[:2]}_" in text, src.name
        assert (ROOT / "tutorials" / "solutions").glob(f"ex{src.name[:2]}_*.py"), src.name
    assert "def batchnorm_backward(dy, x, weight, eps=1e-5):" in sources[0].read_text()
    assert "xhat * dweight" not in sources[0].read_text()            # the formula is not given away


# ---------------------------------------------------------------------------- tutorial 1
def test_ex01_batchnorm_backward_passes_check_layer():
    ex = solution("ex01_backprop")
    bn = ex.MyBatchNorm2d(3).astype(np.float64)
    rng = np.random.default_rng(0)
    bn.params["weight"][...] = rng.uniform(0.5, 1.5, 3)
    bn.params["bias"][...] = rng.standard_normal(3)
    report = check_layer(bn, rng.standard_normal((4, 3, 5, 5)) * 2 + 1, seed=1)
    assert report.ok and set(report.errors) == {"x", "weight", "bias"}


def test_ex01_batchnorm_backward_equals_npmask():
    from npmask.nn import BatchNorm2d
    ex = solution("ex01_backprop")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 2, 3))
    dy = rng.standard_normal(x.shape)
    bn = BatchNorm2d(4, dtype=np.float64)
    bn.params["weight"][...] = rng.uniform(0.5, 1.5, 4)
    bn.forward(x)
    dx = bn.backward(dy)
    got = ex.batchnorm_backward(dy, x, bn.params["weight"], bn.eps)
    for a, b in zip(got, (dx, bn.grads["weight"], bn.grads["bias"])):
        assert rel_error(a, b) < 1e-10


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
def test_ex01_conv_backward_by_loops_equals_npmask(stride, padding):
    ex = solution("ex01_backprop")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    y, cache = conv2d_forward(x, w, b, stride, padding)
    dy = rng.standard_normal(y.shape)
    want = conv2d_backward(dy, cache)
    got = ex.conv2d_backward_loops(dy, x, w, stride, padding)
    for a, c in zip(got, want):
        assert a.shape == c.shape and rel_error(a, c) < 1e-10


# ---------------------------------------------------------------------------- tutorial 2
def test_ex02_the_repository_test_catches_a_broken_sigmoid_surrogate():
    ex = solution("ex02_masks")
    from npmask.masking.transform import surrogate_derivative
    ex.run_repo_surrogate_test(surrogate_derivative, ROOT)           # the real one passes
    with pytest.raises(AssertionError):
        ex.run_repo_surrogate_test(ex.broken_surrogate_derivative, ROOT)
    from npmask.masking import transform
    assert transform.surrogate_derivative is surrogate_derivative    # put back


def test_ex02_a_new_variant_trains_and_passes_the_gradient_check(monkeypatch):
    from npmask.masking import MaskedConv2d
    from npmask.masking.variants import VARIANTS
    from npmask.models import create
    from npmask.multidomain import MultiDomainModel
    from npmask.nn import Conv2d
    ex = solution("ex02_masks")
    monkeypatch.setattr("npmask.masking.variants.VARIANTS", dict(VARIANTS))
    import npmask.masking.variants as variants
    v = ex.add_variant()
    assert variants.get_variant("piggyback_affine") is v
    conv = Conv2d(3, 4, 3, padding=1, rng=0).astype(np.float64)
    masked = MaskedConv2d(conv, "piggyback_affine", rng=0).astype(np.float64)
    assert sorted(k for k in masked.params if k.startswith("k")) == ["k1", "k3"]
    masked.params["k3"][...] = 1.0
    report = check_layer(masked, np.random.default_rng(3).standard_normal((2, 3, 5, 5)),
                         params=["k1", "k3"])
    assert report.ok
    md = MultiDomainModel(create("wrn10_1", 3, input_size=8, seed=0))
    md.add_domain("t", 2, "piggyback_affine")
    assert md.variant("t") is v


# ---------------------------------------------------------------------------- tutorials 3 and 4
@pytest.fixture(scope="module")
def small_domain(tmp_path_factory):
    """A wrn10_1 MultiDomainModel with domain "a" of the tiny test benchmark, and its iterators."""
    from npmask.data.format import load_domain
    from npmask.models import create
    from npmask.multidomain import MultiDomainModel
    from npmask.training.batches import make_iterators
    from test_train import write_tiny_benchmark
    root = write_tiny_benchmark(tmp_path_factory.mktemp("ex") / "data")
    data = load_domain(root / "a")
    train_it, test_it = make_iterators(data, batch_size=16, seed=0, backend="numpy",
                                       dtype=np.float32, protocol="auto")
    return data, train_it, test_it, lambda: MultiDomainModel(create("wrn10_1", 5, input_size=16, seed=3))


def test_ex03_one_pytorch_style_optimiser_trains_the_domain_only(small_domain):
    ex = solution("ex03_domain")
    data, train_it, test_it, make = small_domain
    model = make()
    model.add_domain("a", data.num_classes, "full", seed=0)
    fp = model.fingerprint()
    before = {k: v.copy() for k, v in model.network("a").state_dict().items()}
    acc = ex.train_with_one_optimizer(model, "a", train_it, test_it, epochs=2, lr=1e-2)
    assert 0 <= acc <= 100
    from npmask.multidomain import fingerprint_arrays
    assert fingerprint_arrays(model.backbone_arrays()) == fp           # the backbone is untouched
    after = model.network("a").state_dict()
    assert not np.array_equal(after["fc.weight"], before["fc.weight"])
    assert not np.array_equal(after["conv1.mask_real"], before["conv1.mask_real"])


def test_ex03_predicting_an_image_file(small_domain, tmp_path):
    ex = solution("ex03_domain")
    data, _, _, make = small_domain
    model = make()
    model.add_domain("a", data.num_classes, "full", seed=0)
    model.set_data_info("a", data)
    image = data.test[0][0]
    name, p = ex.predict_image_file(model, "a", image, tmp_path)
    probs = model.predict(image, domain="a").probabilities[0]
    assert name == data.class_names[int(probs.argmax())] and abs(p - probs.max()) < 1e-12
    assert (tmp_path / "my_image.png").is_file()


def test_ex04_densities_from_the_file_alone(small_domain, tmp_path):
    from npmask.masking.inspect import mask_statistics
    from npmask.storage import save_domain
    ex = solution("ex04_masks")
    data, train_it, test_it, make = small_domain
    model = make()
    model.add_domain("a", data.num_classes, "full", seed=0)
    solution("ex03_domain").train_with_one_optimizer(model, "a", train_it, test_it, lr=1e-2)
    path = save_domain(model, "a", tmp_path / "a.npz")
    got = ex.densities_from_file(path)
    want = {r["layer"]: r["density"] for r in mask_statistics(model.network("a"))}
    assert list(got) == list(want) and all(abs(got[k] - want[k]) < 1e-12 for k in want)
    assert any(d < 1 for d in got.values())
    layer, d = ex.most_changed_layer(got)
    assert d == min(got.values()) and got[layer] == d


# ---------------------------------------------------------------------------- tutorial 5
def test_ex05_backend_agnostic_softmax_and_backends():
    from npmask.backend import cupy_available
    from npmask.inference import softmax as reference
    from npmask.models import create
    ex = solution("ex05_gpu")
    z = np.random.default_rng(0).standard_normal((4, 7)) * 30
    assert np.allclose(ex.softmax(z), reference(z), rtol=0, atol=1e-12)
    assert ex.softmax(z.astype(np.float32)).dtype == np.float32
    net = create("wrn10_1", 3, input_size=8)
    assert ex.backends_of(net) == {"numpy"}
    if cupy_available():
        import cupy as cp
        assert np.allclose(cp.asnumpy(ex.softmax(cp.asarray(z))), reference(z))
        assert ex.backends_of(net.to("cupy")) == {"cupy"}
