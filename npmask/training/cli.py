"""Command-line plumbing shared by ``npmask.train``, ``npmask.pretrain`` and ``npmask.compare``.

Parsers are built with ``argument_default=argparse.SUPPRESS``: the namespace then holds only the
flags the user actually typed. That lets a benchmark supply its own defaults (model, epochs,
learning rates) and lets ``--resume`` refuse a flag that contradicts the saved config.

The flags of ``npmask.train`` and how they become a :class:`~npmask.training.config.TrainConfig`
live here too (:func:`add_train_arguments`, :func:`train_config_from_args`): ``npmask.compare``
takes the same flags for all its variants, and the commands do not import one another.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .. import pretrained
from ..masking.variants import VARIANTS
from .config import (PretrainConfig, TrainConfig, check_model, check_variant, create_model,
                     load_config, save_config)
from . import validate
from .domain_training import emax_from_run
from .errors import ConfigError
from .graph_step import refuse_random_layers
from .pretraining import pretrain
from .run_folder import RunFolder
from .suites import BENCHMARKS, choose_domains, get_benchmark, resolve_data_root


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


def check_resume_conflicts(given: dict, saved: dict, flag_of: dict) -> None:
    """On --resume, every flag typed again must agree with the saved config."""
    bad = [f"{flag_of.get(k, k)} {given[k]!r} (the run has {saved[k]!r})"
           for k in given if k in saved and given[k] != saved[k]]
    if bad:
        raise ConfigError("--resume continues a run with its saved settings; these flags differ: "
                          + "; ".join(bad))


TRAIN_FLAGS = {  # config field -> flag of npmask.train (for messages and --resume checks)
    "benchmark": "--benchmark", "data_root": "--data-root", "domains": "--domains",
    "model": "--model", "input_size": "--input-size", "backbone": "--backbone",
    "variant": "--variant", "epochs": "--epochs", "batch_size": "--batch-size",
    "lr_body": "--lr-body", "lr_head": "--lr-head", "momentum": "--momentum",
    "lr_decay_epochs": "--lr-decay-epochs", "lr_decay": "--lr-decay",
    "weight_decay": "--weight-decay", "max_train": "--max-train", "seed": "--seed",
    "mask_init": "--mask-init", "tau": "--tau",
    "backend": "--backend", "dtype": "--dtype", "cuda_graphs": "--cuda-graphs",
    "augmentation": "--augmentation",
    "train_split": "--train-split",
}


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every flag of ``npmask.train`` to ``p`` (returned)."""
    syn = BENCHMARKS["synthetic"]
    g = p.add_argument_group("what to train")
    g.add_argument("--benchmark", choices=list(BENCHMARKS),
                   help="the protocol preset: synthetic (default: built in, CPU sized), decathlon "
                        "(table 4: Visual Decathlon converted by data_scripts, WRN-28-4, 64x64, "
                        "published Emax), imagenet_to_sketch (tables 1-3: ResNet-50 at 224, "
                        "random-size crops, 30 epochs, decay after 15), or folder (any converted "
                        "domains under --data-root); every default it sets is in config.json")
    g.add_argument("--data-root", metavar="DIR",
                   help="folder holding one sub-folder per domain in npmask's data format "
                        "(default for synthetic: generated once into ~/.cache/npmask)")
    g.add_argument("--domains", type=name_list, metavar="D1,D2",
                   help="target domains, comma-separated (default: every domain of the benchmark "
                        "but the pretraining one)")
    g.add_argument("--variant", help="the method variant or baseline (default: full); one of "
                                     + ", ".join(VARIANTS))
    g.add_argument("--model", help=f"backbone architecture (default: {syn.model} for synthetic, "
                                   "wrn28_4 for decathlon); must match --backbone")
    g.add_argument("--input-size", type=int, help="network input side in pixels (default: 32; 64 "
                                                  "for decathlon)")
    g.add_argument("--backbone", metavar="NPZ",
                   help="pretrained backbone .npz written by npmask.pretrain (default for "
                        "synthetic: the one shipped in npmask/pretrained/)")
    g = p.add_argument_group("protocol (paper, section 4)")
    g.add_argument("--epochs", type=int, help=f"epochs per domain (default: {syn.epochs} synthetic, "
                                              "60 decathlon)")
    g.add_argument("--batch-size", type=int, help="images per step (default: 32)")
    g.add_argument("--lr-body", type=float,
                   help="Adam learning rate of masks, k's and batch norm (paper: 1e-4; default "
                        f"synthetic: {syn.lr_body:g}, scaled for short runs, see config notes)")
    g.add_argument("--lr-head", type=float,
                   help=f"SGD learning rate of the classifier (paper: 1e-3; default synthetic: "
                        f"{syn.lr_head:g})")
    g.add_argument("--momentum", type=float, help="SGD momentum of the classifier (default: 0.9)")
    g.add_argument("--lr-decay-epochs", type=int_list, metavar="E1,E2",
                   help="multiply both learning rates by --lr-decay after these epochs (default "
                        f"synthetic: {','.join(map(str, syn.lr_decay_epochs))}; decathlon: 45)")
    g.add_argument("--lr-decay", type=float, help="step-decay factor (default: 0.1)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (default: 0, as the paper)")
    g.add_argument("--max-train", type=int, metavar="N",
                   help="use a fixed random subset of N training images per domain (default: all)")
    g.add_argument("--mask-init", type=float_pair, metavar="LO,HI",
                   help="real masks start as R ~ U(tau+LO, tau+HI), so M is all ones (default: "
                        "1e-4,2e-4 as the paper; Piggyback's code starts 5e-3 above its threshold)")
    g.add_argument("--tau", type=float, help="mask threshold: M = 1[R >= tau] (default: 0)")
    g.add_argument("--seed", type=int, help="seed of mask init, heads, batch order, augmentation "
                                            "(default: 0)")
    g = p.add_argument_group("where and how")
    g.add_argument("--backend", choices=["numpy", "cupy"], help="array backend (default: numpy)")
    g.add_argument("--dtype", choices=["float32", "float64"], help="float type (default: float32)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="with --backend cupy: capture each training step in CUDA graphs once per "
                        "batch shape and replay them (fewer kernel launches from Python; the same "
                        "numbers). Off by default: not yet run on a GPU")
    g.add_argument("--augmentation",
                   choices=["auto", "pad_crop", "decathlon", "decathlon_crop64", "imagenet", "none"],
                   help="loader protocol (default: pad_crop synthetic; decathlon for decathlon: "
                        "gtsrb/omniglot/svhn whole at 72 as the residual-adapters loader, the others "
                        "cropped to 64; decathlon_crop64: every domain cropped to 64 as the paper's "
                        "text; imagenet for imagenet_to_sketch: random-size crop + mirroring, test "
                        "resize 256 centre 224)")
    g.add_argument("--train-split", choices=["train", "train+val"],
                   help="what to train on (default: train; train+val for decathlon, the paper's "
                        "final runs; the val split is for choosing the schedule)")
    g.add_argument("--out", metavar="DIR", help="run folder (default: runs/train-<variant>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/train-*) from its "
                        "last checkpoint with its saved settings")
    g.add_argument("--emax-from", metavar="DIR",
                   help="a finished finetune run folder; Emax = 2 x its test errors (for the S-score)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars (a terminal) and no per-epoch lines (a log file)")
    g.add_argument("--workers", type=_positive_int, metavar="N",
                   help="target domains trained at a time, one process each (default on NumPy: "
                        "$NPMASK_TRAIN_WORKERS, else npmask's thread count, NPMASK_THREADS or the "
                        "CPUs up to 4; 1: one after the other); the numbers are the same either way")
    g.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="stop (as if killed) after N epochs of this invocation; for testing --resume")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def train_config_from_args(ns: dict) -> TrainConfig:
    """Build the config of an ``npmask.train`` run: the flags given, then the benchmark's defaults.

    Everything is checked (settings, data, backbone) before the caller creates a run folder."""
    validate.check_args(ns)
    validate.check_environment()
    bench = get_benchmark(ns.get("benchmark", "synthetic"))
    given = {k: v for k, v in ns.items() if k in TRAIN_FLAGS}
    cfg = TrainConfig(
        benchmark=bench.name, model=bench.model, input_size=bench.input_size, epochs=bench.epochs,
        lr_body=bench.lr_body, lr_head=bench.lr_head, lr_decay_epochs=list(bench.lr_decay_epochs),
        batch_size=bench.batch_size, augmentation=bench.augmentation,
        train_split=bench.train_split, emax=bench.emax, emax_source=bench.emax_source,
        notes=bench.notes)
    for k, v in given.items():
        setattr(cfg, k, v)
    if any(k in given for k in ("lr_body", "lr_head", "lr_decay_epochs", "epochs")) \
            and bench.name == "synthetic":
        cfg.notes = "protocol settings changed on the command line (see the fields above)"
    cfg.validate()
    validate.check_train_config(cfg)  # every setting, before the data or a backbone is touched
    check_variant(cfg.variant)
    validate.check_backend(cfg.backend)  # --backend cupy without a GPU: one line, before any work
    check_model(cfg.model, cfg.input_size)
    if cfg.cuda_graphs:   # dropout cannot be replayed from a graph: refused before any work
        refuse_random_layers(create_model(cfg.model, num_classes=2, input_size=cfg.input_size))
    if bench.base_domain in (cfg.domains or []):  # before any data is generated or read
        raise ConfigError(f"{bench.base_domain!r} is the pretraining domain of the {bench.name} "
                          "benchmark; it is the backbone itself and is not trained again")
    root = resolve_data_root(bench.name, cfg.data_root, cfg.domains or None)
    cfg.data_root = str(root)
    cfg.domains = choose_domains(bench, root, cfg.domains or None, backbone_domain(cfg.backbone))
    cfg.backbone = resolve_backbone(cfg, bench, root)
    if ns.get("emax_from"):
        cfg.emax, cfg.emax_source = emax_from_run(ns["emax_from"])
    return validate.check_train_run(cfg)  # data (channels, labels, archives) and the backbone


