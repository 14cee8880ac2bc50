"""The on-disk format of one domain (a data set) and how to write, check and load it.

A domain is one folder::

    <folder>/meta.json     name, class names, image size, channel mean/std, mirroring, source ...
    <folder>/train.npz     images uint8 (N, H, W, C), labels int64 (N,)
    <folder>/test.npz      same
    <folder>/val.npz       optional, same

Why this format: ``.npz`` and JSON are read with ``allow_pickle=False``, so opening a data set can
never execute code; uint8 NHWC is what image files decode to and is 4x smaller than float32; the
per-channel ``mean``/``std`` (computed on the training split, in [0, 1] units) travel with the
images so every user normalises the same way.

Writes are atomic: :func:`write_domain` builds the whole folder under a temporary name beside the
target and renames it into place only when every file is written, so a crash or an error never
leaves a half-written domain, and an existing domain is kept until its replacement is complete.

Every problem found while loading raises :class:`DataFormatError` naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import current_umask, open_npz, replace_folder

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
_REQUIRED_META = ("format_version", "name", "class_names", "num_classes", "image_size", "channels",
                  "mean", "std", "mirror", "source", "licence", "counts")
_CHUNK = 4096  # images per chunk when computing statistics (bounds the temporary int64 memory)


class DataFormatError(ValueError):
    """A domain folder (or the arrays given to :func:`write_domain`) is not in the expected format."""


@dataclass
class Domain:
    """One loaded domain.

    ``train``/``test``/``val`` are ``(images, labels)`` tuples, images uint8 (N, H, W, C) and labels
    int64 (N,), or None for a split that was not loaded (or does not exist, for ``val``).
    ``mean``/``std`` are float32 arrays of shape (C,), in [0, 1] units: normalise with
    ``(x / 255 - mean) / std``. ``image_size`` is (H, W).
    """

    name: str
    meta: dict
    train: tuple | None
    test: tuple | None
    val: tuple | None
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    mirror: bool
    image_size: tuple
    folder: Path | None = field(default=None, repr=False)

    def split(self, name: str) -> tuple:
        """The ``(images, labels)`` of split ``name``; KeyError if it was not loaded."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"split {name!r} of domain {self.name!r} was not loaded or does not exist")
        return value

    @property
    def class_names(self) -> list:
        return list(self.meta["class_names"])


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

