"""torchvision's ResNets, DenseNet-121 and VGG-16 and the residual-adapters ResNet-26: names and
shapes against tables written here from the published architectures, gradient checks of the new
layers, whole-model directional checks, and every conv/hidden linear masked by every variant."""
import numpy as np
import pytest

from npmask.gradcheck import check_layer, directional_check
from npmask.masking.layers import MaskedConv2d, MaskedLinear, SharedFrozen
from npmask.masking.variants import variant_names
from npmask.models import VGG, DenseNet, ResNet, ResNet26RA, create, get_submodule, head_name
from npmask.multidomain import MultiDomainModel
from npmask.nn import BatchNorm2d, Dropout, Linear, softmax_cross_entropy
from npmask.nn.adaptive import AdaptiveAvgPool2d, adaptive_bins
from npmask.nn.conv import Conv2d
from npmask.nn.dense import DenseLayer, Transition, concat_channels
from npmask.nn.ra_blocks import RABasicBlock, ZeroPadShortcut
from npmask.nn.resnet_blocks import Bottleneck, ResNetBasicBlock


def images(n, size, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(dtype)


# ---------------------------------------------------------------------------- torchvision tables
# Written from the papers / torchvision's published definitions, independently of npmask's code:
# (name, shape) of every parameter and BN buffer in torchvision's state_dict order.
def _bn(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)),
            (f"{prefix}.running_mean", (c,)), (f"{prefix}.running_var", (c,))]


def tv_resnet50_table(classes=1000):
    t = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    inp = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            t += [(f"{p}.conv1.weight", (planes, inp, 1, 1))] + _bn(f"{p}.bn1", planes)
            t += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            t += [(f"{p}.conv3.weight", (4 * planes, planes, 1, 1))] + _bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                t += [(f"{p}.downsample.0.weight", (4 * planes, inp, 1, 1))] + _bn(f"{p}.downsample.1", 4 * planes)
            inp = 4 * planes
    return t + [("fc.weight", (classes, 2048)), ("fc.bias", (classes,))]


