"""The sketches domain: wobbly line drawings of objects (house, fish, umbrella ...)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .drawing import _arc, _paint, _pixels, _polyline, _rotation


def _seg(*pts):
    return np.array(pts, dtype=float)


_SKETCHES = {  # strokes in [-1, 1]^2, y down; the first stroke is never dropped
    "house": [_seg((-0.7, 0), (-0.7, 0.8), (0.7, 0.8), (0.7, 0), (-0.7, 0)),
              _seg((-0.85, 0.05), (0, -0.75), (0.85, 0.05)),
              _seg((-0.15, 0.8), (-0.15, 0.35), (0.15, 0.35), (0.15, 0.8))],
    "tree": [_arc(0, -0.3, 0.6, 0.55), _seg((-0.1, 0.2), (-0.12, 0.9)), _seg((0.1, 0.2), (0.12, 0.9))],
    "car": [_seg((-0.9, 0.3), (-0.9, 0.0), (-0.5, -0.05), (-0.3, -0.4), (0.3, -0.4), (0.5, -0.05),
                 (0.9, 0.0), (0.9, 0.3), (-0.9, 0.3)),
            _arc(-0.5, 0.35, 0.18, 0.18), _arc(0.5, 0.35, 0.18, 0.18)],
    "fish": [_arc(-0.1, 0, 0.65, 0.38), _seg((0.55, 0), (0.95, -0.35), (0.95, 0.35), (0.55, 0)),
             _arc(-0.45, -0.08, 0.06, 0.06, n=8)],
    "cup": [_seg((-0.5, -0.5), (-0.4, 0.6), (0.4, 0.6), (0.5, -0.5)),
            _arc(0.55, 0.0, 0.22, 0.25, -math.pi / 2, math.pi / 2, 10), _seg((-0.5, -0.5), (0.5, -0.5))],
    "umbrella": [_arc(0, 0, 0.85, 0.6, math.pi, 2 * math.pi, 16) + [0, 0.0],
                 _seg((-0.85, 0), (0.85, 0)), _seg((0, 0), (0, 0.75)) ,
                 _arc(-0.15, 0.75, 0.15, 0.15, 0, math.pi, 8)],
    "sun": [_arc(0, 0, 0.4, 0.4)] + [_seg((0.55 * math.cos(t), 0.55 * math.sin(t)),
                                          (0.9 * math.cos(t), 0.9 * math.sin(t)))
                                     for t in np.linspace(0, 2 * math.pi, 9)[:-1]],
    "cloud": [np.concatenate([_arc(-0.5, 0.1, 0.35, 0.3, math.pi / 2, 3 * math.pi / 2, 8),
                              _arc(-0.1, -0.2, 0.4, 0.35, math.pi, 2 * math.pi, 8),
                              _arc(0.45, 0.05, 0.35, 0.3, -math.pi / 2, math.pi / 2, 8)]),
              _seg((0.45, 0.35), (-0.5, 0.4))],
    "flower": [_arc(0, -0.3, 0.15, 0.15, n=10)]
              + [_arc(0.33 * math.cos(t), -0.3 + 0.33 * math.sin(t), 0.17, 0.17, n=10)
                 for t in np.linspace(0, 2 * math.pi, 6)[:-1]]
              + [_seg((0, 0.2), (0.05, 0.95))],
    "key": [_arc(-0.55, 0, 0.3, 0.3), _seg((-0.25, 0), (0.85, 0)),
            _seg((0.55, 0), (0.55, 0.3)), _seg((0.75, 0), (0.75, 0.25))],
    "lamp": [_seg((-0.45, -0.2), (-0.25, -0.75), (0.25, -0.75), (0.45, -0.2), (-0.45, -0.2)),
             _seg((0, -0.2), (0, 0.7)), _seg((-0.4, 0.75), (0.4, 0.75))],
    "boat": [_seg((-0.9, 0.3), (-0.6, 0.7), (0.6, 0.7), (0.9, 0.3), (-0.9, 0.3)),
             _seg((0, 0.3), (0, -0.9)), _seg((0, -0.8), (0.6, 0.15), (0, 0.15))],
    "apple": [_arc(0, 0.15, 0.65, 0.6), _seg((0, -0.45), (0.1, -0.85)),
              _arc(0.3, -0.65, 0.2, 0.1, n=10)],
    "envelope": [_seg((-0.85, -0.5), (0.85, -0.5), (0.85, 0.5), (-0.85, 0.5), (-0.85, -0.5)),
                 _seg((-0.85, -0.5), (0, 0.1), (0.85, -0.5))],
    "clock": [_arc(0, 0, 0.8, 0.8, n=20), _seg((0, 0), (0, -0.55)), _seg((0, 0), (0.4, 0.1))],
    "glasses": [_arc(-0.45, 0, 0.32, 0.28), _arc(0.45, 0, 0.32, 0.28), _seg((-0.13, 0), (0.13, 0)),
                _seg((-0.77, 0), (-0.95, -0.2)), _seg((0.77, 0), (0.95, -0.2))],
}
SKETCH_CLASSES = list(_SKETCHES)


def _draw_sketches(rng, label, size, ctx):
    strokes = _SKETCHES[SKETCH_CLASSES[label]]
    paper = rng.uniform(190, 255, 3)
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(paper * (1 - 0.15 * rng.random() * yy), (size, size, 3)).copy()
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    a = (np.array([[rng.uniform(0.85, 1.15), rng.uniform(-0.15, 0.15)], [0, 1]])
         @ _rotation(rng.uniform(-15, 15)) * rng.uniform(0.3, 0.44))
    shift = 0.5 + rng.uniform(-0.08, 0.08, 2)
    width = max(2, int(size * rng.uniform(0.025, 0.06)))
    for k, stroke in enumerate(strokes):
        if k > 0 and rng.random() < 0.1:
            continue
        pts = stroke + rng.normal(0, 0.05, stroke.shape)
        _polyline(d, _pixels(pts @ a.T + shift, size), width, 255)
    if rng.random() < 0.4:  # a stray scribble
        s = rng.uniform(0.05, 0.95, (3, 2))
        _polyline(d, _pixels(s, size), max(1, width - 1), 255)
    ink = rng.uniform(0, 80, 3)
    if rng.random() < 0.3:
        ink[2] += 100  # blue ball-point
    return _paint(canvas, mask, ink), rng.uniform(2, 12)
