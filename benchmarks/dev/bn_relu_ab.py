"""Batch norm + ReLU (+ the residual sum) fused against the separate modules, layer by layer.

A developer's A/B tool (benchmarks/dev/). Run:
      NPMASK_THREADS=1 .venv/bin/python benchmarks/dev/bn_relu_ab.py [--net wrn16_1|wrn28_4]
          [--batch 32] [--rounds 200] [--clock wall|cpu]

For each activation shape of the network (WRN-16-1 at 32x32 or WRN-28-4 at 64x64), one training
forward and backward of BN -> ReLU (the stem's and each block's first) and of BN -> + skip -> ReLU
(each block's end) in float32: fused (``bn.forward(x, relu=True, residual=skip)``, setting
``fuse_bn_relu``) and separate (BatchNorm2d, ``add_into``, ReLU(inplace=True), as BasicBlock runs
them). The two take turns, round by round (the order reversed every other round); printed: each
one's median time and the median over the rounds of the paired ratio fused / separate. Then the
memory of the whole network's forward and backward under each value of the setting (tracemalloc:
what the forward pass leaves held for the backward, and the peak of both).
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from npmask import config, models, nn  # noqa: E402
from npmask.nn.parallel import add_into  # noqa: E402

SHAPES = {"wrn16_1": [(16, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)],
          "wrn28_4": [(16, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8)]}
SIZE = {"wrn16_1": 32, "wrn28_4": 64}


def _memory(name: str, batch: int) -> None:
    """MiB held after a training forward pass and peak over forward + backward, per setting value."""
    for fused in (False, True):
        with config.using(fuse_bn_relu=fused):
            net = models.create(name, num_classes=10, input_size=SIZE[name], seed=0)
            x = np.random.default_rng(0).standard_normal((batch, 3, SIZE[name], SIZE[name]),
                                                         dtype=np.float32)
            net.backward(np.ones_like(net.forward(x)))          # warm-up: every buffer made once
            tracemalloc.start()
            y = net.forward(x)
            held = tracemalloc.get_traced_memory()[0]
            net.backward(np.ones_like(y))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        print(f"  fuse_bn_relu={fused!s:<5}  {name} forward + backward: held after the forward "
              f"{held / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")


def _passes(shape, residual: bool):
    """(fused, separate): each runs one training forward and backward on the same arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    skip = rng.standard_normal(shape, dtype=np.float32) if residual else None
    dy = rng.standard_normal(shape, dtype=np.float32)
    bn, relu = nn.BatchNorm2d(shape[1]), nn.ReLU(inplace=True)

    def fused():
        bn.forward(x, relu=True, residual=skip)
        bn.backward(dy)

    def separate():
        y = bn(x)
        if residual:
            add_into(np, y, skip)
        relu(y)
        bn.backward(relu.backward(dy))
    return fused, separate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="wrn16_1", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time, steadier on a shared machine")
    args = ap.parse_args(argv)
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"{args.net}, batch {args.batch}, float32, {config.settings.threads} thread(s), "
          f"{args.rounds} rounds, {args.clock} clock; forward + backward of one layer")
    for c, h, w in SHAPES[args.net]:
        for residual in (False, True):
            fused, separate = _passes((args.batch, c, h, w), residual)
            times = {fused: [], separate: []}
            for r in range(args.rounds):
                for fn in ((fused, separate) if r % 2 == 0 else (separate, fused)):
                    t0 = now()
                    fn()
                    times[fn].append(now() - t0)
            tf, ts = np.array(times[fused]), np.array(times[separate])
            q1, med, q3 = np.percentile(tf / ts, [25, 50, 75])
            what = "BN + sum + ReLU" if residual else "BN + ReLU      "
            print(f"  {what} {c:4d}x{h}x{w:<3d} separate {np.median(ts) * 1e3:7.3f} ms  fused "
                  f"{np.median(tf) * 1e3:7.3f} ms  paired ratio {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    _memory(args.net, args.batch)


if __name__ == "__main__":
    main()
