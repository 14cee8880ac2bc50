"""Train a backbone from scratch on one domain: the work behind ``python -m npmask.pretrain``.

An ordinary from-scratch training (SGD with Nesterov momentum and weight decay, step decay of the
learning rate) with a checkpoint after every epoch, then the weights written as a backbone ``.npz``
with a ``.json`` beside it (:func:`npmask.pretrained.save_backbone`). ``npmask.train`` calls
:func:`pretrain` too, when the synthetic benchmark's backbone is not shipped.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from ..backend import get_backend
from ..data.format import list_domains, read_meta
from ..optim import SGD, MultiStepLR
from ..pretrained import save_backbone
from . import batches
from .checkpoint import checkpoint_epoch
from .config import PretrainConfig, check_model, create_model, environment
from .errors import ConfigError
from .fit import fit
from .loop import evaluate
from .plots import plot_learning_curves
from .suites import resolve_data_root


def images_fingerprint(images, labels) -> str:
    """sha256 of uint8 images and their labels: whether a later check sees the very same test
    images, whatever code generated them."""
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def check(cfg: PretrainConfig) -> str:
    """Validate backend, model and data before anything is written; returns the data root."""
    get_backend(cfg.backend)  # BackendError (one line) before any work
    check_model(cfg.model, cfg.input_size)
    root = resolve_data_root("synthetic" if cfg.data_root is None else "folder", cfg.data_root,
                             [cfg.domain])
    if cfg.domain not in list_domains(root):
        raise ConfigError(f"unknown domain {cfg.domain!r} in {root}; available: "
                          f"{', '.join(list_domains(root)) or 'none'}")
    read_meta(Path(root) / cfg.domain)  # a malformed meta.json stops here, before the run folder
    return root


def pretrain(cfg: PretrainConfig, folder, *, progress=True, stop_after=None, command="") -> dict:
    """Train ``cfg.model`` from scratch on ``cfg.domain``; write the backbone; return the figures."""
    root = check(cfg)
    domain = batches.load(root, cfg.domain)
    dtype = np.dtype(cfg.dtype)
    train_it, test_it = batches.make_iterators(
        domain, batch_size=cfg.batch_size, seed=cfg.seed, backend=cfg.backend, dtype=dtype,
        protocol=cfg.augmentation, max_train=cfg.max_train, input_size=cfg.input_size)
    model = create_model(cfg.model, num_classes=domain.num_classes, input_size=cfg.input_size,
                         dtype=dtype, seed=cfg.seed)
    if cfg.backend != "numpy":
        model.to(cfg.backend)
    opt = SGD(model.parameter_refs(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
              weight_decay=cfg.weight_decay)
    sched = MultiStepLR(opt, milestones=sorted(cfg.lr_decay_epochs), gamma=cfg.lr_decay)
    _drop_metrics_after_checkpoint(folder)
    start = time.time()
    history = fit(
        model=model, optimizer=opt, scheduler=sched,
        batches_for_epoch=train_it.epoch, num_batches=len(train_it), epochs=cfg.epochs,
        checkpoint_path=folder.checkpoint("pretrain"),
        state_fn=model.state_dict, load_state_fn=model.load_state_dict,
        evaluate_fn=lambda: evaluate(model, test_it),
        log_fn=lambda r: folder.log({"domain": cfg.domain, **r}), desc=f"pretrain {cfg.domain}",
        progress=progress, extra={"model": cfg.model, "domain": cfg.domain, "seed": cfg.seed},
        epoch_budget=[stop_after] if stop_after else None)
    full = evaluate(model, test_it)
    sub_it = batches.make_iterators(domain, batch_size=cfg.batch_size, seed=cfg.seed,
                                    backend=cfg.backend, dtype=dtype, protocol=cfg.augmentation,
                                    max_train=cfg.max_train, max_test=cfg.eval_subset)[1]
    sub = evaluate(model, sub_it)
    info = {
        "model": cfg.model, "num_classes": domain.num_classes, "input_size": cfg.input_size,
        "dtype": cfg.dtype, "domain": cfg.domain, "data_root": str(root),
        "test_acc": round(full["acc"], 4), "test_images": full["n"],
        "eval_subset": int(sub["n"]), "subset_acc": round(sub["acc"], 4),
        "eval_subset_sha256": images_fingerprint(*(a[:int(sub["n"])] for a in domain.test)),
        "train_seconds_this_session": round(time.time() - start, 1),
        "epochs": cfg.epochs, "history": history,
        "command": command, "config": cfg.to_dict(), "environment": environment(),
        "domain_meta": {k: domain.meta.get(k) for k in ("source", "counts", "image_size")},
        # what the test of a shipped backbone needs to rebuild and normalise the same test images
        "data_config": (domain.meta.get("extra") or {}).get("config"),
        "mean": [float(v) for v in domain.mean], "std": [float(v) for v in domain.std],
    }
    save_backbone(cfg.save, model, info)
    plot_learning_curves([{"domain": cfg.domain, **r} for r in history],
                         folder.plots / "learning_curves.png", title=f"pretraining {cfg.model}")
    return {"save": cfg.save, "test_acc": full["acc"], "subset_acc": sub["acc"],
            "eval_subset": sub["n"]}


def _drop_metrics_after_checkpoint(folder) -> None:
    """On resume, drop metrics.jsonl lines of epochs the checkpoint does not hold (the process
    died between the log line and the checkpoint, see npmask.training.fit): they run again."""
    if not folder.metrics.is_file():
        return
    ck = folder.checkpoint("pretrain")
    done = checkpoint_epoch(ck) if ck.is_file() else 0
    folder.truncate_metrics(lambda r: r.get("epoch", 0) <= done)
