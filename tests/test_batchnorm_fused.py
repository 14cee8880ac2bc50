"""Batch norm with the ReLU and the residual sum fused in (setting ``fuse_bn_relu``), on NumPy.

The fused path must give exactly the bits of the separate modules (BatchNorm, the in-place addition
of npmask.nn.parallel.add_into, ReLU): for the layer alone, for the blocks' BNReLU step
(npmask/nn/bn_relu.py), and for whole blocks and networks forward and backward with their parameter
gradients and running statistics, over shapes, train and eval mode, frozen and learned batch norms,
thread counts and dtypes.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npmask import config, models, nn
from npmask.gradcheck import check_layer
from npmask.masking.layers import SharedFrozen
from npmask.models import VGG, DenseNet, ResNet, ResNet26RA
from npmask.multidomain import MultiDomainModel
from npmask.nn.batchnorm import fuse_relu_into
from npmask.nn.bn_relu import BNReLU
from npmask.nn.module import Module
from npmask.nn.parallel import add_into
from npmask.nn.residual import BasicBlock
from test_batchnorm_fast import random_batchnorm


def _bn(shape, dtype, training, frozen, seed=0):
    return random_batchnorm(shape, dtype, training, frozen, np.random.default_rng(seed))


def _run_bn(shape, dtype, training, frozen, relu, residual, fused):
    """(y, dx, d of the residual or None, grads, running stats) of BN [+ residual] [ReLU]."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype) if residual else None
    dy = rng.standard_normal(shape).astype(dtype)
    layer = _bn(shape, dtype, training, frozen)
    if fused:
        y = layer.forward(x, relu=relu, residual=r)
        out = layer.backward(dy)
        dx, d = out if residual else (out, None)
    else:
        act = nn.ReLU(inplace=True)
        y = layer(x)
        if residual:
            add_into(np, y, r)
        if relu:
            y = act(y)
        d = act.backward(dy) if relu else dy
        dx = layer.backward(d)
        d = d if residual else None
    return ([y, dx, d] + [layer.grads.get(k) for k in ("weight", "bias")]
            + [layer.buffers["running_mean"], layer.buffers["running_var"]])


