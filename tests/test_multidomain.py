"""MultiDomainModel: every variant trains (loss down), the backbone never changes, gradients check out."""
import numpy as np
import pytest

from npmask.gradcheck import directional_check
from npmask.masking.inspect import mask_statistics, plot_mask_statistics
from npmask.masking.layers import MaskedConv2d, MaskedLinear, SharedFrozen
from npmask.masking.variants import get_variant, variant_names
from npmask.models import create
from npmask.multidomain import MultiDomainModel
from npmask.nn import Flatten, GlobalAvgPool2d, Linear, ReLU, Sequential
from npmask.nn.batchnorm import BatchNorm2d
from npmask.nn.conv import Conv2d
from npmask.nn.loss import softmax_cross_entropy
from npmask.optim import SGD, Adam, Optimizers

MASK_VARIANTS = [v for v in variant_names() if get_variant(v).has_mask]


def tiny_no_bn(dtype=np.float32, seed=0):
    """conv-relu-pool-flatten-linear-relu-linear, no batch norm: k0 is learned, the hidden linear masked."""
    net = Sequential(Conv2d(3, 4, 3, padding=1, bias=True, dtype=dtype, rng=seed), ReLU(), GlobalAvgPool2d(),
                     Flatten(), Linear(4, 6, dtype=dtype, rng=seed), ReLU(), Linear(6, 3, dtype=dtype, rng=seed))
    for m in net.modules():
        if isinstance(m, (Conv2d, Linear)):
            m.followed_by_bn = False
    net.head_name = "6"
    return net


def data(n=16, size=8, classes=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(dtype), rng.integers(0, classes, n)


def snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def train_steps(md, x, y, steps, lr_body=1e-2, lr_head=0.05):
    groups = md.parameter_groups()
    opts = {"head": SGD(groups["head"], lr_head, momentum=0.9)}
    if groups["body"]:
        opts["body"] = Adam(groups["body"], lr_body)
    opt = Optimizers(**opts)
    md.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, d = softmax_cross_entropy(md.forward(x), y)
        md.backward(d)
        opt.step()
        losses.append(loss)
    return losses


@pytest.fixture(scope="module")
def wrn():
    return create("wrn10_1", 5, input_size=8, seed=0)


@pytest.mark.parametrize("variant", variant_names())
def test_training_lowers_loss_and_leaves_backbone_bit_identical(variant, wrn):
    md = MultiDomainModel(wrn)
    x, y = data()
    base_logits = md.forward(x)
    before = snapshot(wrn)
    md.add_domain("target", 4, variant, seed=1)
    md.set_domain("target")
    masks_before = {n: m.mask().copy() for n, m in md.network().named_modules() if hasattr(m, "mask")}
    losses = train_steps(md, x, y, 8)
    assert losses[-1] < losses[0] - 0.05, losses
    after = snapshot(wrn)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].tobytes() == after[k].tobytes(), f"backbone array {k} changed"
    assert np.array_equal(md.forward(x, domain="base"), base_logits)
    if get_variant(variant).has_mask:   # the R gradient flows: some mask bits flipped
        flipped = sum(int((m.mask() != masks_before[n]).sum())
                      for n, m in md.network().named_modules() if hasattr(m, "mask"))
        assert flipped > 0


@pytest.mark.parametrize("variant", variant_names())
def test_domain_network_structure(variant, wrn):
    md = MultiDomainModel(wrn)
    net = md.add_domain("t", 7, variant, seed=0)
    v = get_variant(variant)
    kinds = {type(m) for m in net.modules()}
    assert md.head("t").params["weight"].shape == (7, 64)
    if v.has_mask:
        convs = [m for m in net.modules() if isinstance(m, MaskedConv2d)]
        assert len(convs) == len([m for m in wrn.modules() if isinstance(m, Conv2d)])
        assert all(m.weight is m.source.params["weight"] for m in convs)
        assert all("k0" not in m.params for m in convs)       # WRN convs are followed by BN
    if v.kind == "finetune":
        assert Conv2d in kinds and MaskedConv2d not in kinds
        assert net.conv1.params["weight"] is not wrn.conv1.params["weight"]
    if v.domain_bn:
        assert net.bn1.params["weight"] is not wrn.bn1.params["weight"]
        assert BatchNorm2d in kinds
    else:
        assert isinstance(net.bn1, SharedFrozen) and net.bn1.source is wrn.bn1
    groups = md.parameter_groups("t")
    assert [r.name for r in groups["head"]] == ["fc.weight", "fc.bias"]
    assert bool(groups["body"]) == (v.kind != "classifier_only")
    assert not any(r.name.startswith("fc.") for r in groups["body"])
    body = {r.name for r in groups["body"]}     # a domain BN is trained with the body, a shared one not
    assert ({"bn1.weight", "bn1.bias", "layer1.0.bn2.weight"} <= body) == v.domain_bn


