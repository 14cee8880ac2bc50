"""Command-line plumbing shared by ``npmask.train``, ``npmask.pretrain`` and ``npmask.compare``.

Parsers are built with ``argument_default=argparse.SUPPRESS``: the namespace then holds only the
flags the user actually typed. That lets a benchmark supply its own defaults (model, epochs,
learning rates) and lets ``--resume`` refuse a flag that contradicts the saved config.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .errors import ConfigError


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   argument_default=argparse.SUPPRESS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def int_list(text: str) -> list[int]:
    """"15" or "10,13" -> [15] / [10, 13]; "" or "none" -> []."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_pair(text: str) -> list[float]:
    """"1e-4,2e-4" -> [0.0001, 0.0002]."""
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    return [lo, hi]


def name_list(text: str) -> list[str]:
    """"a,b , c" -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def command_line(prog_module: str, argv=None) -> str:
    """The command as a user would retype it: ``python -m npmask.train --epochs 3``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", prog_module] + [shlex.quote(a) for a in args])


def default_out(kind: str, *parts) -> str:
    """``runs/<kind>-<parts>-<YYYYmmdd-HHMMSS>``: a fresh folder per run, in the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "-".join([kind, *[str(p) for p in parts if p], stamp])
    return os.path.join("runs", name)


def create_model(name: str, **kwargs):
    """``models.create`` with an unknown name (or impossible size) reported as a ConfigError."""
    from .. import models
    try:
        return models.create(name, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_model(name: str, input_size: int = 32) -> None:
    """ConfigError listing the known architectures when ``name`` is not one of them."""
    create_model(name, num_classes=2, input_size=input_size)


def check_variant(name: str) -> None:
    """ConfigError listing the known variants and baselines when ``name`` is not one of them."""
    from ..masking.variants import VARIANTS
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")


def check_resume_conflicts(given: dict, saved: dict, flag_of: dict) -> None:
    """On --resume, every flag typed again must agree with the saved config."""
    bad = [f"{flag_of.get(k, k)} {given[k]!r} (the run has {saved[k]!r})"
           for k in given if k in saved and given[k] != saved[k]]
    if bad:
        raise ConfigError("--resume continues a run with its saved settings; these flags differ: "
                          + "; ".join(bad))
