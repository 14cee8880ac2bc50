"""Shared helpers for the data_scripts: download, checksum, archive reading, image resizing, CLI.

Every converter script in this folder follows the same three steps:

1. ``download``: fetch the source's archives into ``<root>/_downloads/<source>/`` with
   :func:`download` (resumable: an interrupted transfer is kept as ``<file>.part`` and continued
   with an HTTP ``Range`` request; the checksum is verified where the source publishes one).
2. ``convert``: read the archives *without extracting them to disk* (``tarfile``/``zipfile``
   streams, so no half-extracted tree is ever left behind), decode and resize the images with
   Pillow, and hand uint8 arrays to :func:`npmask.data.format.write_domain`, which writes the
   domain folder atomically (temporary folder, then rename).
3. idempotence: :func:`domain_is_complete` lets a script skip a domain whose folder is already
   complete (written with the same options); ``--force`` rebuilds it.

Errors a user can act on (a truncated archive, a checksum mismatch, a missing file inside an
archive) raise :class:`DataScriptError` with a message naming the file and what to do; the
``main`` wrapper :func:`run_cli` prints it without a traceback and exits with status 1.

Only the standard library (urllib, tarfile, zipfile, hashlib), numpy, Pillow, scipy and tqdm are
used. Nothing here ever unpickles data.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # tqdm is a dependency of npmask; fall back to a silent iterator if it is missing.
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable=None, **kwargs):
        return iterable if iterable is not None else _NullBar()

    class _NullBar:
        def update(self, n=1):
            pass

        def close(self):
            pass

# Make "import npmask" work when a script is run from a source checkout without installing.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "npmask").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from npmask.data.format import DataFormatError, read_meta, write_domain  # noqa: E402
from npmask.inference import to_8bit  # noqa: E402

DOWNLOADS = "_downloads"          # <root>/_downloads/<source>/ holds the raw archives
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff")
_CHUNK = 1 << 20                  # bytes per read while downloading / hashing


class DataScriptError(RuntimeError):
    """A problem the user can act on: bad or truncated archive, checksum mismatch, missing file."""


# ---------------------------------------------------------------------------------------------
# checksums and download
# ---------------------------------------------------------------------------------------------

def file_hash(path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (the archives are up to several GB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise DataScriptError if ``path`` does not have the given md5 / sha256 (None = unchecked)."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        got = file_hash(path, algorithm)
        if got.lower() != expected.lower():
            raise DataScriptError(
                f"{path}: {algorithm} checksum mismatch (expected {expected}, got {got}); the "
                f"file is corrupt or not the published version. Delete it and run again.")


def download(url: str, dest, *, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, quiet: bool = False, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resumable) and verify its checksum; return ``dest``.

    * ``dest`` already present: only its checksum is verified (no network access).
    * Otherwise bytes go to ``dest.part``. If a ``.part`` exists from an interrupted run, the
      request carries ``Range: bytes=<len>-``: a ``206 Partial Content`` answer is appended, a
      plain ``200`` (server without Range support, or a ``file://`` URL) restarts from zero.
    * When the transfer ends the ``.part`` is checked (size if known, then md5/sha256); only a
      verified file is renamed to ``dest``. A mismatch deletes the ``.part`` (resuming a corrupt
      file can never repair it) and raises DataScriptError.
    """
    dest = Path(dest)
    if dest.exists():
        verify(dest, md5=md5, sha256=sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:      # longer than the real file: cannot be a prefix
        part.unlink()
        have = 0

    if size is None or have < size:
        request = urllib.request.Request(url, headers={"User-Agent": "npmask-data-scripts"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:      # "Range Not Satisfiable": the .part is complete
                response = None
            else:
                raise DataScriptError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            raise DataScriptError(f"download of {url} failed: {err}. Check the network, or place "
                                  f"the file at {dest} by hand and run again.") from None
        if response is not None:
            with response:
                status = getattr(response, "status", None)
                if have and status != 206:    # Range ignored: the body is the whole file
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True,
                           desc=dest.name, disable=quiet, leave=False)
                try:
                    with open(part, "ab" if have else "wb") as f:
                        for block in iter(lambda: response.read(_CHUNK), b""):
                            f.write(block)
                            bar.update(len(block))
                except (OSError, http.client.HTTPException) as err:
                    raise DataScriptError(
                        f"download of {url} was interrupted ({type(err).__name__}: {err}); "
                        f"run again to resume from the {part.stat().st_size} bytes kept "
                        f"in {part}") from None
                finally:
                    bar.close()

    got = part.stat().st_size
    if size is not None and got != size:
        raise DataScriptError(f"{part}: has {got} bytes, expected {size}; the transfer was cut "
                              f"short. Run again to resume it.")
    try:
        verify(part, md5=md5, sha256=sha256)
    except DataScriptError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest


def fetch(resources, folder, *, offline: bool = False, quiet: bool = False) -> dict:
    """Download every resource into ``folder``; return {filename: path}.

    ``resources`` is a list of dicts with keys ``url`` (or ``urls``, tried in order), ``filename``
    and optionally ``md5``, ``sha256``, ``size``. With ``offline=True`` nothing is downloaded and
    a missing file is an error telling the user where to put it.
    """
    folder = Path(folder)
    paths = {}
    for res in resources:
        dest = folder / res["filename"]
        if offline:
            if not dest.exists():
                raise DataScriptError(f"{dest}: missing (offline mode). Download "
                                      f"{_urls(res)[0]} and put it there.")
            verify(dest, md5=res.get("md5"), sha256=res.get("sha256"))
        else:
            errors = []
            for url in _urls(res):
                try:
                    download(url, dest, md5=res.get("md5"), sha256=res.get("sha256"),
                             size=res.get("size"), quiet=quiet)
                    break
                except DataScriptError as err:
                    errors.append(str(err))
            else:
                raise DataScriptError("; ".join(errors))
        paths[res["filename"]] = dest
    return paths


def _urls(res) -> list:
    return list(res["urls"]) if "urls" in res else [res["url"]]


# ---------------------------------------------------------------------------------------------
# archives (read in place, never extracted to disk)
# ---------------------------------------------------------------------------------------------

# What a truncated / corrupt gzip, tar or zip raises, depending on where the damage is.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError,
                   KeyError, ValueError)


def archive_error(path, err) -> DataScriptError:
    """A DataScriptError telling the user that ``path`` is truncated or corrupt."""
    return DataScriptError(f"{path}: archive is truncated or corrupt ({type(err).__name__}: {err}). "
                           f"Delete it and run again to download it anew.")


def require(path) -> Path:
    """``path`` as a Path; DataScriptError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataScriptError(f"{path}: missing file (run the script without --offline to "
                              f"download it, or put it there by hand)")
    return path


def iter_tar(path, *, want=None, fileobj=None, label=None):
    """Yield ``(member_name, data_bytes)`` for the regular files of a tar / tar.gz, in archive order.

    The archive is read as a stream (mode ``r|*``), so a multi-GB tar.gz is never held in memory
    nor extracted; only members for which ``want(name)`` is true (default: all) are read.
    Any decoding error (truncated gzip, bad header) is re-raised as a DataScriptError naming the
    archive. ``fileobj`` (with ``label`` for messages) reads a tar nested inside another archive.
    """
    label = label or path
    owned = fileobj is None
    try:
        if owned:
            fileobj = open(require(path), "rb")
        try:
            with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and (want is None or want(member.name)):
                        data = tar.extractfile(member).read()
                        if len(data) != member.size:
                            raise EOFError(f"member {member.name} is cut short")
                        yield member.name, data
        finally:
            if owned:
                fileobj.close()
    except DataScriptError:
        raise
    except _ARCHIVE_ERRORS as err:
        raise archive_error(label, err) from None


def open_zip(path) -> zipfile.ZipFile:
    """Open a zip archive; DataScriptError if it is missing, truncated or corrupt."""
    path = require(path)
    try:
        return zipfile.ZipFile(path)
    except _ARCHIVE_ERRORS as err:
        raise archive_error(path, err) from None


def zip_read(zf: zipfile.ZipFile, name: str) -> bytes:
    """Bytes of member ``name``; DataScriptError for a missing member or a corrupt entry."""
    try:
        return zf.read(name)
    except KeyError:
        raise DataScriptError(f"{zf.filename}: expected member {name!r} is missing") from None
    except _ARCHIVE_ERRORS as err:
        raise archive_error(zf.filename, err) from None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def open_image(data, mode: str = "RGB", name: str = "image", archive: bool = True) -> Image.Image:
    """Decode image bytes (or a file object) with Pillow and convert to ``mode`` ("RGB" / "L").

    ``archive``: whether the bytes come from an archive, which the error then suggests is corrupt.
    """
    try:
        if isinstance(data, (bytes, bytearray)):
            data = io.BytesIO(data)
        img = Image.open(data)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        # Pillow names the BytesIO it was given, not the file: say what it means instead
        why = "not a picture Pillow reads" if isinstance(err, UnidentifiedImageError) else err
        raise DataScriptError(f"{name}: cannot decode image ({why})"
                              + ("; the archive may be corrupt" if archive else "")) from None
    try:
        return to_8bit(img).convert(mode)  # as npmask.predict reads a picture
    except ValueError as err:
        raise DataScriptError(f"{name}: {err}") from None


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Isotropic resize so that the shorter side is ``size`` (bilinear; box filter when shrinking
    by a lot, which Pillow's ``reduce`` step does for us via ``reducing_gap``)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.BILINEAR, reducing_gap=3.0)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size`` x ``size`` crop (the image must be at least that large)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def square(img: Image.Image, size: int, mode: str = "crop") -> Image.Image:
    """Make a ``size`` x ``size`` image: ``"crop"`` = resize shorter side then centre crop
    (keeps the aspect ratio, loses the borders); ``"stretch"`` = resize both sides (keeps
    everything, distorts the aspect ratio)."""
    if mode == "crop":
        return center_crop(resize_shorter(img, size), size)
    if mode == "stretch":
        return img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR,
                                                               reducing_gap=3.0)
    raise ValueError(f"unknown resize mode {mode!r} (use 'crop' or 'stretch')")


def to_array(img: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 array (H, W, C); grayscale gets C = 1."""
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def stack(images: list, labels: list, what: str) -> tuple[np.ndarray, np.ndarray]:
    """List of (H, W, C) uint8 arrays + labels -> (N, H, W, C) uint8 and int64 (N,)."""
    if not images:
        raise DataScriptError(f"{what}: no images found; the archive does not have the expected layout")
    return np.stack(images).astype(np.uint8, copy=False), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# domain folders
# ---------------------------------------------------------------------------------------------

def domain_is_complete(folder, options: dict | None = None) -> bool:
    """True when ``folder`` holds a complete domain (meta.json valid, every split file present)
    written with the same values for the converter ``options`` given (each key compared with
    meta["extra"]["options"])."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except DataFormatError:
        return False
    if not all((folder / f"{s}.npz").is_file() for s in meta["counts"]):
        return False
    stored = meta.get("extra", {}).get("options") or {}
    if options is not None and any(stored.get(k) != v for k, v in options.items()):
        return False
    return True


def save_domain(folder, *, options: dict, extra: dict | None = None, **kwargs) -> Path:
    """``write_domain`` with ``extra_meta = {"options": options, **extra}`` (atomic)."""
    extra_meta = {"options": options}
    extra_meta.update(extra or {})
    return write_domain(folder, extra_meta=extra_meta, **kwargs)


def skip_message(folder) -> str:
    return f"{folder}: complete, skipped (use --force to rebuild)"


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def make_parser(description: str, *, size: int | None = None) -> argparse.ArgumentParser:
    """An argparse parser with the flags every script shares (and ``--size`` when given)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path,
                   help="output folder: one domain folder per data set is written under it, the "
                        "raw archives go to ROOT/_downloads/<source>/")
    p.add_argument("--downloads", type=Path, default=None,
                   help="folder for the raw archives (default ROOT/_downloads/<source>)")
    p.add_argument("--offline", action="store_true",
                   help="do not download; use archives already in the downloads folder")
    p.add_argument("--force", action="store_true",
                   help="rebuild domain folders even when they are already complete")
    p.add_argument("--keep-archives", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the downloaded archives after converting (default: keep)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if size is not None:
        p.add_argument("--size", type=int, default=size,
                       help=f"side of the square output images in pixels (default {size})")
    return p


def downloads_dir(args, source: str) -> Path:
    return Path(args.downloads) if args.downloads else Path(args.root) / DOWNLOADS / source


def remove_archives(paths) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; print DataScriptError / DataFormatError as one line and return 1."""
    try:
        main(argv)
    except (DataScriptError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run again to resume (partial downloads are kept as .part files)",
              file=sys.stderr)
        return 130
    return 0


def decode_tar_images(archive, want, prepare, *, desc: str = "images", quiet: bool = False,
                      extra_files=None) -> tuple[dict, dict]:
    """Stream a tar(.gz) once: decode every image member for which ``want(name)`` is true with
    ``prepare(PIL image) -> uint8 array``, and keep the raw bytes of members for which
    ``extra_files(name)`` is true (label lists, split files).

    Returns ``(arrays, files)``: {member name: (H, W, C) uint8}, {member name: bytes}. One
    sequential pass because a gzip stream cannot seek: the label files may come after the images.
    """
    arrays, files = {}, {}
    keep = extra_files or (lambda name: False)
    bar = tqdm(desc=desc, unit="img", disable=quiet, leave=False)
    for name, data in iter_tar(archive, want=lambda n: want(n) or keep(n)):
        if keep(name):
            files[name] = data
        else:
            arrays[name] = to_array(prepare(open_image(data, name=f"{archive}:{name}")))
            bar.update(1)
    bar.close()
    return arrays, files
