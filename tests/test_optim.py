"""Optimisers and schedulers against the update formulas, computed by hand on hand-made numbers."""
import math

import numpy as np
import pytest

from npmask.nn.module import Module
from npmask.optim import SGD, Adam, MultiStepLR, Optimizers, StepLR


class Params(Module):
    """A module that only holds parameters (no forward), for driving optimisers by hand."""

    def __init__(self, dtype=np.float64, **arrays):
        super().__init__()
        for name, value in arrays.items():
            self.register_param(name, np.array(value, dtype=dtype))


def toy(dtype=np.float64):
    """A two-part 'model': body.w = [1, -2], head.b = [3]."""
    m = Module()
    m.body = Params(dtype, w=[1.0, -2.0])
    m.head = Params(dtype, b=[3.0])
    return m


def set_grads(m, w, b=(0.0,)):
    m.body.grads["w"][...] = w
    m.head.grads["b"][...] = b


G1 = [0.5, 0.25]   # the gradient of the first step
G2 = [1.0, -1.0]   # the gradient of the second step


def run(opt, m, grads):
    out = []
    for g in grads:
        set_grads(m, g)
        opt.step()
        out.append(m.body.params["w"].copy())
    return out


# ---------------------------------------------------------------------------- SGD
def test_sgd_plain():
    m = toy()
    (p1, p2) = run(SGD(m.parameter_refs(include=("body",)), lr=0.1), m, [G1, G2])
    np.testing.assert_allclose(p1, [1 - 0.05, -2 - 0.025], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p2, [0.95 - 0.1, -2.025 + 0.1], rtol=0, atol=1e-15)


def test_sgd_momentum_buffer_starts_at_the_first_gradient():
    m = toy()
    p1, p2 = run(SGD(m.parameter_refs(include=("body",)), lr=0.1, momentum=0.9), m, [G1, G2])
    # step 1: buf = g1 = [0.5, 0.25];  p = [1, -2] - 0.1 * buf
    np.testing.assert_allclose(p1, [0.95, -2.025], rtol=0, atol=1e-15)
    # step 2: buf = 0.9 * [0.5, 0.25] + [1, -1] = [1.45, -0.775]
    np.testing.assert_allclose(p2, [0.95 - 0.145, -2.025 + 0.0775], rtol=0, atol=1e-15)


def test_sgd_nesterov():
    m = toy()
    p1, p2 = run(SGD(m.parameter_refs(include=("body",)), lr=0.1, momentum=0.9, nesterov=True),
                 m, [G1, G2])
    # step 1: buf = [0.5, 0.25]; d = g + 0.9 * buf = [0.95, 0.475]
    np.testing.assert_allclose(p1, [0.905, -2.0475], rtol=0, atol=1e-15)
    # step 2: buf = [1.45, -0.775]; d = [1 + 1.305, -1 - 0.6975] = [2.305, -1.6975]
    np.testing.assert_allclose(p2, [0.905 - 0.2305, -2.0475 + 0.16975], rtol=0, atol=1e-15)


def test_sgd_dampening_applies_from_the_second_step():
    m = toy()
    p1, p2 = run(SGD(m.parameter_refs(include=("body",)), lr=0.1, momentum=0.9, dampening=0.5),
                 m, [G1, G2])
    np.testing.assert_allclose(p1, [0.95, -2.025], rtol=0, atol=1e-15)
    # buf = 0.9 * [0.5, 0.25] + 0.5 * [1, -1] = [0.95, -0.275]
    np.testing.assert_allclose(p2, [0.95 - 0.095, -2.025 + 0.0275], rtol=0, atol=1e-15)


