"""Oxford VGG-Flowers 102 (jpg + .mat labels and splits) -> the npmask domain "flowers102".

Usage::

    python data_scripts/flowers102.py --root DATA [--size 64] [--resize crop|stretch]

Source: https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (Nilsback and Zisserman, 2008). Files
(md5 sums as torchvision checks them):

* ``102flowers.tgz``: ``jpg/image_00001.jpg`` ... ``jpg/image_08189.jpg``;
* ``imagelabels.mat``: ``labels``, 1 x 8189, the class 1..102 of image i (1-based);
* ``setid.mat``: ``trnid``, ``valid``, ``tstid``, the 1-based image ids of the official train
  (1,020), validation (1,020) and test (6,149) splits.

Class k is stored as label k - 1; the data set ships no class names, so they are "001".."102".
Images are resized to ``--size`` x ``--size`` (default: shorter side to size, centre crop).
Flowers keep their class when mirrored, so ``mirror`` is true.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
RESOURCES = {
    "images": {"url": BASE + "102flowers.tgz", "filename": "102flowers.tgz",
               "md5": "52808999861908f626f3c1f4e79d11fa"},
    "labels": {"url": BASE + "imagelabels.mat", "filename": "imagelabels.mat",
               "md5": "e0620be6f572b9609742df49c70aed4d"},
    "setid": {"url": BASE + "setid.mat", "filename": "setid.mat",
              "md5": "a5357ecc9cb78c4bef273ce3793fc85c"},
}
LICENCE = "No licence stated on the VGG page; cite Nilsback and Zisserman, ICVGIP 2008."
_IMAGE = re.compile(r"(^|/)jpg/image_(\d{5})\.jpg$")


def loadmat(path, keys):
    from scipy.io import loadmat as _load
    path = C.require(path)
    try:
        mat = _load(path)
    except Exception as err:
        raise C.DataScriptError(f"{path}: cannot read the .mat file ({type(err).__name__}: {err}); "
                                f"it is truncated or corrupt. Delete it and run again.") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise C.DataScriptError(f"{path}: variables {', '.join(missing)} missing")
    return {k: np.asarray(mat[k]).reshape(-1).astype(np.int64) for k in keys}


def convert(files: dict, out_folder, *, size: int = 64, resize: str = "crop", quiet: bool = False):
    """``files`` maps "images", "labels", "setid" to the downloaded files."""
    labels = loadmat(files["labels"], ["labels"])["labels"]
    sets = loadmat(files["setid"], ["trnid", "valid", "tstid"])
    arrays, _ = C.decode_tar_images(files["images"], lambda n: bool(_IMAGE.search(n)),
                                    lambda img: C.square(img, size, resize),
                                    desc="flowers102", quiet=quiet)
    by_id = {int(_IMAGE.search(n).group(2)): a for n, a in arrays.items()}
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ids = sets[key]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise C.DataScriptError(f"{files['images']}: images {missing[:5]} listed in setid.mat "
                                    f"({key}) are missing")
        if ids.max() > len(labels):
            raise C.DataScriptError(f"{files['setid']}: image id {ids.max()} has no label")
        splits[split] = C.stack([by_id[i] for i in ids], [labels[i - 1] - 1 for i in ids], split)
    return C.save_domain(
        out_folder, name="flowers102", train=splits["train"], val=splits["val"],
        test=splits["test"], class_names=[f"{k:03d}" for k in range(1, 103)], mirror=True,
        source=BASE, licence=LICENCE, options={"size": size, "resize": resize},
        extra={"preprocess": f"{resize} to {size}x{size}",
               "splits": "official setid.mat: trnid -> train, valid -> val, tstid -> test"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=64)
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="crop: shorter side to SIZE then centre crop (default); "
                             "stretch: resize both sides to SIZE")
    args = parser.parse_args(argv)
    options = {"size": args.size, "resize": args.resize}
    folder = Path(args.root) / "flowers102"
    if not args.force and C.domain_is_complete(folder, options):
        print(C.skip_message(folder))
        return
    paths = C.fetch(list(RESOURCES.values()), C.downloads_dir(args, "flowers102"),
                    offline=args.offline, quiet=args.quiet)
    convert({k: paths[r["filename"]] for k, r in RESOURCES.items()}, folder, quiet=args.quiet,
            **options)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
