"""Compare variants and baselines on the same domains and backbone: ``python -m npmask.compare``.

Trains every variant in ``--variants`` (default: the rows of tables 1 and 5 of the paper that
matter most) with identical settings -- same backbone, domains, epochs, learning rates and seed --
each in its own run folder ``<out>/<variant>/`` (an ordinary ``npmask.train`` run, so each is
resumable), then writes ``<out>/results.md``: one row per variant, one column per domain (test
accuracy in %, the pretraining domain first), the S-score over every domain with Emax = 2 x the
error of the ``finetune`` row (so ``finetune`` scores 250 per domain), ``# Params`` from the stored
domain files (footnote 3) and S_p = S / # Params.

``--seeds 0,1,2`` repeats every (variant, domain) once per seed, in ``<out>/seed<k>/<variant>/``,
scores each seed with its own ``finetune`` row, and prints mean ± std (sample std) per cell, as the
paper reports averages over runs; results.json keeps every run. ``--table PATH`` also writes the table there
together with the command that produced it (how ``benchmarks/results/compare_synthetic.md`` was
made).

``finetune`` is trained first because it defines Emax; without it the S-score columns say n/a.

Examples::

    python -m npmask.compare                                   # synthetic benchmark, 8 rows
    python -m npmask.compare --variants classifier_only,finetune,full --domains digits,textures
    python -m npmask.compare --out runs/cmp --resume           # continue after a kill
    python -m npmask.compare --seeds 0,1,2 --max-train 1000     # mean +- std over 3 runs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .io import atomic_write_text, remove_stale_temps
from .training import cli, validate
from .training.config import TrainConfig, load_config, save_config
from .training.domain_training import emax_from_run, score, train_domains
from .training.errors import ConfigError, exit_on_error
from .training.fit import StopRequested
from .training.lock import RunLock
from .training.results import markdown_table, mean_std_row
from .training.run_folder import RunFolder, resume_target

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
    p.add_argument("--out", metavar="DIR", help="comparison folder (default: runs/compare-<time>)")
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
    """Train every variant (resuming finished or partial ones) and write the comparison table."""
    validate.check_args(ns)
    if ns.get("resume"):
        out = resume_target(ns.get("out"), "compare-", what="comparison folder")
        doc = _read_json(Path(out) / "compare.json")
        variants, base = _read_compare(doc, Path(out) / "compare.json")
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
        given = {k: v for k, v in ns.items() if k in cli.TRAIN_FLAGS}
        if ns.get("out"):  # before any data is generated or read
            validate.check_new_out(ns["out"], "compare", PROG)
        base = cli.train_config_from_args({**given, "variant": "full"})
        out = ns.get("out") or cli.default_out("compare", base.benchmark)
        if (Path(out) / "compare.json").is_file():
            raise ConfigError(f"comparison folder {out} already exists; pass --resume to continue "
                              "it or choose another --out")
        validate.check_new_out(out, "compare", PROG)
        command = cli.command_line("npmask.compare", argv)
    top = _CompareFolder(out)
    if ns.get("resume"):
        top.lock()
    else:
        with validate.new_folder(top):
            atomic_write_text(str(Path(out) / "compare.json"), json.dumps(
                {"variants": variants, "seeds": seeds, "config": base.to_dict(),
                 "command": command}, indent=2) + "\n")
    if ctx is not None:
        ctx.on_exit(top.unlock)
        ctx.resume = f"{PROG} --resume --out {out}"
    # finetune first: its errors are Emax for every row's S-score
    order = sorted(variants, key=lambda v: v != "finetune")
    budget = [ns.get("stop_after_epochs")]
    per_seed = {}  # seed -> (results by variant, emax, emax_source)
    for seed in (seeds if seeds is not None else [base.seed]):
        where = Path(out) / f"seed{seed}" if seeds is not None else Path(out)
        results = {}
        emax, emax_source = base.emax, base.emax_source
        for v in order:
            folder = RunFolder(where / v)
            if ctx is not None:
                ctx.on_exit(folder.unlock)  # a no-op unless the lock below was taken
            if folder.exists():
                folder.lock()
                cfg = load_config(str(folder.config))
                validate.check_train_config(cfg, where=str(folder.config))
            else:
                cfg = TrainConfig.from_dict({**base.to_dict(), "variant": v, "seed": seed})
                with validate.new_folder(folder):
                    save_config(str(folder.config), cfg,
                                {"command": command, "part_of": str(out)})
            if emax is not None and cfg.emax != emax:
                cfg.emax, cfg.emax_source = emax, emax_source
            print(f"== {v} (seed {seed}) ==", file=sys.stderr)
            res = _train_one(cfg, folder, ns, budget, out)
            if res is None:
                return None
            results[v] = res
            if v == "finetune" and emax is None:
                emax, _ = emax_from_run(folder.path)
                emax_source = "2 x the test error of the finetune row" + (
                    " of the same seed" if seeds is not None else "")
        per_seed[seed] = (results, emax, emax_source)
    return write_table(out, variants, per_seed, base, command, ns.get("table"), seeds)


def _train_one(cfg, folder, ns, budget, out):
    """Train (or finish) one run folder; None when stopped (kill or --stop-after-epochs)."""
    done_before = _epochs_done(folder, cfg)
    try:
        res = train_domains(cfg, folder, data_root=cfg.data_root,
                            progress=not ns.get("quiet", False), stop_after=budget[0],
                            log=lambda s: print(s, file=sys.stderr))
    except StopRequested as stop:
        print(f"{stop}; continue with: {PROG} --resume --out {out}", file=sys.stderr)
        return None
    if budget[0]:
        budget[0] -= _epochs_done(folder, cfg) - done_before
        if budget[0] <= 0:
            print(f"stopped as requested; continue with: {PROG} --resume --out {out}",
                  file=sys.stderr)
            return None
    return res


def _epochs_done(folder, cfg) -> int:
    done = folder.progress()["done"]
    return sum(int(done[d]["epochs"]) for d in cfg.domains if d in done)


def write_table(out, variants, per_seed, base, command, table_path=None, seeds=None) -> str:
    """Score every run with its seed's Emax, average over seeds, write results.md/json (and ``table_path``).

    ``per_seed``: {seed: ({variant: results of its run}, emax, emax_source)}.
    """
    runs = []
    for seed, (results, emax, _) in per_seed.items():
        where = Path(out) / f"seed{seed}" if seeds is not None else Path(out)
        for v in variants:
            res = results[v]
            files = [where / v / "domains" / f"{d}.npz" for d in base.domains]
            sc = score(res["acc"], emax, files)
            runs.append({"method": v, "seed": seed, "acc": res["acc"], **sc})
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
            + f"Produced by:\n\n    {command}\n")
    atomic_write_text(str(Path(out) / "results.md"), text)
    atomic_write_text(str(Path(out) / "results.json"), json.dumps(
        {"variants": variants, "seeds": seeds, "rows": rows, "runs": runs, "emax": emax,
         "emax_source": emax_source, "command": command}, indent=2) + "\n")
    if table_path:
        atomic_write_text(str(table_path), text)
    return text


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
