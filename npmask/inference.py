"""From image files (or uint8 arrays) to class names and probabilities, for one trained domain.

A domain file (:mod:`npmask.storage`) carries what inference needs, under ``__meta__["data"]``::

    class_names   the K class names, in the order of the classifier's outputs
    mean, std     per-channel normalisation in [0, 1] units: x = (pixels / 255 - mean) / std
    image_size    [H, W] of the images the domain was trained on (what a file is resized to)
    input_size    [h, w] of the network input: the test view, a centre crop of image_size
    channels      1 (grey) or 3 (RGB)
    mirror        whether a horizontal flip keeps the class (the data's flag; not used at test time)
    resize        optional: "crop" (default) or "stretch", how the data's converter made pictures
                  square (``data_scripts/image_folder.py --resize``); a file is resized the same way

:func:`prepare_images` turns images into the network's input exactly as the test split was fed
during training: a picture of another size is resized (shorter side to the stored size, bilinear,
then a centre crop -- the default of ``data_scripts/image_folder.py`` -- or both sides, for data
converted with ``--resize stretch``), centre-cropped to the input size and normalised. :class:`Predictions` holds the softmax probabilities.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .backend import get_array_module, to_numpy

DATA_KEYS = ("class_names", "mean", "std", "image_size", "input_size", "channels", "mirror")


class ImageError(ValueError):
    """An image cannot be read or does not fit the domain (one line, names the file)."""


def data_info(domain, input_size=None) -> dict:
    """The ``data`` description of a loaded :class:`npmask.data.format.Domain`.

    ``input_size``: the network input (h, w), when the test view crops the stored images (Decathlon
    protocol: 64 of 72); default: the stored size.
    """
    h, w = (int(v) for v in domain.image_size)
    extra = domain.meta.get("extra") or {}
    if input_size is None:
        ih, iw = h, w
    elif np.ndim(input_size) == 0:
        ih = iw = int(input_size)
    else:
        ih, iw = (int(v) for v in input_size)
    return {"class_names": [str(c) for c in domain.class_names],
            "mean": [float(v) for v in np.asarray(domain.mean).reshape(-1)],
            "std": [float(v) for v in np.asarray(domain.std).reshape(-1)],
            "image_size": [h, w], "input_size": [ih, iw],
            "channels": int(np.asarray(domain.mean).size), "mirror": bool(domain.mirror),
            "resize": "stretch" if str(extra.get("preprocess", "")).startswith("stretch") else "crop"}


def check_data_info(info: dict, num_classes: int | None = None) -> dict:
    """``info`` with its types checked (ValueError naming the field); returns a clean copy."""
    missing = [k for k in DATA_KEYS if k not in info]
    if missing:
        raise ValueError(f"data description lacks {missing}")
    out = {"class_names": [str(c) for c in info["class_names"]],
           "mean": [float(v) for v in info["mean"]], "std": [float(v) for v in info["std"]],
           "image_size": [int(v) for v in info["image_size"]],
           "input_size": [int(v) for v in info["input_size"]],
           "channels": int(info["channels"]), "mirror": bool(info["mirror"]),
           "resize": str(info.get("resize", "crop"))}
    if out["resize"] not in ("crop", "stretch"):
        raise ValueError(f"data description: resize must be 'crop' or 'stretch', got {out['resize']!r}")
    if out["channels"] not in (1, 3) or len(out["mean"]) != out["channels"] \
            or len(out["std"]) != out["channels"]:
        raise ValueError(f"data description: {out['channels']} channels with mean {out['mean']} "
                         f"and std {out['std']}")
    if any(s <= 0 for s in out["std"]):
        raise ValueError(f"data description: std must be > 0, got {out['std']}")
    if len(out["image_size"]) != 2 or len(out["input_size"]) != 2 or \
            any(i > s for i, s in zip(out["input_size"], out["image_size"])):
        raise ValueError(f"data description: input_size {out['input_size']} must be 2 sides no "
                         f"larger than image_size {out['image_size']}")
    if num_classes is not None and len(out["class_names"]) != num_classes:
        raise ValueError(f"data description names {len(out['class_names'])} classes, the "
                         f"classifier has {num_classes}")
    return out


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` with 8-bit channels, ready for ``convert("RGB"/"L")``: 16-bit grey (Pillow's modes
    ``I;16*`` and ``I``) is scaled by 255/65535, where ``convert`` would clip it at 255 (a 16-bit
    picture would come out nearly white); float pixels (``F``) have no fixed range: ValueError."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no fixed range; save the picture with 8 or 16 "
                         "bits per channel")
    return img


def read_image(path, channels: int = 3) -> np.ndarray:
    """The image file at ``path`` as uint8 (H, W, channels); ImageError if it cannot be read."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _fit(image: np.ndarray, size, mode: str = "crop") -> np.ndarray:
    """Resize uint8 (H, W, C) to ``size``: "crop" scales the shorter side (bilinear) and
    centre-crops, "stretch" scales both sides."""
    th, tw = size
    h, w = image.shape[:2]
    if (h, w) == (th, tw):
        return image
    if mode == "stretch":
        nh, nw = th, tw
    else:
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    pil = pil.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    a = np.asarray(pil, dtype=np.uint8)
    a = a[:, :, None] if a.ndim == 2 else a
    top, left = (nh - th) // 2, (nw - tw) // 2
    return a[top:top + th, left:left + tw]