def _assert_same_bits(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(u, v)
            assert np.array_equal(np.signbit(u), np.signbit(v))    # -0.0 and 0.0 too


@given(n=st.integers(2, 5), c=st.integers(1, 7), hw=st.sampled_from([(1, 1), (3, 4), (5, 5), None]),
       training=st.booleans(), frozen=st.booleans(), relu=st.booleans(), residual=st.booleans(),
       threads=st.sampled_from([1, 2, 3]), dtype=st.sampled_from([np.float32, np.float64]))
def test_fused_batchnorm_gives_the_bits_of_the_separate_modules(n, c, hw, training, frozen, relu,
                                                                residual, threads, dtype):
    shape = (n, c) if hw is None else (n, c) + hw
    with config.using(threads=threads, parallel_min_floats=0):
        fused = _run_bn(shape, dtype, training, frozen, relu, residual, fused=True)
        with config.using(threads=1):
            plain = _run_bn(shape, dtype, training, frozen, relu, residual, fused=False)
    _assert_same_bits(fused, plain)


def test_fused_batchnorm_keeps_no_mask_and_checks_the_residual_shape():
    layer = _bn((4, 3, 5, 5), np.float32, True, False)
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    y = layer.forward(x, relu=True)
    assert (y >= 0).all() and layer._cache[5] is y and layer._cache[1].shape == (3,)
    assert not any(isinstance(a, np.ndarray) and a.dtype == bool for a in layer._cache)
    with pytest.raises(ValueError, match="residual"):
        layer.forward(x, relu=True, residual=x[:, :2])


class _FusedBN(Module):
    """relu(bn(x) + r) as one layer of x, with a fixed r (for check_layer)."""

    def __init__(self, bn, r):
        super().__init__()
        self.bn, self.r = bn, r

    def forward(self, x):
        return self.bn.forward(x, relu=True, residual=self.r)

    def backward(self, dy):
        return self.bn.backward(dy)[0]


@pytest.mark.parametrize("training", [True, False])
def test_fused_batchnorm_gradients_against_finite_differences(training):
    rng = np.random.default_rng(3)
    bn = _bn((5, 3, 4, 4), np.float64, training, frozen=False)
    layer = _FusedBN(bn, rng.standard_normal((5, 3, 4, 4)) * 0.5).train(training)
    check_layer(layer, rng.standard_normal((5, 3, 4, 4)), seed=2, tol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_bn_relu_step_goes_back_the_way_its_forward_ran(residual, inplace):
    """BNReLU: the setting at forward time picks the way, backward follows it even after the setting
    has changed, both ways give the same bits, and the unfused sum is made in bn's output exactly
    when the ReLU works in place."""
    shape = (3, 4, 5, 5)
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    skip = rng.standard_normal(shape) if residual else None
    results = []
    for fused in (True, False):
        bn, relu, step = _bn(shape, np.float64, True, False), nn.ReLU(inplace=inplace), BNReLU()
        made, forward = [], bn.forward

        def recorded(x, **kw):                             # bn's output, and a copy of it as made
            y = forward(x, **kw)
            made.append((y, y.copy()))
            return y
        bn.forward = recorded
        with config.using(fuse_bn_relu=fused):
            y = step.forward(bn, relu, x, residual=skip)
        assert step.fused is fused and (relu._mask is None) is fused
        if not fused:
            (bn_out, as_made), = made
            assert (y is bn_out) is inplace
            assert np.array_equal(bn_out, as_made) is not inplace     # not written over otherwise
        with config.using(fuse_bn_relu=not fused):
            out = step.backward(bn, relu, dy)
        dx, d = out if residual else (out, None)
        results.append([y, dx, d, bn.grads["weight"], bn.grads["bias"]])
    _assert_same_bits(*results)


def test_bn_relu_step_runs_a_module_without_the_fused_call_unfused():
    """In a Sequential any module followed by a ReLU is one BNReLU step: relu(m(x)) as written."""
    x = np.random.default_rng(7).standard_normal((3, 4))
    linear, relu, step = nn.Linear(4, 5, rng=0).astype(np.float64), nn.ReLU(), BNReLU()
    y = step.forward(linear, relu, x)
    assert config.settings.fuse_bn_relu and not step.fused
    np.testing.assert_array_equal(y, np.maximum(linear(x), 0))
    dx = step.backward(linear, relu, np.ones_like(y))
    np.testing.assert_array_equal(dx, linear.backward(np.ones_like(y) * (y > 0)))


def _wrn_step(model_name, size, dtype, training, fused, threads, batch=4):
    """(logits, input gradient, every gradient, every buffer) of one forward/backward."""
    with config.using(fuse_bn_relu=fused, threads=threads, parallel_min_floats=0):
        net = models.create(model_name, num_classes=5, input_size=size, dtype=dtype, seed=0).train(training)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 3, size, size)).astype(dtype)
        y = net.forward(x)
        dx = net.backward(rng.standard_normal(y.shape).astype(dtype))
    grads = [g for _, m in net.named_modules() for _, g in sorted(m.grads.items())]
    buffers = [b for _, b in net.named_buffers()]
    return [y, dx] + grads + buffers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_wrn_gives_the_bits_of_the_unfused_wrn(dtype, training, threads):
    fused = _wrn_step("wrn10_1", 16, dtype, training, True, threads)
    plain = _wrn_step("wrn10_1", 16, dtype, training, False, 1)
    assert len(fused) > 20
    _assert_same_bits(fused, plain)


