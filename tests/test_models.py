"""WRN and VGG models: structure, parameter counts, names, and whole-model gradient checks."""
import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npmask.gradcheck import check_layer, directional_check
from npmask.models import VGG, available, create, get_submodule, set_submodule
from npmask.nn import BatchNorm2d, Dropout, Linear, softmax_cross_entropy
from npmask.nn.conv import Conv2d
from npmask.nn.residual import BasicBlock


def images(n, size, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(dtype)


# ---------------------------------------------------------------------------- parameter count
def wrn_param_count(depth, k, classes):
    """The count implied by docs/design.md, section 5, written independently of the model code.

    Per 3x3 conv c_in -> c_out: 9 c_in c_out weights (no bias); per BN: 2 c (weight, bias);
    per stage: the first block has a 1x1 projection conv + BN; fc: 64k * classes + classes.
    """
    n = (depth - 4) // 6
    total = 9 * 3 * 16 + 2 * 16  # stem conv + BN
    c_in = 16
    for w in (16 * k, 32 * k, 64 * k):
        total += 9 * c_in * w + 9 * w * w + 2 * (2 * w)   # first block: conv1, conv2, bn1, bn2
        total += c_in * w + 2 * w                          # projection shortcut: 1x1 conv + BN
        total += (n - 1) * (2 * 9 * w * w + 2 * (2 * w))   # the other blocks
        c_in = w
    return total + 64 * k * classes + classes


def test_wrn28_4_parameter_count():
    model = create("wrn28_4", num_classes=10, input_size=64)
    expected = wrn_param_count(28, 4, 10)
    print(f"WRN-28-4, 10 classes: {model.num_parameters():,} parameters (structure implies {expected:,}; "
          f"{expected - (256 * 10 + 10):,} without the classifier)")
    assert model.num_parameters() == expected == 5_849_946
    n_convs = sum(isinstance(m, Conv2d) for m in model.modules())
    assert n_convs == 1 + 3 * 4 * 2 + 3  # stem, 12 blocks x 2, 3 projections


@pytest.mark.parametrize("depth,k", [(10, 1), (16, 2), (22, 1), (28, 2)])
def test_wrn_parameter_count_other_sizes(depth, k):
    assert create(f"wrn{depth}_{k}", num_classes=7).num_parameters() == wrn_param_count(depth, k, 7)


def test_vgg16_parameter_count():
    # 13 convs with bias, 512 -> 512 -> 512 -> 10 classifier at 32x32 (1x1 final map)
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512)] + [(512, 512)] * 5
    expected = sum(9 * a * b + b for a, b in convs) + (512 * 512 + 512) * 2 + 512 * 10 + 10
    assert create("vgg16", 10).num_parameters() == expected
    bn = sum(2 * b for _, b in convs)
    assert create("vgg16_bn", 10).num_parameters() == expected + bn


# ---------------------------------------------------------------------------- shapes and names
@pytest.mark.parametrize("name,size", [("wrn10_1", 8), ("wrn10_1", 13), ("wrn16_2", 32), ("wrn28_1", 64)])
def test_wrn_shapes(name, size):
    model = create(name, num_classes=5, input_size=size)
    x = images(2, size)
    h = model.relu(model.bn1(model.conv1(x)))
    for i, c in enumerate((16, 32, 64), start=1):
        h = getattr(model, f"layer{i}")(h)
        side = math.ceil(size / 2 ** i)  # each stage halves the resolution (3x3 pad 1 / 1x1, stride 2)
        assert h.shape == (2, c * model.width, side, side)
    y = model.forward(x)
    assert y.shape == (2, 5) and y.dtype == np.float32
    dx = model.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == np.float32


