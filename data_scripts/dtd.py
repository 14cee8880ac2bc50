"""DTD, the Describable Textures Dataset (jpg + split files) -> the npmask domain "dtd".

Usage::

    python data_scripts/dtd.py --root DATA [--size 64] [--partition 1]

Source: https://www.robots.ox.ac.uk/~vgg/data/dtd/ (Cimpoi et al., 2014). The archive
``dtd-r1.0.1.tar.gz`` (md5 as torchvision checks it) holds ``dtd/images/<class>/<name>.jpg``
(47 classes, 120 images each) and ``dtd/labels/{train,val,test}<k>.txt`` for ten partitions
k = 1..10, one ``<class>/<name>.jpg`` per line; each partition splits every class 40/40/40.

Classes are the sorted class folder names. Images are resized to ``--size`` x ``--size``
(default: shorter side to size, centre crop). Textures keep their class when mirrored, so
``mirror`` is true.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
RESOURCE = {"url": URL, "filename": "dtd-r1.0.1.tar.gz", "md5": "fff73e5086ae6bdbea199a49dfb8a4c1"}
LICENCE = "For research purposes (see the DTD page); cite Cimpoi et al., CVPR 2014."


def convert(archive, out_folder, *, size: int = 64, partition: int = 1, resize: str = "crop",
            quiet: bool = False):
    """Convert the downloaded ``dtd-r1.0.1.tar.gz`` (one partition of the ten) into a domain."""
    if not 1 <= partition <= 10:
        raise ValueError(f"partition must be in 1..10, got {partition}")
    split_files = {f"dtd/labels/{s}{partition}.txt": s for s in ("train", "val", "test")}
    arrays, files = C.decode_tar_images(
        archive, lambda n: n.startswith("dtd/images/") and C.is_image_name(n),
        lambda img: C.square(img, size, resize), desc="dtd", quiet=quiet,
        extra_files=lambda n: n in split_files)
    missing = sorted(set(split_files) - set(files))
    if missing:
        raise C.DataScriptError(f"{archive}: split files {', '.join(missing)} are missing")
    lists = {split_files[n]: [line.strip() for line in files[n].decode().splitlines() if line.strip()]
             for n in files}
    class_names = sorted({entry.split("/")[0] for entries in lists.values() for entry in entries})
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split, entries in lists.items():
        images, labels = [], []
        for entry in entries:
            key = f"dtd/images/{entry}"
            if key not in arrays:
                raise C.DataScriptError(f"{archive}: image {key} listed in {split}{partition}.txt "
                                        f"is missing")
            images.append(arrays[key])
            labels.append(index[entry.split("/")[0]])
        splits[split] = C.stack(images, labels, split)
    return C.save_domain(
        out_folder, name="dtd", train=splits["train"], val=splits["val"], test=splits["test"],
        class_names=class_names, mirror=True, source="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        licence=LICENCE, options={"size": size, "partition": partition, "resize": resize},
        extra={"preprocess": f"{resize} to {size}x{size}",
               "splits": f"official partition {partition}: labels/train{partition}.txt, "
                         f"val{partition}.txt, test{partition}.txt"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=64)
    parser.add_argument("--partition", type=int, default=1, choices=range(1, 11), metavar="K",
                        help="which of the ten official train/val/test partitions (default 1)")
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="crop: shorter side to SIZE then centre crop (default); "
                             "stretch: resize both sides to SIZE")
    args = parser.parse_args(argv)
    options = {"size": args.size, "partition": args.partition, "resize": args.resize}
    folder = Path(args.root) / "dtd"
    if not args.force and C.domain_is_complete(folder, options):
        print(C.skip_message(folder))
        return
    paths = C.fetch([RESOURCE], C.downloads_dir(args, "dtd"), offline=args.offline,
                    quiet=args.quiet)
    convert(paths[RESOURCE["filename"]], folder, quiet=args.quiet, **options)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