def test_at_init_every_domain_reproduces_the_pretrained_features(wrn):
    """With the pretrained head copied in, every variant gives the pretrained logits exactly."""
    md = MultiDomainModel(wrn)
    x, _ = data()
    base = md.forward(x)
    for v in variant_names():
        md.add_domain(v, 5, v, seed=3)
        md.head(v).load_state_dict(wrn.fc.state_dict())
        md.set_domain(v).eval()
        assert np.array_equal(md.forward(x), base), v


@pytest.mark.parametrize("variant", ["full", "full_channelwise", "piggyback_bn_k1", "simple_sigmoid", "finetune"])
def test_whole_domain_network_gradient_along_a_direction(variant):
    wrn = create("wrn10_1", 3, input_size=6, dtype=np.float64, seed=0)
    md = MultiDomainModel(wrn)
    net = md.add_domain("t", 3, variant, seed=0)
    rng = np.random.default_rng(0)
    for m in net.modules():
        if isinstance(m, (MaskedConv2d, MaskedLinear)):
            for j in range(1, 4):  # move the k's off 0 so every term contributes
                if f"k{j}" in m.params:
                    m.params[f"k{j}"][...] = rng.uniform(-0.5, 0.5, m.params[f"k{j}"].shape)
            m.freeze("mask_real")  # R acts through a step: finite differences cannot see it
    x, y = data(n=4, size=6, classes=3, dtype=np.float64)
    # h = 1e-7: a step of 1e-5 along a direction moving every weight crosses ReLU kinks (measured:
    # finetune off by 10% at h=1e-5, 1e-8 at h=1e-7); float64 keeps the rounding error ~1e-9.
    directional_check(net, x, lambda out: softmax_cross_entropy(out, y), h=1e-7, tol=1e-6)


def test_model_without_bn_learns_k0_and_masks_hidden_linear():
    net0 = tiny_no_bn(np.float64)
    md = MultiDomainModel(net0)
    net = md.add_domain("t", 2, "full", seed=0)
    assert isinstance(net.children["0"], MaskedConv2d) and isinstance(net.children["4"], MaskedLinear)
    assert "k0" in net.children["0"].params and "k0" in net.children["4"].params
    assert isinstance(net.children["6"], Linear) and net.children["6"].out_features == 2
    rng = np.random.default_rng(1)
    for m in (net.children["0"], net.children["4"]):
        for j in range(4):
            m.params[f"k{j}"][...] = rng.uniform(0.5, 1.5, 1)
        m.freeze("mask_real")
    x, _ = data(n=3, size=5, dtype=np.float64)
    y = np.array([0, 1, 1])
    directional_check(net, x, lambda out: softmax_cross_entropy(out, y), h=1e-7, tol=1e-6)


def test_errors_and_base_domain(wrn):
    md = MultiDomainModel(wrn)
    with pytest.raises(KeyError, match="known variants"):
        md.add_domain("t", 3, "no_such_variant")
    md.add_domain("t", 3, "full")
    with pytest.raises(ValueError, match="already exists"):
        md.add_domain("t", 3, "full")
    with pytest.raises(KeyError, match="unknown domain"):
        md.set_domain("nope")
    with pytest.raises(RuntimeError, match="frozen"):
        md.train()
    x, _ = data(n=2)
    assert md.predict(x, domain="t").shape == (2, 3)
    assert md.predict(x).shape == (2, 5)


def test_predict_logits_restores_the_training_mode(wrn):
    md = MultiDomainModel(wrn)
    md.add_domain("t", 3, "full", seed=0)
    md.set_domain("t").train()
    x, _ = data(n=4)
    md.predict_logits(x)                       # eval mode inside (running BN statistics) ...
    assert md.network("t").training             # ... training mode again after
    md.eval()
    md.predict_logits(x)
    assert not md.network("t").training


def test_predict_logits_in_batches_gives_every_image(wrn):
    md = MultiDomainModel(wrn)
    md.add_domain("t", 3, "full", seed=0)
    x, _ = data(n=7)
    whole = md.predict_logits(x, "t")
    in_threes = md.predict_logits(x, "t", batch_size=3)     # batches of 3, 3 and 1 images
    assert whole.shape == in_threes.shape == (7, 3)
    np.testing.assert_allclose(in_threes, whole, rtol=1e-5, atol=1e-6)


