"""The Module API: names, state_dict round trips, freezing, train/eval, zero_grad, astype."""
import numpy as np
import pytest

from npmask import nn
import npmask.nn.linear as linear_module


class Net(nn.Module):
    """features (Sequential: Linear, BatchNorm1d, ReLU) -> head Linear, like a tiny model."""

    def __init__(self, seed=0, dtype=np.float32):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 6, rng=seed, dtype=dtype), nn.BatchNorm1d(6, dtype=dtype),
                                      nn.ReLU(), nn.Dropout(0.2, rng=seed))
        self.fc = nn.Linear(6, 3, rng=seed + 1, dtype=dtype)

    def forward(self, x):
        return self.fc.forward(self.features.forward(x))

    def backward(self, dy):
        return self.features.backward(self.fc.backward(dy))


PARAM_NAMES = ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
               "fc.weight", "fc.bias"]
BUFFER_NAMES = ["features.1.running_mean", "features.1.running_var"]


def x_batch(seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((5, 4)).astype(dtype)


def test_dotted_names_and_order():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == PARAM_NAMES
    assert [n for n, _ in net.named_buffers()] == BUFFER_NAMES
    assert list(net.state_dict()) == PARAM_NAMES + BUFFER_NAMES
    assert [n for n, _ in net.named_modules()] == ["", "features", "features.0", "features.1",
                                                    "features.2", "features.3", "fc"]
    assert [r.name for r in net.parameter_refs(exclude=("fc",))] == PARAM_NAMES[:4]
    assert [r.name for r in net.parameter_refs(include=("fc",))] == PARAM_NAMES[4:]
    assert net.num_parameters() == 4 * 6 + 6 + 6 + 6 + 6 * 3 + 3


def test_state_dict_round_trip_into_fresh_module(tmp_path):
    src = Net(seed=0)
    src.forward(x_batch())  # moves the BN running statistics away from their initial values
    state = {k: np.array(v) for k, v in src.state_dict().items()}
    np.savez(tmp_path / "ckpt.npz", **state)
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}

    dst = Net(seed=123)
    refs = {k: v for k, v in dst.state_dict().items()}
    assert not np.array_equal(refs["fc.weight"], state["fc.weight"])
    dst.load_state_dict(loaded)
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, state[k])  # exact, bit for bit
        assert v.dtype == state[k].dtype
        assert v is refs[k]  # loaded in place: references held elsewhere stay valid
    src.eval(), dst.eval()
    np.testing.assert_array_equal(src.forward(x_batch(1)), dst.forward(x_batch(1)))


def test_state_dict_returns_references_not_copies():
    net = Net()
    assert net.state_dict()["fc.weight"] is net.fc.params["weight"]


