"""PyTorch's ``parameters()`` / ``named_parameters()`` and optimisers built from them.

The update rules themselves are checked against hand-computed numbers in test_optim.py; here every
way of handing parameters to an optimiser must give the same bits as the ParamRefs those tests use.
"""
import numpy as np
import pytest

from npmask.models import create
from npmask.nn.module import NamedParameter, ParamRef
from npmask.optim import SGD, Adam, Optimizers

from test_optim import G1, G2, run, toy

OPTIMISERS = {
    "sgd": lambda p: SGD(p, lr=0.1),
    "momentum": lambda p: SGD(p, lr=0.1, momentum=0.9),
    "nesterov": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening": lambda p: SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
    "adam": lambda p: Adam(p, lr=0.1),
    "adam_wd": lambda p: Adam(p, lr=0.1, eps=0.1, weight_decay=0.5),
}
STYLES = {
    "parameters": lambda m: m.body.parameters(),
    "named_parameters": lambda m: m.body.named_parameters(),
    "generator": lambda m: (p for p in m.body.parameters()),
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("opt", OPTIMISERS)
def test_optimisers_take_parameters_as_pytorch_does(opt, style):
    ref = toy()
    want = run(OPTIMISERS[opt](ref.parameter_refs(include=("body",))), ref, [G1, G2])
    m = toy()
    got = run(OPTIMISERS[opt](STYLES[style](m)), m, [G1, G2])
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert not np.array_equal(got[-1], [1.0, -2.0])


def test_whole_model_parameters_frozen_ones_are_skipped():
    m = toy()
    m.head.freeze()
    opt = Adam(m.parameters(), lr=0.1)                 # holds the frozen head too, as in PyTorch
    assert [r.name for r in opt.refs] == ["body.w", "head.b"]
    m.body.grads["w"][...] = G1
    opt.step()
    assert m.head.params["b"][0] == 3.0 and "head.b" not in opt.state


def test_parameters_look_like_torch_parameters():
    net = create("wrn10_1", num_classes=3, input_size=16, seed=0)
    params = net.parameters()
    named = net.named_parameters()
    assert all(isinstance(p, ParamRef) for p in params)
    assert [n for n, _ in named] == [p.name for p in params]
    assert all(a is p.data for (_, a), p in zip(named, params))
    assert sum(p.numel() for p in params) == net.num_parameters()
    assert dict(named)["fc.weight"].shape == params[-2].shape == (3, 64)
    net.fc.freeze("bias")
    assert [p.requires_grad for p in net.parameters()][-2:] == [True, False]
    assert [p.name for p in net.parameters(trainable_only=True)][-1] == "fc.weight"
    assert named[0] == (named[0][0], named[0][1]) and isinstance(named[0], NamedParameter)


def test_multidomain_model_parameters_are_the_active_domains():
    from npmask.multidomain import MultiDomainModel
    md = MultiDomainModel(create("wrn10_1", num_classes=3, input_size=16, seed=0))
    md.add_domain("t", 2)
    md.set_domain("t")
    groups = md.parameter_groups()
    trainable = [p.name for p in md.parameters() if p.requires_grad]
    assert trainable == [r.name for r in groups["body"] + groups["head"]]
    assert [n for n, _ in md.named_parameters()] == [p.name for p in md.parameters()]
    head = SGD([p for p in md.parameters() if p.name.startswith("fc.")], 1e-3)
    assert [r.name for r in head.refs] == ["fc.weight", "fc.bias"]
    Optimizers(body=Adam(groups["body"], 1e-4), head=head)


@pytest.mark.parametrize("bad, says", [
    (lambda m: m, "got the model itself"),
    (lambda m: [a for _, a in m.named_parameters()], "item 0 is a ndarray, not a parameter"),
    (lambda m: [("body.w", m.body.params["w"])], "item 0 is a tuple"),
    (lambda m: [{"params": m.parameters(), "lr": 0.1}], "parameter groups are not supported"),
    (lambda m: m.body.params["w"], "got a ndarray"),
    (lambda m: 3, "got a int"),
])
def test_anything_else_is_a_clear_error(bad, says):
    m = toy()
    with pytest.raises(TypeError, match=says):
        SGD(bad(m), lr=0.1)
