"""The jobs of a comparison: one (variant, domain, seed) each, in its own run folder.

``npmask.compare`` splits its grid into independent jobs. Job ``(v, d, k)`` is an ordinary
``npmask.train`` run folder ``<out>/[seed<k>/]<v>/<d>/`` whose config trains the one domain ``d``
with variant ``v`` and seed ``k`` (same atomic files, checkpoints and resume as any run). A domain's
seed is a function of (run seed, domain name) only (:func:`~.domain_training.domain_seed`), so a job
gives the numbers the same domain gets in a run folder training several domains.

:func:`run_job` is what every executor runs for one job, in the driver's own process
(:func:`run_local`) or in a worker of a Ray cluster (:mod:`npmask.training.ray_executor`): it
creates the job folder or continues it (taking the folder's lock, so two processes never train one
job), trains, and returns a small JSON-able summary. A job whose folder says it is done is skipped;
a partial one resumes from its last epoch's checkpoint. A job that fails (damaged files, a NaN loss)
returns its error instead of raising it, so the others go on. Nothing here needs the other jobs:
the Emax of the S-score comes from the finetune jobs only when the table is assembled
(:func:`collect`), after every job has ended.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from ..io import atomic_write_text
from . import validate
from .config import TrainConfig, load_config, save_config
from .domain_training import train_domains
from .errors import ConfigError, one_line
from .fit import StopRequested
from .run_folder import RunFolder

LAYOUT = "one run folder per (variant, domain, seed)"
BASE_CACHE = "base_accuracy.json"  # the name domain_training.base_accuracy caches it under


def seed_dir(out, seed, seeds) -> Path:
    """``<out>/seed<k>`` with ``--seeds``, else ``<out>``."""
    return Path(out) / f"seed{seed}" if seeds is not None else Path(out)


def job_specs(base: TrainConfig, variants, seeds, out, command: str) -> list[dict]:
    """Every job of the grid, finetune first within each seed (the order the local executor runs
    them in); each a plain dict an executor can ship to another process."""
    specs = []
    order = sorted(variants, key=lambda v: v != "finetune")
    for seed in (seeds if seeds is not None else [base.seed]):
        for v in order:
            for d in base.domains:
                cfg = TrainConfig.from_dict({**base.to_dict(), "variant": v, "seed": seed,
                                             "domains": [d]})
                specs.append({"variant": v, "domain": d, "seed": seed,
                              "folder": str(seed_dir(out, seed, seeds) / v / d),
                              "config": cfg.to_dict(), "command": command, "part_of": str(out)})
    return specs


def name(spec: dict) -> str:
    return f"{spec['variant']}/{spec['domain']} seed {spec['seed']}"


def run_job(spec: dict, *, progress: bool = False, stop_after=None, log=None) -> dict:
    """Train (or finish, or skip) one job; ``{"status": "done", "acc", "epochs", ...}`` or
    ``{"status": "failed", "error": one line}``. StopRequested and KeyboardInterrupt propagate."""
    folder = RunFolder(spec["folder"])
    d = spec["domain"]
    t0 = time.time()
    try:
        want = TrainConfig.from_dict(spec["config"])
        if folder.exists():
            folder.lock()
            cfg = load_config(str(folder.config))
            validate.check_train_config(cfg, where=str(folder.config))
            have = cfg.to_dict()
            diff = sorted(k for k, v in want.to_dict().items() if have.get(k) != v)
            if diff:
                raise ConfigError(f"{folder.config} was written with other settings "
                                  f"({', '.join(diff)}) than this comparison's; move the folder "
                                  "away to train the job again")
        else:
            cfg = want
            with validate.new_folder(folder):
                save_config(str(folder.config), cfg,
                            {"command": spec["command"], "part_of": spec["part_of"]})
        done = folder.progress()["done"]
        skipped = d in done and folder.results_json.is_file()
        if not skipped:
            folder.drop_metrics_after_checkpoints()  # as npmask.train does on resume
            _share_base_accuracy(Path(spec["part_of"]) / BASE_CACHE, folder.path / BASE_CACHE)
            train_domains(cfg, folder, data_root=cfg.data_root, progress=progress,
                          stop_after=stop_after, log=log)
            _share_base_accuracy(folder.path / BASE_CACHE, Path(spec["part_of"]) / BASE_CACHE)
            done = folder.progress()["done"]
        return {"status": "done", "acc": float(done[d]["test_acc"]),
                "epochs": int(done[d]["epochs"]), "skipped": skipped,
                "seconds": round(time.time() - t0, 1)}
    except (StopRequested, KeyboardInterrupt):
        raise
    except Exception as err:  # one job's failure must not stop the others
        message = one_line(err)
        if message is None:  # a bug: its traceback goes to the log, its last line to the table
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            message = f"{type(err).__name__}: {err}".splitlines()[0]
        return {"status": "failed", "error": message, "seconds": round(time.time() - t0, 1)}
    finally:
        folder.unlock()


def _share_base_accuracy(src: Path, dst: Path) -> None:
    """Copy the pretraining domain's measured accuracy (domain_training.base_accuracy's cache,
    written only when the backbone's JSON lacks it) between the comparison folder and a job folder:
    every job of a comparison has the same backbone, data and evaluation settings, so the backbone's
    test split is evaluated once per comparison, not once per job."""
    if src.is_file() and not dst.is_file():
        atomic_write_text(str(dst), src.read_text(encoding="utf-8"))


def report_line(spec: dict, res: dict, *, done: int, total: int, running: int, queued: int) -> str:
    """One progress line for a finished job: its figure (or its error) and the grid's counts."""
    counts = f"[{done}/{total} done, {running} running, {queued} queued]"
    if res["status"] == "done":
        what = "already done" if res.get("skipped") else f"{res['epochs']} epochs, {res['seconds']:.0f} s"
        return f"{counts} {name(spec)}: {res['acc']:.2f}% ({what})"
    return f"{counts} {name(spec)}: FAILED: {res['error']}"