@pytest.mark.parametrize("name,size,classes", [("vgg11", 32, 10), ("vgg11_bn", 64, 3), ("vgg16_bn", 32, 100)])
def test_vgg_shapes(name, size, classes):
    model = create(name, num_classes=classes, input_size=size)
    assert model.classifier[0].params["weight"].shape == (512, 512 * (size // 32) ** 2)
    y = model.forward(images(2, size))
    assert y.shape == (2, classes) and y.dtype == np.float32
    assert model.backward(np.ones_like(y)).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="built for"):
        model.forward(images(1, size + 32))


def test_pytorch_like_names():
    names = dict(create("wrn16_1", 10).named_parameters())
    for n in ("conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
              "layer1.0.shortcut.0.weight", "layer1.0.shortcut.1.weight", "layer3.1.conv2.weight",
              "fc.weight", "fc.bias"):
        assert n in names, n
    assert "layer1.1.shortcut.0.weight" not in names  # only the first block of a stage projects
    assert not any(n.startswith("layer4") for n in names)
    buffers = dict(create("wrn16_1", 10).named_buffers())
    assert "layer2.0.shortcut.1.running_var" in buffers
    vnames = dict(create("vgg11_bn", 10).named_parameters())
    for n in ("features.0.weight", "features.0.bias", "features.1.weight", "classifier.0.weight",
              "classifier.6.weight"):
        assert n in vnames, n


@pytest.mark.parametrize("name", ["wrn16_2", "vgg11", "vgg16_bn"])
def test_head_name_and_followed_by_bn(name):
    model = create(name, num_classes=4)
    head = get_submodule(model, model.head_name)
    assert isinstance(head, Linear) and head.params["weight"].shape[0] == 4
    assert head is list(m for m in model.modules() if isinstance(m, Linear))[-1]
    modules = dict(model.named_modules())
    for path, m in modules.items():
        if not isinstance(m, (Conv2d, Linear)):
            continue
        # where a BN consumes this layer's output: the next sibling in a Sequential ("3" -> "4"),
        # conv1 -> bn1 in the stem and the blocks
        parent, _, leaf = path.rpartition(".")
        nxt = f"{parent}.{int(leaf) + 1}" if leaf.isdigit() else path.replace("conv", "bn")
        nxt = nxt.lstrip(".")
        expected = isinstance(modules.get(nxt), BatchNorm2d)
        assert m.followed_by_bn is expected, path
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    assert all(c.followed_by_bn for c in convs) == (name != "vgg11")


def test_set_submodule_swaps_the_layer_used_by_forward():
    model = create("wrn10_1", 3, input_size=8).eval()
    x = images(2, 8)
    y0 = model.forward(x)
    for path in ("layer1.0.conv1", "layer1.0.shortcut.0"):
        old = get_submodule(model, path)
        new = Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        new.params["weight"][...] = 0
        assert set_submodule(model, path, new) is old
        assert get_submodule(model, path) is new
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in create("wrn10_1", 3).named_parameters()]
    assert not np.allclose(model.forward(x), y0)
    with pytest.raises(KeyError, match="layer1.0 has children"):
        get_submodule(model, "layer1.0.conv9")


def test_create_errors_and_available():
    with pytest.raises(ValueError, match="vgg16_bn"):
        create("resnet101", 10)
    with pytest.raises(ValueError, match="6n"):
        create("wrn12_1", 10)
    with pytest.raises(ValueError, match="input_size"):
        create("vgg11", 10, input_size=16)
    assert "vgg11_bn" in available() and any(a.startswith("wrn") for a in available())
    a, b = create("wrn10_1", 3, seed=1), create("wrn10_1", 3, seed=1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p, q, err_msg=n)
    assert not np.array_equal(a.conv1.params["weight"], create("wrn10_1", 3, seed=2).conv1.params["weight"])


# ---------------------------------------------------------------------------- gradient checks
@settings(max_examples=6)
@given(in_planes=st.integers(1, 3), out_planes=st.integers(1, 4), stride=st.sampled_from([1, 2]),
       size=st.integers(3, 6), seed=st.integers(0, 2 ** 16), train=st.booleans())
def test_basic_block_gradcheck(in_planes, out_planes, stride, size, seed, train):
    block = BasicBlock(in_planes, out_planes, stride, dtype=np.float64, rng=seed).train(train)
    assert (block.shortcut is None) == (stride == 1 and in_planes == out_planes)
    rng = np.random.default_rng(seed)
    for bn in (block.bn1, block.bn2):  # non-trivial affine maps and running statistics
        bn.params["weight"][...] = rng.uniform(0.5, 1.5, out_planes)
        bn.params["bias"][...] = rng.uniform(-0.5, 0.5, out_planes)
        bn.buffers["running_mean"][...] = rng.uniform(-0.2, 0.2, out_planes)
        bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, out_planes)
    x = rng.standard_normal((2, in_planes, size, size))
    # central differences are meaningless across a ReLU kink: keep both ReLUs' inputs away from it
    probe = copy.deepcopy(block)
    a1 = probe.bn1.forward(probe.conv1.forward(x))
    skip = x if probe.shortcut is None else probe.shortcut.forward(x)
    a2 = probe.bn2.forward(probe.conv2.forward(np.maximum(a1, 0))) + skip
    assume(min(np.abs(a1).min(), np.abs(a2).min()) > 1e-3)
    check_layer(block, x, seed=seed, tol=1e-5)