def test_set_data_info_checks_the_class_names_against_the_head(wrn):
    md = MultiDomainModel(wrn)
    md.add_domain("t", 3, "full", seed=0)
    info = dict(mean=[0.5] * 3, std=[0.25] * 3, image_size=[8, 8], input_size=[8, 8], channels=3,
                mirror=False)
    with pytest.raises(ValueError, match="names 2 classes, the classifier has 3"):
        md.set_data_info("t", class_names=["a", "b"], **info)
    md.set_data_info("t", class_names=["a", "b", "c"], **info)
    assert md.data_info["t"]["class_names"] == ["a", "b", "c"]


def test_the_seed_draws_the_real_masks_and_the_head(wrn):
    md = MultiDomainModel(wrn)
    nets = {name: md.add_domain(name, 3, "full", seed=s) for name, s in (("a", 1), ("b", 1), ("c", 2))}
    masks = {n: net.layer1[0].conv1.params["mask_real"] for n, net in nets.items()}
    heads = {n: net.fc.params["weight"] for n, net in nets.items()}
    assert np.array_equal(masks["a"], masks["b"]) and np.array_equal(heads["a"], heads["b"])
    assert not np.array_equal(masks["a"], masks["c"]) and not np.array_equal(heads["a"], heads["c"])


def test_evaluate_gives_a_domain_back_in_the_mode_it_had(wrn):
    """evaluate() reads model.training to restore it: a MultiDomainModel has it (the active domain's
    mode). Without it an eval-mode domain came back in training mode, and evaluating the
    pretraining domain raised 'frozen and stays in eval mode' after computing its accuracy."""
    from npmask.training.loop import evaluate
    md = MultiDomainModel(wrn)
    md.add_domain("t", 5, "full", seed=0)
    batches = [data(n=4, classes=5)]
    for mode in (False, True):
        md.set_domain("t").train(mode)
        evaluate(md, batches)
        assert md.network("t").training is mode
    md.set_domain("base")
    assert evaluate(md, batches)["n"] == 4 and not md.network("base").training


def test_inspection_and_plot(wrn, tmp_path):
    md = MultiDomainModel(wrn)
    x, y = data()
    stats = {}
    for v in ("full", "piggyback_bn", "full_channelwise"):
        md.add_domain(v, 4, v, seed=0)
        md.set_domain(v)
        train_steps(md, x, y, 3)
        stats[v] = mask_statistics(md.network(v))
    rows = stats["full"]
    names = [n for n, m in md.network("full").named_modules() if isinstance(m, MaskedConv2d)]
    assert [r["layer"] for r in rows] == names and names[0] == "conv1"
    assert all(0 <= r["density"] <= 1 for r in rows) and any(r["density"] < 1 for r in rows)
    assert stats["piggyback_bn"][0]["k3"] == 1.0 and stats["piggyback_bn"][0]["k0"] == 0.0
    assert isinstance(stats["full_channelwise"][0]["k2"], list)
    path = plot_mask_statistics(stats, tmp_path / "masks.png", title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["full", "piggyback", "finetune", "classifier_only"])
def test_training_step_skips_the_image_gradient_and_changes_no_other_bit(variant, wrn):
    """train_step skips the first conv's input gradient; every parameter ends as with it computed."""
    from npmask.training.loop import input_gradient_skipped, train_step
    x, y = data(seed=3)
    results = []
    for skip in (False, True):
        md = MultiDomainModel(wrn)
        md.add_domain("d", 4, variant=variant, seed=1)
        md.set_domain("d").train()
        stem = md.network().conv1
        seen = []
        original = stem.backward
        stem.backward = lambda dy: seen.append(original(dy)) or seen[-1]
        groups = md.parameter_groups()
        opt = Optimizers(head=SGD(groups["head"], 0.05, momentum=0.9),
                         **({"body": Adam(groups["body"], 1e-2)} if groups["body"] else {}))
        for _ in range(2):
            if skip:
                train_step(md, opt, x, y)
            else:                               # the same step, with dL/dx computed
                opt.zero_grad()
                md.backward(softmax_cross_entropy(md.forward(x), y)[1])
                opt.step()
        if variant == "classifier_only":        # a shared frozen stem; backward stops at the head
            assert not hasattr(stem, "need_input_grad") and seen == []
        else:
            assert all((dx is None) == skip for dx in seen) and len(seen) == 2
            assert stem.need_input_grad                     # restored after each step
            with input_gradient_skipped(md):
                assert not stem.need_input_grad
        results.append(snapshot(md.network()))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
