"""One training step of a masked WRN-28-4 against the machine's floor.

Run:  .venv/bin/python benchmarks/train_step.py [--backend numpy|cupy] [--model wrn28_4]
          [--size 64] [--batch 32] [--repeats 5] [--stat median|min] [--clock wall|cpu]
          [--variants full,piggyback,...] [--profile full,...]
Quick check:  .venv/bin/python benchmarks/train_step.py --model wrn16_1 --size 32 --repeats 2
On a machine shared with other jobs, two BLAS threads time erratically; for figures that can be
compared from run to run use  NPMASK_THREADS=1 OPENBLAS_NUM_THREADS=1 ... --clock cpu  (one core,
CPU time).

Prints, in one run on the chosen backend:

1. the float32 GEMM rate (2048x2048 matmuls), measured in this process, between the timed steps:
   every training step is mostly GEMMs, so the GEMM rate is the yardstick (measured again at the
   end: a large change means other jobs shared the machine);
2. the FLOPs of one training step, counted from the layer shapes of the network: per conv
   ``2*N*O*C*kh*kw*Ho*Wo`` for each of forward, weight gradient and input gradient (the first conv's
   input gradient is not needed and not counted), the same three GEMMs for the classifier; the
   floor is FLOPs / GEMM rate, the time the step would take if it were nothing but GEMMs at full
   speed;
3. for each variant, the median (``--stat min``: minimum) time of a whole step -- forward, softmax
   cross-entropy, backward, optimiser update (Adam for masks/k's/BN, SGD with momentum for the
   head, as the paper) -- as a multiple of the floor; ``x own`` counts only the GEMMs the variant
   needs (``classifier_only`` needs only the forward pass of the backbone), and ``/ full`` is the
   median over the rounds of the step's time divided by the ``full`` step's in the same round
   (steadier than a ratio of medians on a machine whose speed drifts). The steps of all
   variants and the GEMM timings run interleaved, round by round (the variants' order reversed
   every other round), so that a change of machine load during the run affects them all alike;
4. for each mask variant (piggyback, simple, full), the time its step spends in the mask transform
   (forward and backward, gradient accumulation included), timed inside the step, its share of the
   step, and its ratio to the full model's transform in the same round;
5. peak memory: on NumPy the peak of traced allocations during one step (tracemalloc, which NumPy
   reports its array buffers to) and the process's maximum resident set size; on CuPy an upper
   bound of the memory pool's peak: the pool's size after a step that started with no free
   blocks (with ``--cuda-graphs`` also the graphs' private pools).

``--cuda-graphs`` (CuPy): every variant is also timed as ``<variant>+graphs``, its step replayed from
CUDA graphs (:class:`npmask.training.graph_step.GraphStep`, two warm-up steps: one uncaptured, one
captured), in the same rounds as the plain steps, so the table shows the lever's effect directly.

``--setting NAME=V1,V2,...`` (benchmarks/_settings.py) times every step above under each value of
an npmask setting, all in the same rounds (a step's values one after another), e.g.
``--setting cuda_conv_kernels=False,True`` on CuPy; ``/ first`` is the median over the rounds of
the step's time divided by the same step's under the first value. With ``--unfused`` the unfused
steps are timed under each value too.

``--profile full,...`` adds a breakdown of those variants' steps by layer type (where the time goes),
convolutions by geometry with the GEMM rate each one reaches (its GEMM FLOPs / its time; a masked
layer's time includes its mask transform).
Times on CuPy use CUDA events around the step (GPU time, after a synchronising warm-up).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed
import numpy as np  # noqa: E402

from npmask import models  # noqa: E402
from npmask.backend import get_backend  # noqa: E402
from npmask.masking import layers as masked_layers  # noqa: E402
from npmask.masking.variants import VARIANTS as VARIANT_SPECS  # noqa: E402
from npmask.multidomain import MultiDomainModel  # noqa: E402
from npmask import config  # noqa: E402
from npmask.nn.conv import Conv2d  # noqa: E402
from npmask.nn.linear import Linear  # noqa: E402
from npmask.optim import SGD, Adam, Optimizers  # noqa: E402
from npmask.training.graph_step import GraphStep  # noqa: E402
from npmask.training.loop import train_step  # noqa: E402

from _settings import parse_setting  # noqa: E402  (benchmarks/_settings.py, beside this script)
from _timing import Clock, gemm_rate  # noqa: E402  (benchmarks/_timing.py, beside this script)

VARIANTS = ("classifier_only", "piggyback", "simple", "full", "finetune")


# ---------------------------------------------------------------------------------- FLOPs
def step_flops(net, x) -> tuple[float, float]:
    """(FLOPs of a training step, FLOPs of its forward pass) of ``net`` on the batch ``x``.

    Counted from the shapes the layers actually see: one forward pass is run in eval mode and the
    input shape of every Conv2d/Linear is read from its cache. Each conv is three GEMMs of
    2*N*O*C*kh*kw*Ho*Wo flops (forward, weight gradient, input gradient); the first layer's input
    gradient (the image's) is not needed and not counted. Elementwise work (BN, ReLU, the mask
    transform, the optimiser) is not counted: the floor is the GEMM work alone.
    """
    net.eval()
    net.forward(x)
    forward = backward = 0.0
    first = True
    for _, m in net.named_modules():
        if isinstance(m, Conv2d):
            xin, w = m._cache[0], m.params["weight"]
            n = xin.shape[0]
            o, c, kh, kw = w.shape
            ho = (xin.shape[2] + 2 * m.padding - kh) // m.stride + 1
            wo = (xin.shape[3] + 2 * m.padding - kw) // m.stride + 1
            f = 2.0 * n * o * c * kh * kw * ho * wo
        elif isinstance(m, Linear):
            n = m._x.shape[0]
            f = 2.0 * n * m.in_features * m.out_features
        else:
            continue
        forward += f
        backward += f if first else 2 * f      # weight gradient (+ input gradient)
        first = False
    return forward + backward, forward


# ---------------------------------------------------------------------------------- one step
def make_step(model: MultiDomainModel, x, y, cuda_graphs: bool = False):
    """The training step of npmask.training.loop (train_step), for one fixed batch; with
    ``cuda_graphs`` the same step through a GraphStep (``step.graph`` is the GraphStep)."""
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=1e-4), head=SGD(groups["head"], lr=1e-3, momentum=0.9))
    if not cuda_graphs:
        return lambda: train_step(model, opt, x, y)[0]
    graph = GraphStep(model, opt)

    def step():
        return graph(x, y)[0]
    step.graph = graph
    return step


def unfused(step):
    """``step`` run with the setting fuse_bn_relu off (the separate layers)."""
    def run():
        with config.using(fuse_bn_relu=False):
            return step()
    return run


def under(step, name: str, value):
    """``step`` run with npmask setting ``name`` = ``value`` (a GraphStep's ``graph`` kept)."""
    def run():
        with config.using(**{name: value}):
            return step()
    if hasattr(step, "graph"):
        run.graph = step.graph
    return run


def build_step(model_name: str, size: int, batch: int, variant: str):
    """(step, FLOPs of one step): ``variant`` added to a fresh ``model_name`` backbone (10 classes,
    seed 0), trained on one fixed random NumPy batch of ``batch`` images of size x size."""
    backbone = models.create(model_name, num_classes=10, input_size=size, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    flops, _ = step_flops(backbone, x)
    model = MultiDomainModel(backbone)
    model.add_domain(variant, num_classes=10, variant=variant, seed=0)
    model.set_domain(variant).train()
    return make_step(model, x, y), flops


def add_step_arguments(ap, rounds: int = 10) -> None:
    """The options of the scripts that time one training step in rounds (dev/step_ab.py,
    dev/conv_against.py, dev/serial_share.py): --model, --size, --batch, --variant, --rounds."""
    ap.add_argument("--model", default="wrn28_4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--rounds", type=int, default=rounds)


def print_floor(args, flops: float, rates) -> float:
    """Print the step and the GEMM rate over the rounds (from add_step_arguments' options); return
    the floor, FLOPs / the median GEMM rate, in seconds."""
    floor = flops / 1e9 / float(np.median(rates))
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, variant {args.variant}, "
          f"{args.rounds} rounds; GEMM {np.median(rates):.0f} GFLOP/s "
          f"(range {min(rates):.0f}-{max(rates):.0f}), floor {floor:.3f} s")
    return floor


class TransformTimer:
    """Accumulates the time spent in the masked layers' transform forward and backward.

    Wraps ``_MaskedLayer._forward_weight`` (W~ from W, R, k) and ``_backward_weight`` (dL/dR and
    dL/dk from G, accumulated into the gradients) for the duration of a ``with`` block.
    """

    def __init__(self, clock: Clock):
        self.clock, self.total = clock, 0.0

    @contextlib.contextmanager
    def active(self):
        cls = masked_layers._MaskedLayer
        fwd, bwd = cls._forward_weight, cls._backward_weight
        timer = self

        def timed_fwd(layer):
            out = {}
            timer.total += timer.clock.time(lambda: out.setdefault("w", fwd(layer)))
            return out["w"]

        def timed_bwd(layer, G):
            timer.total += timer.clock.time(lambda: bwd(layer, G))

        cls._forward_weight, cls._backward_weight = timed_fwd, timed_bwd
        try:
            yield self
        finally:
            cls._forward_weight, cls._backward_weight = fwd, bwd


def _conv_key(m, x):
    """(label, forward FLOPs, GEMMs of the backward pass) for a conv layer and its input, else None."""
    weight = m.weight if isinstance(m, masked_layers._MaskedLayer) else m.params.get("weight")
    if weight is None or weight.ndim != 4 or not hasattr(m, "stride"):
        return None
    o, c, kh, kw = weight.shape
    n, _, h, w = x.shape
    ho, wo = (h + 2 * m.padding - kh) // m.stride + 1, (w + 2 * m.padding - kw) // m.stride + 1
    weight_grad = m._needs_weight_grad() if hasattr(m, "_needs_weight_grad") else m.requires_grad("weight")
    gemms = int(getattr(m, "need_input_grad", True)) + int(weight_grad)
    label = f"{type(m).__name__} {c}->{o} {kh}x{kw}/{m.stride} at {h}x{w}"
    return label, 2.0 * n * o * c * kh * kw * ho * wo, gemms


@contextlib.contextmanager
def layer_profile(net, clock: Clock, table: dict, flops: dict):
    """Adds the forward and backward time of every leaf module of ``net`` to ``table``: by type, and
    for convolutions by geometry, with their GEMM FLOPs in ``flops``."""
    patched = []
    for _, m in net.named_modules():
        if m.children and type(m).__name__ not in ("SharedFrozen",):
            continue
        fwd, bwd = m.forward, m.backward

        def tf(x, m=m, fwd=fwd, **fused):      # fused: batch norm's relu=, residual= (fuse_bn_relu)
            out, conv = {}, _conv_key(m, x)
            name = type(m).__name__ if conv is None else conv[0]
            if fused.get("relu") or fused.get("residual") is not None:
                name += " (+ReLU)" if fused.get("residual") is None else " (+sum, ReLU)"
            table[name + " fwd"] += clock.time(lambda: out.setdefault("y", fwd(x, **fused)))
            if conv is not None:
                flops[name + " fwd"] += conv[1]
                flops[name + " bwd"] += conv[1] * conv[2]
            m.__dict__["_profile_name"] = name
            return out["y"]

        def tb(dy, m=m, bwd=bwd):
            out = {}
            table[m.__dict__["_profile_name"] + " bwd"] += clock.time(lambda: out.setdefault("d", bwd(dy)))
            return out["d"]

        object.__setattr__(m, "forward", tf)
        object.__setattr__(m, "backward", tb)
        patched.append(m)
    try:
        yield table
    finally:
        for m in patched:
            for key in ("forward", "backward", "_profile_name"):
                m.__dict__.pop(key, None)


def profile(model, step, clock: Clock, repeats: int, name: str) -> None:
    """Print where the step's time goes, by layer type and conv geometry (forward and backward
    separately), with the GEMM rate each conv reaches (its GEMM FLOPs / its time)."""
    table, flops = defaultdict(float), defaultdict(float)
    with layer_profile(model.network(), clock, table, flops):
        step()
        table.clear()
        flops.clear()
        total = sum(clock.time(step) for _ in range(repeats))
    print(f"    where a {name} step's time goes (mean of {repeats} steps, {total / repeats:.3f} s):")
    for key, v in sorted(table.items(), key=lambda kv: -kv[1]):
        if v / total >= 0.002:
            rate = f"{flops[key] / v / 1e9:>7.0f} GFLOP/s" if flops.get(key) else ""
            print(f"      {key:<44}{v / repeats:>8.3f} s {100 * v / total:>6.1f}%{rate}")
    rest = total - sum(table.values())
    print(f"      {'rest (loss, optimiser)':<44}{rest / repeats:>8.3f} s {100 * rest / total:>6.1f}%")


def peak_memory(xp, step) -> str:
    """Peak memory of one step: traced NumPy allocations (tracemalloc), or the CuPy pool's peak."""
    if xp is np:
        tracemalloc.start()   # traces allocations made from now on (arrays held before are not seen)
        step()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return (f"{peak / 2**20:.0f} MiB allocated by the step at its peak (tracemalloc: activations, "
                f"caches, temporaries; weights held before the step not included); process max RSS "
                f"{rss:.0f} MiB")
    # The pool keeps freed blocks for reuse and only grows while a step runs: emptied of free
    # blocks first, its size after the step bounds from above what the step held at once.
    pool = xp.get_default_memory_pool()
    xp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.used_bytes()
    step()
    xp.cuda.Device().synchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    return (f"CuPy memory pool: at most {total / 2**20:.0f} MiB in use at the step's peak (the pool's "
            f"size after the step, emptied of free blocks before it), {before / 2**20:.0f} MiB in use "
            f"before the step (every model built so far), {used / 2**20:.0f} MiB after it")


def transform_shares(steps: dict, names: list, clock: Clock, repeats: int) -> None:
    """Print the time each mask variant's step spends in the mask transform (forward + backward).

    The variants' steps run round-robin, ``repeats`` rounds (the order reversed every other round),
    with :class:`TransformTimer` active.
    Mask variants differ from one another only in the transform (which k's are learned) and in a
    few scalars of optimiser state; the rest of their steps is the same code on the same shapes. So
    where the step times are equal within the machine's noise, the transform times (paired, per
    round) say which variant is cheaper.
    """
    timer = TransformTimer(clock)
    transform, step_time = {n: [] for n in names}, {n: [] for n in names}
    with timer.active():
        for name in names:
            steps[name][1]()
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:     # as in main: reversed every
                timer.total = 0.0                                 # other round
                step_time[name].append(clock.time(steps[name][1]))
                transform[name].append(timer.total)
    print("mask transform (forward + backward), median over the steps; share = transform / that step:")
    for name in names:
        tr, st = np.array(transform[name]), np.array(step_time[name])
        line = (f"  {name:<15}{1e3 * np.median(tr):>8.1f} ms of a {np.median(st):.3f} s step "
                f"({100 * np.median(tr / st):.1f}%)")
        if "full" in names and name != "full":
            full_tr, full_st = np.array(transform["full"]), np.array(step_time["full"])
            line += (f"; paired / full: transform {np.median(tr / full_tr):.3f}, "
                     f"rest of the step {np.median((st - tr) / (full_st - full_tr)):.3f}")
        print(line)


# ---------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--model", default="wrn28_4")
    ap.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="statistic over the repeats (of the steps and of the GEMM timings); min is "
                         "robust when other jobs share the machine")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="NumPy only: cpu = CPU time of the process (robust when the machine is shared; "
                         "use with NPMASK_THREADS=1 OPENBLAS_NUM_THREADS=1)")
    ap.add_argument("--profile", default="", metavar="VARIANTS",
                    help="comma-separated variants whose step is broken down by layer type")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="cupy: also time every variant's step replayed from CUDA graphs")
    ap.add_argument("--unfused", action="store_true",
                    help="also time every variant's step with fuse_bn_relu=False (batch norm, the "
                         "residual sum and ReLU as separate layers), paired with the fused one")
    ap.add_argument("--setting", default=None, metavar="NAME=V1,V2,...",
                    help="time every step above (each variant, +graphs, +unfused) under each value of "
                         "this npmask.config setting, in the same rounds, e.g. "
                         "cuda_conv_kernels=False,True; '/ first' is the paired ratio to the same "
                         "step under the first value")
    args = ap.parse_args(argv)
    setting, values = parse_setting(args.setting) if args.setting else (None, [None])

    xp = get_backend(args.backend)
    if args.cuda_graphs and xp is np:
        ap.error("--cuda-graphs is for the cupy backend")
    if args.clock == "cpu" and xp is not np:
        ap.error("--clock cpu is for the numpy backend (CuPy steps are timed with CUDA events)")
    clock = Clock(xp, cpu=args.clock == "cpu", stat=args.stat)
    print("command: " + " ".join(["python benchmarks/train_step.py"] + (argv if argv is not None else sys.argv[1:])))
    import os
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"backend {args.backend}, float32, {args.model} at {args.size}x{args.size}, batch {args.batch}, "
          f"{args.stat} of {args.repeats} steps, {args.clock} clock, BLAS threads: {threads} "
          f"({os.cpu_count()} CPUs), OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'default')}, "
          f"npmask threads: {config.settings.threads}")

    backbone = models.create(args.model, num_classes=args.classes, input_size=args.size, seed=0)
    if xp is not np:
        backbone.to("cupy")
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((args.batch, 3, args.size, args.size)), dtype=xp.float32)
    y = xp.asarray(rng.integers(0, args.classes, args.batch))
    flops, fwd_flops = step_flops(backbone, x)

    # Every variant's network is built first, then the timed steps run round-robin (one step of each
    # variant per round, and one GEMM-rate measurement per round). On a machine shared with other
    # jobs the speed drifts by tens of percent within a run; interleaving spreads that drift evenly
    # over the variants and the yardstick, so the ratios stay comparable. The order is reversed
    # every other round, so that no variant always runs right after the same one (or right after
    # the yardstick's two-thread GEMMs).
    variants = args.variants.split(",")
    bases = (variants + ([f"{v}+graphs" for v in variants] if args.cuda_graphs else [])
             + ([f"{v}+unfused" for v in variants] if args.unfused else []))

    def label(base, value):                   # with --setting, each step once per value
        return base if setting is None else f"{base} [{value!r}]"
    # a step's name -> (base name, the setting's value); each base's values next to one another
    named = {label(base, value): (base, value) for base in bases for value in values}
    names = list(named)
    steps = {}
    for name, (base, value) in named.items():
        variant = base.split("+")[0]
        model = MultiDomainModel(backbone)
        model.add_domain(variant, num_classes=args.classes, variant=variant, seed=0)
        model.set_domain(variant).train()
        step = make_step(model, x, y, cuda_graphs=base.endswith("+graphs"))
        if base.endswith("+unfused"):
            step = unfused(step)
        if setting is not None:
            step = under(step, setting, value)  # built, warmed up, captured and timed under value
        steps[name] = (model, step)
        steps[name][1]()                      # warm-up step: optimiser state, buffers
        if base.endswith("+graphs"):
            steps[name][1]()                  # the second step captures the graphs
    rates, times = [], {name: [] for name in names}
    for r in range(args.repeats):
        rates.append(gemm_rate(xp, clock, repeats=3))
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(clock.time(steps[name][1]))
    reduce = np.min if args.stat == "min" else np.median
    rate = float(np.max(rates) if args.stat == "min" else np.median(rates))
    floor = flops / 1e9 / rate
    print(f"float32 GEMM rate (2048x2048 matmul, {'best' if args.stat == 'min' else 'median'} "
          f"over the rounds): {rate:.1f} GFLOP/s "
          f"(range {min(rates):.1f}-{max(rates):.1f})")
    print(f"FLOPs of one training step (forward, input and weight gradients): {flops / 1e9:.1f} GFLOP "
          f"({fwd_flops / 1e9 / args.batch:.3f} GFLOP forward per image)")
    print(f"floor = FLOPs / GEMM rate = {floor:.3f} s\n")

    # "/ full": the median over the rounds of (this variant's step / the full step of the same
    # round). The machine's speed drifts by tens of percent within a run; a paired ratio compares
    # variants timed seconds apart, so it is far steadier than a ratio of the two medians.
    # With --setting, "/ full" compares with the full step under the same value, and "/ first" with
    # the same step under the first value (the median over the rounds of the ratio, too).
    paired = "full" in bases
    width = max(17, max(len(name) for name in names) + 2)
    if setting is not None:
        print(f"--setting {setting}: every step under each of {', '.join(map(repr, values))}; "
              f"'/ first': its paired ratio to the same step under {values[0]!r}")
    header = (f"{'variant':<{width}}{'step s':>9}{'x floor':>9}{'own floor s':>13}{'x own':>8}"
              f"{'images/s':>10}" + (f"{'/ full':>9}" if paired else "")
              + (f"{'/ first':>9}" if setting is not None else ""))
    print(header)
    print("-" * len(header))

    def ratio(name, other):
        return float(np.median(np.array(times[name]) / np.array(times[other])))
    for name, (base, value) in named.items():
        t = float(reduce(times[name]))
        own = (fwd_flops if base == "classifier_only" else flops) / 1e9 / rate
        line = f"{name:<{width}}{t:>9.3f}{t / floor:>9.2f}{own:>13.3f}{t / own:>8.2f}{args.batch / t:>10.1f}"
        if paired:
            line += f"{ratio(name, label('full', value)):>9.3f}"
        if setting is not None:
            line += f"{ratio(name, label(base, values[0])):>9.3f}"
        print(line)
    print("-" * len(header))
    for name, (base, _) in named.items():
        if base in args.profile.split(","):
            profile(steps[name][0], steps[name][1], clock, args.repeats, name)
    masked = [name for name in variants if VARIANT_SPECS[name].has_mask]
    for value in values:
        under_value = "" if setting is None else f" ({setting}={value!r})"
        if masked:
            if setting is not None:
                print(f"under {setting}={value!r}:")
            transform_shares({base: steps[label(base, value)] for base in variants}, masked, clock,
                             args.repeats)
        if "full" in bases:
            print(f"peak memory of a full step{under_value}: "
                  + peak_memory(xp, steps[label("full", value)][1]))
        if "full+graphs" in bases:
            held = steps[label("full+graphs", value)][1].graph.memory()
            print(f"full+graphs{under_value}: the graphs' private memory pools hold "
                  f"{held['graph_pools'] / 2**20:.0f} MiB; CuPy's default pool "
                  f"{held['default_pool'] / 2**20:.0f} MiB (every step built so far)")
    del steps
    rate_end = gemm_rate(xp, clock)
    print(f"float32 GEMM rate measured again at the end: {rate_end:.1f} GFLOP/s "
          "(a large difference means other work shared the machine during the run)")


if __name__ == "__main__":
    main()
