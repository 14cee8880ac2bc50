"""``python -m npmask.data.synthetic [--root DIR] [--seed N] [--workers N] [--grids DIR]``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .generation import DOMAINS, ensure_synthetic, save_grid


def _main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m npmask.data.synthetic",
                                 description="Generate (or reuse) the synthetic benchmark.")
    ap.add_argument("--root", default=None, help="output folder (default: the cache folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--grids", default=None, help="also save a PNG grid per domain here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_synthetic(args.root, seed=args.seed, workers=args.workers, verbose=True)
    print(f"benchmark at {root} ({time.perf_counter() - t0:.1f} s)")
    if args.grids:
        for d in DOMAINS:
            print(save_grid(root / d, Path(args.grids) / f"{d}.png"))


if __name__ == "__main__":
    _main()
