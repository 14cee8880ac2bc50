"""The base domain (plays ImageNet): 20 shapes x 3 fills on cluttered backgrounds."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .drawing import (_arc, _background, _contrasting, _grid, _paint, _pixels, _random_colour,
                      _rotation)


def _regular(n, r=1.0, start=-math.pi / 2):
    return _arc(0, 0, r, r, start, start + 2 * math.pi, n + 1)[:-1]


def _star(n, inner):
    outer = _regular(n)
    inner_pts = _regular(n, inner, -math.pi / 2 + math.pi / n)
    pts = np.empty((2 * n, 2))
    pts[0::2], pts[1::2] = outer, inner_pts
    return pts


def _plus(w=0.33):
    return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                     [-w, w], [-1, w], [-1, -w], [-w, -w]])


def _heart(n=40):
    t = np.linspace(0, 2 * math.pi, n)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2], axis=1) / 16.5


_SHAPES = {  # name -> list of (polygon in [-1, 1]^2, value drawn into the mask)
    "circle": [(_regular(32), 255)],
    "ellipse": [(_regular(32) * [1.0, 0.55], 255)],
    "triangle": [(_regular(3) * 1.1 + [0, 0.2], 255)],
    "square": [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), 255)],
    "diamond": [(np.array([[0, -1], [0.75, 0], [0, 1], [-0.75, 0]]), 255)],
    "pentagon": [(_regular(5), 255)],
    "hexagon": [(_regular(6, start=0), 255)],
    "star5": [(_star(5, 0.42), 255)],
    "star8": [(_star(8, 0.6), 255)],
    "plus": [(_plus(), 255)],
    "xcross": [(_plus(0.28) @ _rotation(45).T, 255)],
    "ring": [(_regular(32), 255), (_regular(32, 0.55), 0)],
    "heart": [(_heart(), 255)],
    "crescent": [(_regular(32), 255), (_regular(32, 0.85) + [0.45, -0.1], 0)],
    "arrow": [(np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.7], [1, 0], [0.2, 0.7], [0.2, 0.25],
                         [-1, 0.25]]), 255)],
    "chevron": [(np.array([[-0.9, -0.9], [-0.3, -0.9], [0.6, 0], [-0.3, 0.9], [-0.9, 0.9],
                           [0, 0]]), 255)],
    "lshape": [(np.array([[-0.7, -1], [-0.2, -1], [-0.2, 0.5], [0.8, 0.5], [0.8, 1], [-0.7, 1]]), 255)],
    "tshape": [(np.array([[-0.9, -0.9], [0.9, -0.9], [0.9, -0.4], [0.25, -0.4], [0.25, 1],
                          [-0.25, 1], [-0.25, -0.4], [-0.9, -0.4]]), 255)],
    "semicircle": [(np.concatenate([_arc(0, 0.3, 1, 1, math.pi, 2 * math.pi, 24)]), 255)],
    "bar": [(np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]), 255)],
}
_FILLS = ("solid", "striped", "spotted")
BASE_CLASSES = [f"{s}_{f}" for s in _SHAPES for f in _FILLS]


def _fill_pattern(rng, size, kind, c1, c2):
    if kind == "solid":
        return c1
    yy, xx = _grid(size)
    a = rng.uniform(0, math.pi)
    period = rng.uniform(0.09, 0.16) * size
    u = np.cos(a) * xx + np.sin(a) * yy
    v = -np.sin(a) * xx + np.cos(a) * yy
    if kind == "striped":
        on = (u / period) % 1.0 < 0.5
    else:  # spotted: a lattice of dots
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        on = du * du + dv * dv < 0.09
    return np.where(on[..., None], c1, c2).astype(np.float32)


def _shape_mask(size, shape, cx, cy, radius, angle, aspect):
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    rot = _rotation(angle).T
    for poly, value in _SHAPES[shape]:
        pts = (poly * [aspect, 1.0]) @ rot * radius + [cx, cy]
        d.polygon(_pixels(pts, size), fill=value)
    return mask


def _draw_base(rng, label, size, ctx):
    shape, fill = BASE_CLASSES[label].rsplit("_", 1)
    canvas = _background(rng, size)
    for _ in range(rng.integers(0, 3)):  # small distractor shapes
        other = list(_SHAPES)[rng.integers(len(_SHAPES))]
        m = _shape_mask(size, other, rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9),
                        rng.uniform(0.06, 0.11), rng.uniform(-180, 180), 1.0)
        canvas = _paint(canvas, m, _random_colour(rng))
    c1 = _random_colour(rng)
    c2 = _contrasting(rng, c1, 60)
    mask = _shape_mask(size, shape, 0.5 + rng.uniform(-0.13, 0.13), 0.5 + rng.uniform(-0.13, 0.13),
                       rng.uniform(0.22, 0.38), rng.uniform(-20, 20), rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:  # a contrasting outline makes the shape stand out from any background
        edge = mask.filter(ImageFilter.MaxFilter(3))
        canvas = _paint(canvas, edge, _contrasting(rng, c1, 60))
    return _paint(canvas, mask, _fill_pattern(rng, size, fill, c1, c2)), rng.uniform(0, 10)
