"""npmask's run-time settings: one object, read by the code at call time, changed with :func:`using`.

    from npmask import config
    config.settings.threads                 # how many threads npmask's CPU code uses
    with config.using(threads=1, conv_impl="readable"):
        ...                                 # the plain serial code and the readable convolution

None of these settings changes what a layer computes: the thread count, the thresholds and, on
NumPy, ``fuse_bn_relu`` do not change a single bit of the results (tested); the convolution's chunk
sizes, layouts and ``conv_impl`` (and ``fuse_bn_relu`` on CuPy) change only the order of the
roundings (the results agree to float32 rounding); ``cuda_conv_kernels`` (CuPy only) is meant to
give the same bits as without it (tested by emulation; not yet run on a GPU). They trade speed
only; the measurements behind each default are in ``benchmarks/results/`` (``conv_cpu.txt``,
``train_step_cpu.txt``, ``code_comment_figures.md``).

The settings are process-wide, like ``chainer.config``'s global defaults, not per thread: npmask's
helper threads must see the values of the thread that hands them the work. Change them from the
thread that runs the model (the training loop's), not while a forward or backward pass is running.

This module imports nothing from npmask, so every module may read it.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["Settings", "settings", "using", "default_threads"]


def default_threads() -> int:
    """``NPMASK_THREADS`` if set (a positive integer), else the usable CPUs, at most 4."""
    env = os.environ.get("NPMASK_THREADS")
    if env:
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"NPMASK_THREADS must be a positive integer, got {env!r}")
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))            # the CPUs this process may run on
    except AttributeError:                             # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))                        # memory bandwidth is saturated beyond ~4


# name: (type, what it is and why its default; the measurements are in benchmarks/results/)
_DOCS = {
    "threads": (int, "threads that share npmask's CPU work (1: the plain serial code); beyond ~4 "
                     "memory bandwidth, not cores, limits it"),
    "parallel_min_floats": (int, "elementwise work under this many floats stays on the calling "
                                 "thread: handing work to a thread costs tens of microseconds"),
    "parallel_min_flops": (int, "GEMM work (each_chunk) under this many flops stays on the calling "
                                "thread, for the same reason"),
    "conv_chunk_floats": (int, "column floats per chunk of images on the CPU, so that a chunk's "
                               "columns are still in cache when its GEMM reads them"),
    "conv_chunks_multiple": (int, "the number of chunks is a multiple of this (when the batch "
                                  "allows), so that 2 or 4 threads finish a pass together"),
    "gpu_chunk_floats": (int, "column floats per chunk on a GPU: large, since a loop over chunks "
                              "would only add kernel launches"),
    "shifted_rows": (bool, "stride-1 convolutions with Wo = W build their columns from contiguous "
                           "slices of the flattened image (faster copies); False: the general layout"),
    "folded_rows": (bool, "NumPy 'same'-size stride-1 convolutions copy only the kernel's column "
                          "shifts and run one GEMM per kernel row (a third of the copying)"),
    "folded_min_pixels": (int, "folded rows only on images of at least this many pixels: on 8x8 "
                               "images their GEMMs are too small to pay"),
    "conv_keep_columns_floats": (int, "a training strided convolution (3x3 stride 2) whose "
                                      "column matrix (the whole batch's) has at most this many "
                                      "floats keeps it from the forward pass for its weight "
                                      "gradient instead of building it again: the small networks' "
                                      "layers, not WRN-28-4's (its memory does not grow); 0: never"),
    "fuse_bn_relu": (bool, "a batch norm directly followed by ReLU (and a residual block's sum "
                           "before its ReLU) runs as one layer: the ReLU and the addition inside "
                           "batch norm's passes, the ReLU's mask taken from the output (the same "
                           "bits on NumPy; fused CUDA kernels on CuPy, also for a batch norm with no "
                           "ReLU after it); False: the separate BatchNorm2d, addition and ReLU "
                           "modules, as the code reads"),
    "cuda_conv_kernels": (bool, "on CuPy, a convolution's im2col and its input gradient's col2im "
                                "each run as ONE CUDA kernel (npmask/nn/conv_cuda.py) instead of a "
                                "strided copy or addition per kernel offset: fewer kernel launches, "
                                "the same bits expected; off by default: not yet run on a GPU. "
                                "NumPy ignores it"),
    "conv_impl": (str, "'fast' (conv_fast.py, the default) or 'readable' (the im2col + GEMM + "
                       "col2im of conv.py, for teaching and for testing the fast path against)"),
}
_CHOICES = {"conv_impl": ("fast", "readable")}


class Settings:
    """The settings, as attributes; see ``Settings.describe()`` for each one's meaning and why."""

    __slots__ = tuple(name for name in _DOCS if name != "threads") + ("_threads",)

    def __init__(self):
        # NPMASK_THREADS is read at first use, not at import: a bad value then reaches the user
        # as the commands' one-line error instead of a traceback from an import.
        object.__setattr__(self, "_threads", None)
        self.parallel_min_floats = 1 << 18     # 256K floats, 1 MB
        self.parallel_min_flops = 1 << 26      # 64M flops, ~0.5 ms on one core
        self.conv_chunk_floats = 1 << 20       # 4 MB in float32: one to a few images
        self.conv_chunks_multiple = 4
        self.gpu_chunk_floats = 1 << 26        # 256 MB in float32: in practice the whole batch
        self.shifted_rows = True
        self.folded_rows = True
        self.folded_min_pixels = 256           # 16x16 images and larger
        self.conv_keep_columns_floats = 1 << 21  # 8 MB: WRN-16-1/28-1 at 32x32, not WRN-28-4's layers
        self.fuse_bn_relu = True
        self.cuda_conv_kernels = False
        self.conv_impl = "fast"

    @property
    def threads(self) -> int:
        if self._threads is None:
            object.__setattr__(self, "_threads", default_threads())
        return self._threads

    @threads.setter
    def threads(self, value) -> None:
        object.__setattr__(self, "_threads", _checked("threads", value))

    def __setattr__(self, name, value):
        if name == "threads":
            Settings.threads.fset(self, value)
            return
        object.__setattr__(self, name, _checked(name, value))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in _DOCS}

    @staticmethod
    def describe() -> str:
        return "\n".join(f"{name}: {doc}" for name, (_, doc) in _DOCS.items())

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


def _checked(name: str, value):
    """``value`` if it is a valid value of setting ``name``; a clear error otherwise."""
    if name not in _DOCS:
        raise AttributeError(f"npmask.config has no setting {name!r}; the settings are: "
                             f"{', '.join(_DOCS)}")
    kind = _DOCS[name][0]
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"setting {name} must be True or False, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "threads" else 0):
            least = "a positive" if name == "threads" else "a non-negative"
            raise ValueError(f"setting {name} must be {least} integer, got {value!r}")
    elif value not in _CHOICES[name]:
        raise ValueError(f"setting {name} must be one of {_CHOICES[name]}, got {value!r}")
    return value


settings = Settings()


@contextlib.contextmanager
def using(**overrides):
    """Context manager: the given settings take these values until exit (also on an exception).

    Every name and value is checked before any is changed; nested ``using`` blocks restore in turn.
    """
    for name, value in overrides.items():
        _checked(name, value)
    saved = {name: getattr(settings, name) for name in overrides}
    try:
        for name, value in overrides.items():
            setattr(settings, name, value)
        yield settings
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