def test_load_state_dict_strict_errors():
    net = Net()
    state = dict(net.state_dict())
    missing = {k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(KeyError, match="missing keys.*fc.bias"):
        net.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected keys.*extra.weight"):
        net.load_state_dict({**state, "extra.weight": np.zeros(1)})
    net.load_state_dict(missing, strict=False)  # tolerated without strict
    bad = {**state, "fc.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="fc.weight.*shape"):
        net.load_state_dict(bad)


def test_load_state_dict_casts_to_existing_dtype():
    net = Net()
    state = {k: np.asarray(v, np.float64) + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    for k, v in net.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, state[k].astype(np.float32))


def test_freeze_stores_and_computes_no_gradient(monkeypatch):
    calls = []
    real = linear_module.linear_backward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_module, "linear_backward", spy)
    net = Net()
    net.fc.freeze("weight")
    net.features[1].freeze()
    assert "weight" not in net.fc.grads and "bias" in net.fc.grads
    assert net.features[1].grads == {}
    assert [r.name for r in net.parameter_refs()] == ["features.0.weight", "features.0.bias", "fc.bias"]
    assert [r.name for r in net.parameter_refs(trainable_only=False)] == PARAM_NAMES
    y = net.forward(x_batch())
    dx = net.backward(np.ones_like(y))
    assert dx.shape == (5, 4)
    assert calls[0]["need_dweight"] is False  # the frozen weight's gradient was never computed
    assert calls[1]["need_dweight"] is True
    assert np.any(net.fc.grads["bias"] != 0)

    net.fc.unfreeze("weight")
    assert np.array_equal(net.fc.grads["weight"], np.zeros((3, 6), np.float32))
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        net.fc.freeze("nope")


def test_freeze_whole_tree():
    net = Net().freeze()
    assert net.parameter_refs() == []
    y = net.forward(x_batch())
    assert net.backward(np.ones_like(y)).shape == (5, 4)  # input gradient still flows
    assert net.num_parameters() == Net().num_parameters()     # frozen parameters count too
    net.unfreeze()
    assert [r.name for r in net.parameter_refs()] == PARAM_NAMES


def test_unfreeze_keeps_the_gradient_of_a_trained_parameter():
    """unfreeze allocates gradients only for frozen parameters: a trained one keeps its array and
    what was accumulated in it."""
    net = Net()
    y = net.forward(x_batch())
    net.backward(np.ones_like(y))
    grad = net.fc.grads["weight"]
    before = grad.copy()
    assert np.any(before != 0)
    net.unfreeze()
    assert net.fc.grads["weight"] is grad
    np.testing.assert_array_equal(grad, before)


def test_register_param_follows_freeze_and_unfreeze():
    """A parameter registered again (its array replaced) keeps its frozen state: no gradient while
    frozen; once unfrozen, a fresh gradient like the new array."""
    lin = nn.Linear(3, 2, rng=0)
    lin.freeze("weight")
    lin.register_param("weight", np.ones((2, 3), np.float32))
    assert not lin.requires_grad("weight") and "weight" not in lin.grads
    lin.unfreeze("weight")
    lin.register_param("weight", np.ones((2, 3), np.float64))
    assert lin.requires_grad("weight") and lin.grads["weight"].dtype == np.float64


def test_include_and_exclude_match_whole_name_components():
    """A prefix names a module or parameter, not the start of a name: "1" is not "10"."""
    net = nn.Sequential(*[nn.Linear(2, 2, rng=i) for i in range(11)])
    names = [r.name for r in net.parameter_refs(exclude=("1",))]
    assert "1.weight" not in names and "10.weight" in names and len(names) == 20
    assert [r.name for r in net.parameter_refs(include="1")] == ["1.weight", "1.bias"]
    assert [r.name for r in net.parameter_refs(include=("10.bias",))] == ["10.bias"]


def test_train_eval_recurse():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net.train(False)
    assert not any(m.training for m in net.modules())


def test_zero_grad_and_accumulation():
    net = Net()
    x = x_batch()
    net.features[3].reuse_mask = True  # the same dropout mask in both passes
    y = net.forward(x)
    net.backward(np.ones_like(y))
    first = {r.name: r.grad.copy() for r in net.parameter_refs()}
    assert any(np.any(g != 0) for g in first.values())
    net.forward(x)
    net.backward(np.ones_like(y))
    for r in net.parameter_refs():
        np.testing.assert_allclose(r.grad, 2 * first[r.name], rtol=1e-5, atol=1e-7)
    refs = {r.name: r.grad for r in net.parameter_refs()}
    net.zero_grad()
    for r in net.parameter_refs():
        assert np.all(r.grad == 0) and r.grad is refs[r.name]  # zeroed in place


def test_astype_casts_everything():
    net = Net().astype(np.float64)
    for m in net.modules():
        for store in (m.params, m.grads, m.buffers):
            assert all(a.dtype == np.float64 for a in store.values())
    y = net.forward(x_batch(dtype=np.float64))
    assert y.dtype == np.float64
    assert net.backward(np.ones_like(y)).dtype == np.float64


def test_astype_leaves_integer_and_boolean_arrays_alone():
    """Only floating arrays are cast: a counter or a boolean mask a module keeps stays as it is."""
    m = nn.Module()
    m.register_param("w", np.ones(2, np.float32))
    m.register_buffer("steps", np.arange(3, dtype=np.int64))
    m.register_buffer("keep", np.array([True, False]))
    m.astype(np.float64)
    assert m.params["w"].dtype == np.float64 and m.grads["w"].dtype == np.float64
    assert m.buffers["steps"].dtype == np.int64 and m.buffers["keep"].dtype == bool


def test_child_registration_and_repr():
    net = Net()
    assert list(net.children) == ["features", "fc"]
    net.fc = None  # replacing a child by a non-module unregisters it
    assert list(net.children) == ["features"]
    text = repr(Net())
    assert "Linear(in_features=4, out_features=6" in text and "(fc):" in text and "BatchNorm1d(6" in text
    assert repr(nn.ReLU()) == "ReLU()"                        # a module without children: one line
    assert repr(nn.Linear(4, 6, rng=0)) == "Linear(in_features=4, out_features=6, bias=True)"


def test_load_state_dict_takes_cupy_arrays_into_a_numpy_module(host_backed_cupy):
    """A GPU model's state_dict (CuPy arrays) loads into a NumPy module, as the docstring promises
    ("cast to the existing dtype and backend"): CuPy refuses ``np.asarray`` of its arrays
    (cupy/_core/core.pyx, ``__array__``: TypeError "Implicit conversion to a NumPy array is not
    allowed"), so the values must come over by ``.get()``."""
    net = Net()
    state = {k: host_backed_cupy(np.asarray(v, np.float64) + 1) for k, v in net.state_dict().items()}
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(next(iter(state.values())))     # the CuPy refusal the loader must avoid
    net.load_state_dict(state)
    for k, v in net.state_dict().items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32
        np.testing.assert_allclose(v, state[k].host.astype(np.float32))