@pytest.mark.parametrize("in_planes, out_planes, stride", [(4, 4, 1), (3, 6, 2), (4, 6, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_basic_block_gives_the_bits_of_the_unfused_block(in_planes, out_planes, stride, training):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, in_planes, 7, 7)).astype(np.float32)
    results = []
    for fused in (True, False):
        with config.using(fuse_bn_relu=fused, parallel_min_floats=0):
            block = BasicBlock(in_planes, out_planes, stride, rng=0).train(training)
            y = block.forward(x)
            dx = block.backward(np.random.default_rng(5).standard_normal(y.shape).astype(np.float32))
            assert block._bn1_relu1.fused is fused and block._bn2_relu2.fused is fused
        results.append([y, dx] + [g for _, m in block.named_modules() for _, g in sorted(m.grads.items())]
                       + [b for _, b in block.named_buffers()])
    _assert_same_bits(*results)


@pytest.mark.parametrize("variant", ["piggyback", "full"])
def test_fused_domain_network_gives_the_bits_of_the_unfused_one(variant):
    """piggyback shares the backbone's batch norms (SharedFrozen, which hands the fused call on)."""
    results = []
    for fused in (True, False):
        with config.using(fuse_bn_relu=fused):
            backbone = models.create("wrn10_1", num_classes=5, input_size=8, dtype=np.float32, seed=0)
            model = MultiDomainModel(backbone)
            model.add_domain("d", num_classes=3, variant=variant, seed=1)
            model.set_domain("d").train()
            net = model.network()
            if variant == "piggyback":
                assert isinstance(net.bn1, SharedFrozen) and fuse_relu_into(net.bn1) is fused
            x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
            y = model.forward(x)
            dx = net.backward(np.ones_like(y))
        results.append([y, dx] + [g for _, m in net.named_modules() for _, g in sorted(m.grads.items())])
    _assert_same_bits(*results)


def test_the_setting_selects_the_path_and_keeps_the_module_tree():
    with config.using(fuse_bn_relu=False):
        off = models.create("wrn10_1", num_classes=5, input_size=8, seed=0)
        assert not fuse_relu_into(off.bn1)
    on = models.create("wrn10_1", num_classes=5, input_size=8, seed=0)
    assert config.settings.fuse_bn_relu and fuse_relu_into(on.bn1) and not fuse_relu_into(on.relu)
    assert repr(on) == repr(off)
    assert list(on.state_dict()) == list(off.state_dict())
    assert "fuse_bn_relu" in config.Settings.describe()
    with pytest.raises(TypeError):
        with config.using(fuse_bn_relu=1):
            pass


def _tiny(name, dtype):
    """A small member of each family (as tests/test_resnet_densenet.py's)."""
    return {
        "resnet_bottleneck": lambda: ResNet("bottleneck", (1, 2, 1, 1), num_classes=3, input_size=32,
                                            width=2, dtype=dtype, rng=1),
        "resnet_basic": lambda: ResNet("basic", (2, 1, 1, 1), num_classes=3, input_size=32, width=2,
                                       dtype=dtype, rng=2),
        "densenet": lambda: DenseNet(3, (2, 2, 2), num_init_features=4, bn_size=2, num_classes=3,
                                     input_size=32, dtype=dtype, rng=3),
        "resnet26_ra": lambda: ResNet26RA(num_classes=3, input_size=16, nblocks=(2, 1, 1),
                                          factor=0.125, dtype=dtype, rng=4),
        "vgg_bn": lambda: VGG([4, "M", 8, "M"], batch_norm=True, num_classes=3, input_size=16,
                              hidden=8, adaptive_pool=3, dtype=dtype, rng=5),
    }[name]()


@pytest.mark.parametrize("name, fused_bns", [("resnet_bottleneck", 16), ("resnet_basic", 11),
                                             ("densenet", 15), ("resnet26_ra", 1), ("vgg_bn", 2)])
@pytest.mark.parametrize("training", [True, False])
def test_other_families_fuse_with_the_same_bits(name, fused_bns, training, monkeypatch):
    """ResNet blocks and stem, DenseNet layers and transitions, BN + ReLU in a Sequential."""
    size = {"resnet26_ra": 16, "vgg_bn": 16}.get(name, 32)
    calls = []
    forward = nn.BatchNorm.forward
    monkeypatch.setattr(nn.BatchNorm, "forward",
                        lambda self, x, relu=False, residual=None:
                        calls.append(relu) or forward(self, x, relu=relu, residual=residual))
    results = []
    for fused in (True, False):
        calls.clear()
        with config.using(fuse_bn_relu=fused, parallel_min_floats=0, threads=2):
            net = _tiny(name, np.float64).train(training)
            rng = np.random.default_rng(0)
            y = net.forward(rng.standard_normal((2, 3, size, size)))
            dx = net.backward(rng.standard_normal(y.shape))
        assert sum(calls) == (fused_bns if fused else 0)
        results.append([y, dx] + [g for _, m in net.named_modules() for _, g in sorted(m.grads.items())]
                       + [b for _, b in net.named_buffers()])
    _assert_same_bits(*results)
