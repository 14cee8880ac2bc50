"""Where a 2-thread training step leaves a core idle: serial code, and idle time inside parallel regions.

A developer's tool (benchmarks/dev/). Run:
      .venv/bin/python benchmarks/dev/serial_share.py [--model wrn28_4] [--size 64] [--batch 32]
          [--variant full] [--rounds 4]

On NumPy with more than one thread (npmask.config.settings.threads), npmask's threads work only
inside ``parallel._run`` (each_chunk, in_parallel); everything else in the step runs on the calling
thread while the other cores wait. This script wraps ``parallel._run`` and prints, per step (mean
over the rounds):

1. the step's wall time, the wall time inside parallel regions, and the rest ("serial": one core
   busy, the others idle);
2. per calling function, the regions' count and wall time and the core time they leave idle,
   threads * wall - the parts' busy time (uneven parts, the helper thread's start, GIL waits);
3. the serial time of named suspects (the mask transform, the convolution's weight relayouts):
   their time outside parallel regions;
4. the serial time by layer class and pass ("BasicBlock.forward": the block's own code, the
   residual add, not its children's), each pass's time outside parallel regions and outside the
   passes it calls; what runs outside every layer's pass (the loss, the optimisers' bookkeeping,
   the training loop) is the last line.

It changes nothing in npmask; the wrappers cost a few microseconds per call.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))                # train_step
from npmask import config  # noqa: E402
from npmask.masking import layers as masked_layers  # noqa: E402
from npmask.nn import conv_fast, parallel  # noqa: E402
from npmask.nn.module import Module  # noqa: E402

from train_step import add_step_arguments, build_step  # noqa: E402


def _caller() -> str:
    """"file:function" of the innermost caller outside this script and parallel.py. A plain walk
    over the frames: traceback.extract_stack reads source lines, ~0.1 ms a call, which would count
    as serial time of the region's caller."""
    frame = sys._getframe(1)
    while frame is not None and Path(frame.f_code.co_filename).name in ("serial_share.py", "parallel.py"):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"


def _layer_classes(cls):
    """cls and every subclass of it, recursively (each once)."""
    seen, todo = [], [cls]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.append(c)
            todo.extend(c.__subclasses__())
    return seen


class Regions:
    """Wraps parallel._run (per-caller wall and busy time) and named functions (serial time)."""

    def __init__(self):
        self.regions = defaultdict(lambda: [0, 0.0, 0.0])    # caller -> [count, wall, busy]
        self.serial = defaultdict(float)                      # suspect -> time outside regions
        self.inside = False
        self.region_wall = 0.0
        self.by_pass = defaultdict(float)                     # "Class.pass" -> its own serial time
        self._stack = []                                      # [label, start, region_wall, child time]
        self._undo = []

    def _run(self, original):
        def run(parts):
            busy = [0.0]

            def timed(p):
                def part():
                    t = time.perf_counter()
                    try:
                        p()
                    finally:
                        busy[0] += time.perf_counter() - t
                return part
            key = _caller()
            self.inside = True
            t = time.perf_counter()
            try:
                original([timed(p) for p in parts])
            finally:
                wall = time.perf_counter() - t
                self.inside = False
                self.region_wall += wall
                entry = self.regions[key]
                entry[0] += 1
                entry[1] += wall
                entry[2] += busy[0]
        return run

    def _suspect(self, label, original):
        def fn(*args, **kwargs):
            if self.inside:
                return original(*args, **kwargs)
            before, t = self.region_wall, time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.serial[label] += time.perf_counter() - t - (self.region_wall - before)
        return fn

    def _pass(self, label, original):
        """A layer's forward/backward, timed as its own serial time: wall time outside parallel
        regions, minus that of the passes it calls (they count for themselves)."""
        def fn(*args, **kwargs):
            if self.inside:
                return original(*args, **kwargs)
            frame = [label, time.perf_counter(), self.region_wall, 0.0]
            self._stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                self._stack.pop()
                serial = time.perf_counter() - frame[1] - (self.region_wall - frame[2])
                self.by_pass[label] += serial - frame[3]
                if self._stack:
                    self._stack[-1][3] += serial
        return fn

    def patch(self, module, name, wrapper):
        original = getattr(module, name)
        setattr(module, name, wrapper(original))
        self._undo.append((module, name, original))

    def __enter__(self):
        self.patch(parallel, "_run", self._run)
        self.patch(masked_layers, "transform_forward", lambda f: self._suspect("mask transform forward", f))
        self.patch(masked_layers, "transform_backward", lambda f: self._suspect("mask transform backward", f))
        self.patch(conv_fast, "contiguous", lambda f: self._suspect("conv weight relayouts (flip)", f))
        self.patch(conv_fast, "_transposed", lambda f: self._suspect("conv_fast._transposed (weight gradient)", f))
        for cls in _layer_classes(Module):
            for name in ("forward", "backward"):
                if name in vars(cls):
                    self.patch(cls, name, lambda f, label=f"{cls.__name__}.{name}": self._pass(label, f))
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)

    def clear(self):
        self.regions.clear()
        self.serial.clear()
        self.by_pass.clear()
        self.region_wall = 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap, rounds=4)
    args = ap.parse_args(argv)
    step, _ = build_step(args.model, args.size, args.batch, args.variant)
    threads = config.settings.threads
    with Regions() as r:
        step()
        step()
        r.clear()
        total = 0.0
        for _ in range(args.rounds):
            t = time.perf_counter()
            step()
            total += time.perf_counter() - t
            time.sleep(0.25)
    n = args.rounds
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, variant {args.variant}, "
          f"npmask threads {threads}, mean of {n} steps")
    print(f"step {total / n:.3f} s; inside parallel regions {r.region_wall / n:.3f} s; "
          f"serial (one core busy) {(total - r.region_wall) / n:.3f} s "
          f"({100 * (total - r.region_wall) / total:.1f}% of the step)")
    print("parallel regions by caller (per step):")
    for key, (count, wall, busy) in sorted(r.regions.items(), key=lambda kv: -kv[1][1]):
        idle = threads * wall - busy
        print(f"  {key:<34} {count / n:6.1f} regions  wall {wall / n:.3f} s  idle core time "
              f"{idle / n:.3f} s ({1e3 * idle / count:.2f} ms a region)")
    print("serial time of named suspects (per step):")
    for key, v in sorted(r.serial.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<56} {1e3 * v / n:7.1f} ms")
    print("serial time by layer class and pass, its own code only (per step):")
    outside = total - r.region_wall - sum(r.by_pass.values())
    for key, v in sorted(r.by_pass.items(), key=lambda kv: -kv[1]):
        if v / n >= 5e-4:
            print(f"  {key:<56} {1e3 * v / n:7.1f} ms")
    print(f"  {'outside every layer (loss, optimisers, training loop)':<56} {1e3 * outside / n:7.1f} ms")


if __name__ == "__main__":
    main()
