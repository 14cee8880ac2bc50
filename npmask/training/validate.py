"""Every check a command makes before it writes anything, shared by train, pretrain and compare.

A run folder is created only after the settings, the environment, the backbone and the data have
passed these checks, so a mistake leaves no folder behind (a half-made folder would also be what a
plain ``--resume`` picks next). ``--resume`` runs the same checks again on the stored
``config.json``, so a hand-edited config is held to the same rules as the command line.

Each failure is a :class:`~npmask.training.errors.ConfigError` (or a DataFormatError) whose message
names the flag, the file or the field, shown as one line by ``exit_on_error``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..backend import BACKENDS, get_backend
from ..config import default_threads
from ..data.format import DataFormatError, check_domain_files, load_domain
from ..data.loader import PROTOCOLS, augmentation_for
from ..io import fsync_dir
from ..storage import read_domain_file
from .backbone import load_run_backbone
from .config import PretrainConfig, TrainConfig, check_model, check_variant
from .errors import ConfigError
from .suites import check_data_folder

NETWORK_CHANNELS = 3  # every architecture of npmask.models takes RGB input


# ------------------------------------------------------------------------------- command line
def check_args(ns: dict) -> None:
    """Flags whose raw value matters before defaults fill in (``--domains ,`` parses to [])."""
    if "domains" in ns and not ns["domains"]:
        raise ConfigError(f"--domains names no domain (got {ns['domains']!r}); list them as D1,D2 "
                          "or leave the flag out for every domain of the benchmark")
    if "variants" in ns and not ns["variants"]:
        raise ConfigError("--variants names no variant; list them as V1,V2 or leave the flag out")
    n = ns.get("stop_after_epochs")
    if n is not None and n < 1:
        raise ConfigError(f"--stop-after-epochs must be >= 1, got {n}")


def check_environment() -> None:
    """NPMASK_THREADS and NPMASK_DATA, read by npmask at import or when generating data."""
    try:
        default_threads()
    except ValueError as err:
        raise ConfigError(f"environment variable {err}") from None
    data = os.environ.get("NPMASK_DATA")
    if data is not None:
        p = Path(data)
        if not data.strip():
            raise ConfigError("environment variable NPMASK_DATA is set but empty; unset it (the "
                              "default is ~/.cache/npmask) or name a folder")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"environment variable NPMASK_DATA={data} is not a folder")


# ------------------------------------------------------------------------------- settings
# Which values each annotation admits (a bool is an int in Python, but never a count or a rate here)
_IS_TYPE = {"None": lambda v: v is None,
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
            "list": lambda v: isinstance(v, list), "dict": lambda v: isinstance(v, dict)}


def _check_types(cfg, where: str) -> None:
    """Every field of a settings dataclass has the type its annotation names (config.json may be
    edited by hand: "epochs": "3" must not reach a comparison)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        allowed = [t.strip().split("[")[0] for t in str(f.type).split("|")]
        if not set(allowed) <= set(_IS_TYPE):
            continue  # a type this check does not know: the field's own checks apply
        if not any(_IS_TYPE[t](v) for t in allowed):
            raise ConfigError(f"{where}: setting {f.name!r} must be {' or '.join(allowed)}, got "
                              f"{v!r}")


def _finite(name: str, v, lo=None, lo_open=False, hi=None, hi_open=False) -> None:
    bad = not math.isfinite(v)
    if not bad and lo is not None:
        bad = v <= lo if lo_open else v < lo
    if not bad and hi is not None:
        bad = v >= hi if hi_open else v > hi
    if bad:
        rng = ""
        if lo is not None or hi is not None:
            rng = (f" in {'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, "
                   f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}")
        raise ConfigError(f"{name} must be a finite number{rng}, got {v}")


def _common(cfg, where: str) -> None:
    _check_types(cfg, where)
    cfg.validate()
    if cfg.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.input_size < 1:
        raise ConfigError(f"--input-size must be >= 1, got {cfg.input_size}")
    _finite("--momentum", cfg.momentum, 0, False, 1, True)
    _finite("--weight-decay", cfg.weight_decay, 0)
    _finite("--lr-decay", cfg.lr_decay, 0, True)
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
               for e in cfg.lr_decay_epochs):
        raise ConfigError(f"--lr-decay-epochs must be integers >= 1, got {cfg.lr_decay_epochs}")
    if cfg.max_train is not None and cfg.max_train < 1:
        raise ConfigError(f"--max-train must be >= 1, got {cfg.max_train}")
    if cfg.augmentation not in ("auto", *PROTOCOLS):
        raise ConfigError(f"--augmentation must be one of auto, {', '.join(PROTOCOLS)}, got "
                          f"{cfg.augmentation!r}")
    if cfg.backend not in ("numpy", "cupy"):
        raise ConfigError(f"--backend must be numpy or cupy, got {cfg.backend!r}")


