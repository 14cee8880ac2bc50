"""The digits domain (SVHN-like): a house-number-like digit between two cut-off neighbours."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFilter

from .drawing import _contrasting, _font, _paint, _random_colour, _smooth_noise


DIGIT_CLASSES = [str(i) for i in range(10)]


def _draw_digits(rng, label, size, ctx):
    base = _random_colour(rng)
    canvas = 0.6 * _smooth_noise(rng, size, int(rng.integers(2, 6))) + 0.4 * base
    text = f"{rng.integers(10)}{label}{rng.integers(10)}"
    font = _font(ctx["fonts"][rng.integers(len(ctx["fonts"]))], int(size * rng.uniform(0.55, 0.85)))
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    # digits are equally wide in these fonts, so the middle one of three sits at the anchor
    cx = size * (0.5 + rng.uniform(-0.07, 0.07))
    cy = size * (0.5 + rng.uniform(-0.08, 0.08))
    spacing = rng.uniform(-0.06, 0.12) * size
    w = font.getlength("0") + spacing
    for k, ch in enumerate(text):
        d.text((cx + (k - 1) * w, cy), ch, font=font, fill=255, anchor="mm")
    mask = mask.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR,
                       center=(cx, cy)).filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.6)))
    ink = _contrasting(rng, canvas.mean(axis=(0, 1)), rng.uniform(45, 110))
    if rng.random() < 0.3:  # a drop shadow / outline in a third colour
        shadow = mask.transform(mask.size, Image.AFFINE, (1, 0, -2, 0, 1, -2))
        canvas = _paint(canvas, shadow, _random_colour(rng))
    return _paint(canvas, mask, ink), rng.uniform(4, 16)
