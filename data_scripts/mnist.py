"""MNIST (IDX files) -> the npmask domain "mnist".

Usage::

    python data_scripts/mnist.py --root DATA [--size 32] [--channels 3]

Source: http://yann.lecun.com/exdb/mnist/ (LeCun et al., 1998), with the copy torchvision uses
as a fallback mirror (the original site often refuses downloads). The four files are gzipped IDX
files; the md5 sums are those torchvision checks. IDX layout (big-endian): two zero bytes, a
type byte (0x08 = unsigned byte), the number of dimensions d, then d int32 sizes, then the data.
Images: d = 3, (N, 28, 28); labels: d = 1, (N,).

By default the 28 x 28 grey digits are kept at 28 x 28 and replicated to 3 channels so that
models built for RGB input take them unchanged; ``--channels 1`` keeps one channel and
``--size`` resizes (bilinear). Mirroring changes digits, so ``mirror`` is false.
"""
from __future__ import annotations

import gzip
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MIRRORS = ["http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"]
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
RESOURCES = [{"urls": [m + f for m in MIRRORS], "filename": f, "md5": md5}
             for f, md5 in FILES.values()]
LICENCE = ("No licence file on the MNIST page; commonly cited as CC BY-SA 3.0 "
           "(not confirmed here). Cite LeCun et al., 1998.")


def read_idx(path, ndim: int) -> np.ndarray:
    """Read a gzipped (or plain) IDX file of unsigned bytes with ``ndim`` dimensions."""
    path = C.require(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise C.archive_error(path, err) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise C.DataScriptError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise C.DataScriptError(f"{path}: IDX type byte {data[2]:#x}, expected 0x08 (unsigned byte)")
    if data[3] != ndim:
        raise C.DataScriptError(f"{path}: IDX has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">i4"))
    n = int(np.prod(shape))
    if len(data) - header != n:
        raise C.DataScriptError(f"{path}: {len(data) - header} data bytes, the header promises "
                                f"{n} for shape {shape}; the file is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def prepare(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(N, 28, 28) grey -> (N, size, size, channels) uint8."""
    if size != images.shape[1] or size != images.shape[2]:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                           for im in images])
    out = images[..., None]
    return np.repeat(out, channels, axis=3) if channels == 3 else out


def convert(files: dict, out_folder, *, size: int = 28, channels: int = 3) -> Path:
    """``files`` maps train_images/train_labels/test_images/test_labels to the .gz paths."""
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], 3)
        labels = read_idx(files[f"{split}_labels"], 1).astype(np.int64)
        if len(images) != len(labels):
            raise C.DataScriptError(f"{split}: {len(images)} images but {len(labels)} labels")
        splits[split] = (prepare(images, size, channels), labels)
    return C.save_domain(
        out_folder, name="mnist", train=splits["train"], test=splits["test"],
        class_names=[str(d) for d in range(10)], mirror=False, source=MIRRORS[0],
        licence=LICENCE, options={"size": size, "channels": channels},
        extra={"preprocess": f"28x28 grey -> {size}x{size} (bilinear when resized), "
                             f"{channels} channel(s)"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=28)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="1 = grey, 3 = grey replicated to RGB (default 3)")
    args = parser.parse_args(argv)
    folder = Path(args.root) / "mnist"
    options = {"size": args.size, "channels": args.channels}
    if not args.force and C.domain_is_complete(folder, options):
        print(C.skip_message(folder))
        return
    paths = C.fetch(RESOURCES, C.downloads_dir(args, "mnist"), offline=args.offline,
                    quiet=args.quiet)
    convert({k: paths[f] for k, (f, _) in FILES.items()}, folder, **options)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