def check_mask_init(mask_init, tau: float, dtype: str) -> None:
    """R starts in U(tau + LO, tau + HI): both margins must be finite, positive, LO < HI, and
    survive rounding to ``dtype`` (else M would not start at all ones, or the 1-bit file could not
    rebuild R = tau +- LO on the right side of the threshold)."""
    if not (isinstance(mask_init, list) and len(mask_init) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mask_init)):
        raise ConfigError(f"--mask-init must be LO,HI (two numbers), got {mask_init!r}")
    lo, hi = (float(v) for v in mask_init)
    _finite("--tau", tau)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ConfigError(f"--mask-init must be LO,HI with 0 < LO < HI (finite), got {lo:g},{hi:g}")
    dt = np.dtype(dtype).type
    t = dt(tau)
    with np.errstate(over="ignore"):
        up, down, top = dt(tau + lo), dt(tau - lo), dt(tau + hi)
    if not (up > t and down < t and np.isfinite(top)):
        raise ConfigError(f"--mask-init {lo:g},{hi:g} with --tau {tau:g} leaves no margin in "
                          f"{dtype}: tau + LO rounds to tau (or overflows); use a larger LO or a "
                          "tau nearer 0")


def check_train_config(cfg, where: str = "the command line"):
    """All value checks of a TrainConfig (types, ranges, variant, backend, model); returns it.

    ``where``: the command line, or the stored config's path (named in every message then)."""
    try:
        return _check_train_config(cfg, where)
    except ConfigError as err:
        if where == "the command line" or str(err).startswith(where):
            raise
        raise ConfigError(f"{where} (the run's stored settings): {err}") from None


def _check_train_config(cfg, where: str):
    _common(cfg, where)
    for name in ("lr_body", "lr_head"):
        _finite(f"--{name.replace('_', '-')}", getattr(cfg, name), 0)
    check_mask_init(cfg.mask_init, cfg.tau, cfg.dtype)
    if not all(isinstance(d, str) and d for d in cfg.domains):
        raise ConfigError(f"{where}: domains must be a list of names, got {cfg.domains!r}")
    if cfg.emax is not None and not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in cfg.emax.items()):
        raise ConfigError(f"{where}: emax must map domains to positive error fractions, got "
                          f"{cfg.emax!r}")
    check_variant(cfg.variant)
    check_backend(cfg.backend)
    check_model(cfg.model, cfg.input_size)
    return cfg


def check_pretrain_config(cfg, where: str = "the command line"):
    """All value checks of a PretrainConfig; returns it."""
    try:
        _common(cfg, where)
    except ConfigError as err:
        if where == "the command line" or str(err).startswith(where):
            raise
        raise ConfigError(f"{where} (the run's stored settings): {err}") from None
    if cfg.eval_subset < 1:
        raise ConfigError(f"--eval-subset must be >= 1, got {cfg.eval_subset}")
    check_backend(cfg.backend)
    check_model(cfg.model, cfg.input_size)
    return cfg


_DEVICE_HERE = contextvars.ContextVar("npmask_device_here", default=True)


@contextlib.contextmanager
def device_checked_by_workers():
    """Inside the block --backend is checked by name only: for a process that trains nothing
    itself (``npmask.compare --executor ray`` on a head node without a GPU); each job checks the
    device where it runs, and a worker without one fails that job with the same one line."""
    token = _DEVICE_HERE.set(False)
    try:
        yield
    finally:
        _DEVICE_HERE.reset(token)


def check_backend(name: str) -> None:
    """--backend by name, and its device unless inside :func:`device_checked_by_workers`."""
    if _DEVICE_HERE.get() or name not in BACKENDS:
        get_backend(name)  # BackendError, one line: an unknown name, or cupy without a GPU