def run_local(specs, *, progress: bool, stop_after=None, echo=print) -> list[dict] | None:
    """Run the jobs one after the other in this process; None when ``stop_after`` epochs (in
    total) have run (``--stop-after-epochs``, for testing resume)."""
    results, budget = [], stop_after
    for i, spec in enumerate(specs):
        before = _epochs_done(spec)
        res = run_job(spec, progress=progress, stop_after=budget,
                      log=(lambda s: echo(s)) if progress else None)
        results.append(res)
        left = len(specs) - i - 1
        echo(report_line(spec, res, done=i + 1, total=len(specs), running=min(1, left),
                         queued=max(0, left - 1)))
        if budget:
            budget -= _epochs_done(spec) - before
            if budget <= 0:
                raise StopRequested("stopped as requested")
    return results


def _epochs_done(spec) -> int:
    folder = RunFolder(spec["folder"])
    if not folder.progress_file.is_file():
        return 0
    try:
        done = folder.progress()["done"]
    except ConfigError:
        return 0
    return int(done[spec["domain"]]["epochs"]) if spec["domain"] in done else 0


def running(spec) -> bool:
    """Whether some process holds the job folder's lock now (what a cluster's driver can see of a
    job's state on shared storage)."""
    return (Path(spec["folder"]) / ".lock").is_file()


def collect(specs, outcomes, variants, domains) -> dict:
    """``{seed: {variant: {"acc", "files", "failed"}}}`` read back from the job folders, with the
    pretraining domain's accuracy first; ``outcomes`` (one per spec) name the failed jobs."""
    grid, base = {}, None
    for spec, res in zip(specs, outcomes):
        folder = RunFolder(spec["folder"])
        row = grid.setdefault(spec["seed"], {}).setdefault(
            spec["variant"], {"acc": {}, "files": [], "failed": {}})
        d = spec["domain"]
        if res is None or res["status"] != "done":
            row["acc"][d] = None
            row["failed"][d] = (res or {}).get("error", "not run")
            continue
        row["acc"][d] = float(folder.progress()["done"][d]["test_acc"])
        row["files"].append(folder.domain_file(d))
        if base is None and folder.results_json.is_file():
            got = json.loads(folder.results_json.read_text(encoding="utf-8"))
            if got.get("base_domain") in (got.get("acc") or {}):
                base = (got["base_domain"], float(got["acc"][got["base_domain"]]))
    for rows in grid.values():
        for v, row in rows.items():
            acc = {d: row["acc"].get(d) for d in domains}
            row["acc"] = {base[0]: base[1], **acc} if base else acc
    return {s: {v: grid[s][v] for v in variants} for s in grid}
