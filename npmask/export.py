"""Domains out: a domain trained in npmask as a dense state_dict that stock PyTorch loads.

    python -m npmask.export runs/svhn/domain.npz --backbone backbones/resnet50.npz --out svhn.safetensors
    python -m npmask.export runs/svhn/domain.npz --backbone backbones/resnet50.npz --out svhn.npz

The domain file (:mod:`npmask.storage`) holds only what the domain adds to the backbone (masks,
k's, batch norm, head). Export applies it: each masked weight is replaced by
W~ = k0 W + k1 + k2 M + k3 W∘M, batch norm is the domain's (or the backbone's, for variants that share
it) with its running statistics, and the head is the domain's. The names and shapes are the
backbone's (the PyTorch layout it was converted from), so e.g.
``torchvision.models.resnet50(num_classes=K).load_state_dict(tensors, strict=True)`` loads it
(BatchNorm fills the absent ``num_batches_tracked`` in) and gives npmask's logits (eval mode). See
:meth:`npmask.multidomain.MultiDomainModel.export_dense` for the same arrays in a notebook.

``.safetensors`` is written with the safetensors package's NumPy API, ``.npz`` with ``np.savez``;
both atomically (nothing is left behind on an error).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from .io import atomic_write_bytes
from .multidomain import MultiDomainModel
from .pretrained import BackboneError, load_backbone
from .storage import DomainExistsError, DomainFileError, load_domain
from .training.errors import ConfigError, exit_on_error

PROG = "python -m npmask.export"


class ExportError(ConfigError):
    """A domain or backbone that cannot be exported (reported as one line)."""


def export_domain(domain_path, backbone_path, out, name: str | None = None) -> dict:
    """Load the backbone and the domain file, write the domain's dense state_dict to ``out``; returns it."""
    out = Path(out)
    if out.suffix not in (".safetensors", ".npz"):
        raise ExportError(f"--out must end in .safetensors or .npz, got {out}")
    if not Path(domain_path).is_file():
        raise ExportError(f"{domain_path}: no such domain file")
    for given, what in ((backbone_path, "the backbone"), (domain_path, "the domain file")):
        if out.exists() and Path(given).exists() and out.samefile(given):
            raise ExportError(f"--out {out} is {what} the export reads; npmask does not overwrite "
                              "it: choose another path")
    try:
        backbone, _ = load_backbone(backbone_path)
    except BackboneError as err:            # its message names the backbone already
        raise ExportError(_one_line(err)) from None
    except KeyError as err:
        raise ExportError(f"backbone {backbone_path}: {_one_line(err)}") from None
    model = MultiDomainModel(backbone)
    try:
        domain = load_domain(model, domain_path, name=name)
    except DomainFileError as err:          # its message names the file already
        raise ExportError(_one_line(err)) from None
    except DomainExistsError as err:        # only the pretraining domain is there: the same name
        raise ExportError(f"{domain_path}: the domain is named {err.name!r}, as the backbone's "
                          "pretraining domain; give it another name with --name") from None
    except (ValueError, KeyError, OSError) as err:
        raise ExportError(f"{domain_path}: {_one_line(err)}") from None
    arrays = {k: np.ascontiguousarray(v) for k, v in model.export_dense(domain).items()}
    write_state_dict(out, arrays)
    return arrays


def write_state_dict(path, arrays: dict) -> None:
    """``arrays`` to ``path`` (.safetensors or .npz), atomically."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = safetensors_bytes(arrays, metadata={"format": "pt", "written_by": "npmask.export"})
        atomic_write_bytes(str(path), lambda f: f.write(data))
    elif path.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(str(path), lambda f: f.write(buf.getvalue()))
    else:
        raise ExportError(f"cannot write {path}: give a .safetensors or .npz file name")


def _one_line(err) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return " ".join(text.split()) or type(err).__name__


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("domain", help="domain file written by npmask (storage.save_domain / npmask.train)")
    p.add_argument("--backbone", required=True, help="the backbone .npz the domain was trained on (its .json beside it)")
    p.add_argument("--out", required=True, help="X.safetensors or X.npz to write")
    p.add_argument("--name", default=None, help="domain name to use (default: the stored one)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG):
        arrays = export_domain(args.domain, args.backbone, args.out, args.name)
    n = sum(int(np.asarray(v).size) for v in arrays.values())
    print(f"{len(arrays)} arrays ({n:,} numbers) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
