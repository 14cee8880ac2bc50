"""MaskedConv2d / MaskedLinear: gradients by finite differences, piggyback == conv(W∘M), W~ = W at init."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from npmask.gradcheck import check_layer, numeric_gradient, rel_error
from npmask.masking.layers import MaskedConv2d, MaskedLinear, SharedFrozen
from npmask.masking.transform import apply_affine, surrogate_derivative
from npmask.masking.variants import LEARNED, Variant, get_variant, variant_names
from npmask.nn.batchnorm import BatchNorm2d
from npmask.nn.conv import Conv2d, conv2d_forward
from npmask.nn.linear import Linear, linear_forward

MASK_VARIANTS = [v for v in variant_names() if get_variant(v).has_mask]
K_CHOICE = st.sampled_from([0.0, 1.0, 0.7, LEARNED])


def randomise(layer, seed):
    """Move R away from 0 (both signs, so M is mixed) and the learned k's away from their init."""
    rng = np.random.default_rng(seed)
    R = layer.params["mask_real"]
    R[...] = rng.choice([-1, 1], R.shape) * rng.uniform(0.05, 1, R.shape)
    for j in range(4):
        if f"k{j}" in layer.params:
            k = layer.params[f"k{j}"]
            k[...] = rng.uniform(-1.5, 1.5, k.shape)


@st.composite
def conv_case(draw):
    c = draw(st.integers(1, 3))
    o = draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 1))
    h = draw(st.integers(k, 6))
    assume(h + 2 * pad >= k)
    ks = draw(st.tuples(K_CHOICE, K_CHOICE, K_CHOICE, K_CHOICE))
    return c, o, k, stride, pad, h, ks, draw(st.booleans()), draw(st.sampled_from(["identity", "sigmoid"])), \
        draw(st.integers(0, 2**31 - 1)), draw(st.booleans())


@given(conv_case())
def test_masked_conv_input_and_k_gradients(case):
    c, o, k, stride, pad, h, ks, channelwise, surrogate, seed, bias = case
    variant = Variant("custom", ks=ks, channelwise=channelwise, surrogate=surrogate)
    src = Conv2d(c, o, k, stride=stride, padding=pad, bias=bias, dtype=np.float64, rng=seed)
    layer = MaskedConv2d(src, variant, rng=seed)
    randomise(layer, seed)
    x = np.random.default_rng(seed + 1).standard_normal((2, c, h, h))
    names = [f"k{j}" for j in range(4) if f"k{j}" in layer.params]
    check_layer(layer, x, params=names, seed=seed, tol=1e-6)
    # R: dL/dR = h~'(R - tau) * dL/dM, dL/dM by finite differences through the conv, M real-valued
    layer.zero_grad()
    y = layer.forward(x)
    g = np.random.default_rng(seed + 2).standard_normal(y.shape)
    layer.backward(g)
    W, R = src.params["weight"], layer.params["mask_real"]
    M = (R >= 0).astype(np.float64)
    f = lambda: conv2d_forward(x, apply_affine(W, M, layer.ks), src.params.get("bias"), stride, pad)[0]  # noqa: E731
    dM = numeric_gradient(f, M, g)
    expected = surrogate_derivative(R, surrogate) * dM
    assert rel_error(layer.grads["mask_real"], expected) < 1e-7
    assert not src.grads["weight"].any(), "the pretrained weight must get no gradient"


@given(st.tuples(K_CHOICE, K_CHOICE, K_CHOICE, K_CHOICE), st.booleans(), st.integers(0, 2**31 - 1))
def test_masked_linear_gradients(ks, channelwise, seed):
    variant = Variant("custom", ks=ks, channelwise=channelwise)
    src = Linear(5, 3, dtype=np.float64, rng=seed)
    layer = MaskedLinear(src, variant, rng=seed)
    randomise(layer, seed)
    x = np.random.default_rng(seed).standard_normal((4, 5))
    check_layer(layer, x, params=[f"k{j}" for j in range(4) if f"k{j}" in layer.params], seed=seed)
    y = layer.forward(x)
    g = np.random.default_rng(seed + 1).standard_normal(y.shape)
    layer.zero_grad()
    layer.backward(g)
    W, M = src.params["weight"], (layer.params["mask_real"] > 0).astype(np.float64)
    dM = numeric_gradient(lambda: linear_forward(x, apply_affine(W, M, layer.ks), src.params["bias"]), M, g)
    assert rel_error(layer.grads["mask_real"], dM) < 1e-7


