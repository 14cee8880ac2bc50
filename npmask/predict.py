"""Classify image files with a trained domain: ``python -m npmask.predict RUN_DIR --domain NAME IMAGE...``

RUN_DIR is a training run folder (``runs/train-...``, its ``domains/<name>.npz``) or a folder
written by ``MultiDomainModel.save``. Every image is resized, cropped and normalised as the domain's
test data were (the domain file stores the class names, mean/std and sizes), and the top classes
are printed with their probabilities::

    $ python -m npmask.predict runs/train-full-20261207-101010 --domain digits a.png b.png
    a.png: 7 0.912 | 1 0.041 | 9 0.020
    b.png: 3 0.644 | 8 0.201 | 5 0.088

``--json`` prints one JSON object per image instead (file, label, top: [[name, probability], ...]).
"""
from __future__ import annotations

import argparse
import json
import sys

from .backend import BackendError
from .inference import ImageError
from .multidomain import MultiDomainModel
from .storage import DomainFileError

PROG = "python -m npmask.predict"


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, description="Top classes of image files under one trained domain.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m npmask.predict runs/train-full-... --domain digits img1.png img2.jpg")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a training run folder or a folder written by MultiDomainModel.save")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--domain", required=True, help="the trained domain to classify with")
    p.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--backbone", metavar="NPZ", default=None,
                   help="the backbone .npz, when the one the run recorded has moved")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy"))
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    return p


def predict_files(run_dir, domain: str, images, *, backbone=None, backend: str = "numpy"):
    """:class:`npmask.inference.Predictions` of ``images`` (file paths) under ``domain``."""
    model = MultiDomainModel.load(run_dir, backbone=backbone, domains=[domain], backend=backend)
    return model.predict(list(images), domain=domain)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1:
        raise SystemExit(f"{PROG}: error: --top must be >= 1, got {args.top}")
    try:
        preds = predict_files(args.run_dir, args.domain, args.images, backbone=args.backbone,
                              backend=args.backend)
    except (DomainFileError, ImageError, BackendError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        raise SystemExit(f"{PROG}: error: {message}") from None
    except ValueError as err:    # e.g. a domain file written before class names were stored
        raise SystemExit(f"{PROG}: error: {' '.join(str(err).split())}") from None
    for path, top in zip(args.images, preds.top(args.top)):
        if args.json:
            print(json.dumps({"file": path, "label": top[0][0],
                              "top": [[name, round(p, 6)] for name, p in top]}))
        else:
            print(f"{path}: " + " | ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
