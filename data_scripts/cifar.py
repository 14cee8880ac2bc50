"""CIFAR-10 and CIFAR-100 (the *binary* versions, so no pickle is ever loaded) -> npmask domains.

Usage::

    python data_scripts/cifar.py --root DATA                 # both
    python data_scripts/cifar.py --root DATA --which cifar10

Source: https://www.cs.toronto.edu/~kriz/cifar.html (Krizhevsky, 2009). The binary archives and
their md5 sums are the ones listed on that page:

* ``cifar-10-binary.tar.gz`` (md5 c32a1d4ab5d03f1284b67883e8d87530) holds
  ``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin`` and ``batches.meta.txt``
  (class names, one a line). Each ``.bin`` is a run of 3073-byte records:
  ``<1 x label><3072 x pixel>``, pixels as 1024 red, 1024 green, 1024 blue bytes, each plane
  32 x 32 row-major.
* ``cifar-100-binary.tar.gz`` (md5 03b5dce01913d631647c71ecec9e9cb8) holds
  ``cifar-100-binary/train.bin``, ``test.bin``, ``fine_label_names.txt`` and
  ``coarse_label_names.txt``; records are 3074 bytes: ``<1 x coarse label><1 x fine label>
  <3072 x pixel>``. We use the 100 fine labels.

Images stay 32 x 32 RGB. Horizontal mirroring keeps the class, so ``mirror`` is true.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = "https://www.cs.toronto.edu/~kriz/"
SOURCES = {
    "cifar10": {
        "resource": {"url": BASE + "cifar-10-binary.tar.gz", "filename": "cifar-10-binary.tar.gz",
                     "md5": "c32a1d4ab5d03f1284b67883e8d87530"},
        "folder": "cifar-10-batches-bin",
        "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test": ["test_batch.bin"],
        "names": "batches.meta.txt",
        "label_bytes": 1,       # record = label, pixels
    },
    "cifar100": {
        "resource": {"url": BASE + "cifar-100-binary.tar.gz", "filename": "cifar-100-binary.tar.gz",
                     "md5": "03b5dce01913d631647c71ecec9e9cb8"},
        "folder": "cifar-100-binary",
        "train": ["train.bin"],
        "test": ["test.bin"],
        "names": "fine_label_names.txt",
        "label_bytes": 2,       # record = coarse label, fine label, pixels
    },
}
LICENCE = ("No explicit licence on the CIFAR page; cite Krizhevsky, 'Learning Multiple Layers of "
           "Features from Tiny Images', 2009.")


def parse_records(data: bytes, label_bytes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary records -> images uint8 (N, 32, 32, 3), labels int64 (N,).

    The *last* label byte is the class (CIFAR-10: the only one; CIFAR-100: the fine label).
    Pixels are stored channel-planar (3, 32, 32), so we transpose to (32, 32, 3).
    """
    record = label_bytes + 3072
    if len(data) == 0 or len(data) % record:
        raise C.DataScriptError(f"{name}: {len(data)} bytes is not a whole number of "
                                f"{record}-byte CIFAR records; the file is truncated")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def convert(archive, out_folder, which: str, *, quiet: bool = False) -> Path:
    """Convert one downloaded CIFAR binary archive into the domain folder ``out_folder``."""
    spec = SOURCES[which]
    wanted = {f"{spec['folder']}/{f}" for f in spec["train"] + spec["test"] + [spec["names"]]}
    files = dict(C.iter_tar(archive, want=lambda n: n in wanted))
    missing = sorted(wanted - set(files))
    if missing:
        raise C.DataScriptError(f"{archive}: expected members missing: {', '.join(missing)}")
    names_text = files[f"{spec['folder']}/{spec['names']}"].decode("utf-8")
    class_names = [line.strip() for line in names_text.splitlines() if line.strip()]

    splits = {}
    for split in ("train", "test"):
        parts = [parse_records(files[f"{spec['folder']}/{f}"], spec["label_bytes"], f)
                 for f in spec[split]]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return C.save_domain(
        out_folder, name=which, train=splits["train"], test=splits["test"],
        class_names=class_names, mirror=True, source=spec["resource"]["url"], licence=LICENCE,
        options={"which": which}, extra={"preprocess": "none (original 32x32 RGB)"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=["cifar10", "cifar100", "both"], default="both",
                        help="which data set(s) to build (default both)")
    args = parser.parse_args(argv)
    for which in (["cifar10", "cifar100"] if args.which == "both" else [args.which]):
        folder = Path(args.root) / which
        if not args.force and C.domain_is_complete(folder, {"which": which}):
            print(C.skip_message(folder))
            continue
        spec = SOURCES[which]
        paths = C.fetch([spec["resource"]], C.downloads_dir(args, "cifar"),
                        offline=args.offline, quiet=args.quiet)
        convert(paths[spec["resource"]["filename"]], folder, which, quiet=args.quiet)
        print(f"{folder}: written")
        if not args.keep_archives:
            C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
