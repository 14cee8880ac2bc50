"""Train a list of target domains on a shared backbone, one after the other or side by side
(one process each, :mod:`npmask.training.domain_workers`), resumably.

For every target domain:

1. add it to the :class:`~npmask.multidomain.MultiDomainModel` with the run's variant;
2. train it with the paper's protocol -- Adam for the body group (real masks, learned k's, domain
   BN; every weight for ``finetune``), SGD with momentum for the head, both decayed by
   ``lr_decay`` after each of ``lr_decay_epochs`` -- checkpointing after every epoch;
3. store it (1-bit masks) as ``domains/<d>.npz`` and record its test accuracy in progress.json;

then score the run (accuracy per domain, S-score, # Params, S_p from the stored files) and draw the
plots. The S-score sums over every domain of the model, the pretraining one included, as tables 1-4
of the paper: its accuracy is the backbone's own (recorded in the backbone's JSON, or measured once
on its test split when the data is there and the JSON lacks it), the same for every variant. Domains are independent: each gets its own seed derived from (run seed, domain name), so a
domain's result does not depend on which domains came before it, nor on being resumed, nor on
which process trained it.
"""
from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

from ..backend import get_backend
from ..io import atomic_write_text
from ..masking.inspect import mask_statistics, plot_mask_statistics
from ..masking.variants import get_variant
from ..metrics import (decathlon_score, emax_from_accuracies, params_ratio, running_stats_share,
                       score_per_parameter)
from ..optim import SGD, Adam, MultiStepLR, Optimizers
from ..storage import load_domain as load_stored_domain
from ..storage import save_domain
from . import batches
from .backbone import load_run_backbone
from .domain_workers import train_in_workers
from .errors import ConfigError
from .fit import fit
from .loop import evaluate
from .plots import plot_learning_curves
from .run_folder import CONCURRENT_LOGS
from .results import markdown_table
from .validate import check_stored_domain


