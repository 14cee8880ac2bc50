"""Strided convolutions build their columns from the input's phases: the readable im2col's matrix."""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

from npmask import config
from npmask.nn import conv_columns
from npmask.nn.conv import conv2d_backward, conv2d_forward, conv_output_size, im2col

# (c, h, w, kh, kw, stride, padding): strides 2 and 3, odd and even sizes, padding 0-2, kernels
# larger than the stride and smaller, a 1x1 kernel with padding (no shortcut through the transpose)
GEOMETRIES = [(3, 9, 9, 3, 3, 2, 1), (2, 8, 8, 3, 3, 2, 1), (2, 7, 10, 3, 2, 2, 0),
              (4, 11, 9, 5, 5, 3, 2), (2, 6, 7, 2, 3, 3, 1), (3, 9, 8, 1, 1, 2, 1), (1, 5, 5, 3, 3, 2, 2)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_phased_columns_are_the_readable_im2col_bit_for_bit(geometry, dtype, monkeypatch):
    """Chunks of 1 to nb images, one after the other on the same buffers (the phases' padding must
    stay zero, and a short chunk must not read a longer one's images), against conv.im2col."""
    monkeypatch.setattr(conv_columns, "PHASED_MIN_WIDTH", 1)
    c, h, w, kh, kw, s, p = geometry
    ho, wo = conv_output_size(h, kh, s, p), conv_output_size(w, kw, s, p)
    rng = np.random.default_rng(sum(geometry))
    cols = conv_columns._Columns(np, dtype, 3, c, h, w, kh, kw, s, p, p, ho, wo)
    assert cols.phased
    for m in (3, 1, 2, 3):
        x = rng.standard_normal((m, c, h, w)).astype(dtype)
        np.testing.assert_array_equal(cols.cols(x), im2col(x, kh, kw, s, p))


class _OtherArrays:
    """An array module that is not NumPy (CuPy's place in _Columns)."""
    zeros, empty = staticmethod(np.zeros), staticmethod(np.empty)


def test_phases_only_where_the_output_rows_are_long_enough():
    """WRN-16-1's 32x32 -> 16x16 layer takes the phases; its 16x16 -> 8x8 and 8x8 -> 4x4 layers, the
    stride-1 layouts, a strided 1x1 without padding and another array module than NumPy do not."""
    def layout(c, h, kh, s, p, xp=np):
        ho = conv_output_size(h, kh, s, p)
        return conv_columns._Columns(xp, np.float32, 2, c, h, h, kh, kh, s, p, p, ho, ho).phased
    assert layout(16, 32, 3, 2, 1)
    assert not layout(16, 16, 3, 2, 1) and not layout(32, 8, 3, 2, 1)
    assert not layout(16, 32, 3, 1, 1) and not layout(16, 32, 1, 2, 0)
    assert not layout(16, 32, 3, 2, 1, xp=_OtherArrays)


@contextlib.contextmanager
def _min_width(monkeypatch, width):
    with monkeypatch.context() as patch:
        patch.setattr(conv_columns, "PHASED_MIN_WIDTH", width)
        yield


@pytest.mark.parametrize("threads, chunk_floats", list(itertools.product([1, 3], [1, 1 << 20])))
def test_phases_give_the_convolution_bit_for_bit(threads, chunk_floats, monkeypatch):
    """A strided layer's forward, input and weight gradients with the phases are those of the
    strided window copies, bit for bit, and the readable path's within rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 6, 17, 18)).astype(np.float32)
    weight = rng.standard_normal((7, 6, 3, 3)).astype(np.float32)
    dy = None
    results = []
    for width, impl in ((10 ** 9, "fast"), (1, "fast"), (1, "readable")):
        with _min_width(monkeypatch, width), config.using(threads=threads, conv_chunk_floats=chunk_floats,
                                                           conv_impl=impl):
            y, cache = conv2d_forward(x, weight, None, 2, 1, keep_columns=True)
            dy = rng.standard_normal(y.shape).astype(np.float32) if dy is None else dy
            results.append((y, *conv2d_backward(dy, cache)[:2]))
    for window, phased, readable in zip(*results):
        np.testing.assert_array_equal(phased, window)
        np.testing.assert_allclose(phased, readable, rtol=1e-5, atol=1e-5 * float(np.abs(readable).max()))