def backbone_domain(backbone) -> str | None:
    """The domain a ``--backbone`` was pretrained on (its JSON), left out of the default targets:
    the folder preset knows none of its own, and a data folder often holds it. None without a
    readable description (resolve_backbone and the checks after it say what is wrong)."""
    if backbone is None:
        return None
    try:
        return pretrained.pretraining_domain(pretrained.read_info(backbone))
    except (pretrained.BackboneError, OSError):
        return None


def resolve_backbone(cfg: TrainConfig, bench, root) -> str:
    """The backbone file: --backbone, else (synthetic) the shipped one, pretrained when missing."""
    if cfg.backbone is not None:
        if Path(cfg.backbone).is_dir():
            raise ConfigError(f"backbone {cfg.backbone} is a folder; give the backbone's .npz file")
        if not Path(cfg.backbone).is_file():
            raise ConfigError(f"backbone {cfg.backbone} not found")
        return str(Path(cfg.backbone).resolve())
    if bench.name != "synthetic":
        raise ConfigError(f"--benchmark {bench.name} needs --backbone NPZ: pretrain one with "
                          f"python -m npmask.pretrain --data-root {root} --domain "
                          f"{bench.base_domain or '<domain>'} --model {cfg.model} --input-size "
                          f"{cfg.input_size}")
    path = pretrained.shipped_path(f"{cfg.model}_synthetic")
    if not path.is_file():
        path = pretrain_on_the_spot(cfg, root)
    return str(path.resolve())  # recorded in config.json: --resume from another folder finds it


def pretrain_on_the_spot(cfg: TrainConfig, root) -> Path:
    """No shipped backbone for this model: pretrain one on the synthetic base domain now."""
    out = Path("runs") / f"pretrain-{cfg.model}-synthetic"
    pcfg = PretrainConfig(data_root=str(root), model=cfg.model, input_size=cfg.input_size,
                          seed=cfg.seed, backend=cfg.backend, dtype=cfg.dtype,
                          save=str(out / "backbone.npz"))
    folder = RunFolder(out)
    if folder.exists():
        pcfg = load_config(str(folder.config), PretrainConfig)  # resume the earlier attempt
    else:
        folder.create()
        save_config(str(folder.config), pcfg, {"command": "(pretrained on the spot by npmask.train)"})
    print(f"no shipped backbone for {cfg.model}: pretraining one on the synthetic base domain "
          f"into {out} (resumable; this takes a while on a CPU)", file=sys.stderr)
    folder.lock()  # a second train waiting for the same backbone is refused, not interleaved
    try:
        pretrain(pcfg, folder)
    finally:
        folder.unlock()
    return Path(pcfg.save)