def test_piggyback_forward_is_conv_with_W_times_M_exactly():
    src = Conv2d(3, 8, 3, padding=1, rng=0)
    layer = MaskedConv2d(src, "piggyback", rng=0)
    randomise(layer, 0)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    M = layer.params["mask_real"] > 0
    assert 0 < M.mean() < 1
    y_ref, _ = conv2d_forward(x, src.params["weight"] * M, None, 1, 1)
    assert np.array_equal(layer.forward(x), y_ref)


@pytest.mark.parametrize("variant", MASK_VARIANTS)
@pytest.mark.parametrize("followed_by_bn", [True, False])
def test_every_variant_equals_the_pretrained_layer_at_init(variant, followed_by_bn):
    conv = Conv2d(3, 6, 3, padding=1, bias=True, rng=1)
    conv.params["bias"][...] = np.random.default_rng(0).standard_normal(6)
    lin = Linear(7, 4, rng=1)
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5)).astype(np.float32)
    z = np.random.default_rng(3).standard_normal((3, 7)).astype(np.float32)
    mc = MaskedConv2d(conv, variant, followed_by_bn=followed_by_bn, rng=0)
    ml = MaskedLinear(lin, variant, followed_by_bn=followed_by_bn, rng=0)
    assert np.array_equal(mc.forward(x), conv.forward(x))
    assert np.array_equal(ml.forward(z), lin.forward(z))
    assert mc.mask().all()


def test_k0_fixed_with_bn_learned_without():
    conv = Conv2d(2, 3, 3, rng=0)
    conv.followed_by_bn = True
    assert "k0" not in MaskedConv2d(conv, "full").params
    conv.followed_by_bn = False
    assert MaskedConv2d(conv, "full").params["k0"].tolist() == [1.0]
    assert MaskedConv2d(conv, "full_channelwise").params["k1"].shape == (3,)
    assert "k0" not in MaskedConv2d(conv, "piggyback").params  # piggyback: k0 = 0 always


# docs/design.md section 2 (tables 5 and 6 of the paper), for a layer followed by batch norm:
# (k0, k1, k2, k3) with L = learned, the surrogate, domain BN
L = "learned"
PAPER_VARIANTS = {
    "piggyback": ((0, 0, 0, 1), "identity", False),
    "piggyback_bn": ((0, 0, 0, 1), "identity", True),
    "piggyback_bn_k1": ((0, L, 0, 1), "identity", True),
    "simple_nobias": ((1, 0, L, 0), "identity", True),
    "simple": ((1, L, L, 0), "identity", True),
    "simple_sigmoid": ((1, L, L, 0), "sigmoid", True),
    "full_nobias": ((1, 0, L, L), "identity", True),
    "full_no_k2": ((1, L, 0, L), "identity", True),
    "full": ((1, L, L, L), "identity", True),
    "full_sigmoid": ((1, L, L, L), "sigmoid", True),
    "full_channelwise": ((1, L, L, L), "identity", True),
}


@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_every_variant_is_its_row_of_the_paper(variant):
    conv = Conv2d(2, 3, 3, rng=0)
    conv.followed_by_bn = True
    layer = MaskedConv2d(conv, variant)
    ks, surrogate, domain_bn = PAPER_VARIANTS[variant]
    assert tuple(L if f"k{j}" in layer.params else layer.fixed_k[j] for j in range(4)) == ks
    assert (layer.surrogate, get_variant(variant).domain_bn) == (surrogate, domain_bn)
    per_channel = (3,) if variant == "full_channelwise" else (1,)
    assert all(layer.params[f"k{j}"].shape == per_channel for j in range(4) if ks[j] == L)


def test_weight_is_a_reference_not_state():
    conv = Conv2d(2, 3, 3, rng=0)
    layer = MaskedConv2d(conv, "full")
    assert layer.weight is conv.params["weight"]
    assert set(layer.state_dict()) == {"mask_real", "k0", "k1", "k2", "k3"}
    R = layer.params["mask_real"]
    assert R.dtype == np.float32 and R.min() >= 1e-4 and R.max() <= 2e-4


