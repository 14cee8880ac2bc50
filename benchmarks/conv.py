"""Conv2d speed against the machine's float32 GEMM rate, for every conv shape of WRN-28-4.

Run:  .venv/bin/python benchmarks/conv.py [--backend numpy|cupy] [--batch 32] [--repeats 5]

Prints, in one run:
1. the float32 GEMM rate (2048x2048 matmuls), the yardstick: a convolution is three GEMMs in
   disguise (forward, input gradient, weight gradient), so its best possible speed is the GEMM rate;
2. for every distinct conv shape of WRN-28-4 at 64x64 input, the time of forward + backward (dx and
   dweight), its GFLOP/s (2*O*C*kh*kw*Ho*Wo*N per pass, 3 passes) and the fraction of the GEMM rate;
3. the total over all convs of the network, each shape weighted by how many times it occurs.
Each time is the median over --repeats runs (--stat min: the minimum, robust when other jobs share
the machine); the GEMM rate is measured again at the end as a check on such interference.

Times on CuPy use CUDA events (GPU time, after a synchronising warm-up).

``--threads 1,2`` times every shape with each value of npmask.config.settings.threads (the threads
that share a convolution's chunks of images, each running its chunks' GEMMs on one BLAS thread;
1 = serial chunks, on one core), the settings taking turns repeat by repeat, and prints each
setting's total and its ratio to the first, and for every shape the paired ratio (the median over
the repeats of its time / the first setting's time in the same repeat): a comparison within one
run, which is what to trust on a machine whose speed drifts. ``--setting NAME=V1,V2,...`` does the
same for any npmask setting (benchmarks/_settings.py), e.g. ``--setting shifted_rows=False,True``
(the column layouts) or ``--setting conv_impl="'readable','fast'"`` (the readable path of conv.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from npmask import config  # noqa: E402
from npmask.backend import BackendError, get_backend  # noqa: E402
from npmask.nn.conv import conv2d_backward, conv2d_forward, conv_output_size  # noqa: E402

from _settings import parse_setting, restored, switch  # noqa: E402  (beside this script)
from _timing import Clock, gemm_rate, settle  # noqa: E402  (benchmarks/_timing.py, beside this script)


def wrn_conv_shapes(depth: int = 28, width: int = 4, size: int = 64):
    """[(name, Cin, Cout, k, stride, H, count)] for the convs of WRN-depth-width (docs/design.md).

    Stem 3x3 3->16; three stages of (depth-4)/6 basic blocks with widths 16k, 32k, 64k; the first
    block of each stage has stride 2 and a 1x1 stride-2 projection shortcut.
    """
    blocks = (depth - 4) // 6
    shapes = {}

    def add(name, cin, cout, k, stride, h):
        key = (cin, cout, k, stride, h)
        prev = shapes.get(key)
        shapes[key] = (prev[0] if prev else name, prev[1] + 1 if prev else 1)

    add("stem", 3, 16, 3, 1, size)
    cin, h = 16, size
    for stage, cout in enumerate((16 * width, 32 * width, 64 * width), start=1):
        add(f"layer{stage}.0.conv1", cin, cout, 3, 2, h)
        add(f"layer{stage}.0.shortcut", cin, cout, 1, 2, h)
        h //= 2
        add(f"layer{stage}.*.conv", cout, cout, 3, 1, h)          # block 0 conv2, then 2 per block
        for _ in range(blocks - 1):
            add(f"layer{stage}.*.conv", cout, cout, 3, 1, h)
            add(f"layer{stage}.*.conv", cout, cout, 3, 1, h)
        cin = cout
    return [(name, *key, count) for key, (name, count) in shapes.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="statistic over repeats; min is robust on a machine shared with other jobs")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (npmask.config.settings.threads) to compare, "
                         "interleaved (e.g. 1,2)")
    ap.add_argument("--setting", default=None,
                    help="NAME=V1,V2,...: any npmask.config setting to compare the same way")
    args = ap.parse_args(argv)
    if args.threads and args.setting:
        sys.exit("benchmarks/conv.py: give --threads or --setting, not both")
    if args.setting:
        name, settings = parse_setting(args.setting)
    else:
        name = "threads"
        settings = (parse_setting(f"threads={args.threads}")[1] if args.threads
                    else [config.settings.threads])
    with restored(name):
        run(args, name, settings)


def run(args, setting, settings):

    try:
        xp = get_backend(args.backend)
    except BackendError as err:
        sys.exit(f"benchmarks/conv.py: {err}")
    timer = Clock(xp, stat=args.stat)
    rate = gemm_rate(xp, timer)
    print(f"backend {args.backend}, float32, batch {args.batch}, input {args.size}x{args.size}, "
          f"{args.stat} of {args.repeats} repeats")
    print(f"float32 GEMM rate (2048x2048 matmul): {rate:.1f} GFLOP/s "
          f"(fractions below are of this rate)")
    print(f"npmask setting {setting}: {', '.join(map(repr, settings))}; OPENBLAS_THREAD_TIMEOUT="
          f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'default')}; {os.cpu_count()} CPUs\n")

    header = (f"{'layer':<22}{'Cin':>5}{'Cout':>5}{'k':>3}{'s':>3}{'H':>5}{'count':>6}"
              f"{'ms fwd':>9}{'ms bwd':>9}{'ms tot':>9}{'GFLOP/s':>9}{'x GEMM':>8}"
              + (f"{'paired':>8}" if len(settings) > 1 else ""))
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    total_time = {value: 0.0 for value in settings}
    total_flops = 0.0
    stat = np.min if args.stat == "min" else np.median
    for name, cin, cout, k, stride, h, count in wrn_conv_shapes(size=args.size):
        pad = k // 2
        x = xp.asarray(rng.standard_normal((args.batch, cin, h, h)), dtype=xp.float32)
        w = xp.asarray(rng.standard_normal((cout, cin, k, k)) * 0.05, dtype=xp.float32)
        ho = conv_output_size(h, k, stride, pad)
        dy = xp.asarray(rng.standard_normal((args.batch, cout, ho, ho)), dtype=xp.float32)
        state = {}

        def fwd():
            state["cache"] = conv2d_forward(x, w, None, stride, pad)[1]

        def bwd():
            conv2d_backward(dy, state["cache"], need_dx=True, need_dweight=True)

        # Each setting's forward and backward are timed in turns, one repeat at a time.
        times = {value: ([], []) for value in settings}
        for r in range(args.repeats + 1):                 # repeat 0 is the warm-up
            for value in settings if r % 2 else settings[::-1]:   # each goes first in turn
                switch(setting, value)
                if len(settings) > 1:
                    settle(xp)              # the previous setting's BLAS workers must not spin here
                t_f, t_b = timer.time(fwd), timer.time(bwd)
                if r:
                    times[value][0].append(t_f)
                    times[value][1].append(t_b)
        flops = 3 * 2 * args.batch * cout * cin * k * k * ho * ho
        total_flops += count * flops
        for value in settings:
            t_fwd, t_bwd = (float(stat(v)) for v in times[value])
            t = t_fwd + t_bwd
            gflops = flops / t / 1e9
            total_time[value] += count * t
            label = name if len(settings) == 1 else f"{name} [{value}]"
            # paired: the median over the repeats of this setting's forward + backward divided by
            # the first setting's in the same repeat (steadier than a ratio of medians)
            paired = np.median((np.add(*times[value]) / np.add(*times[settings[0]])))
            print(f"{label:<22}{cin:>5}{cout:>5}{k:>3}{stride:>3}{h:>5}{count:>6}"
                  f"{t_fwd * 1e3:>9.2f}{t_bwd * 1e3:>9.2f}{t * 1e3:>9.2f}{gflops:>9.1f}{gflops / rate:>8.2f}"
                  + (f"{paired:>8.3f}" if len(settings) > 1 else ""))
    print("-" * len(header))
    first = total_time[settings[0]]
    for value in settings:
        t = total_time[value]
        gflops = total_flops / t / 1e9
        print(f"all {sum(s[-1] for s in wrn_conv_shapes(size=args.size))} convs of WRN-28-4, "
              f"forward + backward, {setting} = {value!r}: {t:.3f} s, {total_flops / 1e9:.1f} GFLOP, "
              f"{gflops:.1f} GFLOP/s = {gflops / rate:.2f} x GEMM "
              f"(floor at the GEMM rate: {total_flops / 1e9 / rate:.3f} s)"
              + ("" if value == settings[0] else f"; {t / first:.3f} x the time with {settings[0]!r}"))
    rate_end = gemm_rate(xp, timer)
    print(f"float32 GEMM rate measured again at the end: {rate_end:.1f} GFLOP/s "
          "(a large difference means the machine was busy with other work during the run)")


if __name__ == "__main__":
    main()
