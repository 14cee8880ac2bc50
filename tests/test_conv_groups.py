"""Folded rows take a group of images per NumPy call: the same bits as one image per call."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from npmask import config
from npmask.nn import conv_columns
from npmask.nn.conv import conv2d_backward, conv2d_forward

# (n, c, o, h, w, k): 'same'-size stride-1 convolutions, odd batch sizes so that the last group
# is short
GEOMETRIES = [(7, 3, 4, 16, 16, 3), (5, 2, 3, 9, 11, 3), (6, 16, 16, 32, 32, 3), (3, 2, 2, 6, 7, 5),
              (1, 4, 5, 16, 16, 3)]


def _pass(x, weight, dy, padding):
    y, cache = conv2d_forward(x, weight, None, 1, padding)
    dx, dw, _ = conv2d_backward(dy, cache)
    return y, dx, dw


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("threads", [1, 3])
def test_grouped_folded_rows_give_the_bits_of_one_image_per_call(geometry, threads, monkeypatch):
    """Forward, input gradient and weight gradient with groups of 2, 3 or all images per call are
    bit for bit those of one image per call (the group is only a speed setting), on one thread or
    several, and agree with the readable im2col path; the weight gradient adds the images in order."""
    n, c, o, h, w, k = geometry
    padding = k // 2
    rng = np.random.default_rng(n * 100 + c)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
    dy = rng.standard_normal((n, o, h, w)).astype(np.float32)
    per_image = c * k * (h + 2 * padding) * w
    with contextlib.ExitStack() as stack:
        stack.enter_context(config.using(folded_min_pixels=0, threads=threads, parallel_min_flops=0))
        assert conv_columns._folds(np, n, c, h, w, k, k, 1, padding, padding, h, w)
        monkeypatch.setattr(conv_columns, "FOLDED_GROUP_FLOATS", 0)
        assert conv_columns._FoldedRows.group(n, c, h, w, k, k, padding) == 1
        one = _pass(x, weight, dy, padding)
        for group in (2, 3, n):
            monkeypatch.setattr(conv_columns, "FOLDED_GROUP_FLOATS", group * per_image)
            assert conv_columns._FoldedRows.group(n, c, h, w, k, k, padding) == min(group, n)
            for got, want in zip(_pass(x, weight, dy, padding), one):
                np.testing.assert_array_equal(got, want)
        with config.using(conv_impl="readable"):
            readable = _pass(x, weight, dy, padding)
    for got, want in zip(one, readable):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(np.abs(want).max()))


def test_the_default_groups_small_images_only():
    """WRN-16-1's 16-channel 32x32 layers go two images per call, its 32-channel 16x16 ones four;
    WRN-28-4's 64x64 layers stay at one image per call."""
    group = conv_columns._FoldedRows.group
    assert group(32, 16, 32, 32, 3, 3, 1) == 2
    assert group(32, 32, 16, 16, 3, 3, 1) == 4
    assert group(32, 64, 64, 64, 3, 3, 1) == 1
    assert group(1, 16, 32, 32, 3, 3, 1) == 1
