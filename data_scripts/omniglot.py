"""Omniglot (the png zips of the "python" release) -> the npmask domain "omniglot".

Usage::

    python data_scripts/omniglot.py --root DATA [--size 32] [--train-per-class 15]

Source: https://github.com/brendenlake/omniglot (Lake et al., 2015; MIT licence). The two zips
``python/images_background.zip`` (30 alphabets, 964 characters) and
``python/images_evaluation.zip`` (20 alphabets, 659 characters) hold
``images_<set>/<Alphabet>/character<NN>/<id>_<drawer>.png``: 20 drawings (by 20 people) of each
character, 105 x 105 black-and-white. The md5 sums are the ones torchvision checks.

Omniglot is a few-shot benchmark with no classification split, so we make one, as the Decathlon
does, over all 1,623 characters (both zips): for every character the drawings sorted by file
name are split into the first ``--train-per-class`` (default 15) for training and the rest (5) for
testing. (The Decathlon's own per-image split is not published in a form we could reuse here.)
Images are resized to ``--size`` (bilinear) and by default replicated to 3 channels for RGB
models. Mirroring can turn one character into another, so ``mirror`` is false.
"""
from __future__ import annotations

import posixpath
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = "https://github.com/brendenlake/omniglot/raw/master/python/"
RESOURCES = {
    "background": {"url": BASE + "images_background.zip", "filename": "images_background.zip",
                   "md5": "68d2efa1b9178cc56df9314c21c6e718"},
    "evaluation": {"url": BASE + "images_evaluation.zip", "filename": "images_evaluation.zip",
                   "md5": "6b91aef0f799c5bb55b94e3f2daec811"},
}
LICENCE = "MIT licence (github.com/brendenlake/omniglot); cite Lake et al., Science 2015."


def convert(files: dict, out_folder, *, size: int = 32, channels: int = 3,
            train_per_class: int = 15, quiet: bool = False):
    """``files`` maps "background" and/or "evaluation" to the downloaded zips."""
    mode = "RGB" if channels == 3 else "L"
    per_class = defaultdict(list)     # "Alphabet/characterNN" -> [(zip path, member name)]
    zips = {k: C.open_zip(p) for k, p in files.items()}
    try:
        for key, zf in zips.items():
            for name in zf.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[0] == f"images_{key}" and name.endswith(".png"):
                    per_class[f"{parts[1]}/{parts[2]}"].append((key, name))
        if not per_class:
            raise C.DataScriptError(f"{', '.join(map(str, files.values()))}: no "
                                    f"images_<set>/<Alphabet>/<character>/*.png members found")
        class_names = sorted(per_class)
        split = {"train": ([], []), "test": ([], [])}
        for label, cls in enumerate(C.tqdm(class_names, desc="omniglot characters",
                                           disable=quiet, leave=False)):
            members = sorted(per_class[cls], key=lambda km: posixpath.basename(km[1]))
            if len(members) <= train_per_class:
                raise C.DataScriptError(f"{cls}: only {len(members)} drawings, need more than "
                                        f"--train-per-class = {train_per_class}")
            for i, (key, name) in enumerate(members):
                img = C.open_image(C.zip_read(zips[key], name), mode=mode, name=name)
                target = split["train" if i < train_per_class else "test"]
                target[0].append(C.to_array(C.square(img, size, "stretch")))
                target[1].append(label)
    finally:
        for zf in zips.values():
            zf.close()
    return C.save_domain(
        out_folder, name="omniglot", train=C.stack(*split["train"], "omniglot train"),
        test=C.stack(*split["test"], "omniglot test"), class_names=class_names, mirror=False,
        source="https://github.com/brendenlake/omniglot", licence=LICENCE,
        options={"size": size, "channels": channels, "train_per_class": train_per_class,
                 "sets": sorted(files)},
        extra={"preprocess": f"105x105 -> {size}x{size} bilinear, {channels} channel(s)",
               "split": f"per character: first {train_per_class} drawings (sorted by file name) "
                        f"train, the rest test"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=32)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="1 = grey, 3 = grey replicated to RGB (default 3)")
    parser.add_argument("--train-per-class", type=int, default=15,
                        help="drawings per character used for training; the rest (of 20) are "
                             "the test split (default 15)")
    parser.add_argument("--sets", choices=["both", "background", "evaluation"], default="both",
                        help="which zip(s) to use; the Decathlon uses both (1623 characters)")
    args = parser.parse_args(argv)
    keys = ["background", "evaluation"] if args.sets == "both" else [args.sets]
    options = {"size": args.size, "channels": args.channels,
               "train_per_class": args.train_per_class, "sets": sorted(keys)}
    folder = Path(args.root) / "omniglot"
    if not args.force and C.domain_is_complete(folder, options):
        print(C.skip_message(folder))
        return
    paths = C.fetch([RESOURCES[k] for k in keys], C.downloads_dir(args, "omniglot"),
                    offline=args.offline, quiet=args.quiet)
    convert({k: paths[RESOURCES[k]["filename"]] for k in keys}, folder, size=args.size,
            channels=args.channels, train_per_class=args.train_per_class, quiet=args.quiet)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
