"""The settings of a training run, saved as ``config.json`` in its run folder.

Every number that influences a run lives in :class:`TrainConfig`, so ``config.json`` is enough to
repeat it (together with the library versions recorded beside it by :func:`environment`). A
resumed run reads its settings back from there; the command line cannot silently change them.

Protocol defaults (paper, section 4): Adam with lr 1e-4 for the masks, the k's and batch norm;
SGD with momentum 0.9 and lr 1e-3 for the classifier; batch 32; no weight decay; both rates
multiplied by 0.1 after a fixed number of epochs (45 of 60 on the Decathlon). Those rates were
tuned for 60 epochs over thousands to tens of thousands of images. A synthetic run (5 epochs of
5,000 images per domain, 780 steps) takes far fewer optimiser steps, so the synthetic defaults
scale both rates by 10 (see :data:`npmask.training.suites.SYNTHETIC_LR_SCALE` and the note in
config.json). The dataclass defaults below serve the Python API; the command line starts from
its benchmark's defaults (:data:`npmask.training.suites.BENCHMARKS`).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field

import numpy as np

from .. import __version__, models
from ..data.loader import PROTOCOLS
from ..io import atomic_write_text
from ..masking.variants import VARIANTS
from .errors import ConfigError

CONFIG_FILE = "config.json"


class _Settings:
    """to_dict/from_dict shared by the settings dataclasses (what config.json holds)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config has unknown settings {unknown}")
        return cls(**d)


@dataclass
class TrainConfig(_Settings):
    """All settings of one run of ``python -m npmask.train`` (one variant, several domains).

    benchmark:     "synthetic", "decathlon", "imagenet_to_sketch" or "folder" (where data, model,
                   schedule and Emax come from; npmask.training.suites).
    data_root:     folder holding one sub-folder per domain (the npmask data format).
    domains:       target domains, trained one after the other (each independently).
    model:         backbone architecture name, e.g. "wrn16_1" (see npmask.models).
    input_size:    side of the network input in pixels (32 synthetic, 64 Decathlon, 224
                   ImageNet-to-Sketch).
    backbone:      path of the pretrained backbone ``.npz``.
    variant:       the method variant or baseline (see npmask.masking).
    epochs:        epochs per domain. batch_size: images per step.
    lr_body:       Adam learning rate for masks, k's and batch norm (and all weights in finetune).
    lr_head:       SGD learning rate for the classifier. momentum: SGD momentum of the head.
    lr_decay_epochs: epochs after which both rates are multiplied by lr_decay (a list; [] = none).
    weight_decay:  L2 weight decay of both optimisers (0 in the paper).
    max_train:     use at most this many training images per domain (None: all), a fixed subset.
    mask_init:     [lo, hi]: real masks start as R ~ U(tau + lo, tau + hi) (paper: 1e-4, 2e-4).
    tau:           the mask threshold, M = 1[R >= tau] (paper: 0).
    seed:          everything random (mask init, heads, batch order, augmentation) derives from it.
    backend:       "numpy" or "cupy". dtype: "float32" (default) or "float64".
    cuda_graphs:   replay each training step from CUDA graphs (cupy only; off by default until it
                   has run on a GPU; npmask.training.graph_step).
    augmentation:  the loader's protocol: "auto", "pad_crop", "decathlon" (gtsrb/omniglot/svhn fed
                   whole at 72, the residual-adapters loader), "decathlon_crop64" (every domain
                   cropped to 64, the paper's text), "imagenet" (random-size crop + mirroring;
                   test resize 256 centre 224) or "none". See npmask.data.loader.
    train_split:   "train", or "train+val" (the paper's final Decathlon runs; the val split then
                   only serves to choose the schedule beforehand).
    emax:          {domain: Emax as an error fraction} for the S-score (None: no finetune run known).
    emax_source:   where ``emax`` came from (a published table, a finetune run folder).
    notes:         free text recorded with the run (e.g. why the learning rates were scaled).
    """

    benchmark: str = "synthetic"
    data_root: str | None = None
    domains: list = field(default_factory=list)
    model: str = "wrn16_1"
    input_size: int = 32
    backbone: str | None = None
    variant: str = "full"
    epochs: int = 3
    batch_size: int = 32
    lr_body: float = 1e-3
    lr_head: float = 1e-2
    momentum: float = 0.9
    lr_decay_epochs: list = field(default_factory=list)
    lr_decay: float = 0.1
    weight_decay: float = 0.0
    max_train: int | None = None
    mask_init: list = field(default_factory=lambda: [1e-4, 2e-4])
    tau: float = 0.0
    seed: int = 0
    backend: str = "numpy"
    dtype: str = "float32"
    cuda_graphs: bool = False
    augmentation: str = "auto"
    train_split: str = "train"
    emax: dict | None = None
    emax_source: str | None = None
    notes: str = ""

    def validate(self) -> "TrainConfig":
        """Check value ranges; raises ConfigError naming the setting."""
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("lr_body", "lr_head"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if any(int(e) < 1 for e in self.lr_decay_epochs):
            raise ConfigError(f"--lr-decay-epochs must be >= 1, got {self.lr_decay_epochs}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.cuda_graphs and self.backend != "cupy":
            raise ConfigError(f"--cuda-graphs needs --backend cupy (CUDA graphs replay GPU kernels; "
                              f"the backend is {self.backend})")
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"--max-train must be >= 1, got {self.max_train}")
        if len(self.mask_init) != 2 or not 0 < self.mask_init[0] < self.mask_init[1]:
            raise ConfigError(f"--mask-init must be LO,HI with 0 < LO < HI, got {self.mask_init}")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"--domains lists a domain twice: {self.domains}")
        if self.train_split not in ("train", "train+val"):
            raise ConfigError(f"--train-split must be train or train+val, got {self.train_split!r}")
        if self.augmentation not in ("auto", *PROTOCOLS):
            raise ConfigError(f"--augmentation must be auto or one of {', '.join(PROTOCOLS)}, "
                              f"got {self.augmentation!r}")
        return self


