"""Extend a pretrained network to new domains with binary masks: ``python -m npmask.train``.

With no arguments this runs the whole story on the built-in synthetic benchmark, on NumPy, in
under 10 minutes on a 2-core CPU:

1. load the pretrained backbone shipped with npmask (a WRN-16-1 trained on the synthetic ``base``
   domain by ``python -m npmask.pretrain``; pretrained on the spot if the file is missing);
2. add every target domain (digits, signs, glyphs, textures, sketches) with the paper's ``full``
   model, W~ = k0 W + k1 + k2 M + k3 W∘M, and train it: Adam for masks, k's and batch norm, SGD
   with momentum for the classifier, step decay of both learning rates;
3. print the results: test accuracy per domain, S-score (when a fine-tuning run gives Emax),
   # Params and S_p computed from the stored files;
4. leave a run folder (default ``runs/train-...``): config.json, metrics.jsonl, one .npz per
   domain, results.md/json, plots/ (learning curves, mask density and k per layer).

Killing the command at any moment keeps the last completed epoch's checkpoint; ``--resume``
continues from it and ends with exactly the numbers of an uninterrupted run.

Examples::

    python -m npmask.train                                   # the synthetic benchmark, `full`
    python -m npmask.train --variant piggyback --domains digits,signs --epochs 2
    python -m npmask.train --variant finetune --out runs/ft  # then: --emax-from runs/ft
    python -m npmask.train --resume                          # continue the newest run
    python -m npmask.train --benchmark decathlon --data-root data/decathlon \\
        --backbone runs/pretrain-imagenet/backbone.npz --backend cupy
"""
from __future__ import annotations

import os
import sys
import time

from .backend import get_backend
from .config import settings
from .training import cli, validate
from .training.config import load_config, save_config
from .training.domain_training import emax_from_run, train_domains
from .training.errors import ConfigError, exit_on_error
from .training.fit import StopRequested
from .training.results import text_table
from .training.run_folder import RunFolder, resume_target

PROG = "python -m npmask.train"


def build_parser():
    p = cli.parser(PROG, __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
                   .split("Examples::")[0].strip(), epilog="examples:" + __doc__.split("Examples::")[1])
    return cli.add_train_arguments(p)


def prepare(args, argv=None):
    """(config, run folder) for a new run or a resumed one."""
    ns = vars(args)
    if ns.get("resume"):
        validate.check_args(ns)
        folder = RunFolder(resume_target(ns.get("out"), "train-"))
        validate.check_resume_folder(folder.path, "train", PROG)
        folder.lock()  # one process per run folder; removes temp files of interrupted writes
        try:
            cfg = _resume_config(folder, ns, argv)
        except BaseException:
            folder.unlock()
            raise
        return cfg, folder
    if ns.get("out"):  # before any data is generated or read
        validate.check_new_out(ns["out"], "train", PROG)
    cfg = cli.train_config_from_args(ns)
    out = ns.get("out") or cli.default_out("train", cfg.variant)
    validate.check_new_out(out, "train", PROG)
    folder = RunFolder(out)
    if folder.exists():
        raise ConfigError(f"run folder {out} already exists; pass --resume to continue it or "
                          "choose another --out")
    with validate.new_folder(folder):
        save_config(str(folder.config), cfg, {"command": cli.command_line("npmask.train", argv)})
    return cfg, folder


def _resume_config(folder, ns, argv):
    """The stored config of a run being resumed, checked as a new one would be."""
    cfg = load_config(str(folder.config))
    validate.check_train_run(cfg, where=str(folder.config))
    given = {k: v for k, v in ns.items() if k in cli.TRAIN_FLAGS}
    cli.check_resume_conflicts(given, cfg.to_dict(), cli.TRAIN_FLAGS)
    get_backend(cfg.backend)
    if ns.get("emax_from"):
        cfg.emax, cfg.emax_source = emax_from_run(ns["emax_from"])
        save_config(str(folder.config), cfg, {"command": cli.command_line("npmask.train", argv)})
    folder.drop_metrics_after_checkpoints()
    return cfg


def main(argv=None) -> int:
    with exit_on_error(PROG):
        validate.check_environment()  # NPMASK_THREADS, NPMASK_DATA: one line, before any work
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG) as ctx:
        start = time.time()
        cfg, folder = prepare(args, argv)
        ctx.on_exit(folder.unlock)
        ctx.resume = f"{PROG} --resume --out {folder.path}"
        print(f"run folder: {folder.path}", file=sys.stderr)
        try:
            res = train_domains(cfg, folder, data_root=cfg.data_root,
                                progress=not vars(args).get("quiet", False),
                                stop_after=vars(args).get("stop_after_epochs"),
                                workers=domain_workers(cfg, vars(args).get("workers")),
                                log=lambda s: print(s, file=sys.stderr))
        except StopRequested as stop:
            print(f"{stop}; continue with: {PROG} --resume --out {folder.path}", file=sys.stderr)
            return 0
        print_results(cfg, res, folder, time.time() - start)
    return 0


def domain_workers(cfg, given) -> int:
    """``--workers``, else ``NPMASK_TRAIN_WORKERS``, else npmask's thread count on NumPy (the
    training step of a small network keeps one core busy, not several), else 1."""
    env = os.environ.get("NPMASK_TRAIN_WORKERS")
    if given:
        return int(given)
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"NPMASK_TRAIN_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return settings.threads if cfg.backend == "numpy" else 1


def print_results(cfg, res, folder, seconds) -> None:
    row = {"method": cfg.variant, "acc": res["acc"], "score": res["score"],
           "params": res["params"], "sp": res["sp"]}
    print()
    print(text_table([row], list(res["acc"])), end="")
    if res["score"] is None:
        print("S-score, S_p: missing (no fine-tuning run gives Emax; see results.md)")
    else:
        print(f"Emax: {cfg.emax_source}")
    print(f"\nwall time {seconds:.0f} s; run folder {folder.path} (results.md, metrics.jsonl, "
          "domains/, plots/)")


if __name__ == "__main__":
    sys.exit(main())
