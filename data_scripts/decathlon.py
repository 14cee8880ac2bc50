"""Visual Domain Decathlon: the ten data sets from the official archives -> ten npmask domains.

Usage::

    python data_scripts/decathlon.py --root DATA                     # the nine small data sets
    python data_scripts/decathlon.py --root DATA --datasets svhn dtd
    python data_scripts/decathlon.py --root DATA --datasets imagenet12   # 6.5 GB download

Source: https://www.robots.ox.ac.uk/~vgg/decathlon/ (Rebuffi, Bilen and Vedaldi, NIPS 2017).

* ``decathlon-1.0-devkit.tar.gz`` holds ``decathlon-1.0/annotations/<dataset>_{train,val}.json``
  and ``<dataset>_test_stripped.json``, COCO-style: ``images`` (id, file_name),
  ``annotations`` (image_id, category_id), ``categories`` (id, name). ``file_name`` is relative to
  the ``decathlon-1.0`` folder, e.g. ``data/aircraft/train/...jpg``.
* ``decathlon-1.0-data.tar.gz`` holds one ``<dataset>.tar`` per data set (all but ImageNet) whose
  members are named like ``file_name`` without the leading ``data/``.
* ImageNet comes separately, ``decathlon-1.0-data-imagenet.tar`` from image-net.org, with members
  ``imagenet12/...``.
* The test labels are not in the devkit (``_test_stripped``). The residual-adapters repository
  (github.com/srebuffi/residual_adapters) publishes them as ``labels_test.zip``: ten files
  ``<dataset>_test.json`` at the root of the zip, each COCO-style like the devkit's files
  (``images`` with id/file_name ``data/<dataset>/test/...``, ``annotations`` with
  image_id/category_id, ``categories``), with the devkit's category ids (e.g. 10000001..10000100
  for aircraft). We take the JSON whose name starts with the data set's name, in COCO form or as
  a results list (``[{"image_id", "category_id"}]``). With ``--test-labels none``, or when no
  labels are found for a data set, its *official validation split is used as the test split*
  (and there is no val split); meta.json says which was done.

URLs, byte sizes and sha256 sums are those recorded by TensorFlow Datasets (the Decathlon page
itself publishes no checksums). labels_test.zip has no published checksum either; its size and
sha256 are those of the file in the residual-adapters repository (master, commit 5c51aa3).

Labels: ``label = category_id - min(category_id)``, the min taken over the categories of the
training file, so labels start at 0. This is what the residual-adapters loader does
(``category_id - 1`` minus its minimum; docs/design.md, section 6). Images are matched to
annotations by ``image_id``.

Images come pre-resized so that the shorter side is 72. We resize the shorter side to ``--size``
(72 by default, so normally a no-op) and centre-crop ``--size`` x ``--size`` so that images
stack into one array; the 72 -> 64 random/centre crop of the training protocol is left to the
loader. Mirroring is off for gtsrb, omniglot, svhn and dtd: the paper mirrors no digits, signs,
characters or textures (the residual-adapters loader does flip dtd).
"""
from __future__ import annotations

import io
import json
import posixpath
import shutil
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from npmask.data.loader import DECATHLON_FULL_VIEW, DECATHLON_NO_MIRROR  # noqa: E402

VGG = "http://www.robots.ox.ac.uk/~vgg/share/"
RESOURCES = {
    "devkit": {"url": VGG + "decathlon-1.0-devkit.tar.gz", "filename": "decathlon-1.0-devkit.tar.gz",
               "size": 23503205,
               "sha256": "f86d9e128678434ff2a3a374f00eb3e2ec2267e15e53ddae5f19ff19378b5ff7"},
    "data": {"url": VGG + "decathlon-1.0-data.tar.gz", "filename": "decathlon-1.0-data.tar.gz",
             "size": 406351554,
             "sha256": "8eca928bda025d855c91a78db45b3b18bc322efd7b1462a041e62c27b3c83c25"},
    "imagenet": {"url": "http://www.image-net.org/image/decathlon/decathlon-1.0-data-imagenet.tar",
                 "filename": "decathlon-1.0-data-imagenet.tar", "size": 6535075840,
                 "sha256": "93caac18a907266f917136849c1db7bbf88dd595120af1a8eea7177138962e4a"},
    "test_labels": {"url": "https://github.com/srebuffi/residual_adapters/raw/master/labels_test.zip",
                    "filename": "labels_test.zip", "size": 1628053,
                    "sha256": "505e4bb6053195233772662da1712184d381de8ac3677b6c4c582ad55c23b2da"},
}
DATASETS = ["aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "imagenet12", "omniglot",
            "svhn", "ucf101", "vgg-flowers"]