@pytest.mark.parametrize("in_planes,stride", [(4, 1), (2, 2)])
def test_basic_block_sums_in_place_on_threads_give_the_serial_bits(in_planes, stride):
    # The block adds its branches and rectifies in arrays of its own, split over threads: the same
    # bits on 3 threads as on 1, and neither its input nor the upstream gradient is written.
    from npmask import config
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, in_planes, 6, 6)).astype(np.float32)
    dy = rng.standard_normal((5, 4, 6 // stride, 6 // stride)).astype(np.float32)
    x_copy, dy_copy, results = x.copy(), dy.copy(), []
    for threads in (3, 1):
        with config.using(threads=threads, parallel_min_floats=0):
            block = BasicBlock(in_planes, 4, stride, rng=0).train()
            y = block.forward(x)
            dx = block.backward(dy)
            grads = [g for _, m in block.named_modules() for _, g in sorted(m.grads.items())]
            assert len(grads) == len(list(block.named_parameters()))    # every parameter trains
            results.append((y, dx, *grads))
            np.testing.assert_array_equal(x, x_copy)
            np.testing.assert_array_equal(dy, dy_copy)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert (results[0][0] >= 0).all()


# The direction is standard normal over every input and parameter entry: big next to weights of
# scale ~0.1, so a step h moves thousands of ReLU (and max-pool) inputs by ~100 h. With the default
# h = 1e-5 some of them cross their kink inside [-h, h] and the central difference is off by ~1e-3;
# at h = 1e-7 no kink is crossed, and float64 rounding (~1e-16 / h) stays far below the tolerance.
# VGG-11 (131k ReLUs in its first layer alone, fan-in up to 4608) needs h = 1e-8 for the same.
H = 1e-7


def cross_entropy_of(labels):
    return lambda logits: softmax_cross_entropy(logits, labels)


def warm_up_running_stats(model, x, steps=3):
    """Move the BN running statistics away from (0, 1), so eval mode is a real test."""
    model.train()
    for i in range(steps):
        model.forward(x * (1.0 + 0.3 * i) + 0.2 * i)


@pytest.mark.parametrize("name,size", [("wrn10_1", 16), ("wrn16_1", 8)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrn_directional_gradcheck(name, size, mode):
    model = create(name, num_classes=4, input_size=size, dtype=np.float64, seed=3)
    x = images(3, size, seed=4, dtype=np.float64)
    if mode == "eval":
        warm_up_running_stats(model, x)
        model.eval()
    labels = np.array([0, 3, 1])
    analytic, numeric = directional_check(model, x, cross_entropy_of(labels), seed=5, h=H, tol=1e-6)
    assert abs(analytic) > 1e-3  # a real derivative, not 0 = 0


TINY_VGG = [4, "M", 8, 8, "M", 8, "M"]


@pytest.mark.parametrize("cfg,size,batch_norm", [(TINY_VGG, 16, True), (TINY_VGG, 16, False),
                                                 ("11", 32, True)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vgg_directional_gradcheck(cfg, size, batch_norm, mode):
    hidden = 16 if cfg == TINY_VGG else 32
    model = VGG(cfg, batch_norm=batch_norm, num_classes=3, input_size=size, hidden=hidden,
                dtype=np.float64, rng=7)
    x = images(2, size, seed=8, dtype=np.float64)
    if mode == "eval":
        warm_up_running_stats(model, x)
        model.eval()
    for m in model.modules():
        if isinstance(m, Dropout):
            m.reuse_mask = True  # the same dropout mask on every forward of the check
    labels = np.array([2, 0])
    h = H if cfg == TINY_VGG else H / 10
    analytic, _ = directional_check(model, x, cross_entropy_of(labels), seed=9, h=h, tol=1e-6)
    assert abs(analytic) > 1e-3


def test_training_skips_the_input_gradient_of_the_layer_named_by_input_layer_name():
    from npmask.training.loop import input_gradient_skipped
    wrn = create("wrn10_1", num_classes=3, input_size=8, seed=0)
    vgg = VGG(TINY_VGG, num_classes=3, input_size=16, hidden=8, rng=0)
    for model, name in ((wrn, "conv1"), (vgg, "features.0")):
        assert model.input_layer_name == name
        layer = get_submodule(model, name)
        with input_gradient_skipped(model):
            assert layer.need_input_grad is False
            model.train().forward(images(2, model.input_size, seed=1))
            assert model.backward(np.ones((2, 3), np.float32)) is None
        assert layer.need_input_grad is True
    pooled_first = VGG(["M", 4, "M"], num_classes=3, input_size=16, hidden=8, rng=0)
    assert pooled_first.input_layer_name is None
    with input_gradient_skipped(pooled_first):             # nothing to skip: left as it is
        assert pooled_first.features[1].need_input_grad is True
