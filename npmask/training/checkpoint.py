"""Atomic checkpoints: nested training state (arrays, numbers, strings) in one ``.npz`` file.

A checkpoint holds everything needed to continue a run exactly where it stopped: the trainable
state of the model, the optimisers' moments and step counts, the learning-rate schedulers, the
epoch counter and any random-generator states. Such state is a nested structure of dicts and lists
whose leaves are arrays or plain values; :func:`flatten` splits it into

- a dict of NumPy arrays (``"a0"``, ``"a1"``, ...), stored as the ``.npz`` members, and
- a JSON *skeleton* that records the structure, the plain values and, where an array was, a
  reference ``{"__array__": "a3"}``. The skeleton is stored in the same file as a uint8 member
  ``"__skeleton__"``, so one file is one checkpoint.

Why one file and ``os.replace`` (:func:`npmask.io.atomic_write_bytes`): the file is written to a
temporary name in the same folder, flushed to disk, and renamed over the old checkpoint. A rename within one file system is atomic,
so a reader (or a resumed run) sees either the old complete checkpoint or the new complete one,
never a half-written file, whenever the process is killed. Loading uses ``allow_pickle=False``:
a checkpoint can never execute code.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..backend import to_numpy
from ..io import atomic_write_bytes, open_npz

SKELETON_KEY = "__skeleton__"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not in the expected format."""


# ---------------------------------------------------------------------------------------- flatten
def _is_array(x) -> bool:
    # numpy arrays, and cupy arrays (anything array-like with a dtype and a shape that is not a
    # numpy scalar); numpy scalars (np.float32(1.0)) are stored as plain numbers.
    return hasattr(x, "dtype") and hasattr(x, "shape") and not isinstance(x, np.generic)


def flatten(state) -> tuple[dict, dict[str, np.ndarray]]:
    """Split nested ``state`` into (JSON-able skeleton, {member name: NumPy array}).

    Supported leaves: arrays (NumPy or CuPy, copied to host), None, bool, int, float, str and
    NumPy scalars. Containers: dict (keys str or int), list, tuple.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(x):
        if _is_array(x):
            name = f"a{len(arrays)}"
            arrays[name] = np.array(to_numpy(x), copy=True)  # a snapshot, not a view of live state
            return {"__array__": name}
        if isinstance(x, dict):
            # Keys keep their type (optimisers may key state by int index).
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"checkpoint dict keys must be str or int, got {k!r}")
                items.append([k, walk(v)])
            return {"__dict__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            if isinstance(x, float) and not np.isfinite(x):
                return {"__float__": repr(x)}  # JSON has no inf/nan
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(state), arrays


def unflatten(skeleton, arrays) -> object:
    """Inverse of :func:`flatten`: rebuild the nested state (arrays come back as NumPy arrays)."""
    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__array__" in x:
                if x["__array__"] not in arrays:
                    raise CheckpointError(f"the skeleton refers to array {x['__array__']!r}, "
                                          "which the file does not hold")
                return arrays[x["__array__"]]
            if "__dict__" in x:
                items = x["__dict__"]
                if not (isinstance(items, list)
                        and all(isinstance(i, list) and len(i) == 2 for i in items)):
                    raise CheckpointError("a __dict__ node of the skeleton is not a list of "
                                          "[key, value] pairs")
                return {k: walk(v) for k, v in items}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__float__" in x:
                return float(x["__float__"])
            raise CheckpointError(f"unknown node in checkpoint skeleton: {sorted(x)}")
        return x

    return walk(skeleton)


# ---------------------------------------------------------------------------------------- files
def save_checkpoint(path: str, state) -> None:
    """Write nested ``state`` to ``path`` (an ``.npz``) atomically."""
    skeleton, arrays = flatten(state)
    header = json.dumps({"format": "npmask-checkpoint", "version": FORMAT_VERSION,
                         "state": skeleton}).encode("utf-8")
    members = dict(arrays)
    members[SKELETON_KEY] = np.frombuffer(header, dtype=np.uint8)
    atomic_write_bytes(path, lambda f: np.savez(f, **members))


def load_checkpoint(path: str):
    """Read a checkpoint written by :func:`save_checkpoint`; returns the nested state.

    Raises CheckpointError (naming the file) when it is missing, truncated or malformed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open_npz(path) as z:
            if SKELETON_KEY not in z.files:
                raise CheckpointError(f"checkpoint {path} has no {SKELETON_KEY} member: "
                                      "not an npmask checkpoint")
            header = json.loads(bytes(z[SKELETON_KEY]).decode("utf-8"))
            arrays = {k: z[k] for k in z.files if k != SKELETON_KEY}
    except CheckpointError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError, JSON errors, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                              "it is truncated or corrupt") from None
    if not isinstance(header, dict) or header.get("format") != "npmask-checkpoint" \
            or "state" not in header:
        raise CheckpointError(f"checkpoint {path} is not an npmask checkpoint")
    try:
        return unflatten(header["state"], arrays)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}; delete it to train this part again "
                              "from epoch 0") from None


def checkpoint_epoch(path, epochs: int | None = None, state=None) -> int:
    """The completed-epoch count of checkpoint ``path`` (or of its already loaded ``state``),
    checked to be an int in [0, epochs]; CheckpointError naming the file otherwise."""
    if state is None:
        state = load_checkpoint(str(path))
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(f"checkpoint {path}: field 'epoch' must be an integer >= 0, got "
                              f"{epoch!r}; delete it to train this part again from epoch 0")
    if epochs is not None and epoch > epochs:
        raise CheckpointError(f"checkpoint {path} holds epoch {epoch}, but the run has {epochs} "
                              "epochs; it belongs to another run: delete it to train this part "
                              "again from epoch 0")
    return epoch