def test_sgd_weight_decay_leaves_the_gradient_untouched():
    m = toy()
    opt = SGD(m.parameter_refs(include=("body",)), lr=0.1, weight_decay=0.1)
    (p1,) = run(opt, m, [G1])
    # d = g + 0.1 * p = [0.5 + 0.1, 0.25 - 0.2] = [0.6, 0.05]
    np.testing.assert_allclose(p1, [0.94, -2.005], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(m.body.grads["w"], G1)


def test_sgd_rejects_bad_settings():
    m = toy()
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(m.parameter_refs(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        SGD(m.parameter_refs(), lr=-1.0)


@pytest.mark.parametrize("make", [lambda r, lr: SGD(r, lr=lr), lambda r, lr: Adam(r, lr=lr)])
def test_a_nan_learning_rate_is_rejected(make):
    """``lr >= 0`` is false for NaN: a NaN rate is refused, not stepped into NaN weights."""
    with pytest.raises(ValueError, match="learning rate"):
        make(toy().parameter_refs(), float("nan"))

# ---------------------------------------------------------------------------- Adam
def test_adam_first_step_moves_by_lr_times_sign():
    """After bias correction, m_hat = g and v_hat = g**2 at step 1: the step is lr * g / (|g| + eps)."""
    m = toy()
    (p1,) = run(Adam(m.parameter_refs(include=("body",)), lr=0.1, eps=0.1), m, [G1])
    # a large eps shows where it enters: added to sqrt(v_hat), after the bias correction
    np.testing.assert_allclose(p1, [1 - 0.1 * 0.5 / 0.6, -2 - 0.1 * 0.25 / 0.35], rtol=1e-14)


def test_adam_second_step_bias_correction():
    m = toy()
    p1, p2 = run(Adam(m.parameter_refs(include=("body",)), lr=0.1), m, [G1, G2])
    p1_expected = [1 - 0.1 * 0.5 / (0.5 + 1e-8), -2 - 0.1 * 0.25 / (0.25 + 1e-8)]  # ~ [0.9, -2.1]
    np.testing.assert_allclose(p1, p1_expected, rtol=1e-14)
    # by hand: m = 0.9 * 0.1 * g1 + 0.1 * g2, v = 0.999 * 0.001 * g1^2 + 0.001 * g2^2,
    # corrections 1 - 0.9^2 = 0.19 and 1 - 0.999^2 = 0.001999
    m2 = [0.145, -0.0775]
    v2 = [0.00124975, 0.0010624375]
    expected = [p - 0.1 * (mi / 0.19) / (math.sqrt(vi / 0.001999) + 1e-8)
                for p, mi, vi in zip(p1, m2, v2)]
    # = [0.9 - 0.0965166..., -2.1 + 0.0559498...]
    np.testing.assert_allclose(p2, expected, rtol=1e-13)
    np.testing.assert_allclose(p2, [0.80348, -2.04405], atol=1e-5)


def test_adam_weight_decay():
    m = toy()
    (p1,) = run(Adam(m.parameter_refs(include=("body",)), lr=0.1, eps=0.1, weight_decay=0.5), m, [G1])
    g = [0.5 + 0.5 * 1.0, 0.25 + 0.5 * -2.0]  # = [1.0, -0.75]
    np.testing.assert_allclose(p1, [1 - 0.1 * 1.0 / 1.1, -2 + 0.1 * 0.75 / 0.85], rtol=1e-14)
    assert g[1] < 0  # weight decay flipped the sign of the second gradient: the step goes up


# ---------------------------------------------------------------------------- frozen, dtype, groups
@pytest.mark.parametrize("make", [lambda r: SGD(r, lr=0.1, momentum=0.9), lambda r: Adam(r, lr=0.1)])
def test_frozen_parameters_are_skipped(make):
    m = toy()
    opt = make(m.parameter_refs(trainable_only=False))  # holds the head too
    m.head.freeze("b")
    m.body.grads["w"][...] = G1
    opt.step()
    assert m.head.params["b"][0] == 3.0
    assert "head.b" not in opt.state and "body.w" in opt.state
    assert not np.array_equal(m.body.params["w"], [1.0, -2.0])


@pytest.mark.parametrize("make", [
    lambda r: SGD(r, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda r: Adam(r, lr=0.1, weight_decay=1e-2),
])
def test_float32_is_kept(make):
    m = toy(np.float32)
    opt = make(m.parameter_refs())
    w = m.body.params["w"]
    for g in (G1, G2):
        set_grads(m, g, [0.5])
        opt.step()
    assert m.body.params["w"] is w and w.dtype == np.float32  # updated in place
    assert m.head.params["b"].dtype == np.float32
    for st in opt.state.values():
        for key, val in st.items():
            if key != "step":
                assert val.dtype == np.float32, key
    for key, val in opt.state_dict().items():
        if key.startswith("state.") and not key.endswith(".step"):
            assert val.dtype == np.float32, key


@pytest.mark.parametrize("make", [
    lambda r: SGD(r, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda r: Adam(r, lr=0.1, weight_decay=1e-2),
])
def test_parameters_updated_on_threads_give_the_same_bits_as_serially(make, monkeypatch):
    from npmask import config
    from npmask.optim import optimizers as optim
    from npmask.nn import parallel
    monkeypatch.setattr(Adam, "together_max", 0)   # every parameter by itself (see the next test)
    shapes = [(7, 3), (5,), (64, 9), (1,), (300,), (2, 2, 2)] * 3
    calls = []

    def spy(xp, count, setup, fn, **work):       # the real each_chunk, recording its calls and
        workers = []                             # how many threads took part (one setup each)
        parallel.each_chunk(xp, count, lambda: workers.append(setup()), fn, **work)
        calls.append((count, len(workers)))
    monkeypatch.setattr(optim, "each_chunk", spy)

    def train(threads):
        with config.using(threads=threads, parallel_min_floats=0):
            return run()

    def run():
        m = Params(np.float32, **{f"p{i}": np.linspace(-1, 1, int(np.prod(s))).reshape(s)
                                  for i, s in enumerate(shapes)})
        opt = make(m.parameter_refs())
        for step in range(3):
            for g in m.grads.values():
                g[...] = np.random.default_rng(step).standard_normal(g.shape)
            opt.step()
        return m.params
    serial, threaded = train(1), train(3)
    assert calls == [(len(shapes), 1)] * 3 + [(len(shapes), 3)] * 3    # 3 threads in the second run
    for name in serial:
        np.testing.assert_array_equal(serial[name], threaded[name])


def test_one_array_under_two_names_is_updated_by_one_thread(monkeypatch):
    """Tied weights: two threads updating one array would race (lost updates), so no threads."""
    from npmask.optim import optimizers as optim

    def no_threads(*args, **kwargs):
        raise AssertionError("parameters sharing an array were handed to the threads")
    monkeypatch.setattr(optim, "each_chunk", no_threads)
    m = Module()
    m.a = Params(np.float32, w=np.zeros(8))
    m.b = Module()
    m.b.params["w"] = m.a.params["w"]                           # the same array, a second name
    m.b.grads["w"] = np.ones(8, dtype=np.float32)
    m.a.grads["w"][...] = 1
    opt = SGD(m.parameter_refs(), lr=1.0)
    assert len(opt.refs) == 2 and opt.refs[0].data is opt.refs[1].data
    for _ in range(5):
        opt.step()
    np.testing.assert_array_equal(m.a.params["w"], -10)         # 5 steps x 2 names x lr 1


def paper_optimiser(m):
    return Optimizers(body=Adam(m.parameter_refs(exclude=("head",)), lr=1e-1),
                      head=SGD(m.parameter_refs(include=("head",)), lr=1e-2, momentum=0.9))


def test_optimizers_group_steps_each_part_with_its_own_rule():
    m = toy()
    opt = paper_optimiser(m)
    set_grads(m, G1, [2.0])
    opt.step()
    np.testing.assert_allclose(m.body.params["w"], [0.9, -2.1], rtol=1e-7)  # Adam: ~ lr * sign
    np.testing.assert_allclose(m.head.params["b"], [3.0 - 0.02], rtol=1e-15)  # SGD: lr * g
    opt["head"].lr = 0.5
    assert opt.lr == {"body": 0.1, "head": 0.5}
    opt.zero_grad()
    assert not m.body.grads["w"].any() and not m.head.grads["b"].any()
    with pytest.raises(ValueError, match="both groups"):
        Optimizers(a=SGD(m.parameter_refs(), lr=1.0), b=SGD(m.parameter_refs(include=("head",)), lr=1.0))
    with pytest.raises(KeyError, match="groups are"):
        opt["classifier"]


def test_state_dict_round_trip_gives_identical_updates(tmp_path):
    m = toy(np.float32)
    opt = paper_optimiser(m)
    sched = MultiStepLR(opt, milestones=[1], gamma=0.1)
    for g in (G1, G2):
        set_grads(m, g, [0.7])
        opt.step()
    sched.step()
    path = tmp_path / "opt.npz"
    np.savez(path, **opt.state_dict(), **{f"sched/{k}": v for k, v in sched.state_dict().items()})

    m2 = toy(np.float32)
    m2.load_state_dict(m.state_dict())
    opt2 = paper_optimiser(m2)
    sched2 = MultiStepLR(opt2, milestones=[1], gamma=0.1)
    with np.load(path, allow_pickle=False) as f:
        saved = {k: f[k] for k in f.files}
    opt2.load_state_dict({k: v for k, v in saved.items() if not k.startswith("sched/")})
    sched2.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("sched/")})
    assert opt2.lr == opt.lr == pytest.approx({"body": 1e-2, "head": 1e-3})
    assert opt2["body"].state["body.w"]["step"] == 2

    for g in ([0.3, -0.1], [-2.0, 4.0]):
        for model in (m, m2):
            set_grads(model, g, [0.1])
        opt.step()
        opt2.step()
        for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
            np.testing.assert_array_equal(a, b, err_msg=n)
    # without the state the next update differs (so the test above can fail)
    m3 = toy(np.float32)
    m3.load_state_dict(m2.state_dict())
    fresh = paper_optimiser(m3)
    set_grads(m3, G1, [0.1])
    set_grads(m2, G1, [0.1])
    fresh.step()
    opt2.step()
    assert not np.array_equal(m3.body.params["w"], m2.body.params["w"])


def test_load_state_dict_rejects_foreign_state():
    m = toy()
    opt = Adam(m.parameter_refs(), lr=0.1)
    set_grads(m, G1, [1.0])
    opt.step()
    sd = opt.state_dict()
    other = SGD(m.parameter_refs(), lr=0.1, momentum=0.9)
    with pytest.raises(KeyError):
        other.load_state_dict(sd)
    narrow = Adam(m.parameter_refs(include=("head",)), lr=0.1)
    with pytest.raises(KeyError, match="body.w"):
        narrow.load_state_dict(sd)


def test_load_state_dict_rejects_state_of_the_wrong_shape():
    m = toy()
    opt = Adam(m.parameter_refs(), lr=0.1)
    set_grads(m, G1, [1.0])
    opt.step()
    sd = opt.state_dict()
    sd["state.body.w.exp_avg"] = np.zeros(3)                    # body.w has shape (2,)
    with pytest.raises(ValueError, match=r"state.body.w.exp_avg.*\(3,\).*\(2,\)"):
        Adam(m.parameter_refs(), lr=0.1).load_state_dict(sd)


def test_state_dict_holds_copies_that_later_steps_leave_alone():
    """state_dict() returns copies: a checkpoint taken at step 1 still says step 1 after step 2."""
    m = toy()
    opt = Adam(m.parameter_refs(include=("body",)), lr=0.1)
    set_grads(m, G1)
    opt.step()
    sd = opt.state_dict()
    before = {k: v.copy() for k, v in sd.items()}
    set_grads(m, G2)
    opt.step()
    for k, v in sd.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_loaded_state_is_cast_to_the_parameter_dtype_and_owned_by_the_optimiser():
    """State saved from float64 parameters loads into float32 ones as float32 arrays (into float64
    ones as float64), and the optimiser's steps then update its own copies, not the arrays of the
    dict it was given."""
    m64 = toy()
    opt64 = Adam(m64.parameter_refs(include=("body",)), lr=0.1)
    set_grads(m64, G1)
    opt64.step()
    sd = opt64.state_dict()
    before = {k: v.copy() for k, v in sd.items()}
    for dtype in (np.float32, np.float64):
        m = toy(dtype)
        opt = Adam(m.parameter_refs(include=("body",)), lr=0.1)
        opt.load_state_dict(sd)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state["body.w"][key].dtype == dtype, key
        set_grads(m, G2)
        opt.step()
        assert m.body.params["w"].dtype == dtype
        for k, v in sd.items():
            np.testing.assert_array_equal(v, before[k], err_msg=f"{k} after a {dtype.__name__} step")

# ---------------------------------------------------------------------------- schedulers
def lr_sequence(sched, opt, epochs):
    out = [opt.lr]
    for _ in range(epochs):
        sched.step()
        out.append(opt.lr)
    return out


def test_step_lr_sequence():
    m = toy()
    opt = SGD(m.parameter_refs(), lr=1.0)
    sched = StepLR(opt, step_size=2, gamma=0.1)
    np.testing.assert_allclose(lr_sequence(sched, opt, 5), [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-12)
    assert sched.last_epoch == 5


def test_multistep_lr_on_a_group_scales_each_base_lr():
    m = toy()
    opt = paper_optimiser(m)  # body 0.1, head 0.01
    sched = MultiStepLR(opt, milestones=[2, 5], gamma=0.5)
    seq = lr_sequence(sched, opt, 6)
    factors = [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    np.testing.assert_allclose([s["body"] for s in seq], [0.1 * f for f in factors], rtol=1e-12)
    np.testing.assert_allclose([s["head"] for s in seq], [0.01 * f for f in factors], rtol=1e-12)


def test_scheduler_state_dict_round_trip():
    m = toy()
    opt = SGD(m.parameter_refs(), lr=1.0)
    sched = MultiStepLR(opt, milestones=[1, 3], gamma=0.1)
    for _ in range(3):
        sched.step()
    sd = sched.state_dict()
    opt2 = SGD(toy().parameter_refs(), lr=1.0)
    sched2 = MultiStepLR(opt2, milestones=[1, 3], gamma=0.1)
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == 3 and opt2.lr == pytest.approx(0.01)
    sched.step()
    sched2.step()
    assert opt2.lr == opt.lr


def test_schedulers_reject_bad_settings():
    opt = SGD(toy().parameter_refs(), lr=1.0)
    with pytest.raises(ValueError, match="increasing"):
        MultiStepLR(opt, milestones=[5, 2])
    with pytest.raises(ValueError, match="step_size"):
        StepLR(opt, step_size=0)


def test_schedulers_decay_by_a_tenth_by_default():
    """gamma defaults to 0.1, as in torch.optim.lr_scheduler (the Decathlon protocol's x0.1)."""
    for make in (lambda o: StepLR(o, step_size=1), lambda o: MultiStepLR(o, milestones=[1])):
        opt = SGD(toy().parameter_refs(), lr=1.0)
        np.testing.assert_allclose(lr_sequence(make(opt), opt, 1), [1.0, 0.1], rtol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("threads", [1, 3])
def test_adam_updates_small_parameters_together_with_the_bits_of_one_by_one(weight_decay, threads, monkeypatch):
    """Adam's small NumPy parameters are updated as one concatenation per step count and dtype;
    parameters, moments and step counts are those of one update per parameter, bit for bit,
    with a frozen parameter, one that was frozen for a step (its count lags), a large one and a
    float64 one beside them."""
    from npmask import config
    shapes = [(1,)] * 5 + [(16,), (64,), (3, 3), (5000,), (7,)]
    together_calls = []
    real = Adam._update_together
    monkeypatch.setattr(Adam, "_update_together",
                        lambda self, refs: (together_calls.append(len(refs)), real(self, refs)))

    def train(together_max):
        m = Params(np.float32, **{f"p{i}": np.linspace(-1, 1, int(np.prod(s))).reshape(s)
                                  for i, s in enumerate(shapes)})
        m.d = Params(np.float64, a=[0.5, -0.5], b=[1.0])
        m.freeze("p9")                                           # frozen throughout
        opt = Adam(m.parameter_refs(), lr=0.1, weight_decay=weight_decay)
        opt.together_max = together_max
        with config.using(threads=threads, parallel_min_floats=0):
            for step in range(4):
                if step == 1:
                    m.freeze("p2")                               # skips a step: its count lags
                if step == 2:
                    m.unfreeze("p2")
                for i, (_, g) in enumerate(_grads(m)):
                    g[...] = np.random.default_rng([step, i]).standard_normal(g.shape)
                opt.step()
        return m, opt
    one_by_one, opt_1 = train(0)
    assert not together_calls
    together, opt_t = train(4096)
    assert together_calls and max(together_calls) >= 8                # it did take the new path
    for (name, a), (_, b) in zip(_params(one_by_one), _params(together)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert opt_1.state.keys() == opt_t.state.keys() and "p9" not in opt_t.state
    for name, st in opt_1.state.items():
        assert st["step"] == opt_t.state[name]["step"]
        for buf in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(st[buf], opt_t.state[name][buf], err_msg=f"{name} {buf}")
    assert opt_t.state["p2"]["step"] == 3 and opt_t.state["p0"]["step"] == 4


def _params(m):
    return sorted((ref.name, ref.data) for ref in m.parameter_refs())


def _grads(m):
    return sorted((ref.name, ref.grad) for ref in m.parameter_refs() if ref.grad is not None)


# ---------------------------------------------------------------- zero_grad's flat arrays
def _three(dtypes=(np.float32, np.float32, np.float64)):
    m = Module()
    for i, dtype in enumerate(dtypes):
        setattr(m, f"p{i}", Params(dtype, w=np.arange(6.0).reshape(2, 3) + i))
    return m


def test_zero_grad_holds_the_gradients_in_one_flat_array_per_dtype():
    m = _three()
    opt = SGD(m.parameters(), lr=0.1)
    for i in range(3):
        getattr(m, f"p{i}").grads["w"][...] = 7.0
    opt.zero_grad()
    g = [getattr(m, f"p{i}").grads["w"] for i in range(3)]
    assert all(a.shape == (2, 3) and not a.any() for a in g)
    assert g[0].base is g[1].base and g[0].base.size == 12 and g[2].base.size == 6    # float32 x2, float64
    assert g[0].dtype == np.float32 and g[2].dtype == np.float64
    for a in g:
        a += 1.0                                     # the layers accumulate into the views
    opt.zero_grad()
    assert all(getattr(m, f"p{i}").grads["w"] is g[i] for i in range(3))   # the same arrays, zeroed
    assert not any(a.any() for a in g)


def test_zero_grad_after_a_gradient_was_replaced_or_a_parameter_frozen():
    m = _three()
    opt = SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    m.p1.grads["w"] = np.full((2, 3), 5.0, np.float32)          # as Module.to or unfreeze would
    opt.zero_grad()
    assert not m.p1.grads["w"].any()
    m.p0.freeze()
    m.p1.grads["w"] += 2.0
    opt.zero_grad()
    assert m.p0.grads.get("w") is None and not m.p1.grads["w"].any() and not m.p2.grads["w"].any()
    m.p0.unfreeze()
    m.p0.grads["w"][...] = 3.0
    opt.zero_grad()
    assert not m.p0.grads["w"].any()


def test_zero_grad_keeps_a_gradient_array_two_parameters_share():
    m = _three((np.float64, np.float64, np.float64))
    m.p1.grads["w"] = m.p0.grads["w"]
    m.p0.grads["w"][...] = 2.0
    opt = SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    assert m.p1.grads["w"] is m.p0.grads["w"] and not m.p0.grads["w"].any()


def test_zero_grad_keeps_gradients_that_share_memory_through_views():
    m = _three((np.float64, np.float64, np.float64))
    shared = np.zeros(6)
    m.p0.grads["w"], m.p1.grads["w"] = shared.reshape(2, 3), shared.reshape(2, 3)[:]   # two views
    shared[...] = 4.0
    opt = SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    assert m.p0.grads["w"].base is shared and m.p1.grads["w"].base is shared
    assert not shared.any() and not m.p2.grads["w"].any()
