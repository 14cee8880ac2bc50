"""GTSRB, the German Traffic Sign Recognition Benchmark (final training and test sets) -> "gtsrb".

Usage::

    python data_scripts/gtsrb.py --root DATA [--size 32]

Source: https://benchmark.ini.rub.de/ (Stallkamp et al., 2012); the archives now live at
https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/. The site publishes no md5
sums. Those of the two test zips are the ones torchvision checks; torchvision trains on another
archive (``GTSRB-Training_fixed.zip``, another layout), so the md5 of
``GTSRB_Final_Training_Images.zip`` is the one other public loaders check, not torchvision's.

* ``GTSRB_Final_Training_Images.zip``: ``GTSRB/Final_Training/Images/<class 00000..00042>/`` with
  ``<track>_<frame>.ppm`` images and one ``GT-<class>.csv`` per class folder.
* ``GTSRB_Final_Test_Images.zip``: ``GTSRB/Final_Test/Images/<nnnnn>.ppm``.
* ``GTSRB_Final_Test_GT.zip``: ``GT-final_test.csv``, the test labels.

The csv files are ';'-separated with the header
``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``. Each image is cropped to its
region of interest (the sign without the ~10 % margin around it; we treat X2/Y2 as inclusive
pixel coordinates, which the format description suggests but we could not confirm) and resized to
``--size`` x ``--size`` (bilinear, the ROI is nearly square). Mirroring would turn "keep left"
into "keep right", so ``mirror`` is false.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
RESOURCES = {
    "train": {"url": BASE + "GTSRB_Final_Training_Images.zip",
              "filename": "GTSRB_Final_Training_Images.zip", "md5": "f33fd80ac59bff73c82d25ab499e03a3"},
    "test": {"url": BASE + "GTSRB_Final_Test_Images.zip",
             "filename": "GTSRB_Final_Test_Images.zip", "md5": "c7e4e6327067d32654124b0fe9e82185"},
    "test_gt": {"url": BASE + "GTSRB_Final_Test_GT.zip",
                "filename": "GTSRB_Final_Test_GT.zip", "md5": "fe31e9c9270bbcd7b84b7f21a9d9d9e5"},
}
NUM_CLASSES = 43
LICENCE = "See https://benchmark.ini.rub.de/ for the terms; cite Stallkamp et al., 2012."
_TRAIN_CSV = re.compile(r"(^|/)Final_Training/Images/(\d{5})/GT-\d{5}\.csv$")


def read_csv(data: bytes, name: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=";"))
    need = {"Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"}
    if not rows or not need <= set(rows[0]):
        raise C.DataScriptError(f"{name}: expected a ';'-separated csv with columns "
                                f"{', '.join(sorted(need))}")
    return rows


def crop_sign(data: bytes, row: dict, size: int, name: str):
    """Decode one ppm, crop to its ROI (X2, Y2 inclusive), resize to size x size."""
    img = C.open_image(data, name=name)
    x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
    img = img.crop((x1, y1, x2 + 1, y2 + 1))
    return C.to_array(C.square(img, size, "stretch"))


def convert(files: dict, out_folder, *, size: int = 32, quiet: bool = False):
    """``files`` maps "train", "test", "test_gt" to the three downloaded zips."""
    images, labels = [], []
    with C.open_zip(files["train"]) as zf:
        csvs = sorted(n for n in zf.namelist() if _TRAIN_CSV.search(n))
        if not csvs:
            raise C.DataScriptError(f"{files['train']}: no Final_Training/Images/<class>/GT-<class>.csv "
                                    f"found; not the GTSRB final training archive")
        for csv_name in C.tqdm(csvs, desc="gtsrb train classes", disable=quiet, leave=False):
            folder = posixpath.dirname(csv_name)
            for row in read_csv(C.zip_read(zf, csv_name), csv_name):
                member = f"{folder}/{row['Filename']}"
                images.append(crop_sign(C.zip_read(zf, member), row, size, member))
                labels.append(int(row["ClassId"]))
    train = C.stack(images, labels, f"{files['train']}")

    with C.open_zip(files["test_gt"]) as zf:
        gt = [n for n in zf.namelist() if n.endswith("GT-final_test.csv")]
        if not gt:
            raise C.DataScriptError(f"{files['test_gt']}: GT-final_test.csv is missing")
        rows = read_csv(C.zip_read(zf, gt[0]), gt[0])
    images, labels = [], []
    with C.open_zip(files["test"]) as zf:
        names = {posixpath.basename(n): n for n in zf.namelist() if n.lower().endswith(".ppm")}
        for row in C.tqdm(rows, desc="gtsrb test", disable=quiet, leave=False):
            if row["Filename"] not in names:
                raise C.DataScriptError(f"{files['test']}: test image {row['Filename']} listed in "
                                        f"GT-final_test.csv is missing")
            member = names[row["Filename"]]
            images.append(crop_sign(C.zip_read(zf, member), row, size, member))
            labels.append(int(row["ClassId"]))
    test = C.stack(images, labels, f"{files['test']}")
    return C.save_domain(
        out_folder, name="gtsrb", train=train, test=test,
        class_names=[f"{c:05d}" for c in range(NUM_CLASSES)], mirror=False,
        source="https://benchmark.ini.rub.de/", licence=LICENCE, options={"size": size},
        extra={"preprocess": f"ROI crop (X2, Y2 inclusive), then bilinear resize to {size}x{size}"})


def main(argv=None) -> None:
    parser = C.make_parser(__doc__.split("\n\n")[0], size=32)
    args = parser.parse_args(argv)
    folder = Path(args.root) / "gtsrb"
    if not args.force and C.domain_is_complete(folder, {"size": args.size}):
        print(C.skip_message(folder))
        return
    paths = C.fetch(list(RESOURCES.values()), C.downloads_dir(args, "gtsrb"),
                    offline=args.offline, quiet=args.quiet)
    convert({k: paths[r["filename"]] for k, r in RESOURCES.items()}, folder, size=args.size,
            quiet=args.quiet)
    print(f"{folder}: written")
    if not args.keep_archives:
        C.remove_archives(paths.values())


if __name__ == "__main__":
    sys.exit(C.run_cli(main))