# ------------------------------------------------------------------------------- data
def check_data(root, domains, *, input_size: int, augmentation: str, batch_size: int,
               max_train: int | None) -> None:
    """Each domain: channels the networks take, every split's archive intact (zip CRCs), labels in
    range, views of ``input_size`` pixels, at least one training batch. Reads every file once."""
    for d in domains:
        folder = Path(root) / d
        meta = check_domain_files(folder)
        if meta["channels"] != NETWORK_CHANNELS:
            raise ConfigError(
                f"domain {d!r} ({folder}) has {meta['channels']} channel(s) but the networks take "
                f"{NETWORK_CHANNELS} (RGB); convert it with 3 channels (data_scripts/mnist.py "
                "--channels 3, the default, replicates the grey channel)")
        for split in meta["counts"]:
            path = folder / f"{split}.npz"
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise DataFormatError(f"{path}: corrupt npz (member {bad} fails its CRC check)")
                with np.load(path, allow_pickle=False) as z:
                    labels = z["labels"]
            except DataFormatError:
                raise
            except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
                raise DataFormatError(f"{path}: corrupt or unreadable npz "
                                      f"({type(err).__name__}: {err})") from None
            if labels.size and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
                raise DataFormatError(f"{path}: labels out of range [0, {meta['num_classes'] - 1}]"
                                      f": found [{labels.min()}, {labels.max()}]")
        dom = load_domain(folder, splits=())
        for train in (True, False):
            try:
                aug = augmentation_for(dom, train, augmentation, input_size=input_size)
                size = aug.check(tuple(meta["image_size"]))  # ValueError: crop > stored images
            except ValueError as err:
                raise ConfigError(f"domain {d!r}: {err}") from None
            # a domain the protocol feeds whole (Decathlon's 72x72 gtsrb/omniglot/svhn) is meant
            # to differ from the input side: the network's global pooling takes any size
            if size != (input_size, input_size) and not aug.full_view:
                raise ConfigError(
                    f"domain {d!r} gives {size[0]}x{size[1]} {'train' if train else 'test'} "
                    f"images but the network takes {input_size}x{input_size}; convert the data to "
                    "that size or pick another --input-size/--model/--benchmark")
        n = meta["counts"]["train"] if max_train is None else min(max_train, meta["counts"]["train"])
        if n < batch_size:
            raise ConfigError(f"domain {d!r} has {n} training images"
                              f"{' (--max-train)' if max_train is not None else ''}, fewer than "
                              f"one batch of {batch_size}; lower --batch-size")


def check_train_backbone(cfg) -> None:
    """Load the run's backbone as the run will (description, weights, model and input size); its
    pretraining domain is no target (training would refuse it after the run folder exists)."""
    if not _DEVICE_HERE.get():  # the device is the jobs' business: read the weights on the CPU
        cfg = dataclasses.replace(cfg, backend="numpy")
    model, _ = load_run_backbone(cfg)
    if model.base_domain in (cfg.domains or []):
        raise ConfigError(f"{model.base_domain!r} is the pretraining domain of backbone "
                          f"{cfg.backbone}; it is the backbone itself and is not trained again: "
                          "leave it out of --domains")


def check_train_run(cfg, where: str = "the command line"):
    """Everything a train run needs, before its folder exists (and again on --resume)."""
    check_environment()
    check_train_config(cfg, where)
    if cfg.data_root is not None and cfg.domains:
        check_data_folder(cfg.data_root)
        check_data(cfg.data_root, cfg.domains, input_size=cfg.input_size,
                   augmentation=cfg.augmentation, batch_size=cfg.batch_size,
                   max_train=cfg.max_train)
    if cfg.backbone is not None:
        check_train_backbone(cfg)
    return cfg


# ------------------------------------------------------------------------------- run folders
def folder_kind(path) -> str | None:
    """"train", "pretrain" or "compare" for an npmask run folder, None for anything else."""
    p = Path(path)
    if (p / "compare.json").is_file():
        return "compare"
    cfg = p / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
        keys = set(doc["config"])
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
        raise ConfigError(f"{cfg} is not a readable npmask config (expected a JSON object with "
                          "a 'config' object)") from None
    for kind, cls in (("train", TrainConfig), ("pretrain", PretrainConfig)):
        if keys <= {f.name for f in dataclasses.fields(cls)}:
            return kind
    return None