@pytest.mark.parametrize("tau", [-0.5, 0.3])
def test_real_masks_start_just_above_the_threshold_whatever_it_is(tau):
    """R ~ U(tau + lo, tau + hi): with tau != 0 too, M starts all ones and W~ = W."""
    conv = Conv2d(2, 3, 3, rng=0)
    x = np.random.default_rng(1).standard_normal((2, 2, 5, 5)).astype(np.float32)
    layer = MaskedConv2d(conv, "full", tau=tau, mask_init=(0.1, 0.2), rng=0)
    R = layer.params["mask_real"]
    assert R.min() >= np.float32(tau + 0.1) and R.max() <= np.float32(tau + 0.2)
    assert layer.mask().all()
    assert np.array_equal(layer.forward(x), conv.forward(x))


@pytest.mark.parametrize("mask_init", [(1e-4, 1e-4), (2e-4, 1e-4)])
def test_mask_init_must_be_an_interval(mask_init):
    with pytest.raises(ValueError, match="low < high"):
        MaskedConv2d(Conv2d(2, 3, 3, rng=0), "full", mask_init=mask_init)
    with pytest.raises(ValueError, match="low < high"):
        MaskedLinear(Linear(4, 3, rng=0), "full", mask_init=mask_init)


def test_dR_is_zero_at_step_zero_for_full():
    """With k2 = k3 = 0 the masks get no gradient (dL/dR = G∘(k2 + k3*W)) until k2/k3 move (expected)."""
    conv = Conv2d(2, 3, 3, dtype=np.float64, rng=0)
    layer = MaskedConv2d(conv, "full")
    y = layer.forward(np.random.default_rng(0).standard_normal((2, 2, 4, 4)))
    layer.backward(np.random.default_rng(1).standard_normal(y.shape))
    assert not layer.grads["mask_real"].any()
    assert layer.grads["k2"].any() and layer.grads["k3"].any()


def test_unknown_variant_lists_known_names():
    with pytest.raises(KeyError, match="full_channelwise"):
        get_variant("fulll")
    with pytest.raises(ValueError, match="no mask"):
        MaskedConv2d(Conv2d(1, 1, 1), "finetune")


def test_shared_frozen_batchnorm_stays_in_eval_mode():
    bn = BatchNorm2d(3)
    bn.buffers["running_mean"][...] = [1, 2, 3]
    bn.freeze()
    shared = SharedFrozen(bn)
    shared.train()
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    before = bn.buffers["running_mean"].copy()
    y = shared.forward(x)
    assert np.array_equal(bn.buffers["running_mean"], before)
    np.testing.assert_allclose(y, (x - before.reshape(1, 3, 1, 1)) / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert shared.state_dict() == {}


@pytest.mark.parametrize("variant", ["full", "piggyback"])
def test_masked_conv_keeps_its_columns_in_training_and_gets_the_same_gradients(variant):
    """A training MaskedConv2d keeps the forward pass's columns for its weight gradient (small
    convolutions, npmask.config's conv_keep_columns_floats): the gradients of R and of the k's are
    those of a layer that builds the columns again, bit for bit; in eval mode nothing is kept."""
    from npmask import config
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)

    def run(keep_floats):
        src = Conv2d(3, 5, 3, stride=2, padding=1, rng=0)
        layer = MaskedConv2d(src, variant, rng=1)
        randomise(layer, 2)
        with config.using(conv_keep_columns_floats=keep_floats):
            y = layer.forward(x)
            kept = bool(layer._ccache[5])
            dx = layer.backward(np.ones_like(y))
        return kept, y, dx, {k: v.copy() for k, v in layer.grads.items()}, layer
    kept, y, dx, grads, layer = run(1 << 21)
    rebuilt, y0, dx0, grads0, _ = run(0)
    assert kept and not rebuilt
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(dx, dx0)
    assert grads.keys() == grads0.keys() and "mask_real" in grads
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads0[k])
    layer.eval()
    layer.forward(x)
    assert layer._ccache[5] is None
