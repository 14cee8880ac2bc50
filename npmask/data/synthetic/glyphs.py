"""The glyphs domain (Omniglot-like): characters of invented alphabets drawn with jittered strokes."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .drawing import _chaikin, _pixels, _polyline, _rotation


N_ALPHABETS, CHARS_PER_ALPHABET = 5, 10
GLYPH_CLASSES = [f"alphabet{a}_char{c:02d}" for a in range(N_ALPHABETS) for c in range(CHARS_PER_ALPHABET)]


def glyph_prototypes(seed: int) -> list:
    """The characters: per class a list of strokes (control points in [0, 1]^2) and a style.

    Each alphabet has a style (number of strokes, segments per stroke, curvy or angular), so
    characters of one alphabet look alike, as in Omniglot.
    """
    rng = np.random.default_rng([seed, 9001])
    classes = []
    for a in range(N_ALPHABETS):
        curvy = bool(a % 2)
        n_strokes = (1 + a % 3, 3 + a % 2)
        for _ in range(CHARS_PER_ALPHABET):
            strokes = []
            for _ in range(rng.integers(n_strokes[0], n_strokes[1] + 1)):
                pts = [rng.uniform(0.2, 0.8, 2)]
                for _ in range(rng.integers(1, 4)):
                    step = rng.uniform(0.2, 0.45) * np.array(
                        [math.cos(t := rng.uniform(0, 2 * math.pi)), math.sin(t)])
                    pts.append(np.clip(pts[-1] + step, 0.12, 0.88))
                strokes.append(np.array(pts))
            # centre the character and give it a similar extent (0.5-0.7 of the frame)
            allpts = np.concatenate(strokes)
            lo, hi = allpts.min(axis=0), allpts.max(axis=0)
            scale = rng.uniform(0.5, 0.7) / max(float((hi - lo).max()), 0.1)
            strokes = [(st - (lo + hi) / 2) * scale + 0.5 for st in strokes]
            classes.append({"strokes": strokes, "curvy": curvy})
    return classes


def _draw_glyphs(rng, label, size, ctx):
    proto = ctx["glyphs"][label]
    paper = rng.uniform(200, 255)
    ink = rng.uniform(0, 90)
    img = Image.new("L", (size, size), int(paper))
    d = ImageDraw.Draw(img)
    a = (np.array([[1, rng.uniform(-0.2, 0.2)], [0, 1]]) @ _rotation(rng.uniform(-15, 15))
         * rng.uniform(0.75, 1.05))
    shift = 0.5 + rng.uniform(-0.08, 0.08, 2)
    width = max(2, int(size * rng.uniform(0.035, 0.08)))
    for stroke in proto["strokes"]:
        if rng.random() < 0.05 and len(proto["strokes"]) > 1:
            continue  # a stroke occasionally left out, as a hurried writer would
        pts = stroke + rng.normal(0, 0.035, stroke.shape)
        if proto["curvy"]:
            pts = _chaikin(pts, 3)
        pts = (pts - 0.5) @ a.T + shift
        _polyline(d, _pixels(pts, size), width, int(ink))
    g = np.asarray(img, dtype=np.float32)
    return np.repeat(g[..., None], 3, axis=2), rng.uniform(2, 12)