def channel_stats(images: np.ndarray) -> tuple[list, list]:
    """Per-channel mean and (population) standard deviation of uint8 images (N, H, W, C), in [0, 1].

    mean_c = Σ x / (255 n),  std_c = sqrt(Σ x² / n - (Σ x / n)²) / 255, with the sums taken exactly
    in int64 (chunk by chunk, so a large data set never needs a float64 copy), hence no
    cancellation error in the variance.
    """
    n_pix = images.shape[0] * images.shape[1] * images.shape[2]
    c = images.shape[3]
    s1 = np.zeros(c, dtype=np.int64)
    s2 = np.zeros(c, dtype=np.int64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start:start + _CHUNK].reshape(-1, c).astype(np.int64)
        s1 += chunk.sum(axis=0)
        s2 += (chunk * chunk).sum(axis=0)
    mean, std = [], []
    for k in range(c):
        m = int(s1[k]) / n_pix
        var = max(int(s2[k]) / n_pix - m * m, 0.0)
        mean.append(m / 255.0)
        std.append(math.sqrt(var) / 255.0)
    return mean, std


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _check_split(split: str, arrays, num_classes: int, shape=None) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (images, labels) pair given to write_domain; return (images, labels int64)."""
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 2:
        raise DataFormatError(f"{split}: expected an (images, labels) tuple, got {type(arrays).__name__}")
    images, labels = arrays
    if not isinstance(images, np.ndarray):
        raise DataFormatError(f"{split}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DataFormatError(f"{split}: images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise DataFormatError(f"{split}: images must be N x H x W x C (4 dims), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataFormatError(f"{split}: no images")
    if min(images.shape[1:]) < 1:
        raise DataFormatError(f"{split}: empty image dimensions {images.shape}")
    if shape is not None and images.shape[1:] != shape:
        raise DataFormatError(f"{split}: image shape H x W x C = {images.shape[1:]} differs from "
                              f"the training split's {shape}")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataFormatError(f"{split}: labels must be integers, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{split}: labels must have shape ({images.shape[0]},) to match the "
                              f"images, got {labels.shape}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataFormatError(f"{split}: labels must lie in [0, {num_classes - 1}] "
                              f"(num_classes = len(class_names)), found range [{lo}, {hi}]")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def write_domain(folder, *, name: str, train, test, val=None, class_names, mirror: bool,
                 source: str, licence: str, extra_meta: dict | None = None,
                 compress: bool = False) -> Path:
    """Write one domain folder atomically and return its path.

    Args:
        folder: the domain folder to create (or replace). Its parent is created if missing.
        name: the domain's name (e.g. "svhn").
        train, test, val: ``(images, labels)`` tuples: images uint8 (N, H, W, C), labels integer
            (N,) in [0, len(class_names)). ``val`` is optional. All splits share H, W and C.
        class_names: one string per class; its length defines ``num_classes``.
        mirror: whether a horizontal flip keeps the class (False for digits, signs, characters).
        source, licence: where the data came from and under which terms (free text).
        extra_meta: JSON-serialisable dict stored under ``meta["extra"]`` (e.g. generator settings).
        compress: use ``np.savez_compressed`` (smaller files, slower to load).

    meta.json gets: format_version, name, class_names, num_classes, image_size [H, W], channels,
    mean and std per channel (on train, [0, 1] units), mirror, source, licence, counts per split,
    class_counts per split, and extra.

    The folder is built under a temporary name beside the target and renamed into place; an
    existing domain is moved aside first and restored if the final rename fails, then deleted.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise DataFormatError(f"name must be a non-empty string, got {name!r}")
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise DataFormatError("class_names must be a list of strings")
    class_names = list(class_names)
    if not class_names:
        raise DataFormatError("class_names is empty")
    if len(set(class_names)) != len(class_names):
        raise DataFormatError("class_names contains duplicates")
    if not isinstance(mirror, (bool, np.bool_)):
        raise DataFormatError(f"mirror must be a bool, got {type(mirror).__name__}")
    for key, value in (("source", source), ("licence", licence)):
        if not isinstance(value, str):
            raise DataFormatError(f"{key} must be a string, got {type(value).__name__}")
    if extra_meta is not None and not isinstance(extra_meta, dict):
        raise DataFormatError(f"extra_meta must be a dict, got {type(extra_meta).__name__}")
    num_classes = len(class_names)

    splits = {"train": _check_split("train", train, num_classes)}
    shape = splits["train"][0].shape[1:]
    splits["test"] = _check_split("test", test, num_classes, shape)
    if val is not None:
        splits["val"] = _check_split("val", val, num_classes, shape)

    mean, std = channel_stats(splits["train"][0])
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "class_names": class_names,
        "num_classes": num_classes,
        "image_size": [int(shape[0]), int(shape[1])],
        "channels": int(shape[2]),
        "mean": mean,
        "std": std,
        "mirror": bool(mirror),
        "source": source,
        "licence": licence,
        "counts": {s: int(a[0].shape[0]) for s, a in splits.items()},
        "class_counts": {s: np.bincount(a[1], minlength=num_classes).tolist()
                         for s, a in splits.items()},
        "extra": extra_meta if extra_meta is not None else {},
    }
    try:
        meta_text = json.dumps(meta, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"extra_meta is not JSON-serialisable: {err}") from None

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        # mkdtemp makes the folder private (0700): a data cache shared by several users would be
        # unreadable to all but its writer. Give it the rights any new folder gets (the umask).
        os.chmod(tmp, 0o777 & ~current_umask())
        save = np.savez_compressed if compress else np.savez
        for split, (images, labels) in splits.items():
            # np.savez appends ".npz" to a name without it, so pass an open file instead.
            with open(tmp / f"{split}.npz", "wb") as f:
                save(f, images=images, labels=labels)
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            f.write(meta_text)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def read_meta(folder) -> dict:
    """Read and check ``<folder>/meta.json``; DataFormatError naming the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: domain folder does not exist (or is not a folder)")
    path = folder / META_FILE
    if not path.is_file():
        raise DataFormatError(f"{path}: missing meta file")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise DataFormatError(f"{path}: missing keys {', '.join(missing)}")

    def bad(what):
        raise DataFormatError(f"{path}: {what}")

    if meta["format_version"] != FORMAT_VERSION:
        bad(f"format_version {meta['format_version']!r} is not supported (this npmask reads "
            f"version {FORMAT_VERSION})")
    names = meta["class_names"]
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        bad("class_names must be a list of strings")
    if not isinstance(meta["num_classes"], int) or meta["num_classes"] != len(names):
        bad(f"num_classes {meta['num_classes']!r} differs from len(class_names) = {len(names)}")
    size = meta["image_size"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)):
        bad(f"image_size must be [H, W] with positive ints, got {size!r}")
    c = meta["channels"]
    if not isinstance(c, int) or c < 1:
        bad(f"channels must be a positive int, got {c!r}")
    for key in ("mean", "std"):
        v = meta[key]
        if (not isinstance(v, list) or len(v) != c
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
            bad(f"{key} must be a list of {c} finite numbers, got {v!r}")
    if not isinstance(meta["mirror"], bool):
        bad(f"mirror must be true or false, got {meta['mirror']!r}")
    counts = meta["counts"]
    if (not isinstance(counts, dict) or "train" not in counts or "test" not in counts
            or not all(k in SPLITS and isinstance(n, int) and n > 0 for k, n in counts.items())):
        bad(f"counts must map train, test (and optionally val) to positive ints, got {counts!r}")
    return meta


def _load_split(folder: Path, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise DataFormatError(f"{path}: missing file (meta.json lists split {split!r})")
    try:
        with open_npz(path) as z:
            keys = set(z.files)
            if not {"images", "labels"} <= keys:
                raise DataFormatError(f"{path}: expected arrays 'images' and 'labels', "
                                      f"found {sorted(keys)}")
            images = z["images"]
            labels = z["labels"]
    except DataFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        # ValueError also covers an object array that would need pickle to load.
        raise DataFormatError(f"{path}: corrupt or unreadable npz ({type(err).__name__}: {err})") from None
    h, w = meta["image_size"]
    expected = (meta["counts"][split], h, w, meta["channels"])
    if images.dtype != np.uint8:
        raise DataFormatError(f"{path}: images must be uint8, got {images.dtype}")
    if images.shape != expected:
        raise DataFormatError(f"{path}: images have shape {images.shape}, meta.json says "
                              f"N x H x W x C = {expected}")
    if labels.dtype != np.int64:
        raise DataFormatError(f"{path}: labels must be int64, got {labels.dtype}")
    if labels.shape != (expected[0],):
        raise DataFormatError(f"{path}: labels have shape {labels.shape}, expected ({expected[0]},)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= meta["num_classes"]:
        raise DataFormatError(f"{path}: labels out of range [0, {meta['num_classes'] - 1}]: "
                              f"found [{lo}, {hi}]")
    return images, labels


def check_domain_files(folder) -> dict:
    """Check a domain folder without loading its images: meta.json, and each split's npz archive.

    For every split meta.json lists: the zip directory can be read (a truncated or foreign file
    fails here), it holds images.npy and labels.npy, and their .npy headers give the dtype and
    shape meta.json promises. This reads a few hundred bytes per file, so a command can check its
    data before it writes anything; :func:`load_domain` still checks the data themselves (CRCs,
    label range). Returns the meta dict; raises :class:`DataFormatError` naming file and problem.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if min(meta["std"]) <= 0:  # loadable, but a run would divide its images by 0
        raise DataFormatError(f"{folder / META_FILE}: std {meta['std']}: a channel with the same "
                              "value in every training image cannot be normalised")
    h, w = meta["image_size"]
    for split, n in meta["counts"].items():
        path = folder / f"{split}.npz"
        if not path.is_file():
            raise DataFormatError(f"{path}: missing file (meta.json lists split {split!r})")
        expected = {"images": (np.dtype(np.uint8), (n, h, w, meta["channels"])),
                    "labels": (np.dtype(np.int64), (n,))}
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if not {"images.npy", "labels.npy"} <= names:
                    raise DataFormatError(f"{path}: expected arrays 'images' and 'labels', found "
                                          f"{sorted(name[:-4] for name in names)}")
                for key, (dtype, shape) in expected.items():
                    with z.open(f"{key}.npy") as f:
                        version = np.lib.format.read_magic(f)
                        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                  else np.lib.format.read_array_header_2_0)(f)
                    got_shape, _, got_dtype = header
                    if got_dtype != dtype or tuple(got_shape) != shape:
                        raise DataFormatError(f"{path}: {key} are {got_dtype} {tuple(got_shape)}, "
                                              f"meta.json says {dtype} {shape}")
        except DataFormatError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
            raise DataFormatError(f"{path}: corrupt or unreadable npz ({type(err).__name__}: {err})") from None
    return meta


