"""What one training step launches on a GPU, counted on the CPU (no GPU needed).

Run:  .venv/bin/python benchmarks/launches.py [--model wrn28_4] [--size 64] [--batch 32]
          [--variants full,piggyback,simple,finetune,classifier_only]
          [--setting cuda_conv_kernels=False,True] [--where full] [--top 20]
Needs a C++ compiler (g++, c++ or clang++): npmask's fused kernels run their own C on the CPU.

On CuPy a step of a masked WRN is bound by launches, not arithmetic: each array operation from
Python is one kernel (or a cuBLAS call, a memset, a copy) and costs microseconds of host and driver
time before the GPU sees it; a CUDA graph (``--cuda-graphs``) replays the same launches with less
of that cost each. This script runs npmask's CuPy path with a counting stand-in for CuPy
(tests/cupy_counting.py, whose docstring has the counting rules: what CuPy 14 launches for each
operation), and prints, for each variant (and each value of ``--setting``):

1. the launches of one step (the third: the first also allocates the optimiser's state), by kind:
   ``kernel`` (ufuncs and other array functions), ``reduction``, ``gemm`` (cuBLAS), ``copy``,
   ``memset``, ``fused`` (npmask's own CUDA kernels); and the reads back to the host (``to_host``:
   each one makes the host wait for the GPU);
2. for the variants named by ``--where``, where the launches come from: the npmask function that
   made them, with the kind and operation, the ``--top`` largest.

The counts do not depend on the batch size (the CuPy path runs a batch as one chunk), except where
a batch is so large that a convolution's columns exceed ``gpu_chunk_floats``. They are a count,
not a time: how long a launch takes is measured on a GPU (benchmarks/train_step.py --backend cupy).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))          # the counting stand-in and the kernels' C runner
import numpy as np  # noqa: E402

from npmask import config, models  # noqa: E402
from npmask.backend import to_device  # noqa: E402
from npmask.masking.variants import get_variant  # noqa: E402
from npmask.multidomain import MultiDomainModel  # noqa: E402
from npmask.optim import SGD, Adam, Optimizers  # noqa: E402
from npmask.training.loop import train_step  # noqa: E402

from _settings import parse_setting  # noqa: E402
import cupy_counting  # noqa: E402  (tests/: the counting stand-in for CuPy)



def count_step(model_name: str, size: int, batch: int, variant: str, steps: int = 3):
    """The cupy_counting Log of the last of ``steps`` training steps of ``variant`` on CuPy."""
    with cupy_counting.counting_cupy() as log:
        model = MultiDomainModel(models.create(model_name, num_classes=10, input_size=size, seed=0))
        model.add_domain(variant, num_classes=10, variant=variant, seed=0)
        model.set_domain(variant).train()
        model.to("cupy")
        groups = model.parameter_groups()
        opt = Optimizers(body=Adam(groups["body"], lr=1e-4), head=SGD(groups["head"], lr=1e-3, momentum=0.9))
        rng = np.random.default_rng(0)
        x = to_device(rng.standard_normal((batch, 3, size, size)).astype(np.float32), "cupy")
        y = to_device(rng.integers(0, 10, batch), "cupy")
        for _ in range(steps):
            log.clear()
            with log.recording():
                train_step(model, opt, x, y)
        return log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wrn28_4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="full,piggyback,simple,finetune,classifier_only")
    ap.add_argument("--setting", default=None, help="NAME=V1,V2,...: every variant under each value")
    ap.add_argument("--where", default="full", help="variants whose launches are listed by origin")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    if not cupy_counting.cuda_on_cpu.available():
        raise SystemExit(cupy_counting.cuda_on_cpu.skip_reason())
    variants = [v for v in args.variants.split(",") if v]
    try:                                           # an unknown model or variant: one line, first
        for variant in variants:
            get_variant(variant)
        models.create(args.model, num_classes=10, input_size=args.size, seed=0)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"launches.py: {exc.args[0] if exc.args else exc}")
    name, values = parse_setting(args.setting) if args.setting else (None, [None])
    print("command: python benchmarks/launches.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}: launches of one training step "
          f"on CuPy (the third), counted on the CPU; settings (unless varied below): cuda_conv_kernels="
          f"{config.settings.cuda_conv_kernels}, fuse_bn_relu={config.settings.fuse_bn_relu}")
    kinds = cupy_counting.LAUNCHES
    head = f"{'variant':<40}{'launches':>9}" + "".join(f"{k:>10}" for k in kinds) + f"{'to_host':>9}"
    print(head)
    print("-" * len(head))
    logs = {}
    for value in values:
        for variant in variants:
            label = variant if name is None else f"{variant} {name}={value}"
            with config.using(**({} if name is None else {name: value})):
                log = count_step(args.model, args.size, args.batch, variant)
            logs[label] = log
            counts = log.counts()
            print(f"{label:<40}{log.launches():>9}" + "".join(f"{counts[k]:>10}" for k in kinds)
                  + f"{counts['to_host']:>9}", flush=True)
    print("-" * len(head))
    for label, log in logs.items():
        if label.split()[0] not in args.where.split(","):
            continue
        print(f"\nwhere the launches of a {label} step come from (the {args.top} largest):")
        for origin, n in log.by("where", "kind", "name").most_common(args.top):
            where, kind, op = origin.split(" ", 2)
            print(f"  {n:6d}  {where:<40} {kind:<10} {op}")
        host = log.by("where", "name", kinds=("to_host",))
        print("  reads back to the host: " + (", ".join(f"{k} x{n}" for k, n in host.items()) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