# The paper mirrors none of the digits, signs, characters and textures; the first three are also
# fed whole (72x72) under the "decathlon" protocol. The loader keeps the same two sets.
FULL_VIEW = set(DECATHLON_FULL_VIEW)
NO_MIRROR = set(DECATHLON_NO_MIRROR)
LICENCE = ("Each data set keeps its original terms (see the Decathlon page); cite Rebuffi et al., "
           "NIPS 2017 and the original data set.")
_MEMMAP_BYTES = 2 << 30     # splits larger than this are assembled in a memory-mapped file


# ---------------------------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------------------------

def _member_path(file_name: str) -> str:
    """Annotation file_name ("data/svhn/train/x.png") -> tar member name ("svhn/train/x.png")."""
    name = file_name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name[len("data/"):] if name.startswith("data/") else name


def read_annotations(devkit, datasets) -> dict:
    """{basename: parsed json} of the annotation files of ``datasets`` in the devkit archive."""
    wanted = set()
    for ds in datasets:
        wanted |= {f"{ds}_train.json", f"{ds}_val.json", f"{ds}_test_stripped.json"}
    out = {}
    for name, data in C.iter_tar(devkit, want=lambda n: posixpath.basename(n) in wanted):
        try:
            out[posixpath.basename(name)] = json.loads(data)
        except json.JSONDecodeError as err:
            raise C.DataScriptError(f"{devkit}: {name} is not valid JSON ({err})") from None
    missing = sorted(wanted - set(out) - {f"{ds}_test_stripped.json" for ds in datasets})
    if missing:
        raise C.DataScriptError(f"{devkit}: annotation files missing: {', '.join(missing)}")
    return out


def labelled_images(coco: dict, offset: int, what: str) -> list[tuple[str, int]]:
    """COCO dict -> [(member name, label)] with label = category_id - offset, joined by image_id."""
    try:
        files = {img["id"]: img["file_name"] for img in coco["images"]}
        pairs = [(files[a["image_id"]], int(a["category_id"]) - offset) for a in coco["annotations"]]
    except (KeyError, TypeError) as err:
        raise C.DataScriptError(f"{what}: not a COCO-style annotation file ({err!r} missing)") from None
    return [(_member_path(f), lab) for f, lab in pairs]


def class_list(coco: dict, what: str) -> tuple[list[str], int]:
    """Class names ordered by category id and the id offset (the smallest category id)."""
    cats = coco.get("categories") or []
    if cats:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in cats]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise C.DataScriptError(f"{what}: category ids are not consecutive")
        names = [str(c.get("name", c["id"])) for c in cats]
        if len(set(names)) != len(names):
            names = [f"{n} ({i})" for n, i in zip(names, ids)]
        return names, ids[0]
    ids = sorted({int(a["category_id"]) for a in coco["annotations"]})
    return [str(i) for i in range(ids[0], ids[-1] + 1)], ids[0]


