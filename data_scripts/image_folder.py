"""Generic image-folder converter: ``<src>/<split>/<class>/*.jpg|png|...`` -> one npmask domain.

Usage::

    python data_scripts/image_folder.py --root DATA --name cubs_cropped --src path/to/cubs_cropped
    python data_scripts/image_folder.py --root DATA --name sketches --src sketches.zip
    python data_scripts/image_folder.py --root DATA --name wikiart --url URL [--md5 MD5]

``--src`` is a folder or a .zip / .tar(.gz) archive. Inside, the images must sit at
``[<anything>/]<split>/<class>/<file>`` with split ``train`` and ``test`` (required) and optionally
``val`` (``valid``/``validation`` are accepted too). Class names are the sorted class folder
names of the training split; a test/val class unknown to training is an error.

This is the layout of torchvision's ``ImageFolder`` and of the ImageNet-to-Sketch datasets as
Piggyback distributes them (CUBS ``cubs_cropped``, Stanford Cars ``stanford_cars_cropped``,
``flowers``, ``wikiart``, ``sketches``: Piggyback reads ``data/<dataset>/train`` and
``data/<dataset>/test``; the archives are on Box, see github.com/arunmallya/piggyback, and
must be downloaded by hand or with ``--url`` if you have a direct link).

Images are resized to ``--size`` x ``--size`` (default: shorter side to size, centre crop).
Use ``--no-mirror`` for data whose class changes under a horizontal flip (text, digits, signs).
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SPLIT_NAMES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def _locate(parts):
    """For path parts ``[..., split, class, file]`` return (split, class) or None."""
    if len(parts) >= 3 and parts[-3].lower() in SPLIT_NAMES and C.is_image_name(parts[-1]):
        if not any(p.startswith(".") or p == "__MACOSX" for p in parts):
            return SPLIT_NAMES[parts[-3].lower()], parts[-2]
    return None


def _iter_source(src, quiet):
    """Yield (split, class, name, bytes) for every image of a folder, zip or tar(.gz)."""
    src = Path(src)
    if not src.exists():
        raise C.DataScriptError(f"{src}: no such folder or archive")
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            where = _locate(path.relative_to(src).parts)
            if where:
                yield (*where, str(path), path.read_bytes())
    elif src.suffix.lower() == ".zip":
        with C.open_zip(src) as zf:
            for name in sorted(zf.namelist()):
                where = _locate(name.split("/"))
                if where:
                    yield (*where, name, C.zip_read(zf, name))
    else:
        C.require(src)
        if not (src.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))
                or tarfile.is_tarfile(src)):
            raise C.DataScriptError(f"{src}: not a folder, .zip or .tar(.gz) archive")
        for name, data in C.iter_tar(src, want=lambda n: _locate(n.split("/")) is not None):
            yield (*_locate(name.split("/")), name, data)


def convert(src, out_folder, *, name: str, size: int = 64, resize: str = "crop",
            mirror: bool = True, source: str | None = None, licence: str = "see the source",
            quiet: bool = False):
    """Convert an image-folder tree (folder or archive) ``src`` into the domain ``out_folder``."""
    found = {}        # split -> list of (class, name, array)
    bar = C.tqdm(desc=name, unit="img", disable=quiet, leave=False)
    in_archive = not Path(src).is_dir()
    for split, cls, member, data in _iter_source(src, quiet):
        img = C.open_image(data, name=f"{src}:{member}" if in_archive else member, archive=in_archive)
        img = C.square(img, size, resize)
        found.setdefault(split, []).append((cls, member, C.to_array(img)))
        bar.update(1)
    bar.close()
    for split in ("train", "test"):
        if split not in found:
            raise C.DataScriptError(f"{src}: no images under a '{split}/<class>/' folder; "
                                    f"found splits: {sorted(found) or 'none'}")
    class_names = sorted({cls for cls, _, _ in found["train"]})
    if len(class_names) < 2:  # e.g. train/images/*.jpg: the class folders are one level down
        raise C.DataScriptError(f"{src}: train has a single class folder ({class_names[0]!r}); "
                                "a classifier needs <split>/<class>/ folders for two classes "
                                "or more")
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split, items in found.items():
        unknown = sorted({cls for cls, _, _ in items} - set(index))
        if unknown:
            raise C.DataScriptError(f"{src}: {split} has classes not in train: {unknown[:5]}")
        items.sort(key=lambda t: (index[t[0]], t[1]))
        splits[split] = C.stack([a for _, _, a in items], [index[c] for c, _, _ in items], split)
    return C.save_domain(
        out_folder, name=name, train=splits["train"], test=splits["test"], val=splits.get("val"),
        class_names=class_names, mirror=mirror, source=source or str(src), licence=licence,
        options={"size": size, "resize": resize, "mirror": mirror},
        extra={"preprocess": f"{resize} to {size}x{size}"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=64)
    parser.add_argument("--name", required=True, help="domain name (also the output folder name)")
    parser.add_argument("--src", type=Path, help="folder or .zip/.tar(.gz) archive with "
                                                   "<split>/<class>/<image> inside")
    parser.add_argument("--url", help="download the archive from this URL instead of --src")
    parser.add_argument("--md5", help="md5 of the archive at --url (checked when given)")
    parser.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                        help="crop: shorter side to SIZE then centre crop (default); "
                             "stretch: resize both sides to SIZE")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                        help="whether a horizontal flip keeps the class (default yes)")
    parser.add_argument("--licence", default="see the source", help="licence note for meta.json")
    args = parser.parse_args(argv)
    if (args.src is None) == (args.url is None):
        parser.error("give exactly one of --src and --url")
    options = {"size": args.size, "resize": args.resize, "mirror": args.mirror}
    folder = Path(args.root) / args.name
    if not args.force and C.domain_is_complete(folder, options):
        print(C.skip_message(folder))
        return
    src, downloaded = args.src, []
    if args.url:
        filename = args.url.rstrip("/").split("/")[-1].split("?")[0] or f"{args.name}.zip"
        paths = C.fetch([{"url": args.url, "filename": filename, "md5": args.md5}],
                        C.downloads_dir(args, args.name), offline=args.offline, quiet=args.quiet)
        src = paths[filename]
        downloaded = [src]
    convert(src, folder, name=args.name, size=args.size, resize=args.resize, mirror=args.mirror,
            source=args.url or str(args.src), licence=args.licence, quiet=args.quiet)
    print(f"{folder}: written")
    if downloaded and not args.keep_archives:
        C.remove_archives(downloaded)


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