def check_new_out(out, kind: str, prog: str) -> None:
    """``--out`` of a new run: a path npmask may create. An existing non-empty folder is refused
    (npmask never writes into a folder it did not make), as is a run folder of another command."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if p.is_dir():
        found = folder_kind(p)
        if found == kind:
            raise ConfigError(f"run folder {out} already exists; pass --resume to continue it or "
                              "choose another --out")
        if found is not None:
            raise ConfigError(f"--out {out} is a {found} run folder, not a {kind} one; choose "
                              "another --out")
        try:
            entries = sorted(e.name for e in p.iterdir())
        except OSError as err:
            raise ConfigError(f"--out {out} cannot be read ({err.strerror})") from None
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"--out {out} exists and is not an npmask run folder (it holds "
                              f"{shown}); npmask writes only into a new or empty folder: choose "
                              "another --out")
    check_creatable("--out", out, p)


def check_save_path(save, flag: str = "--save") -> None:
    """``pretrain --save``, ``convert --out`` (``flag``): a ``.npz`` path that is new or an earlier
    backbone (an .npz with its .json beside it, e.g. the shipped one being regenerated); never
    another file of the user."""
    p = Path(save)
    if p.suffix != ".npz":
        raise ConfigError(f"{flag} {save}: a backbone is written as a .npz file (with a .json "
                          "beside it); give a path ending in .npz")
    if p.is_dir():
        raise ConfigError(f"{flag} {save} is a folder; give the path of the .npz to write")
    info = p.with_suffix(".json")
    if p.exists() and not info.is_file():
        raise ConfigError(f"{flag} {save} exists and is not an npmask backbone (no {info.name} "
                          "beside it); npmask does not overwrite it: choose another path")
    if info.exists() and not p.exists():
        raise ConfigError(f"{flag} {save}: {info} exists without its .npz; npmask does not "
                          "overwrite it: choose another path")
    check_creatable(flag, save, p)


def check_creatable(flag: str, given, p: Path) -> None:
    """The nearest existing folder above ``p`` is a writable folder, so ``p`` can be created."""
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {given}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {given}: folder {parent} is not writable")


def check_resume_folder(out, kind: str, prog: str) -> None:
    """``--resume`` must name a run folder of this command."""
    if not Path(out).is_dir():
        raise ConfigError(f"--resume: run folder {out} does not exist")
    found = folder_kind(out)
    if found is None:
        raise ConfigError(f"--resume: {out} is not an npmask {kind} run folder (no config.json)")
    if found != kind:
        raise ConfigError(f"--resume: {out} is a {found} run folder; continue it with "
                          f"python -m npmask.{found} --resume --out {out}")


def check_stored_domain(path, *, domain: str, variant: str, fingerprint: str) -> None:
    """A domain file counted as done on resume must be the one this run would have written."""
    meta, _ = read_domain_file(path)
    bad = []
    if meta["domain"] != domain:
        bad.append(f"domain {meta['domain']!r} (the run expects {domain!r})")
    if meta["variant"] != variant:
        bad.append(f"variant {meta['variant']!r} (config.json says {variant!r})")
    if meta["backbone_fingerprint"] != fingerprint:
        bad.append("another backbone (its fingerprint differs from config.json's backbone)")
    if bad:
        raise ConfigError(f"{path} holds {', '.join(bad)}: it is not this run's result; move it "
                          "away (and its entry in progress.json) to train the domain again")


@contextlib.contextmanager
def new_folder(folder):
    """Create a new run folder and take its lock; the block writes its first files. If the block
    fails (disk full, say), the folder it was making is removed again and the lock given back; on
    success the lock stays held (``folder.unlock()`` when the command ends). A folder another
    process got to first is left alone."""
    existed = folder.path.exists()
    folder.create()
    fsync_dir(folder.path.resolve().parent)  # the run folder's own entry reaches the disk
    folder.lock()  # refused (one line) when another live process holds it: nothing removed
    if folder.exists():  # another process started a run here between our check and our lock
        folder.unlock()
        raise ConfigError(f"run folder {folder.path} was just created by another process; "
                          "choose another --out")
    try:
        yield folder
    except BaseException:
        ours = not existed and not folder.exists()  # still no config.json: nobody's run
        folder.unlock()
        if ours:
            shutil.rmtree(folder.path, ignore_errors=True)
        raise