def read_test_labels(path, dataset: str) -> dict | None:
    """{image_id: category_id} for ``dataset`` from a test-labels zip / folder, or None."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        entries = {p.name: p.read_bytes for p in path.rglob("*.json")}
    else:
        zf = C.open_zip(path)
        entries = {n: (lambda n=n: C.zip_read(zf, n)) for n in zf.namelist() if n.endswith(".json")}
    key = dataset.replace("-", "").lower()
    for name, read in sorted(entries.items()):
        base = posixpath.basename(name).replace("-", "").lower()
        if not base.startswith(key):
            continue
        try:
            obj = json.loads(read())
        except json.JSONDecodeError:
            continue
        items = obj.get("annotations") if isinstance(obj, dict) else obj
        if isinstance(items, list) and items and {"image_id", "category_id"} <= set(items[0]):
            return {a["image_id"]: int(a["category_id"]) for a in items}
    return None


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------

class _SplitBuffer:
    """Preallocated uint8 (N, S, S, 3) for one split, memory-mapped in ``scratch`` when large
    (ImageNet at 72 x 72 is ~20 GB), filled in archive order by member name."""

    def __init__(self, items, size, scratch: Path, tag: str):
        self.index = {}
        for i, (name, _) in enumerate(items):
            self.index.setdefault(name, []).append(i)
        self.labels = np.asarray([lab for _, lab in items], dtype=np.int64)
        shape = (len(items), size, size, 3)
        if np.prod(shape) > _MEMMAP_BYTES:
            scratch.mkdir(parents=True, exist_ok=True)
            self.images = np.lib.format.open_memmap(scratch / f"{tag}.npy", mode="w+",
                                                    dtype=np.uint8, shape=shape)
        else:
            self.images = np.empty(shape, dtype=np.uint8)
        self.filled = np.zeros(len(items), dtype=bool)


def convert_dataset(ds, annotations, image_source, out_folder, *, size=72, test_labels=None,
                    scratch=None, quiet=False):
    """Convert one data set. ``image_source`` is an iterable of (member name, bytes)."""
    train_coco = annotations[f"{ds}_train.json"]
    class_names, offset = class_list(train_coco, f"{ds}_train.json")
    items = {"train": labelled_images(train_coco, offset, f"{ds}_train.json"),
             "val": labelled_images(annotations[f"{ds}_val.json"], offset, f"{ds}_val.json")}
    test_note = "official validation split (test labels not available)"
    stripped = annotations.get(f"{ds}_test_stripped.json")
    if test_labels and stripped:
        files = {img["id"]: img["file_name"] for img in stripped["images"]}
        if set(files) <= set(test_labels):
            items["test"] = [(_member_path(f), test_labels[i] - offset) for i, f in sorted(files.items())]
            test_note = "official test split with the published test labels"
    if "test" not in items:
        items["test"] = items.pop("val")
    for split, pairs in items.items():
        bad = [lab for _, lab in pairs if not 0 <= lab < len(class_names)]
        if bad:
            raise C.DataScriptError(f"{ds} {split}: labels {bad[:3]} outside 0..{len(class_names) - 1} "
                                    f"(category ids inconsistent with {ds}_train.json)")

    scratch = Path(scratch or Path(out_folder).parent / f".{ds}.scratch")
    try:
        buffers = {s: _SplitBuffer(p, size, scratch, s) for s, p in items.items()}
        bar = C.tqdm(total=sum(len(p) for p in items.values()), desc=ds, unit="img",
                     disable=quiet, leave=False)
        for name, data in image_source:
            targets = [(b, i) for b in buffers.values() for i in b.index.get(name, [])]
            if not targets:
                continue
            img = C.open_image(data, name=name)
            arr = C.to_array(C.center_crop(C.resize_shorter(img, size), size))
            for b, i in targets:
                b.images[i] = arr
                b.filled[i] = True
                bar.update(1)
        bar.close()
        for split, b in buffers.items():
            if not b.filled.all():
                missing = [n for n, idx in b.index.items() if not b.filled[idx[0]]]
                raise C.DataScriptError(f"{ds} {split}: {len(missing)} annotated images not found in "
                                        f"the image archive, e.g. {missing[:3]}")
        return C.save_domain(
            out_folder, name=ds, train=(buffers["train"].images, buffers["train"].labels),
            val=(buffers["val"].images, buffers["val"].labels) if "val" in buffers else None,
            test=(buffers["test"].images, buffers["test"].labels), class_names=class_names,
            mirror=ds not in NO_MIRROR, source="https://www.robots.ox.ac.uk/~vgg/decathlon/",
            licence=LICENCE, options={"size": size, "test_labels": test_note},
            extra={"preprocess": f"shorter side resized to {size} (the archives already have "
                                 f"shorter side 72), centre crop {size}x{size}",
                   # read by npmask.data.loader (augmentation "auto"): the 72 -> 64 protocol,
                   # and the whole 72x72 view for gtsrb, omniglot, svhn (docs/design.md, section 3)
                   "protocol": "decathlon",
                   "full_view": ds in FULL_VIEW,
                   "protocol_note": ("train and test: the whole 72x72 image, no mirroring"
                                     if ds in FULL_VIEW else
                                     "train: random crop 64" + ("" if ds in NO_MIRROR else " + mirror")
                                     + "; test: centre crop 64"),
                   "test_split": test_note, "label_offset": offset})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def convert(files: dict, out_root, datasets, *, size: int = 72, quiet: bool = False) -> list[Path]:
    """Convert ``datasets`` from the downloaded ``files`` ("devkit", "data", optionally
    "imagenet" and "test_labels") into ``out_root/<dataset>``; complete folders are skipped."""
    out_root = Path(out_root)
    annotations = read_annotations(files["devkit"], datasets)
    done = []

    def one(ds, source):
        labels = read_test_labels(files.get("test_labels"), ds)
        done.append(convert_dataset(ds, annotations, source, out_root / ds, size=size,
                                    test_labels=labels, quiet=quiet))

    small = [ds for ds in datasets if ds != "imagenet12"]
    if small:
        # One pass over the outer tar.gz; each <dataset>.tar is read into memory (the largest is
        # a few hundred MB) and streamed from there.
        inner = {f"{ds}.tar": ds for ds in small}
        seen = set()
        for name, data in C.iter_tar(files["data"], want=lambda n: posixpath.basename(n) in inner):
            ds = inner[posixpath.basename(name)]
            seen.add(ds)
            one(ds, C.iter_tar(None, fileobj=io.BytesIO(data), label=f"{files['data']}:{name}"))
        missing = sorted(set(small) - seen)
        if missing:
            raise C.DataScriptError(f"{files['data']}: {', '.join(m + '.tar' for m in missing)} "
                                    f"missing from the archive")
    if "imagenet12" in datasets:
        one("imagenet12", C.iter_tar(files["imagenet"]))
    return done


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=72)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS + ["all"],
                        default=[d for d in DATASETS if d != "imagenet12"],
                        help="which data sets (default: all but imagenet12; 'all' adds ImageNet, "
                             "a 6.5 GB download needing ~20 GB of disk for the converted arrays)")
    parser.add_argument("--test-labels", choices=["auto", "none"], default="auto",
                        help="auto: download labels_test.zip and use the official test split where "
                             "labels are found; none: use the validation split as test split")
    args = parser.parse_args(argv)
    datasets = DATASETS if "all" in args.datasets else list(dict.fromkeys(args.datasets))
    todo = []
    for ds in datasets:
        folder = Path(args.root) / ds
        if not args.force and C.domain_is_complete(folder, {"size": args.size}):
            print(C.skip_message(folder))
        else:
            todo.append(ds)
    if not todo:
        return
    keys = ["devkit"] + (["data"] if set(todo) - {"imagenet12"} else []) + \
           (["imagenet"] if "imagenet12" in todo else [])
    dl = C.downloads_dir(args, "decathlon")
    paths = C.fetch([RESOURCES[k] for k in keys], dl, offline=args.offline, quiet=args.quiet)
    files = {k: paths[RESOURCES[k]["filename"]] for k in keys}
    if args.test_labels == "auto":
        try:
            files["test_labels"] = C.fetch([RESOURCES["test_labels"]], dl, offline=args.offline,
                                           quiet=args.quiet)["labels_test.zip"]
        except C.DataScriptError as err:
            print(f"warning: no test labels ({err}); the validation split becomes the test split",
                  file=sys.stderr)
    for folder in convert(files, args.root, todo, size=args.size, quiet=args.quiet):
        print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
