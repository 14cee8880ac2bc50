"""Fonts and the drawing helpers every domain painter shares.

S = drawing size in pixels (twice the output size); unit coordinates lie in [0, 1]. Text uses
Pillow's built-in scalable font and, when present, DejaVu fonts from /usr/share/fonts/truetype/dejavu.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
_DEJAVU_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                 "DejaVuSansMono.ttf", "DejaVuSansCondensed-Bold.ttf")


def available_fonts() -> list[str]:
    """Names of the fonts the generator will use, in a fixed order: "pillow-default" (Pillow's
    built-in scalable font, when this Pillow has FreeType) and the DejaVu files found."""
    names = []
    try:
        ImageFont.load_default(size=20)
        if isinstance(ImageFont.load_default(size=20), ImageFont.FreeTypeFont):
            names.append("pillow-default")
    except (TypeError, OSError, ImportError):  # old Pillow: no size argument / no FreeType
        pass
    names += [f for f in _DEJAVU_FILES if (DEJAVU_DIR / f).is_file()]
    if not names:
        raise RuntimeError("no scalable font found: install a Pillow built with FreeType "
                           "(every PyPI wheel is) or the DejaVu fonts")
    return names


_font_cache: dict = {}


def _font(name: str, size: int):
    key = (name, size)
    if key not in _font_cache:
        if name == "pillow-default":
            _font_cache[key] = ImageFont.load_default(size=size)
        else:
            _font_cache[key] = ImageFont.truetype(str(DEJAVU_DIR / name), size)
    return _font_cache[key]


def _rotation(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _random_colour(rng, lo=0, hi=255) -> np.ndarray:
    return rng.uniform(lo, hi, 3)


def _contrasting(rng, colour, min_diff=90.0) -> np.ndarray:
    """A random colour whose mean brightness differs from ``colour``'s by at least ``min_diff``."""
    target = float(np.sum(colour)) / 3.0
    for _ in range(20):
        c = _random_colour(rng)
        if abs(float(c[0] + c[1] + c[2]) / 3.0 - target) >= min_diff:
            return c
    return 255.0 - np.asarray(colour)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (yy, xx), each (size, size) float32; cached, never written to."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise: a random cells x cells grid upsampled bilinearly to size x size."""
    small = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(small if channels == 3 else small[..., 0], mode).resize(
        (size, size), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float32)
    return out if channels == 3 else out[..., None]


def _background(rng, size: int) -> np.ndarray:
    """A random (size, size, 3) float32 background: plain, gradient, blotchy, or striped."""
    kind = rng.integers(4)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == 0:
        return np.broadcast_to(c1.astype(np.float32), (size, size, 3)).copy()
    yy, xx = (g / size for g in _grid(size))
    if kind == 1:
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
        return (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)
    if kind == 2:
        n = _smooth_noise(rng, size, int(rng.integers(3, 7)))
        return (0.5 * n + 0.5 * c1).astype(np.float32)
    a = rng.uniform(0, math.pi)
    period = rng.uniform(0.15, 0.4)
    t = ((np.cos(a) * xx + np.sin(a) * yy) / period) % 1.0 < 0.5
    return np.where(t[..., None], c1, c2).astype(np.float32)


def _paint(canvas: np.ndarray, mask: Image.Image, fill) -> np.ndarray:
    """Alpha-blend ``fill`` (a colour or an image array) into ``canvas`` where ``mask`` (L) is on."""
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return canvas * (1.0 - m) + np.asarray(fill, dtype=np.float32) * m


def _pixels(points: np.ndarray, size: int) -> list:
    return [tuple(p) for p in (np.asarray(points) * size).tolist()]


def _polyline(draw: ImageDraw.ImageDraw, points_px: list, width: int, fill) -> None:
    """A thick polyline with round joints and caps (Pillow draws neither cap by itself)."""
    if len(points_px) >= 2:
        draw.line(points_px, fill=fill, width=width, joint="curve")
    r = width / 2.0
    for x, y in (points_px[0], points_px[-1]):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _arc(cx, cy, rx, ry, a0=0.0, a1=2 * math.pi, n=16) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _chaikin(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Corner-cutting smoothing of an open polyline (keeps both end points)."""
    for _ in range(iterations):
        if len(points) < 3:
            return points
        q = 0.75 * points[:-1] + 0.25 * points[1:]
        r = 0.25 * points[:-1] + 0.75 * points[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        points = np.concatenate([points[:1], mid, points[-1:]])
    return points