def domain_seed(seed: int, domain: str) -> int:
    """A seed for one domain: a function of the run seed and the domain's name only."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(domain.encode())]).generate_state(1)[0])


def build_optimizers(model, cfg):
    """The paper's two optimisers for the active domain, and the step-decay scheduler.

    body (masks, k's, BN; all weights for finetune): Adam(lr_body); head: SGD(lr_head, momentum).
    ``classifier_only`` has an empty body group: its Adam simply holds no parameter.
    """
    groups = model.parameter_groups()
    opt = Optimizers(body=Adam(groups["body"], lr=cfg.lr_body, weight_decay=cfg.weight_decay),
                     head=SGD(groups["head"], lr=cfg.lr_head, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay))
    sched = MultiStepLR(opt, milestones=sorted(cfg.lr_decay_epochs), gamma=cfg.lr_decay)
    return opt, sched


def train_domains(cfg, folder, *, data_root, progress=True, stop_after=None, log=print,
                  workers: int = 1) -> dict:
    """Train every domain of ``cfg`` not yet finished in ``folder``; returns the results dict.

    ``workers`` > 1 trains that many domains at a time, each in its own process
    (:mod:`npmask.training.domain_workers`): the domains are independent, so every number is the
    one the domains trained one after the other give. Not with ``stop_after`` (a test's simulated
    kill counts the epochs of one process), nor without ``fcntl`` (Windows: metrics.jsonl takes
    one writer there).
    """
    get_backend(cfg.backend)
    model, info = load_run_backbone(cfg)
    if cfg.backend != "numpy":
        model.to(cfg.backend)
    budget = [stop_after] if stop_after else None
    started = time.time()
    todo = []
    for d in cfg.domains:
        done = folder.progress()["done"]
        if d in done and folder.domain_file(d).is_file():
            check_stored_domain(folder.domain_file(d), domain=d, variant=cfg.variant,
                                fingerprint=model.fingerprint())
            load_stored_domain(model, folder.domain_file(d), name=d)
            continue
        if d in model.domains:
            raise ConfigError(f"domain {d!r} has the name of the pretraining domain")
        todo.append(d)
    if workers > 1 and len(todo) > 1 and budget is None and CONCURRENT_LOGS:
        for d, result in train_in_workers(train_domain, cfg, folder, todo, data_root=data_root,
                                          progress=progress, workers=workers):
            _finished(folder, d, result, log)
        for d in todo:                      # the model of the run, in the domains' order
            load_stored_domain(model, folder.domain_file(d), name=d)
    else:
        for d in todo:
            _finished(folder, d, train_domain(cfg, folder, model, d, data_root=data_root,
                                              progress=progress, budget=budget), log)
    base = base_accuracy(cfg, folder, model, info, data_root)
    return finish(cfg, folder, model, seconds=time.time() - started, base=base)


def train_domain(cfg, folder, model, d, *, data_root, progress=True, budget=None, echo=None) -> dict:
    """Add domain ``d`` to ``model``, train it (resuming from its checkpoint) and store it as
    ``domains/<d>.npz``; returns its result record for progress.json."""
    seed = domain_seed(cfg.seed, d)
    domain = batches.load(data_root, d)
    train_it, test_it = batches.make_iterators(
        domain, batch_size=cfg.batch_size, seed=seed, backend=cfg.backend, dtype=np.dtype(cfg.dtype),
        protocol=cfg.augmentation, max_train=cfg.max_train, input_size=cfg.input_size,
        train_split=cfg.train_split)
    model.add_domain(d, domain.num_classes, cfg.variant, seed=seed, tau=cfg.tau,
                     mask_init=tuple(cfg.mask_init))
    model.set_domain(d)
    model.set_data_info(d, domain, input_size=test_it.output_shape[1:])  # saved for predict
    net = model.network(d)
    opt, sched = build_optimizers(model, cfg)
    t0 = time.time()
    history = fit(
        model=model, optimizer=opt, scheduler=sched, batches_for_epoch=train_it.epoch,
        num_batches=len(train_it), epochs=cfg.epochs, checkpoint_path=folder.checkpoint(d),
        state_fn=net.state_dict, load_state_fn=net.load_state_dict,
        evaluate_fn=lambda: evaluate(model, test_it),
        log_fn=lambda r, d=d: folder.log({"domain": d, "variant": cfg.variant, **r}),
        desc=f"{d} ({cfg.variant})", progress=progress, cuda_graphs=cfg.cuda_graphs,
        extra={"variant": cfg.variant, "domain": d, "seed": cfg.seed, "model": cfg.model,
               "epochs": cfg.epochs, "batch_size": cfg.batch_size},
        epoch_budget=budget, echo=echo)
    final = history[-1]
    save_domain(model, d, folder.domain_file(d))
    return {"test_acc": final["test_acc"], "test_loss": final["test_loss"],
            "train_acc": final["train_acc"], "epochs": len(history),
            "seconds_this_session": round(time.time() - t0, 1),
            "train_images": train_it.num_samples, "test_images": test_it.num_samples}


def _finished(folder, d, result, log) -> None:
    """Record a trained and stored domain: progress.json, then its checkpoint goes."""
    folder.mark_done(d, result)
    folder.checkpoint(d).unlink(missing_ok=True)  # the domain file now holds what matters
    if log:
        log(f"{d}: test accuracy {result['test_acc']:.2f}% after {result['epochs']} epochs "
            f"({result['seconds_this_session']:.0f} s)")


def base_accuracy(cfg, folder, model, info, data_root) -> dict:
    """``{"domain", "acc", "source"}`` of the pretraining domain: the backbone's test accuracy (%).

    From the backbone's JSON (``test_acc``, written by npmask.pretrain); when it lacks one and the
    pretraining domain's folder is under ``data_root``, measured once on its test split and kept in
    the run folder (``base_accuracy.json``). ``acc`` is None when neither is possible.
    """
    name = model.base_domain
    if info.get("test_acc") is not None:
        return {"domain": name, "acc": float(info["test_acc"]),
                "source": f"the backbone's JSON ({Path(str(cfg.backbone)).with_suffix('.json').name})"}
    cache = Path(folder.path) / "base_accuracy.json"
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = None  # a damaged cache is measured again below (and rewritten)
        if isinstance(cached, dict) and {"domain", "acc", "source"} <= cached.keys():
            return cached
    if data_root is None or not (Path(data_root) / name / "meta.json").is_file():
        return {"domain": name, "acc": None,
                "source": f"missing: the backbone's JSON has no test_acc and {name!r} is not under "
                          "the data folder"}
    domain = batches.load(data_root, name)
    _, test_it = batches.make_iterators(
        domain, batch_size=cfg.batch_size, seed=0, backend=cfg.backend, dtype=np.dtype(cfg.dtype),
        protocol=cfg.augmentation, input_size=cfg.input_size)
    net = model.network(name)  # the pretrained network itself, frozen: always in eval mode
    net.eval()
    acc = float(evaluate(net, test_it)["acc"])
    out = {"domain": name, "acc": acc,
           "source": f"measured on the {test_it.num_samples} test images of {name!r}"}
    atomic_write_text(str(cache), json.dumps(out, indent=2) + "\n")
    return out


def with_base(acc: dict, base: dict | None) -> dict:
    """``acc`` with the pretraining domain's accuracy first (when it is known)."""
    if not base or base.get("acc") is None:
        return dict(acc)
    return {base["domain"]: float(base["acc"]), **acc}


def emax_from_run(run_dir) -> tuple[dict, str]:
    """Emax (fractions) from a finished ``finetune`` run folder: 2 x its test error per domain.

    ``run_dir`` is a train run folder, or the ``finetune`` folder of a comparison, whose jobs are
    one run folder per domain (``<finetune>/<domain>/``): their accuracies are taken together.
    """
    if Path(run_dir).is_file():
        raise ConfigError(f"--emax-from {run_dir} is a file; it must be the finetune run's folder "
                          "(the one holding results.json)")
    jobs = sorted(Path(run_dir).glob("*/results.json"))
    if not (Path(run_dir) / "results.json").is_file() and jobs:
        acc = {}
        for job in jobs:
            acc.update(_finetune_accuracies(job.parent))
        return (emax_from_accuracies(acc, percent=True),
                f"2 x the test error of the finetune runs in {run_dir}")
    return (emax_from_accuracies(_finetune_accuracies(run_dir), percent=True),
            f"2 x the test error of the finetune run in {run_dir}")


def _finetune_accuracies(run_dir) -> dict:
    """The checked test accuracies (in %) of a finished ``finetune`` run folder."""
    p = Path(run_dir) / "results.json"
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--emax-from {run_dir}: no results.json (is it a finished run?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--emax-from {p}: not valid JSON ({err})") from None
    if not isinstance(res, dict):
        raise ConfigError(f"--emax-from {p}: expected a JSON object, got {type(res).__name__}")
    acc = res.get("acc")
    if not isinstance(acc, dict) or not acc or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 100
            for a in acc.values()):
        raise ConfigError(f"--emax-from {p}: field 'acc' must map domains to test accuracies in "
                          f"[0, 100] %, got {json.dumps(acc)[:80]}")
    perfect = sorted(d for d, a in acc.items() if a == 100)
    if perfect:
        raise ConfigError(f"--emax-from {p}: the finetune run is 100% accurate on "
                          f"{', '.join(perfect)}, so Emax = 2 x its error is 0 and the S-score is "
                          "undefined there")
    if res.get("variant") != "finetune":
        raise ConfigError(f"--emax-from {run_dir}: that run trained variant {res.get('variant')!r}; "
                          "Emax comes from a 'finetune' run")
    return res["acc"]


def score(acc: dict, emax: dict | None, domain_files) -> dict:
    """S-score (eq. 3), # Params and S_p for test accuracies ``acc`` (in %) and stored files.

    ``acc`` holds every domain of the model, the pretraining one included (see :func:`with_base`);
    the S-score sums over all of them and is None when Emax is missing for any. ``# Params`` counts
    what the paper counts (footnote 3); ``running_stats`` is what the stored BN running statistics
    would add to it.
    """
    params = params_ratio(domain_files) if domain_files else None
    stats = running_stats_share(domain_files) if domain_files else None
    s = sp = None
    per = None
    if emax is not None and all(d in emax for d in acc):
        s, per = decathlon_score({d: 1.0 - a / 100.0 for d, a in acc.items()}, emax)
        sp = score_per_parameter(s, params) if params else None
    return {"score": s, "score_per_domain": per, "params": params, "sp": sp,
            "running_stats": stats}


def finish(cfg, folder, model, seconds: float = 0.0, base: dict | None = None) -> dict:
    """Score the finished run, write results.md/results.json and the plots; returns the results.

    ``base``: the pretraining domain's accuracy (:func:`base_accuracy`); its column comes first and
    it is part of the S-score.
    """
    done = folder.progress()["done"]
    acc = with_base({d: done[d]["test_acc"] for d in cfg.domains if d in done}, base)
    files = [folder.domain_file(d) for d in cfg.domains if d in done]
    sc = score(acc, cfg.emax, files)
    columns = list(acc)
    res = {"variant": cfg.variant, "model": cfg.model, "benchmark": cfg.benchmark,
           "domains": cfg.domains, "base_domain": (base or {}).get("domain"),
           "base_acc_source": (base or {}).get("source"), "acc": acc, **sc, "emax": cfg.emax,
           "emax_source": cfg.emax_source, "seed": cfg.seed, "epochs": cfg.epochs,
           "seconds_this_session": round(seconds, 1)}
    atomic_write_text(str(folder.results_json), json.dumps(res, indent=2) + "\n")
    row = {"method": cfg.variant, "acc": acc, "score": sc["score"], "params": sc["params"],
           "sp": sc["sp"]}
    notes = [f"Backbone: `{cfg.backbone}` ({cfg.model}, {cfg.input_size}x{cfg.input_size}); "
             f"variant `{cfg.variant}`; {cfg.epochs} epochs per domain, batch {cfg.batch_size}, "
             f"Adam lr {cfg.lr_body:g} (masks, k's, BN), SGD lr {cfg.lr_head:g} momentum "
             f"{cfg.momentum:g} (head), x{cfg.lr_decay:g} after epoch(s) "
             f"{', '.join(map(str, cfg.lr_decay_epochs)) or 'none'}; seed {cfg.seed}."]
    if base:
        notes.append(f"Pretraining domain `{base['domain']}` (first column, scored like the others): "
                     f"the backbone's accuracy, from {base['source']}.")
    if sc["score"] is None:
        notes.append("S-score and S_p: **missing** -- Emax comes from the fine-tuning baseline, "
                     "which has not been run for these domains. Run `python -m npmask.train "
                     "--variant finetune --out runs/finetune` with the same settings and pass "
                     "`--emax-from runs/finetune`, or use `python -m npmask.compare`.")
    else:
        notes.append(f"Emax: {cfg.emax_source}.")
    notes.append("# Params = 1 + sum of the bits the stored domain files add / (32 N_p), "
                 "classifiers excluded (paper, footnote 3), with the pretraining domain as one of T: "
                 "masks, k's and BN weights and biases, as the paper counts them"
                 + (f"; the stored BN running statistics would add {sc['running_stats']:.4f}."
                    if sc.get("running_stats") else "."))
    if cfg.notes:
        notes.append(f"Notes: {cfg.notes}")
    text = (f"# Results: {cfg.benchmark} benchmark, `{cfg.variant}`\n\n"
            + markdown_table([row], columns) + "\n" + "\n\n".join(notes) + "\n")
    atomic_write_text(str(folder.results_md), text)
    plot_learning_curves(folder.read_metrics(), folder.plots / "learning_curves.png",
                         title=f"{cfg.variant} on {cfg.benchmark}")
    _plot_masks(cfg, folder, model)
    return res


def _plot_masks(cfg, folder, model) -> None:
    """Figures 3/4 of the paper (mask density and k's per layer) for mask variants."""
    if not get_variant(cfg.variant).has_mask:
        return
    stats = {d: mask_statistics(model.network(d)) for d in cfg.domains if d in model.domains}
    stats = {d: s for d, s in stats.items() if s}
    if stats:
        plot_mask_statistics(stats, folder.plots / "masks_and_ks.png",
                             title=f"{cfg.variant}: mask density and k per layer")
