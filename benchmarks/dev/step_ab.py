"""A training step under several values of one npmask setting, taking turns step by step in one process.

A developer's A/B tool (benchmarks/dev/). Run:
      .venv/bin/python benchmarks/dev/step_ab.py NAME=V1,V2,... [--model wrn28_4] [--size 64]
          [--variant full] [--rounds 10] [--clock wall|cpu]
e.g.  .venv/bin/python benchmarks/dev/step_ab.py conv_chunk_floats=1048576,2097152,4194304
      .venv/bin/python benchmarks/dev/step_ab.py threads=2,3,4

Sets the npmask setting NAME (an attribute of ``npmask.config.settings`` that npmask reads when it
runs, such as a chunk size, a threshold or the thread count) to each value in turn, one training
step per value and round, the order reversed every other round, after a pause that lets OpenBLAS's
workers stop spinning (``_timing.settle``). The machine's speed drifts by tens of percent within
minutes, so a comparison is only trustworthy inside one process: the script prints each value's
median step, its multiple of the FLOP floor (GEMM rate measured in the same rounds) and the median
and quartiles over the rounds of the paired ratio (this value's step / the first value's step of the
same round).
The setting is restored at the end. Values are Python literals (ast.literal_eval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))                # _timing, _settings, train_step
import numpy as np  # noqa: E402

from _settings import parse_setting, restored, switch  # noqa: E402
from _timing import Clock, take_turns  # noqa: E402
from train_step import add_step_arguments, build_step, print_floor  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("setting", help="NAME=V1,V2,... (NAME a setting of npmask.config; the first "
                                    "value is the baseline)")
    add_step_arguments(ap)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (steadier on a shared machine; with "
                         "NPMASK_THREADS=1 OPENBLAS_NUM_THREADS=1 the time on one idle core)")
    args = ap.parse_args(argv)
    name, values = parse_setting(args.setting)

    step, flops = build_step(args.model, args.size, args.batch, args.variant)
    switches = [lambda v=v: switch(name, v) for v in values]
    with restored(name):
        times, rates = take_turns(step, switches, args.rounds, Clock(np, cpu=args.clock == "cpu"))
    floor = print_floor(args, flops, rates)
    base = np.array(times[0])
    for value, t in zip(values, times):
        t = np.array(t)
        q1, med, q3 = np.percentile(t / base, [25, 50, 75])
        print(f"{name} = {value!r:<12} median step {np.median(t):.3f} s = "
              f"{np.median(t) / floor:.2f}x floor, paired ratio {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