def load_domain(folder, splits=None) -> Domain:
    """Load and check one domain folder.

    Args:
        folder: the domain folder (containing meta.json and the split files).
        splits: which splits to load, e.g. ``("test",)``; default: every split listed in
            meta.json (train, test, and val when present). Requesting a split the domain does not
            have is an error.

    Returns a :class:`Domain`; splits not loaded are None. Raises DataFormatError naming the file
    and the problem for a missing folder or file, malformed JSON, missing keys, wrong dtypes or
    shapes, labels out of range, or a corrupt npz.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    available = [s for s in SPLITS if s in meta["counts"]]
    if splits is None:
        splits = available
    elif isinstance(splits, str):
        splits = (splits,)
    for s in splits:
        if s not in SPLITS:
            raise DataFormatError(f"unknown split {s!r}; splits are {', '.join(SPLITS)}")
        if s not in available:
            raise DataFormatError(f"{folder / META_FILE}: domain has no split {s!r} "
                                  f"(it has {', '.join(available)})")
    loaded = {s: _load_split(folder, s, meta) for s in splits}
    return Domain(
        name=meta["name"], meta=meta,
        train=loaded.get("train"), test=loaded.get("test"), val=loaded.get("val"),
        num_classes=meta["num_classes"],
        mean=np.asarray(meta["mean"], dtype=np.float32),
        std=np.asarray(meta["std"], dtype=np.float32),
        mirror=meta["mirror"], image_size=tuple(meta["image_size"]), folder=folder)


def list_domains(root) -> list[str]:
    """Names of the domain folders (those holding a meta.json) directly under ``root``, sorted.

    Temporary folders left by an interrupted write (names starting with ".") are skipped.
    A missing root gives an empty list.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file())