def environment() -> dict:
    """Versions that can change numbers: Python, NumPy, npmask, platform, BLAS, CuPy if used."""
    env = {"python": platform.python_version(), "numpy": np.__version__, "npmask": __version__,
           "platform": platform.platform(), "executable": sys.executable}
    try:
        info = np.show_config(mode="dicts")
        blas = info.get("Build Dependencies", {}).get("blas", {})
        env["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy without mode="dicts"
        pass
    return env


def save_config(path: str, config: TrainConfig, extra: dict | None = None) -> None:
    """Write ``{"config": ..., "environment": ..., **extra}`` to ``path`` (atomic, pretty JSON)."""
    doc = {"config": config.to_dict(), "environment": environment()}
    if extra:
        doc.update(extra)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def load_config(path: str, cls=TrainConfig):
    """Read the config saved by :func:`save_config` (returns the dataclass ``cls``)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: not a run folder") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ConfigError(f"{path} has no 'config' object: not an npmask run folder's config")
    return cls.from_dict(doc["config"])


@dataclass
class PretrainConfig(_Settings):
    """All settings of ``python -m npmask.pretrain`` (one network trained from scratch on one domain).

    data_root/domain: the domain folder to learn (default: the synthetic ``base`` domain).
    model/input_size: the architecture. epochs/batch_size: the schedule.
    lr, momentum, nesterov, weight_decay: SGD (the usual from-scratch recipe for WRNs).
    lr_decay_epochs/lr_decay: step decay. max_train: a fixed subset of the training images.
    eval_subset: the first N test images on which the recorded accuracy is also measured (what the
    test of the shipped backbone re-checks quickly). seed, backend, dtype, augmentation: as in
    :class:`TrainConfig`. save: where the backbone .npz (and its .json) are written.
    """

    data_root: str | None = None
    domain: str = "base"
    model: str = "wrn16_1"
    input_size: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_decay_epochs: list = field(default_factory=lambda: [10, 13])
    lr_decay: float = 0.1
    max_train: int | None = None
    eval_subset: int = 1000
    seed: int = 0
    backend: str = "numpy"
    dtype: str = "float32"
    augmentation: str = "auto"
    save: str | None = None

    def validate(self) -> "PretrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (np.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"--lr must be a finite number >= 0, got {self.lr}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        return self


def create_model(name: str, **kwargs):
    """``models.create`` with an unknown name (or impossible size) reported as a ConfigError."""
    try:
        return models.create(name, **kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_model(name: str, input_size: int = 32) -> None:
    """ConfigError listing the known architectures when ``name`` is not one of them."""
    create_model(name, num_classes=2, input_size=input_size)


def check_variant(name: str) -> None:
    """ConfigError listing the known variants and baselines when ``name`` is not one of them."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