def tv_densenet121_table(classes=1000):
    t = [("features.conv0.weight", (64, 3, 7, 7))] + _bn("features.norm0", 64)
    c = 64
    for i, n in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, n + 1):
            p = f"features.denseblock{i}.denselayer{j}"
            t += _bn(f"{p}.norm1", c) + [(f"{p}.conv1.weight", (128, c, 1, 1))]
            t += _bn(f"{p}.norm2", 128) + [(f"{p}.conv2.weight", (32, 128, 3, 3))]
            c += 32
        if i < 4:
            t += _bn(f"features.transition{i}.norm", c) + [(f"features.transition{i}.conv.weight", (c // 2, c, 1, 1))]
            c //= 2
    return t + _bn("features.norm5", c) + [("classifier.weight", (classes, 1024)), ("classifier.bias", (classes,))]


def tv_vgg16_table(classes=1000):
    t, c, idx = [], 3, 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            idx += 1
            continue
        t += [(f"features.{idx}.weight", (v, c, 3, 3)), (f"features.{idx}.bias", (v,))]
        c, idx = v, idx + 2                           # conv, ReLU
    return t + [("classifier.0.weight", (4096, 512 * 7 * 7)), ("classifier.0.bias", (4096,)),
                ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
                ("classifier.6.weight", (classes, 4096)), ("classifier.6.bias", (classes,))]


def n_params(table):
    return sum(int(np.prod(s)) for n, s in table if not n.endswith(("running_mean", "running_var")))


class ShapeOnlyRng(np.random.Generator):
    """Zeros for the initial weights: builds a full-size model without drawing 138M random numbers."""

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return np.zeros(size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size)


def state_table(model):
    params = dict(model.named_parameters())
    sd = model.state_dict()
    return [(k, tuple(v.shape)) for k, v in sd.items()], sum(int(p.size) for p in params.values())


@pytest.mark.parametrize("name,table,total", [
    ("resnet50", tv_resnet50_table, 25_557_032),
    ("densenet121", tv_densenet121_table, 7_978_856),
    ("vgg16", tv_vgg16_table, 138_357_544)])
def test_torchvision_names_shapes_and_counts(name, table, total):
    expected = table()
    assert n_params(expected) == total
    model = create(name, 1000, input_size=224, seed=ShapeOnlyRng(np.random.PCG64(0)))
    got, count = state_table(model)
    assert sorted(got) == sorted(expected)
    assert [n for n, _ in got if not n.endswith(("running_mean", "running_var"))] == \
        [n for n, _ in expected if not n.endswith(("running_mean", "running_var"))]   # parameter order
    assert count == total == model.num_parameters()
    assert head_name(name) == model.head_name


def test_resnet18_34_and_vgg16_bn_counts_real_instantiation():
    # the published totals of torchvision's resnet18 / resnet34 (weights drawn for real here)
    assert create("resnet18", 1000).num_parameters() == 11_689_512
    assert create("resnet34", 1000, seed=ShapeOnlyRng(np.random.PCG64(0))).num_parameters() == 21_797_672
    vgg_bn = create("vgg16_bn", 1000, input_size=224, seed=ShapeOnlyRng(np.random.PCG64(0)))
    assert vgg_bn.num_parameters() == 138_365_992                       # torchvision vgg16_bn
    assert isinstance(vgg_bn.features[1], BatchNorm2d) and vgg_bn.features[2].__class__.__name__ == "ReLU"


def test_resnet26_ra_layout():
    # srebuffi/residual_adapters models.py, mode "normal", factor 1, one task
    model = create("resnet26_ra", 1000)
    sd = model.state_dict()
    assert sd["pre_layers_conv.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["pre_layers_conv.bns.0.running_var"].shape == (32,)
    assert sd["layer1.0.conv1.conv.weight"].shape == (64, 32, 3, 3)
    assert sd["layer1.0.conv2.1.conv.weight"].shape == (64, 64, 3, 3)
    assert sd["layer3.3.conv2.1.bns.0.bias"].shape == (256,)
    assert sd["end_bns.0.0.weight"].shape == (256,) and sd["linears.0.weight"].shape == (1000, 256)
    convs = [n for n in sd if n.endswith("conv.weight")]
    assert len(convs) == 1 + 3 * 4 * 2            # no projection convs: the shortcut has no weights
    bn = sum(1 for n in sd if n.endswith("running_mean"))
    expected = 9 * 3 * 32 + sum(9 * a * b + 9 * b * b for a, b in [(32, 64), (64, 128), (128, 256)]) \
        + 3 * sum(2 * 9 * b * b for b in (64, 128, 256)) + 2 * (32 + 2 * 4 * (64 + 128 + 256) + 256) \
        + 256 * 1000 + 1000
    assert bn == 1 + 24 + 1 and model.num_parameters() == expected
    y = model.eval().forward(images(2, 64, dtype=np.float32))
    assert y.shape == (2, 1000) and y.dtype == np.float32


# ---------------------------------------------------------------------------- layer gradient checks
def randomise_bn(module, rng):
    for m in module.modules():
        if isinstance(m, BatchNorm2d):
            c = m.num_features
            m.params["weight"][...] = rng.uniform(0.5, 1.5, c)
            m.params["bias"][...] = rng.uniform(-0.5, 0.5, c)
            m.buffers["running_mean"][...] = rng.uniform(-0.2, 0.2, c)
            m.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)


LAYERS = {
    "bottleneck_s2": lambda: Bottleneck(3, 2, stride=2, dtype=np.float64, rng=1),
    "bottleneck_id": lambda: Bottleneck(8, 2, stride=1, dtype=np.float64, rng=1),
    "basic_s2": lambda: ResNetBasicBlock(2, 3, stride=2, dtype=np.float64, rng=2),
    "basic_id": lambda: ResNetBasicBlock(3, 3, dtype=np.float64, rng=2),
    "dense_layer": lambda: DenseLayer(3, 2, bn_size=2, dtype=np.float64, rng=3),
    "transition": lambda: Transition(4, 2, dtype=np.float64, rng=4),
    "ra_block_s2": lambda: RABasicBlock(2, 3, stride=2, dtype=np.float64, rng=5),
    "ra_block_id": lambda: RABasicBlock(3, 3, dtype=np.float64, rng=5),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("train", [True, False])
def test_block_gradcheck(name, train):
    layer = LAYERS[name]().train(train)
    rng = np.random.default_rng(7)
    randomise_bn(layer, rng)
    c = layer.in_planes if hasattr(layer, "in_planes") else (layer.in_channels if hasattr(layer, "in_channels")
                                                             else layer.norm.num_features)
    x = rng.standard_normal((2, c, 6, 6))
    check_layer(layer, x, seed=3, tol=1e-5)


@pytest.mark.parametrize("size,out", [((6, 6), 3), ((5, 7), (3, 2)), ((2, 3), 7), ((4, 4), 4)])
def test_adaptive_avg_pool_gradcheck_and_bins(size, out):
    x = np.random.default_rng(0).standard_normal((2, 3) + size)
    pool = AdaptiveAvgPool2d(out)
    check_layer(pool, x, seed=1, tol=1e-7)
    y = pool.forward(x)
    oh, ow = pool.output_size
    assert y.shape == (2, 3, oh, ow)
    # PyTorch's bins: start floor(i*H/o), end ceil((i+1)*H/o)
    assert adaptive_bins(5, 3) == [(0, 2), (1, 4), (3, 5)] and adaptive_bins(2, 7)[:3] == [(0, 1), (0, 1), (0, 1)]
    i, j = oh - 1, 0
    (h0, h1), (w0, w1) = adaptive_bins(size[0], oh)[i], adaptive_bins(size[1], ow)[j]
    np.testing.assert_allclose(y[:, :, i, j], x[:, :, h0:h1, w0:w1].mean(axis=(2, 3)))


def test_zero_pad_shortcut_and_concat():
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4))
    sc = ZeroPadShortcut(2, 5)
    y = sc.forward(x)
    assert y.shape == (2, 5, 2, 2) and not y[:, 2:].any()
    np.testing.assert_allclose(y[:, :2, 0, 0], x[:, :, :2, :2].mean(axis=(2, 3)))
    check_layer(sc, x, seed=2, tol=1e-7)
    a, b = x, x[:, :1] * 3
    np.testing.assert_array_equal(concat_channels(a, b)[:, 2:], b)
    layer = DenseLayer(2, 3, bn_size=1, dtype=np.float64, rng=0).eval()
    out = layer.forward(x)
    np.testing.assert_array_equal(out[:, :2], x)             # the input comes first, unchanged
    assert out.shape == (2, 5, 4, 4)


def test_concat_and_dense_layer_name_the_feature_maps_they_refuse():
    """Mismatched batch or spatial sizes, or a DenseLayer given the wrong channel count: a
    ValueError naming the layer and the shapes, not NumPy's or a child BN's message."""
    x = np.zeros((2, 3, 4, 4))
    for other in (np.zeros((2, 1, 4, 5)), np.zeros((3, 1, 4, 4))):
        with pytest.raises(ValueError, match=r"cannot concatenate feature maps \(2, 3, 4, 4\) and"):
            concat_channels(x, other)
    layer = DenseLayer(2, 3, bn_size=1, dtype=np.float64, rng=0)
    with pytest.raises(ValueError, match=r"DenseLayer expects \(N, 2, H, W\), got \(2, 3, 4, 4\)"):
        layer.forward(x)


# ---------------------------------------------------------------------------- whole models
H = 1e-7


def tiny_models():
    return {
        "resnet_bottleneck": lambda: ResNet("bottleneck", (1, 2, 1, 1), num_classes=3, input_size=32, width=2,
                                            dtype=np.float64, rng=1),
        "resnet_basic": lambda: ResNet("basic", (2, 1, 1, 1), num_classes=3, input_size=32, width=2,
                                       dtype=np.float64, rng=2),
        "densenet": lambda: DenseNet(3, (2, 2, 2), num_init_features=4, bn_size=2, num_classes=3, input_size=32,
                                     dtype=np.float64, rng=3),
        "resnet26_ra": lambda: ResNet26RA(num_classes=3, input_size=16, nblocks=(2, 1, 1), factor=0.125,
                                          dtype=np.float64, rng=4),
        "vgg_adaptive": lambda: VGG([4, "M", 8, "M"], batch_norm=True, num_classes=3, input_size=16, hidden=8,
                                    adaptive_pool=3, dtype=np.float64, rng=5),
    }


@pytest.mark.parametrize("name", ["resnet_bottleneck", "resnet_basic", "densenet"])
def test_every_conv_of_the_torchvision_models_is_followed_by_bn(name):
    """Each conv's output reaches the next layer only through a batch norm (the downsample's
    through its BN, a dense layer's conv2 and a transition's conv through the next block's
    norms), so the variants fix its k0 = 1; the classifier is not."""
    model = tiny_models()[name]()
    convs = {path: m for path, m in model.named_modules() if isinstance(m, Conv2d)}
    assert any("downsample" in p for p in convs) or any("transition" in p for p in convs)
    assert [p for p, m in convs.items() if not m.followed_by_bn] == []
    assert get_submodule(model, model.head_name).followed_by_bn is False


def size_of(model):
    return 16 if isinstance(model, (ResNet26RA, VGG)) else 32


def prepare(model, mode, x):
    if mode == "eval":
        model.train()
        for i in range(3):
            model.forward(x * (1.0 + 0.3 * i) + 0.2 * i)
        model.eval()
    for m in model.modules():
        if isinstance(m, Dropout):
            m.reuse_mask = True


@pytest.mark.parametrize("name", list(tiny_models()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_directional_gradcheck(name, mode):
    model = tiny_models()[name]()
    x = images(3, size_of(model), seed=4)
    prepare(model, mode, x)
    labels = np.array([0, 2, 1])
    analytic, _ = directional_check(model, x, lambda out: softmax_cross_entropy(out, labels), seed=5, h=H, tol=1e-6)
    assert abs(analytic) > 1e-3


@pytest.mark.parametrize("name", ["resnet_bottleneck", "densenet", "resnet26_ra", "vgg_adaptive"])
@pytest.mark.parametrize("variant", ["full", "piggyback", "full_channelwise"])
def test_every_conv_and_hidden_linear_is_masked_and_gradients_check(name, variant):
    backbone = tiny_models()[name]()
    x = images(3, size_of(backbone), seed=6)
    prepare(backbone, "eval", x)
    md = MultiDomainModel(backbone)
    net = md.add_domain("t", 4, variant, seed=0)
    src = dict(backbone.named_modules())
    layers = [p for p, m in src.items() if isinstance(m, (Conv2d, Linear)) and p != backbone.head_name]
    assert layers and all(isinstance(get_submodule(net, p), (MaskedConv2d, MaskedLinear)) for p in layers)
    bns = [p for p, m in src.items() if isinstance(m, BatchNorm2d)]
    kind = SharedFrozen if variant == "piggyback" else BatchNorm2d
    assert all(isinstance(get_submodule(net, p), kind) for p in bns)
    rng = np.random.default_rng(0)
    for m in net.modules():
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            for j in range(4):
                if f"k{j}" in m.params:
                    m.params[f"k{j}"][...] = rng.uniform(0.5, 1.5, m.params[f"k{j}"].shape)
            m.params["mask_real"][...] = rng.uniform(-1, 1, m.params["mask_real"].shape)
            m.freeze("mask_real")      # R acts through a step: finite differences cannot see it
    for m in net.modules():
        if isinstance(m, Dropout):
            m.reuse_mask = True
    md.set_domain("t").train()
    labels = np.array([3, 0, 1])
    analytic, _ = directional_check(net, x, lambda out: softmax_cross_entropy(out, labels), seed=7, h=H, tol=1e-6)
    assert abs(analytic) > 1e-4


@pytest.mark.parametrize("name", list(tiny_models()))
def test_float32_and_float64(name):
    m64 = tiny_models()[name]().eval()
    m32 = tiny_models()[name]().astype(np.float32).eval()
    x = images(2, size_of(m64), seed=8)
    y64, y32 = m64.forward(x), m32.forward(x.astype(np.float32))
    assert y64.dtype == np.float64 and y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)
    assert m32.backward(np.ones_like(y32)).dtype == np.float32


def test_vgg16_adaptive_pool_any_input_size_and_cifar_vgg_unchanged():
    big = VGG([4, "M", 4, "M"], num_classes=2, input_size=224, hidden=8, adaptive_pool=7, rng=0).eval()
    for s in (8, 28, 40):                                  # 2x2, 7x7 (identity pool), 10x10 maps
        assert big.forward(images(1, s, dtype=np.float32)).shape == (1, 2)
    assert create("vgg16", 10, input_size=224).classifier[0].in_features == 512 * 7 * 7
    small = create("vgg11", 10, input_size=32)
    assert not hasattr(small, "avgpool") and small.classifier[0].in_features == 512


def test_all_variants_build_on_densenet():
    backbone = tiny_models()["densenet"]().astype(np.float32).eval()
    md = MultiDomainModel(backbone)
    x = images(2, 32, dtype=np.float32)
    for v in variant_names():
        md.add_domain(v, 2, v, seed=1)
        assert md.predict(x, domain=v).shape == (2, 2)


# ---------------------------------------------------------------------------- forward semantics
# An independent eval-mode forward from the state_dict alone (naive convolution, BN formula, pools
# written with reshapes), following torchvision's and the residual-adapters release's definitions.
from npmask.nn.conv_reference import conv2d_forward_naive  # noqa: E402


def _conv(sd, name, x, stride=1, padding=0):
    return conv2d_forward_naive(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride, padding)


def _bn_eval(sd, name, x):
    s = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
    return (x - sd[f"{name}.running_mean"][:, None, None]) * s[:, None, None] + sd[f"{name}.bias"][:, None, None]


def _relu(x):
    return np.maximum(x, 0)


def _maxpool3s2p1(x):
    n, c, h, w = x.shape
    p = np.full((n, c, h + 2, w + 2), -np.inf)
    p[:, :, 1:-1, 1:-1] = x
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.max([p[:, :, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)], axis=0)


def _avg2(x):
    n, c, h, w = x.shape
    return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def ref_resnet(sd, x, blocks, bottleneck):
    x = _maxpool3s2p1(_relu(_bn_eval(sd, "bn1", _conv(sd, "conv1", x, 2, 3))))
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            stride = 2 if (b == 0 and s > 1) else 1
            if bottleneck:          # v1.5: the stride is on the 3x3 conv2
                out = _relu(_bn_eval(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x)))
                out = _relu(_bn_eval(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, stride, 1)))
                out = _bn_eval(sd, f"{p}.bn3", _conv(sd, f"{p}.conv3", out))
            else:
                out = _relu(_bn_eval(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", x, stride, 1)))
                out = _bn_eval(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", out, 1, 1))
            skip = _bn_eval(sd, f"{p}.downsample.1", _conv(sd, f"{p}.downsample.0", x, stride)) \
                if f"{p}.downsample.0.weight" in sd else x
            x = _relu(out + skip)
    return _linear(sd, "fc", x.mean(axis=(2, 3)))


def ref_densenet(sd, x, block_config):
    f = "features"
    x = _maxpool3s2p1(_relu(_bn_eval(sd, f"{f}.norm0", _conv(sd, f"{f}.conv0", x, 2, 3))))
    for i, n in enumerate(block_config, start=1):
        feats = [x]
        for j in range(1, n + 1):
            p = f"{f}.denseblock{i}.denselayer{j}"
            h = np.concatenate(feats, axis=1)
            h = _conv(sd, f"{p}.conv1", _relu(_bn_eval(sd, f"{p}.norm1", h)))
            feats.append(_conv(sd, f"{p}.conv2", _relu(_bn_eval(sd, f"{p}.norm2", h)), 1, 1))
        x = np.concatenate(feats, axis=1)
        if i < len(block_config):
            p = f"{f}.transition{i}"
            x = _avg2(_conv(sd, f"{p}.conv", _relu(_bn_eval(sd, f"{p}.norm", x))))
    x = _relu(_bn_eval(sd, f"{f}.norm5", x))
    return _linear(sd, "classifier", x.mean(axis=(2, 3)))


def ref_resnet26_ra(sd, x, nblocks):
    x = _bn_eval(sd, "pre_layers_conv.bns.0", _conv(sd, "pre_layers_conv.conv", x, 1, 1))   # no ReLU
    for s, n in enumerate(nblocks, start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            stride = 2 if b == 0 else 1
            y = _bn_eval(sd, f"{p}.conv1.bns.0", _conv(sd, f"{p}.conv1.conv", x, stride, 1))
            y = _bn_eval(sd, f"{p}.conv2.1.bns.0", _conv(sd, f"{p}.conv2.1.conv", _relu(y), 1, 1))
            if b == 0:
                r = _avg2(x)
                r = np.concatenate([r, r * 0], axis=1)
            else:
                r = x
            x = _relu(y + r)
    x = _relu(_bn_eval(sd, "end_bns.0.0", x))
    return _linear(sd, "linears.0", x.mean(axis=(2, 3)))


@pytest.mark.parametrize("name", ["resnet_bottleneck", "resnet_basic", "densenet", "resnet26_ra"])
def test_forward_matches_an_independent_reference(name):
    model = tiny_models()[name]()
    rng = np.random.default_rng(11)
    randomise_bn(model, rng)
    model.eval()
    x = images(2, 33 if name.startswith("resnet_") else size_of(model), seed=12)   # odd size: padding/ceil
    sd = {k: np.asarray(v) for k, v in model.state_dict().items()}
    if name == "densenet":
        want = ref_densenet(sd, x, model.block_config)
    elif name == "resnet26_ra":
        want = ref_resnet26_ra(sd, x, model.nblocks)
    else:
        want = ref_resnet(sd, x, model.layers, bottleneck=name == "resnet_bottleneck")
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-10, atol=1e-10)
