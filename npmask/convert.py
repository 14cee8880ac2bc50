"""Weights in: a PyTorch-layout state_dict (torchvision, timm, residual adapters) -> an npmask backbone.

    python -m npmask.convert resnet50.safetensors --model resnet50 --out backbones/resnet50.npz
    python -m npmask.convert densenet121.npz --model densenet121 --out d121.npz --domain imagenet --test-acc 74.4

SRC is read as

- ``.safetensors``: with the ``safetensors`` package's NumPy API (no torch, no pickle);
- ``.npz``: ``np.load(allow_pickle=False)``;
- ``.pth`` / ``.pt``: only when PyTorch is importable, and only with ``torch.load(..., weights_only=True)``
  (which refuses arbitrary pickled objects). Without torch the command says how to turn the file
  into .safetensors in one command. npmask has no other pickle path.

Entries that are not floating point (``num_batches_tracked``) are dropped; every other name must
be one of the model's parameters or buffers with the model's shape. All missing, unexpected and
wrongly shaped entries are listed in one error, and nothing is written. On success OUT.npz (the
state_dict, in the model's dtype) and OUT.json (what :func:`npmask.pretrained.load_backbone` and
``--backbone`` read: model, num_classes, input_size, dtype, plus the source file and its sha256)
are written atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from . import models
from .io import open_npz
from .pretrained import save_backbone
from .training.cli import command_line
from .training.errors import ConfigError, exit_on_error
from .training.validate import check_save_path

PROG = "python -m npmask.convert"

TORCH_HINT = ("convert it to .safetensors where PyTorch is installed: python -c \"import torch, "
              "safetensors.torch as st; sd = torch.load('{src}', map_location='cpu', weights_only=True); "
              "st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\"")


class ConvertError(ConfigError):
    """A weights file that cannot be read or does not fit the model (reported as one line)."""


def read_state_dict(path) -> dict:
    """``{name: numpy array}`` from a .safetensors, .npz, or (with torch installed) .pth/.pt file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except Exception as err:
            raise ConvertError(f"{path}: not a readable .safetensors file ({_one_line(err)})") from None
    if suffix == ".npz":
        try:
            with open_npz(path) as z:
                return {k: z[k] for k in z.files}
        except Exception as err:
            raise ConvertError(f"{path}: not a readable .npz file ({_one_line(err)})") from None
    if suffix in (".pth", ".pt"):
        return _read_torch(path)
    raise ConvertError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
                       "give a .safetensors, .npz, .pth or .pt file")


def _read_torch(path: Path) -> dict:
    dst = path.with_suffix(".safetensors")
    try:
        import torch  # optional: only a .pth/.pt source needs it, and the package never imports it otherwise
    except ImportError:
        raise ConvertError(f"{path}: reading a PyTorch file needs torch, which is not installed; "
                           + TORCH_HINT.format(src=path, dst=dst)) from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", _one_line(err))          # torch colours parts of it
        text = text if len(text) <= 120 else text[:117] + "..."     # torch's own message is a page long
        raise ConvertError(f"{path}: torch.load(weights_only=True) cannot read it ({type(err).__name__}: {text}); "
                           "a whole pickled model is not read: save its state_dict() instead") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]              # a training checkpoint that wraps the state_dict
    if not isinstance(sd, dict) or not all(hasattr(v, "detach") for v in sd.values()):
        raise ConvertError(f"{path}: expected a state_dict (names -> tensors), got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v.numpy()
    return out


def _one_line(err) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def match_state_dict(model, state: dict) -> dict:
    """``state`` checked against ``model.state_dict()``: returns the float entries, model's names only.

    Non-float entries (``num_batches_tracked``) are dropped. Raises ConvertError listing every
    missing, unexpected and wrongly shaped entry.
    """
    own = model.state_dict()
    floats = {k: v for k, v in state.items() if np.asarray(v).dtype.kind == "f"}
    missing = [k for k in own if k not in floats]
    unexpected = [k for k in floats if k not in own]
    wrong = [f"{k} {tuple(np.shape(floats[k]))} (model: {tuple(own[k].shape)})"
             for k in own if k in floats and tuple(np.shape(floats[k])) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items))
    if problems:
        raise ConvertError("the weights do not fit the model: " + "; ".join(problems))
    return {k: floats[k] for k in own}


def convert(src, model_name: str, out, num_classes: int | None = None, input_size: int | None = None,
            domain: str | None = None, test_acc: float | None = None, dtype="float32", command: str = "") -> dict:
    """Read ``src``, check it against ``model_name``, write ``out`` (.npz) and its .json; returns the info."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ConvertError(f"--out must end in .npz (the backbone file; its .json goes beside it), got {out}")
    if test_acc is not None and not 0 <= test_acc <= 100:  # also NaN, which JSON cannot hold
        raise ConvertError(f"--test-acc is a test accuracy in percent, from 0 to 100; got {test_acc}")
    try:                             # new, or an earlier backbone: never another file of the user
        check_save_path(out, "--out")
    except ConfigError as err:
        raise ConvertError(str(err)) from None
    state = read_state_dict(src)
    input_size = int(input_size) if input_size is not None else models.default_input_size(model_name)
    head = _head_of(model_name)
    w = state.get(f"{head}.weight")
    if num_classes is None:
        if w is None or np.ndim(w) != 2:
            raise ConvertError(f"{src}: no 2-d {head}.weight to read the number of classes from; "
                               "the weights do not fit the model (give --num-classes to see every difference)")
        num_classes = int(np.shape(w)[0])
    try:
        model = models.create(model_name, num_classes=int(num_classes), input_size=input_size,
                              dtype=np.dtype(dtype), seed=0)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    arrays = match_state_dict(model, state)
    model.load_state_dict(arrays)
    info = {"model": model_name, "num_classes": int(num_classes), "input_size": input_size,
            "dtype": np.dtype(dtype).name, "domain": domain or "pretrained",
            "test_acc": None if test_acc is None else float(test_acc),
            "source": str(src), "source_sha256": _sha256(src),
            "dropped": sorted(k for k in state if k not in arrays),
            "command": command}
    save_backbone(out, model, info)
    return info


def _head_of(model_name: str) -> str:
    try:
        return models.head_name(model_name)
    except ValueError as err:
        raise ConvertError(str(err)) from None


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="weights: .safetensors, .npz, or .pth/.pt (with torch installed)")
    p.add_argument("--model", required=True, help="npmask model name, e.g. resnet50, densenet121, vgg16, resnet26_ra")
    p.add_argument("--out", required=True, help="backbone .npz to write (its .json goes beside it)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: read from the file)")
    p.add_argument("--input-size", type=int, default=None,
                   help="input size recorded for the backbone (default: 224 for torchvision models, 64 for resnet26_ra)")
    p.add_argument("--domain", default=None, help="name of the pretraining domain, recorded in the .json")
    p.add_argument("--test-acc", type=float, default=None, help="its test accuracy (%%), recorded in the .json")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG):
        info = convert(args.src, args.model, args.out, args.num_classes, args.input_size, args.domain,
                       args.test_acc, args.dtype, command=command_line("npmask.convert", argv))
    print(f"backbone {args.model} ({info['num_classes']} classes) written to {args.out} "
          f"and {Path(args.out).with_suffix('.json')}; dropped {len(info['dropped'])} non-float entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