def _centre_crop(image: np.ndarray, size) -> np.ndarray:
    h, w = image.shape[:2]
    th, tw = size
    top, left = (h - th) // 2, (w - tw) // 2
    return image[top:top + th, left:left + tw]


def prepare_images(images, info: dict, dtype=np.float32) -> np.ndarray:
    """Network input (N, C, h, w) in ``dtype`` (NumPy) for ``images``, as the test split was fed.

    images: a uint8 array (H, W, C), (H, W) or (N, H, W, C) (NumPy or CuPy), a list of such arrays,
    or a list of image file paths (str or Path; also mixed with arrays). Grey images given to an
    RGB domain are repeated over the channels and RGBA arrays lose their alpha, so that an array
    gives what the same picture as a file gives; files are converted to the domain's channels when
    read.
    """
    channels = int(info["channels"])
    if get_array_module(images) is not np:          # CuPy pixels: np.asarray of them is refused
        images = to_numpy(images)
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):      # one image: (H, W) grey or (H, W, C)
            images = [images]
        elif images.ndim != 4:
            raise ImageError(f"images must be uint8 (H, W, C) or (N, H, W, C), got shape {images.shape}")
    elif isinstance(images, (str, os.PathLike)):
        images = [images]
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            a, what = read_image(item, channels), os.fspath(item)
        else:
            a, what = to_numpy(item), f"image {i}"
            if a.dtype != np.uint8:
                raise ImageError(f"{what}: expected uint8 pixels (0-255), got {a.dtype}; for float "
                                 "network inputs call model.forward or predict_logits")
            if a.ndim == 2:
                a = a[:, :, None]
            if a.ndim != 3:
                raise ImageError(f"{what}: expected (H, W, C) pixels, got shape {a.shape}")
            if a.shape[0] == 0 or a.shape[1] == 0:
                raise ImageError(f"{what}: an empty picture, shape {a.shape}")
            if a.shape[2] == 1 and channels == 3:
                a = np.repeat(a, 3, axis=2)
            elif a.shape[2] == 4 and channels == 3:   # RGBA: drop alpha, as convert("RGB") does
                a = a[:, :, :3]
            elif a.shape[2] != channels:
                raise ImageError(f"{what}: {a.shape[2]} channels, the domain takes {channels}")
        a = _fit(a, info["image_size"], info.get("resize", "crop"))
        out.append(_centre_crop(a, info["input_size"]))
    if not out:
        raise ImageError("no images given")
    x = np.stack(out).astype(np.float64) / 255.0
    x = (x - np.asarray(info["mean"])) / np.asarray(info["std"])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=dtype)


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (NumPy)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Predictions:
    """Class probabilities for N images: ``probabilities`` (N, K) float64, rows sum to 1."""

    class_names: list
    probabilities: np.ndarray
    sources: list | None = None   # file names (or None for arrays), for printing

    @property
    def indices(self) -> np.ndarray:
        """The most probable class index of every image, (N,) int."""
        return self.probabilities.argmax(axis=1)

    @property
    def labels(self) -> list:
        """The most probable class name of every image."""
        return [self.class_names[i] for i in self.indices]

    def top(self, k: int = 5) -> list:
        """Per image, the ``k`` most probable ``(class name, probability)``, most probable first
        (ties in index order); ``k`` larger than the number of classes gives them all."""
        if int(k) < 1:
            raise ValueError(f"top: k must be >= 1, got {k}")
        k = min(int(k), len(self.class_names))
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(p[j])) for j in row]
                for row, p in zip(order, self.probabilities)]

    def __len__(self) -> int:
        return len(self.probabilities)
