"""SVHN, cropped digits (Format 2: train_32x32.mat, test_32x32.mat) -> the npmask domain "svhn".

Usage::

    python data_scripts/svhn.py --root DATA [--extra]

Source: http://ufldl.stanford.edu/housenumbers/ (Netzer et al., 2011). Each ``.mat`` file (MATLAB
v5, read with scipy.io.loadmat, no pickle) holds ``X`` of shape (32, 32, 3, N), uint8 RGB, and
``y`` of shape (N, 1) with labels 1..10, where **10 stands for the digit 0**; we map 10 -> 0 so
that label k is the digit k. The md5 sums are the ones torchvision checks for these files
(the SVHN page itself publishes none).

Images stay 32 x 32 RGB. Mirroring changes digits (2 vs 5 ...), so ``mirror`` is false.
``--extra`` adds the 531,131 "extra" images to the training split (not used in the paper).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = "http://ufldl.stanford.edu/housenumbers/"
RESOURCES = {
    "train": {"url": BASE + "train_32x32.mat", "filename": "train_32x32.mat",
              "md5": "e26dedcc434d2e4c54c9b2d4a06d8373"},
    "test": {"url": BASE + "test_32x32.mat", "filename": "test_32x32.mat",
             "md5": "eb5a983be6a315427106f1b164d9cef3"},
    "extra": {"url": BASE + "extra_32x32.mat", "filename": "extra_32x32.mat",
              "md5": "a93ce644f1a588dc4d68dda5feec44a7"},
}
LICENCE = "SVHN is for non-commercial use only (see the SVHN page); cite Netzer et al., 2011."


def read_mat(path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat -> images uint8 (N, 32, 32, 3), labels int64 (N,) with digit 0 as label 0."""
    from scipy.io import loadmat
    path = C.require(path)
    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises ValueError/TypeError/OSError on a cut-short file
        raise C.DataScriptError(f"{path}: cannot read the .mat file ({type(err).__name__}: {err}); "
                                f"it is truncated or corrupt. Delete it and run again.") from None
    if "X" not in mat or "y" not in mat:
        raise C.DataScriptError(f"{path}: expected variables X and y, found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise C.DataScriptError(f"{path}: X must be (32, 32, 3, N) with N labels in y, got "
                                f"X {x.shape}, y {y.shape}")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8, copy=False)
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return images, labels


def convert(files: dict, out_folder, *, extra: bool = False) -> Path:
    """``files`` maps "train"/"test" (and "extra") to the downloaded .mat paths."""
    train = read_mat(files["train"])
    test = read_mat(files["test"])
    if extra:
        more = read_mat(files["extra"])
        train = (np.concatenate([train[0], more[0]]), np.concatenate([train[1], more[1]]))
    return C.save_domain(
        out_folder, name="svhn", train=train, test=test, class_names=[str(d) for d in range(10)],
        mirror=False, source=BASE, licence=LICENCE, options={"extra": bool(extra)},
        extra={"preprocess": "none (original 32x32 RGB); label 10 mapped to digit 0"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="store_true",
                        help="also put the 531k 'extra' images into the training split")
    args = parser.parse_args(argv)
    folder = Path(args.root) / "svhn"
    if not args.force and C.domain_is_complete(folder, {"extra": args.extra}):
        print(C.skip_message(folder))
        return
    keys = ["train", "test"] + (["extra"] if args.extra else [])
    paths = C.fetch([RESOURCES[k] for k in keys], C.downloads_dir(args, "svhn"),
                    offline=args.offline, quiet=args.quiet)
    convert({k: paths[RESOURCES[k]["filename"]] for k in keys}, folder, extra=args.extra)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
