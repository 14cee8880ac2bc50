"""Where a training step's time differs from PyTorch's: each layer geometry of a network, both ways.

A developer's tool (benchmarks/dev/; needs torch, the ``[bench]`` extra). Run:
      NPMASK_THREADS=1 .venv/bin/python benchmarks/dev/layers_vs_torch.py [--model wrn16_1]
          [--size 32] [--batch 32] [--rounds 15] [--torch-threads 1]

``benchmarks/vs_torch.py`` compares whole steps; this script splits the comparison by layer. It
runs one forward pass of the backbone to list its convolutions (by input shape, output channels,
kernel, stride, padding) and batch norms (by input shape and what is fused into them: the ReLU, the
residual sum), with how often each occurs; then, taking turns in one process, round by round, it
times for each geometry npmask's forward and backward (``conv2d_forward``/``conv2d_backward`` with
the columns kept as a training layer keeps them, ``BatchNorm2d.forward(x, relu=, residual=)``) and
the same in PyTorch autograd (``F.conv2d``, ``relu(batch_norm(x) [+ skip])``), plain convolutions on
both sides (the mask transform, about 5% of a step, is left out). A convolution's backward computes
the weight gradient and, except for the first layer, the input gradient, as in a training step.

Prints per geometry the medians, npmask/PyTorch for forward and backward, and ``count x (npmask -
PyTorch)``: that geometry's share of the difference between the two steps; the rows are sorted by
it. For a convolution, "its GEMM(s)" is the time of the same matrix products alone, each as ONE
NumPy matmul over the whole batch (the forward's W_mat @ cols; the weight gradient's and, except
for the first layer, the input gradient's): what npmask's im2col + GEMM route would take if
building the columns and laying out the results cost nothing. The totals at the bottom are sums over the network's layers (count x time), which is most of
a step (loss, pooling, classifier and optimiser are not included). Each side's forward and backward
of a layer run back to back, ``WARM + REPEATS`` times after a pause (``_timing.settle``), and the
last ``REPEATS`` are timed: threads awake and the layer's own inputs in cache, as inside a step
(the first call after a pause can take ~10 ms more on PyTorch's two threads, which would
swamp a 1 ms layer). A layer's figures still differ from its share of a real step
(``benchmarks/train_step.py --profile``: another layer's output in cache, another allocator state);
the whole step against PyTorch is ``benchmarks/vs_torch.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("benchmarks/dev/layers_vs_torch.py needs PyTorch: pip install -e '.[bench]' (or pip install torch)")

from npmask import models  # noqa: E402
from npmask.config import settings  # noqa: E402
from npmask.nn.batchnorm import BatchNorm2d  # noqa: E402
from npmask.nn.conv import Conv2d, conv2d_backward, conv2d_forward  # noqa: E402

from _timing import settle  # noqa: E402

WARM, REPEATS = 1, 3        # per round and side: untimed calls, then timed ones


def geometries(net, x):
    """Counter of ("conv", x shape, O, k, stride, padding, input grad?) and ("bn", x shape, relu,
    residual?) over one forward pass of ``net`` in training mode."""
    seen, first = Counter(), []
    patched = []
    for _, m in net.named_modules():
        if isinstance(m, Conv2d):
            fwd = m.forward

            def conv(x, m=m, fwd=fwd):
                first.append(m)
                o, _, kh, _ = m.params["weight"].shape
                seen[("conv", tuple(x.shape), o, kh, m.stride, m.padding, len(first) > 1)] += 1
                return fwd(x)
            object.__setattr__(m, "forward", conv)
        elif isinstance(m, BatchNorm2d):
            fwd = m.forward

            def bn(x, m=m, fwd=fwd, relu=False, residual=None):
                seen[("bn", tuple(x.shape), bool(relu), residual is not None)] += 1
                return fwd(x, relu=relu, residual=residual)
            object.__setattr__(m, "forward", bn)
        else:
            continue
        patched.append(m)
    try:
        net.train()
        net.forward(x)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
    return seen


def label(key) -> str:
    if key[0] == "conv":
        _, (n, c, h, w), o, k, s, p, _ = key
        return f"conv {c}->{o} {k}x{k}/{s} at {h}x{w}"
    _, (n, c, h, w), relu, residual = key
    return f"bn{' +sum' if residual else ''}{' +relu' if relu else ''} {c}ch at {h}x{w}"


def timers(key, rng):
    """(npmask fwd, npmask bwd, torch fwd, torch bwd, GEMMs fwd, GEMMs bwd): functions that each
    return their time; the last two time only a convolution's GEMMs (None for a batch norm)."""
    shape = key[1]
    x = rng.standard_normal(shape).astype(np.float32)
    if key[0] == "conv":
        _, _, o, k, s, p, need_dx = key
        w = (rng.standard_normal((o, shape[1], k, k)) * 0.1).astype(np.float32)
        y, _ = conv2d_forward(x, w, None, s, p)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        state = {}

        def np_fwd():
            t = time.perf_counter()
            state["cache"] = conv2d_forward(x, w, None, s, p, keep_columns=True)[1]
            return time.perf_counter() - t

        def np_bwd():
            if "cache" not in state:
                np_fwd()
            t = time.perf_counter()
            conv2d_backward(dy, state.pop("cache"), need_dx=need_dx, need_dweight=True)
            return time.perf_counter() - t

        n, c, h, wd = shape
        ho, wo = y.shape[2:]
        k, m = c * k * k, n * ho * wo
        gemm = [np.ones((o, k), np.float32), np.ones((k, m), np.float32),   # W_mat @ cols
                np.ones((k, m), np.float32), np.ones((m, o), np.float32)]   # cols @ dy_mat.T
        if need_dx and s == 1:      # the input gradient as a convolution of dy: (C, O*kh*kw) @ cols(dy)
            gemm += [np.ones((c, o * k // c), np.float32), np.ones((o * k // c, n * h * wd), np.float32)]
        elif need_dx:               # col2im's dcols = W_mat.T @ dy_mat
            gemm += [np.ones((k, o), np.float32), np.ones((o, m), np.float32)]

        def gemm_fwd():
            t = time.perf_counter()
            gemm[0] @ gemm[1]
            return time.perf_counter() - t

        def gemm_bwd():
            t = time.perf_counter()
            for i in range(2, len(gemm), 2):
                gemm[i] @ gemm[i + 1]
            return time.perf_counter() - t

        xt = torch.from_numpy(x).requires_grad_(need_dx)
        wt = torch.from_numpy(w).requires_grad_(True)
        run = lambda: F.conv2d(xt, wt, None, s, p)      # noqa: E731
    else:
        _, _, relu, residual = key
        skip = rng.standard_normal(shape).astype(np.float32) if residual else None
        bn = BatchNorm2d(shape[1])
        bn.train()
        y = bn.forward(x, relu=relu, residual=skip)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        state = {}

        def np_fwd():
            t = time.perf_counter()
            bn.forward(x, relu=relu, residual=skip)
            state["ready"] = True
            return time.perf_counter() - t

        def np_bwd():
            if not state.pop("ready", False):
                np_fwd()
            t = time.perf_counter()
            bn.backward(dy)
            return time.perf_counter() - t

        tbn = torch.nn.BatchNorm2d(shape[1]).train()
        xt = torch.from_numpy(x).requires_grad_(True)
        st = None if skip is None else torch.from_numpy(skip).requires_grad_(True)

        gemm_fwd = gemm_bwd = None

        def run():
            out = tbn(xt)
            if st is not None:
                out = out + st
            return F.relu(out) if relu else out
    dyt = torch.from_numpy(dy)
    tstate = {}

    def t_fwd():
        t = time.perf_counter()
        tstate["y"] = run()
        return time.perf_counter() - t

    def t_bwd():
        if "y" not in tstate:
            t_fwd()
        y = tstate.pop("y")
        t = time.perf_counter()
        y.backward(dyt)
        return time.perf_counter() - t

    return np_fwd, np_bwd, t_fwd, t_bwd, gemm_fwd, gemm_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wrn16_1")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="PyTorch's intra-op threads (default: npmask's thread count)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads or settings.threads)
    rng = np.random.default_rng(0)
    net = models.create(args.model, num_classes=10, input_size=args.size, seed=0)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    seen = geometries(net, x)
    keys = sorted(seen, key=label)
    fns = {key: timers(key, rng) for key in keys}
    for f in fns.values():                            # warm-up: buffers, BLAS threads, torch kernels
        for g in f:
            if g is not None:
                g()
    times = {key: [[] for _ in range(6)] for key in keys}
    groups = ((0, 1), (2, 3), (4, 5))                # npmask, PyTorch, GEMMs: forward then backward
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            for group in groups if r % 2 == 0 else groups[::-1]:
                if fns[key][group[0]] is None:
                    continue
                settle(np)
                for rep in range(WARM + REPEATS):      # back to back, as the layers of a step run
                    for i in group:
                        t = fns[key][i]()
                        if rep >= WARM:
                            times[key][i].append(t)
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, {args.rounds} rounds; "
          f"npmask threads {settings.threads} (NPMASK_THREADS={os.environ.get('NPMASK_THREADS', 'unset')}), "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, numpy {np.__version__}")
    rows, total = [], np.zeros(6)
    for key in keys:
        med = np.array([np.median(t) if t else np.nan for t in times[key]]) * 1e3
        total += seen[key] * np.nan_to_num(med)
        rows.append((seen[key] * (med[0] + med[1] - med[2] - med[3]), key, med))
    print("| layer | count | npmask fwd ms | its GEMM | torch fwd ms | fwd ratio | npmask bwd ms | its GEMMs "
          "| torch bwd ms | bwd ratio | count x (npmask - torch) ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    blank = lambda v: "" if np.isnan(v) else f"{v:.3f}"       # noqa: E731
    for gap, key, med in sorted(rows, key=lambda row: -row[0]):
        print(f"| {label(key)} | {seen[key]} | {med[0]:.3f} | {blank(med[4])} | {med[2]:.3f} | "
              f"{med[0] / med[2]:.2f} | {med[1]:.3f} | {blank(med[5])} | {med[3]:.3f} | "
              f"{med[1] / med[3]:.2f} | {gap:+.2f} |")
    np_sum, t_sum = total[0] + total[1], total[2] + total[3]
    print(f"sum over the layers: npmask {np_sum:.1f} ms (forward {total[0]:.1f}), PyTorch {t_sum:.1f} ms "
          f"(forward {total[2]:.1f}); ratio {np_sum / t_sum:.2f}, forward {total[0] / total[2]:.2f}; "
          f"the convolutions' GEMMs alone (whole batch, one call each) {total[4] + total[5]:.1f} ms")

if __name__ == "__main__":
    main()
