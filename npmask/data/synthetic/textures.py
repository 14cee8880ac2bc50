"""The textures domain (DTD-like): procedural stripes, checks, cells, marble ..."""
from __future__ import annotations

import math

import numpy as np

from .drawing import _contrasting, _grid, _random_colour, _smooth_noise


TEXTURE_CLASSES = ["striped", "zigzagged", "wavy", "chequered", "dotted", "grid", "ringed",
                   "spoked", "cellular", "marbled", "blotchy", "grainy", "bricked", "scaly"]


def _texture(rng, name, size):
    """A (size, size) float pattern in [0, 1] for texture class ``name`` (random scale/angle)."""
    yy, xx = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    u = np.cos(a) * xx + np.sin(a) * yy + rng.uniform(0, 100)
    v = -np.sin(a) * xx + np.cos(a) * yy + rng.uniform(0, 100)
    p = rng.uniform(0.09, 0.2) * size
    if name == "striped":
        return ((u / p) % 1.0 < rng.uniform(0.3, 0.6)).astype(np.float32)
    if name == "zigzagged":
        q = rng.uniform(0.7, 1.5) * p
        tri = np.abs((v / q) % 2.0 - 1.0) * q * rng.uniform(0.5, 1.2)
        return (((u + tri) / p) % 1.0 < 0.5).astype(np.float32)
    if name == "wavy":
        q = rng.uniform(1.5, 3.0) * p
        return (((u + rng.uniform(0.3, 0.8) * p * np.sin(2 * math.pi * v / q)) / p) % 1.0 < 0.5
                ).astype(np.float32)
    if name == "chequered":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if name == "dotted":
        du, dv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return (du * du + dv * dv < rng.uniform(0.04, 0.12)).astype(np.float32)
    if name == "grid":
        w = rng.uniform(0.1, 0.22)
        return ((np.abs((u / p) % 1.0 - 0.5) > 0.5 - w) | (np.abs((v / p) % 1.0 - 0.5) > 0.5 - w)
                ).astype(np.float32)
    if name in ("ringed", "spoked"):
        cx, cy = rng.uniform(-0.2, 1.2, 2) * size
        if name == "ringed":
            dist = np.hypot(xx - cx, yy - cy)
            return ((dist / (0.7 * p)) % 1.0 < 0.5).astype(np.float32)
        ang = np.arctan2(yy - cy, xx - cx)
        return ((ang * rng.integers(6, 14) / (2 * math.pi)) % 1.0 < 0.5).astype(np.float32)
    if name == "cellular":
        pts = rng.uniform(0, size, (int(rng.integers(8, 20)), 2))
        dist = np.sort(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
        return (dist[..., 1] - dist[..., 0] < rng.uniform(1.5, 3.5)).astype(np.float32)
    if name == "marbled":
        turb = _smooth_noise(rng, size, int(rng.integers(3, 6)), 1)[..., 0] / 255.0
        return 0.5 + 0.5 * np.sin(2 * math.pi * (u / (2 * p) + rng.uniform(1.5, 3.0) * turb))
    if name == "blotchy":
        n = _smooth_noise(rng, size, int(rng.integers(4, 9)), 1)[..., 0]
        return (n > np.median(n)).astype(np.float32)
    if name == "grainy":
        return rng.random((size, size), dtype=np.float32)
    if name == "bricked":
        row = np.floor(v / p)
        uu = u + (row % 2) * p
        mortar = ((v / p) % 1.0 < 0.18) | ((uu / (2 * p)) % 1.0 < 0.09)
        return (~mortar).astype(np.float32)
    if name == "scaly":
        row = np.floor(v / p)
        du = ((u + (row % 2) * p / 2) / p) % 1.0 - 0.5
        dv = (v / p) % 1.0
        return (np.hypot(du, dv) % 0.5 < 0.33).astype(np.float32)
    raise ValueError(name)  # pragma: no cover


def _draw_textures(rng, label, size, ctx):
    t = _texture(rng, TEXTURE_CLASSES[label], size)[..., None]
    c1 = _random_colour(rng)
    c2 = _contrasting(rng, c1, rng.uniform(30, 110))
    canvas = c1 * t + c2 * (1 - t)
    shade = _smooth_noise(rng, size, 3, 1) / 255.0  # uneven lighting
    canvas = canvas * (0.7 + 0.5 * shade)
    return canvas, rng.uniform(3, 14)
