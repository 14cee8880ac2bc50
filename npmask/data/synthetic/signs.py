"""The signs domain (GTSRB-like): speed limits, warnings, arrows and other traffic-sign symbols."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .drawing import _font, _polyline, _random_colour, _rotation, _smooth_noise


_SPEEDS = ("20", "30", "50", "60", "70", "80", "100", "120")
SIGN_CLASSES = ([f"speed_{s}" for s in _SPEEDS]
                + ["warn_general", "warn_curve_left", "warn_curve_right", "warn_crossroads",
                   "warn_double_curve",
                   "ahead_only", "turn_left", "turn_right", "keep_left", "keep_right",
                   "stop", "yield", "priority_road", "no_entry", "end_restrictions"])
_RED, _WHITE, _BLACK = (200, 20, 30), (245, 245, 240), (20, 20, 20)
_BLUE, _YELLOW = (20, 70, 180), (250, 200, 20)
_ARROWS = {  # unit-coordinate polylines (y down) for the arrow symbols, head at the last point
    "ahead_only": [(0, 0.6), (0, -0.55)],
    "turn_left": [(0.25, 0.6), (0.25, -0.05), (-0.6, -0.05)],
    "turn_right": [(-0.25, 0.6), (-0.25, -0.05), (0.6, -0.05)],
    "keep_left": [(0.45, -0.45), (-0.45, 0.45)],
    "keep_right": [(-0.45, -0.45), (0.45, 0.45)],
    "warn_curve_left": [(0.15, 0.5), (0.15, 0.0), (-0.3, -0.35)],
    "warn_curve_right": [(-0.15, 0.5), (-0.15, 0.0), (0.3, -0.35)],
    "warn_double_curve": [(0.0, 0.5), (0.25, 0.2), (-0.2, -0.1), (0.1, -0.4)],
}


def _arrow(d, points, cx, cy, scale, width, fill, head=True):
    pts = np.array(points, dtype=float) * scale + [cx, cy]
    if head:
        tip, prev = pts[-1], pts[-2]
        direction = (tip - prev) / (np.linalg.norm(tip - prev) + 1e-9)
        normal = np.array([-direction[1], direction[0]])
        hl = 2.2 * width
        base = tip - direction * hl
        d.polygon([tuple(tip), tuple(base + normal * hl * 0.8), tuple(base - normal * hl * 0.8)],
                  fill=fill)
        pts[-1] = base + direction * 0.3 * width
    _polyline(d, [tuple(p) for p in pts.tolist()], max(1, int(width)), fill)


def _draw_sign(d, name, c, r, fonts, rng):
    cx, cy = c
    circle = [cx - r, cy - r, cx + r, cy + r]
    fontname = fonts[rng.integers(len(fonts))]
    if name.startswith("speed_"):
        d.ellipse(circle, fill=_WHITE, outline=_RED, width=max(2, int(0.2 * r)))
        text = name.split("_")[1]
        font = _font(fontname, int(r * (0.95 if len(text) == 2 else 0.72)))
        d.text((cx, cy), text, font=font, fill=_BLACK, anchor="mm")
    elif name.startswith("warn_"):
        tri = [(cx, cy - r), (cx + 0.95 * r, cy + 0.7 * r), (cx - 0.95 * r, cy + 0.7 * r)]
        d.polygon(tri, fill=_WHITE, outline=_RED, width=max(2, int(0.18 * r)))
        sy, s = cy + 0.18 * r, 0.55 * r
        if name == "warn_general":
            d.rectangle([cx - 0.07 * r, sy - 0.4 * r, cx + 0.07 * r, sy + 0.12 * r], fill=_BLACK)
            d.ellipse([cx - 0.08 * r, sy + 0.22 * r, cx + 0.08 * r, sy + 0.38 * r], fill=_BLACK)
        elif name == "warn_crossroads":
            d.rectangle([cx - 0.07 * r, sy - 0.42 * r, cx + 0.07 * r, sy + 0.4 * r], fill=_BLACK)
            d.rectangle([cx - 0.4 * r, sy - 0.07 * r, cx + 0.4 * r, sy + 0.07 * r], fill=_BLACK)
        else:
            _arrow(d, _ARROWS[name], cx, sy, s, 0.12 * r, _BLACK)
    elif name in ("ahead_only", "turn_left", "turn_right", "keep_left", "keep_right"):
        d.ellipse(circle, fill=_BLUE, outline=_WHITE, width=max(1, int(0.05 * r)))
        _arrow(d, _ARROWS[name], cx, cy, 0.7 * r, 0.16 * r, _WHITE)
    elif name == "stop":
        d.regular_polygon((cx, cy, r), 8, rotation=22.5, fill=_RED, outline=_WHITE,
                          width=max(1, int(0.06 * r)))
        d.text((cx, cy), "STOP", font=_font(fontname, int(0.5 * r)), fill=_WHITE, anchor="mm")
    elif name == "yield":
        tri = [(cx - r, cy - 0.7 * r), (cx + r, cy - 0.7 * r), (cx, cy + r)]
        d.polygon(tri, fill=_WHITE, outline=_RED, width=max(2, int(0.2 * r)))
    elif name == "priority_road":
        d.regular_polygon((cx, cy, r), 4, rotation=0, fill=_WHITE)
        d.regular_polygon((cx, cy, 0.68 * r), 4, rotation=0, fill=_YELLOW)
    elif name == "no_entry":
        d.ellipse(circle, fill=_RED)
        d.rectangle([cx - 0.65 * r, cy - 0.16 * r, cx + 0.65 * r, cy + 0.16 * r], fill=_WHITE)
    elif name == "end_restrictions":
        d.ellipse(circle, fill=_WHITE, outline=(60, 60, 60), width=max(1, int(0.06 * r)))
        for off in (-0.22, 0.0, 0.22):
            a = np.array([[-0.6, 0.6], [0.6, -0.6]]) * r + [cx + off * r, cy + off * r]
            d.line([tuple(a[0]), tuple(a[1])], fill=(60, 60, 60), width=max(1, int(0.07 * r)))
    else:  # pragma: no cover - the class list and this function are kept in step
        raise ValueError(name)


def _draw_signs(rng, label, size, ctx):
    canvas = 0.7 * _smooth_noise(rng, size, int(rng.integers(2, 8))) + 0.3 * _random_colour(rng)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    r = size * rng.uniform(0.27, 0.42)
    c = (size * (0.5 + rng.uniform(-0.08, 0.08)), size * (0.5 + rng.uniform(-0.08, 0.08)))
    _draw_sign(d, SIGN_CLASSES[label], c, r, ctx["fonts"], rng)
    # a mild random affine map (view angle): x' = A (x - c) + c, Pillow wants the inverse
    a = np.array([[rng.uniform(0.8, 1.1), rng.uniform(-0.15, 0.15)],
                  [rng.uniform(-0.15, 0.15), rng.uniform(0.85, 1.1)]]) @ _rotation(rng.uniform(-8, 8))
    inv = np.linalg.inv(a)
    cc = np.array(c)
    off = cc - inv @ cc
    layer = layer.transform((size, size), Image.AFFINE,
                            (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                            resample=Image.BILINEAR)
    layer = layer.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5)))
    rgba = np.asarray(layer, dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    canvas = canvas * (1 - alpha) + rgba[..., :3] * alpha
    canvas = canvas * rng.uniform(0.3, 1.2) + rng.uniform(-20, 30)  # illumination, as in GTSRB
    return canvas, rng.uniform(3, 14)
