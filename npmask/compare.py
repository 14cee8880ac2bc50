"""Compare variants and baselines on the same domains and backbone: ``python -m npmask.compare``.

Trains every variant in ``--variants`` (default: the rows of tables 1 and 5 of the paper that
matter most) with identical settings -- same backbone, domains, epochs, learning rates and seed --
as independent jobs, one per (variant, domain, seed), each an ordinary ``npmask.train`` run folder
``<out>/<variant>/<domain>/`` (resumable), then writes ``<out>/results.md``: one row per variant,
one column per domain (test accuracy in %, the pretraining domain first), the S-score over every
domain with Emax = 2 x the error of the ``finetune`` row (so ``finetune`` scores 250 per domain),
``# Params`` from the stored domain files (footnote 3) and S_p = S / # Params.

``--executor local`` (default) runs the jobs one after the other in this process; ``--executor
ray`` submits one Ray task per job to a cluster (``--address``, or a local one), each asking for
``--cpus-per-job``/``--gpus-per-job``, so several train at once (``pip install 'npmask[ray]'``;
on several machines ``--out``, the data and the backbone must be on shared storage). One line per
finished job gives its accuracy and how many are running, queued and done. Running the same
command again (or ``--resume``) skips finished jobs and resumes partial ones from their last
epoch. A job that fails is reported with its error, the others go on, and the table marks it.

``--seeds 0,1,2`` repeats every (variant, domain) once per seed, in ``<out>/seed<k>/<variant>/<domain>/``,
scores each seed with its own ``finetune`` row, and prints mean ± std (sample std) per cell, as the
paper reports averages over runs; results.json keeps every run. ``--table PATH`` also writes the table there
together with the command that produced it (how ``benchmarks/results/compare_synthetic.md`` was
made).

Emax needs the seed's ``finetune`` jobs only when the table is assembled, after every job has
ended; without a finetune row the S-score columns say n/a.

Examples::

    python -m npmask.compare                                   # synthetic benchmark, 8 rows
    python -m npmask.compare --variants classifier_only,finetune,full --domains digits,textures
    python -m npmask.compare --out runs/cmp --resume           # continue after a kill
    python -m npmask.compare --seeds 0,1,2 --max-train 1000     # mean +- std over 3 runs
    python -m npmask.compare --executor ray --address auto --gpus-per-job 1 --backend cupy
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

from .io import atomic_write_text, remove_stale_temps
from .metrics import emax_from_accuracies
from .training import cli, grid, validate
from .training.config import TrainConfig
from .training.domain_training import score
from .training.errors import ConfigError, exit_on_error
from .training.fit import StopRequested
from .training.lock import RunLock
from .training.results import markdown_table, mean_std_row
from .training.run_folder import resume_target

PROG = "python -m npmask.compare"
DEFAULT_VARIANTS = ["classifier_only", "finetune", "piggyback", "piggyback_bn", "simple", "full",
                    "full_sigmoid", "full_channelwise"]


def build_parser():
    p = cli.parser(PROG, __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
                   .split("Examples::")[0].strip(), epilog="examples:" + __doc__.split("Examples::")[1])
    p.add_argument("--variants", type=cli.name_list, metavar="V1,V2",
                   help="variants and baselines to train, in table order (default: "
                        + ",".join(DEFAULT_VARIANTS) + ")")
    p.add_argument("--seeds", type=cli.int_list, metavar="S1,S2",
                   help="run every variant once per seed and report mean ± std per cell (default: "
                        "one run with --seed)")
    p.add_argument("--table", metavar="PATH",
                   help="also write the markdown table and the command that produced it to PATH")
    # Every setting of npmask.train applies to all variants alike.
    skip = {"--variant", "--emax-from", "--out", "--resume", "--help", "-h", "--stop-after-epochs"}
    for action in cli.add_train_arguments(cli.parser(PROG, ""))._actions:
        if not action.option_strings or set(action.option_strings) & skip:
            continue
        kwargs = {"help": action.help, "default": argparse.SUPPRESS}
        if action.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            for attr in ("type", "choices", "metavar"):
                if getattr(action, attr) is not None:
                    kwargs[attr] = getattr(action, attr)
        p.add_argument(*action.option_strings, **kwargs)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where the (variant, domain, seed) jobs run: local (default), one after "
                        "the other in this process; ray, one Ray task per job on a running cluster "
                        "(--address) or a local one (needs pip install 'npmask[ray]')")
    p.add_argument("--address", metavar="ADDR",
                   help="with --executor ray: the cluster to submit to (auto: the one this "
                        "machine belongs to; default: start a local one)")
    p.add_argument("--gpus-per-job", type=float, metavar="G",
                   help="with --executor ray: GPUs each job asks for (default 0; 1 with "
                        "--backend cupy on GPU nodes)")
    p.add_argument("--cpus-per-job", type=float, metavar="C",
                   help="with --executor ray: CPUs each job asks for (default 1; also its "
                        "NPMASK_THREADS unless that is set)")
    p.add_argument("--out", metavar="DIR", help="comparison folder (default: runs/compare-<time>); "
                   "running the same command again continues it")
    p.add_argument("--resume", action="store_true",
                   help="continue the comparison in --out (default: the newest runs/compare-*)")
    p.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="stop (as if killed) after N epochs in total; for testing --resume")
    return p


def main(argv=None) -> int:
    with exit_on_error(PROG):
        validate.check_environment()  # NPMASK_THREADS, NPMASK_DATA: one line, before any work
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG) as ctx:
        start = time.time()
        text = run(vars(args), argv, ctx)
        if text is None:
            return 0
        print(text)
        print(f"wall time {time.time() - start:.0f} s")
    return 0


def run(ns: dict, argv=None, ctx=None) -> str | None:
    """Run every (variant, domain, seed) job (skipping finished ones, resuming partial ones) and
    write the comparison table."""
    validate.check_args(ns)
    executor = _check_executor(ns)
    # on Ray the jobs check their device where they run: the driver may have no GPU
    with (validate.device_checked_by_workers() if executor == "ray" else contextlib.nullcontext()):
        out, variants, seeds, base, command, resume = _settings(ns, argv)
    if ns.get("table"):  # written once every job has ended: checked before the first
        if Path(ns["table"]).is_dir():
            raise ConfigError(f"--table {ns['table']} is a folder; give the path of the markdown "
                              "file to write")
        validate.check_creatable("--table", ns["table"], Path(ns["table"]))
    ray_executor = _ray_executor() if executor == "ray" else None  # installed? before any folder
    top = _CompareFolder(out)
    if resume:
        top.lock()
    else:
        with validate.new_folder(top):
            atomic_write_text(str(Path(out) / "compare.json"), json.dumps(
                {"variants": variants, "seeds": seeds, "config": base.to_dict(),
                 "command": command, "layout": grid.LAYOUT}, indent=2) + "\n")
    if ctx is not None:
        ctx.on_exit(top.unlock)
        ctx.resume = f"{PROG} --resume --out {out}"
    specs = grid.job_specs(base, variants, seeds, out, command)
    quiet = ns.get("quiet", False)
    print(f"{len(specs)} jobs ({len(variants)} variants x {len(base.domains)} domains x "
          f"{len(seeds or [base.seed])} seed(s)) on the {executor} executor, in {out}",
          file=sys.stderr)
    if executor == "ray":
        outcomes = ray_executor.run(
            specs, address=ns.get("address"), cpus=ns.get("cpus_per_job", 1.0),
            gpus=ns.get("gpus_per_job", 0.0), progress=not quiet,
            echo=lambda s: print(s, file=sys.stderr, flush=True))
    else:
        try:
            outcomes = grid.run_local(specs, progress=not quiet, stop_after=ns.get("stop_after_epochs"),
                                      echo=lambda s: print(s, file=sys.stderr, flush=True))
        except StopRequested as stop:
            print(f"{stop}; continue with: {PROG} --resume --out {out}", file=sys.stderr)
            return None
    rows = grid.collect(specs, outcomes, variants, base.domains)
    per_seed = {}  # seed -> (rows by variant, emax, emax_source)
    for seed, by_variant in rows.items():
        emax, emax_source = base.emax, base.emax_source
        fine = by_variant.get("finetune")
        if emax is None and fine is not None and not fine["failed"]:
            emax, emax_source = _emax(fine["acc"], seeds is not None)
        elif emax is None and fine is not None:
            emax_source = f"missing (the finetune row failed on {', '.join(sorted(fine['failed']))})"
        per_seed[seed] = (by_variant, emax, emax_source)
    text = write_table(out, variants, per_seed, base, command, ns.get("table"), seeds)
    failed = [f"{grid.name(s)} ({r['error']})" for s, r in zip(specs, outcomes)
              if r["status"] != "done"]
    if failed:
        print(text)
        raise ConfigError(f"{len(failed)} of {len(specs)} jobs failed (marked in the table): "
                          + "; ".join(failed) + f"; fix the cause, then continue with: {PROG} "
                          f"--resume --out {out}")
    return text


def _settings(ns: dict, argv):
    """(out, variants, seeds, base config, command, resume?) of a new or continued comparison,
    every setting checked before anything is written."""
    resume = bool(ns.get("resume"))
    if not resume and ns.get("out") and (Path(ns["out"]) / "compare.json").is_file():
        resume = True  # the same command again continues the comparison (flags are checked below)
        print(f"continuing the comparison in {ns['out']}", file=sys.stderr)
    if resume:
        out = resume_target(ns.get("out"), "compare-", what="comparison folder")
        doc = _read_json(Path(out) / "compare.json")
        variants, base = _read_compare(doc, Path(out) / "compare.json")
        if doc.get("layout") != grid.LAYOUT:
            raise ConfigError(f"{out} was made by an older npmask (one run folder per variant, not "
                              f"{grid.LAYOUT}); finish it with that version or start a new "
                              "comparison in another --out")
        validate.check_train_run(base, where=str(Path(out) / "compare.json"))
        seeds = doc.get("seeds")
        given = {k: v for k, v in ns.items() if k in cli.TRAIN_FLAGS}
        cli.check_resume_conflicts(given, base.to_dict(), cli.TRAIN_FLAGS)
        if ns.get("variants") and ns["variants"] != variants:
            raise ConfigError(f"--variants differs from the comparison's {variants}")
        if ns.get("seeds") and ns["seeds"] != seeds:
            raise ConfigError(f"--seeds differs from the comparison's {seeds}")
        command = doc["command"]
    else:
        variants = ns.get("variants") or list(DEFAULT_VARIANTS)
        if len(set(variants)) != len(variants):
            raise ConfigError(f"--variants lists a variant twice: {variants}")
        for v in variants:
            cli.check_variant(v)
        seeds = ns.get("seeds")
        if seeds is not None:
            if "seed" in ns:
                raise ConfigError("give either --seed or --seeds, not both")
            if not seeds or len(set(seeds)) != len(seeds):
                raise ConfigError(f"--seeds must list distinct seeds, got {seeds}")
            if min(seeds) < 0:
                raise ConfigError(f"--seeds must be >= 0, got {seeds}")
        given = {k: v for k, v in ns.items() if k in cli.TRAIN_FLAGS}
        if ns.get("out"):  # before any data is generated or read
            validate.check_new_out(ns["out"], "compare", PROG)
        base = cli.train_config_from_args({**given, "variant": "full"})
        out = ns.get("out") or cli.default_out("compare", base.benchmark)
        validate.check_new_out(out, "compare", PROG)
        command = cli.command_line("npmask.compare", argv)
    return out, variants, seeds, base, command, resume


def _ray_executor():
    """npmask.training.ray_executor, or one line saying how to install Ray."""
    try:
        # optional dependency: only --executor ray imports Ray (pip install 'npmask[ray]')
        from .training import ray_executor
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "ray":
            raise
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install "
                          "'npmask[ray]' (or pip install 'ray>=2.9')") from None
    return ray_executor


def _emax(acc: dict, per_seed: bool):
    """(Emax in fractions = 2 x the finetune row's test error per domain, its source); Emax None
    with the reason as source when that row is 100% accurate somewhere (Emax would be 0)."""
    perfect = sorted(d for d, a in acc.items() if a == 100)
    if perfect:
        return None, (f"undefined: the finetune row is 100% accurate on {', '.join(perfect)}, so "
                      "Emax = 2 x its error would be 0")
    return emax_from_accuracies(acc, percent=True), (
        "2 x the test error of the finetune row" + (" of the same seed" if per_seed else ""))


def _check_executor(ns: dict) -> str:
    """--executor and the flags that go with it: one line for a bad combination or value."""
    executor = ns.get("executor", "local")
    if executor != "ray":
        given = [f for f, k in (("--address", "address"), ("--gpus-per-job", "gpus_per_job"),
                                ("--cpus-per-job", "cpus_per_job")) if ns.get(k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} "
                              "with --executor ray")
        return executor
    if ns.get("stop_after_epochs") is not None:
        raise ConfigError("--stop-after-epochs only applies with --executor local")
    cpus, gpus = ns.get("cpus_per_job"), ns.get("gpus_per_job")
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        raise ConfigError(f"--cpus-per-job must be a number > 0, got {cpus:g}")
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise ConfigError(f"--gpus-per-job must be a number >= 0, got {gpus:g}")
    for key, default in (("cpus_per_job", 1.0), ("gpus_per_job", 0.0)):
        ns[key] = default if ns.get(key) is None else ns[key]
    return executor


def write_table(out, variants, per_seed, base, command, table_path=None, seeds=None) -> str:
    """Score every run with its seed's Emax, average over seeds, write results.md/json (and ``table_path``).

    ``per_seed``: {seed: ({variant: {"acc", "files", "failed"}} from :func:`grid.collect`,
    emax, emax_source)}. A row with a failed job has no S-score nor # Params; its cell says so.
    """
    runs = []
    for seed, (by_variant, emax, _) in per_seed.items():
        for v in variants:
            row = by_variant[v]
            sc = (score(row["acc"], emax, row["files"]) if not row["failed"] else
                  {"score": None, "score_per_domain": None, "params": None, "sp": None,
                   "running_stats": None})
            runs.append({"method": v, "seed": seed, "acc": row["acc"], **sc,
                         **({"failed": row["failed"]} if row["failed"] else {})})
    if seeds is None:
        rows = runs
    else:
        rows = [mean_std_row(v, [r for r in runs if r["method"] == v]) for v in variants]
    emax_source = next(iter(per_seed.values()))[2]
    emax = {s: e for s, (_, e, _) in per_seed.items()} if seeds is not None else \
        next(iter(per_seed.values()))[1]
    columns = list(rows[0]["acc"]) if rows else list(base.domains)
    table = markdown_table(rows, columns)
    ordered = "; ".join(f"{r['method']} {r['score']:.0f}" for r in
                        sorted(rows, key=lambda r: -(r["score"] or 0)) if r["score"] is not None)
    base_cols = [d for d in columns if d not in base.domains]
    seeds_text = (f"seeds {', '.join(map(str, seeds))} (each cell: mean ± sample std over "
                  f"{len(seeds)} runs)" if seeds is not None else f"seed {base.seed}")
    text = (f"# Variants compared on the {base.benchmark} benchmark\n\n" + table + "\n"
            f"Backbone `{Path(base.backbone).name}` ({base.model}, {base.input_size}x{base.input_size}), "
            f"{base.epochs} epochs per domain, batch {base.batch_size}, Adam lr {base.lr_body:g} "
            f"(masks, k's, BN; every weight for finetune), SGD lr {base.lr_head:g} momentum "
            f"{base.momentum:g} (head), x{base.lr_decay:g} after epoch(s) "
            f"{', '.join(map(str, base.lr_decay_epochs)) or 'none'}, "
            f"{'all' if base.max_train is None else base.max_train} training images per domain, "
            f"{seeds_text}.\n\n"
            + (f"`{base_cols[0]}` is the pretraining domain: the backbone's own accuracy, the same "
               "in every row, scored like the other domains (tables 1-4 of the paper).\n\n"
               if base_cols else "")
            + f"Emax: {emax_source or 'missing (no finetune row)'}. # Params from the stored domain "
            "files (paper, footnote 3; classifiers excluded, T counts the pretraining domain; masks, "
            "k's and BN weights and biases, not the BN running statistics).\n\n"
            + (f"S-score ranking: {ordered}.\n\n" if ordered else "")
            + _failures(runs, seeds)
            + f"Produced by:\n\n    {command}\n")
    atomic_write_text(str(Path(out) / "results.md"), text)
    atomic_write_text(str(Path(out) / "results.json"), json.dumps(
        {"variants": variants, "seeds": seeds, "rows": rows, "runs": runs, "emax": emax,
         "emax_source": emax_source, "command": command}, indent=2) + "\n")
    if table_path:
        atomic_write_text(str(table_path), text)
    return text


def _failures(runs, seeds) -> str:
    """A note per failed job under the table, with its error."""
    return "".join(f"**Failed**: `{r['method']}` on `{d}`"
                   + ("" if seeds is None else f" (seed {r['seed']})") + f": {e}\n\n"
                   for r in runs for d, e in (r.get("failed") or {}).items())


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: not a comparison folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_compare(doc: dict, path: Path):
    """(variants, base TrainConfig) of compare.json, each field checked."""
    variants = doc.get("variants")
    if not (isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants)):
        raise ConfigError(f"{path}: field 'variants' must be a non-empty list of names, got "
                          f"{json.dumps(variants)[:80]}")
    for v in variants:
        cli.check_variant(v)
    if not isinstance(doc.get("config"), dict):
        raise ConfigError(f"{path}: field 'config' must be an object")
    if not isinstance(doc.get("command"), str):
        raise ConfigError(f"{path}: field 'command' must be a string")
    return variants, TrainConfig.from_dict(doc["config"])


class _CompareFolder:
    """The comparison folder as :func:`validate.new_folder` and the lock see it."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = RunLock(self.path)

    def create(self):
        self.path.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return (self.path / "compare.json").is_file()

    def lock(self):
        if not self._lock.held:
            self._lock.acquire()
            remove_stale_temps(self.path, recursive=False)  # sub-run folders clean their own

    def unlock(self):
        self._lock.release()


if __name__ == "__main__":
    sys.exit(main())
