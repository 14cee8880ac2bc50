"""Pretrained backbones: the one shipped with npmask, and saving/loading any other.

A backbone is two files side by side::

    <name>.npz    the model's state_dict (dotted PyTorch-style names -> arrays), allow_pickle=False
    <name>.json   how to rebuild and judge it: model name, classes, input size, dtype, the command
                  and settings that produced it, and its test accuracy on the pretraining domain

``python -m npmask.convert`` writes the same two files from PyTorch weights (torchvision, timm,
residual adapters; see :mod:`npmask.convert`), recording the source file and its sha256.

The shipped backbone (``wrn16_1_synthetic``) was pretrained on the synthetic ``base`` domain by
``python -m npmask.pretrain``; its JSON records the exact command. It plays the role ImageNet
plays in the paper: target domains start from its weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import models
from ..backend import to_numpy
from ..io import atomic_write_bytes, atomic_write_text, open_npz

HERE = Path(__file__).resolve().parent
SHIPPED = "wrn16_1_synthetic"


# PyTorch weight files, which python -m npmask.convert turns into a backbone
TORCH_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")


class BackboneError(RuntimeError):
    """A backbone file is missing or does not match its description."""


def shipped_path(name: str = SHIPPED) -> Path:
    """Path of the shipped backbone ``.npz`` (it may be absent in a source checkout)."""
    return HERE / f"{name}.npz"


def info_path(npz_path) -> Path:
    p = Path(npz_path)
    return p.with_suffix(".json")


def read_info(npz_path) -> dict:
    """The JSON description stored beside a backbone ``.npz``."""
    p = info_path(npz_path)
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackboneError(f"backbone description {p} not found (it is written beside the .npz "
                            "by python -m npmask.pretrain)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackboneError(f"backbone description {p} is not valid JSON ({err})") from None
    check_info(info, p)
    return info


def check_info(info, p) -> None:
    """The fields load_backbone needs, with their types (BackboneError naming file and field)."""
    if not isinstance(info, dict):
        raise BackboneError(f"backbone description {p}: expected a JSON object, got "
                            f"{type(info).__name__}")
    fields = {"model": (lambda v: isinstance(v, str) and v != "", "a model name"),
              "num_classes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                              "an integer >= 1"),
              "input_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                             "an integer >= 1")}
    for key, (ok, want) in fields.items():
        if key not in info:
            raise BackboneError(f"backbone description {p} lacks field {key!r} ({want}); it is "
                                "written beside the .npz by python -m npmask.pretrain")
        if not ok(info[key]):
            raise BackboneError(f"backbone description {p}: field {key!r} must be {want}, got "
                                f"{json.dumps(info[key])[:60]}")
    if info.get("dtype", "float32") not in ("float32", "float64"):
        raise BackboneError(f"backbone description {p}: field 'dtype' must be float32 or float64, "
                            f"got {json.dumps(info.get('dtype'))[:60]}")
    if not isinstance(pretraining_domain(info), str):
        raise BackboneError(f"backbone description {p}: field 'domain' must be a string")


def pretraining_domain(info: dict) -> str:
    """The domain a backbone was pretrained on, from its description ("base" when it names none)."""
    return info.get("domain", "base")


def save_backbone(path, model, info: dict) -> None:
    """Write ``model.state_dict()`` to ``path`` (.npz) and ``info`` to the .json beside it, atomically."""
    arrays = {k: to_numpy(v) for k, v in model.state_dict().items()}
    atomic_write_bytes(str(path), lambda f: np.savez(f, **arrays))
    atomic_write_text(str(info_path(path)), json.dumps(info, indent=2) + "\n")


def load_backbone(path=None, *, dtype=None, backend: str = "numpy"):
    """Rebuild the model described beside ``path`` and load its weights; returns (model, info).

    path: a backbone ``.npz`` (default: the shipped one). dtype: override the stored dtype.
    """
    path = Path(path) if path is not None else shipped_path()
    if path.suffix.lower() in TORCH_SUFFIXES:
        raise BackboneError(f"backbone {path} is PyTorch weights, not an npmask backbone; convert "
                            f"it first: python -m npmask.convert {path} --model MODEL --out "
                            f"{path.with_suffix('.npz')}")
    if path.is_dir():
        raise BackboneError(f"backbone {path} is a folder; give the backbone's .npz file")
    if not path.is_file():
        raise BackboneError(f"backbone {path} not found; create one with python -m npmask.pretrain, or "
                            "from PyTorch weights with python -m npmask.convert")
    info = read_info(path)
    dt = np.dtype(dtype or info.get("dtype", "float32"))
    try:
        model = models.create(info["model"], num_classes=int(info["num_classes"]),
                              input_size=int(info["input_size"]), dtype=dt, seed=0)
    except ValueError as err:
        raise BackboneError(f"backbone description {info_path(path)}: {err}") from None
    try:
        with open_npz(path) as z:
            state = {k: z[k] for k in z.files}
    except Exception as err:
        raise BackboneError(f"backbone {path} cannot be read ({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as err:
        raise BackboneError(f"backbone {path} does not fit model {info['model']!r}: {err}") from None
    if backend != "numpy":
        model.to(backend)
    return model, info


def exists(path=None) -> bool:
    return os.path.isfile(path if path is not None else shipped_path())
