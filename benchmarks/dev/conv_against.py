"""A training step with this checkout's convolution against the one of an earlier git revision.

A developer's A/B tool (benchmarks/dev/). Run:
      .venv/bin/python benchmarks/dev/conv_against.py REVISION [--model wrn28_4] [--size 64]
          [--variant full] [--rounds 10]
e.g.  .venv/bin/python benchmarks/dev/conv_against.py 9e6cc7b

Loads the fast convolution as it was at REVISION (``git show``: ``npmask/nn/conv_fast.py``, or
``npmask/nn/conv.py`` for revisions before the split) and swaps its three GEMM routines (forward,
weight gradient, col2im input gradient) in and out of this checkout's ``npmask.nn.conv_fast``;
everything else in the step (layers, optimiser, threads, and for a revision after the split its
column layouts, conv_columns.py) is this checkout's. The two versions take turns step
by step in one process, after a pause that lets OpenBLAS's workers stop spinning, so that the
machine's drift affects both alike; prints each one's median step, its multiple of the FLOP floor
(GEMM rate measured in the same rounds) and the median over the rounds of the paired ratio
(this checkout / REVISION), which is what to trust on a machine whose speed drifts.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))                # _timing, train_step
import numpy as np  # noqa: E402

from npmask.nn import conv_fast  # noqa: E402

from _timing import Clock, take_turns  # noqa: E402
from train_step import add_step_arguments, build_step, print_floor  # noqa: E402

ROUTINES = ("conv_gemm", "weight_grad", "input_grad_col2im")
OLD_NAMES = ("_conv_gemm", "_weight_grad", "_input_grad_col2im")    # in conv.py before the split


def conv_routines_at(revision: str) -> dict:
    """{name in ROUTINES: function} of the fast convolution at ``revision``, loaded as a module
    beside this checkout's npmask (its relative imports resolve to this checkout's modules)."""
    for path, names in (("npmask/nn/conv_fast.py", ROUTINES), ("npmask/nn/conv.py", OLD_NAMES)):
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            break
    else:
        raise SystemExit(f"{revision} has neither npmask/nn/conv_fast.py nor npmask/nn/conv.py")
    module = type(sys)(f"conv_at_{revision}")
    module.__package__ = "npmask.nn"                  # so that its relative imports resolve
    exec(compile(shown.stdout, f"{revision}:{path}", "exec"), module.__dict__)
    return {new: getattr(module, old) for new, old in zip(ROUTINES, names)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revision")
    add_step_arguments(ap)
    args = ap.parse_args(argv)

    versions = {"this checkout": {name: getattr(conv_fast, name) for name in ROUTINES},
                args.revision: conv_routines_at(args.revision)}

    def use(version):
        for name, fn in versions[version].items():
            setattr(conv_fast, name, fn)

    step, flops = build_step(args.model, args.size, args.batch, args.variant)
    names = list(versions)
    try:
        times, rates = take_turns(step, [lambda v=v: use(v) for v in names], args.rounds, Clock(np))
    finally:
        use("this checkout")
    times = dict(zip(names, times))
    floor = print_floor(args, flops, rates)
    base = np.array(times[args.revision])
    for version, t in times.items():
        ratio = float(np.median(np.array(t) / base))
        print(f"{version:<16} median step {np.median(t):.3f} s = {np.median(t) / floor:.2f}x floor, "
              f"paired ratio to {args.revision}: {ratio:.3f}")


if __name__ == "__main__":
    main()
