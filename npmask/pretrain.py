"""Pretrain a backbone on one domain: ``python -m npmask.pretrain``.

The paper starts every target domain from a network pretrained on ImageNet. Here any domain folder
can play that role; by default the synthetic ``base`` domain (the shipped backbone was made this
way, with the command recorded in ``npmask/pretrained/wrn16_1_synthetic.json``).

The run is an ordinary from-scratch training (SGD with Nesterov momentum and weight decay, step
decay of the learning rate), with a checkpoint after every epoch and ``--resume``. At the end the
weights are written as a backbone ``.npz`` with a ``.json`` beside it recording the command, every
setting, the library versions and the test accuracy (on the whole test set and on its first
``--eval-subset`` images, the figure the test suite re-checks).

Examples::

    python -m npmask.pretrain                                   # synthetic base, wrn16_1
    python -m npmask.pretrain --data-root data/decathlon --domain imagenet12 \\
        --model wrn28_4 --input-size 64 --epochs 30 --lr-decay-epochs 20,25
    python -m npmask.pretrain --out runs/pre1 --resume          # continue after a kill
"""
from __future__ import annotations

import sys
from pathlib import Path

from .training import cli, validate
from .training.config import PretrainConfig, load_config, save_config
from .training.errors import ConfigError, exit_on_error
from .training.fit import StopRequested
from .training.pretraining import check, pretrain
from .training.run_folder import RunFolder, resume_target

PROG = "python -m npmask.pretrain"

FLAGS = {  # config field -> flag, for messages
    "data_root": "--data-root", "domain": "--domain", "model": "--model",
    "input_size": "--input-size", "epochs": "--epochs", "batch_size": "--batch-size",
    "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
    "lr_decay_epochs": "--lr-decay-epochs", "lr_decay": "--lr-decay", "max_train": "--max-train",
    "eval_subset": "--eval-subset", "seed": "--seed", "backend": "--backend", "dtype": "--dtype",
    "augmentation": "--augmentation", "save": "--save",
}


def build_parser():
    d = PretrainConfig()
    p = cli.parser(PROG, __doc__.split("\n\n")[0], epilog=__doc__.split("Examples::")[1])
    p.add_argument("--data-root", metavar="DIR",
                   help="folder of domain folders (default: the synthetic benchmark's cache, "
                        "generated on first use)")
    p.add_argument("--domain", help=f"the domain to learn (default: {d.domain})")
    p.add_argument("--model", help=f"architecture, e.g. wrn16_1, wrn16_2, wrn28_4 (default: {d.model})")
    p.add_argument("--input-size", type=int, help=f"input side in pixels (default: {d.input_size})")
    p.add_argument("--epochs", type=int, help=f"epochs (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"SGD learning rate (default: {d.lr})")
    p.add_argument("--momentum", type=float, help=f"SGD Nesterov momentum (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"L2 weight decay (default: {d.weight_decay})")
    p.add_argument("--lr-decay-epochs", type=cli.int_list, metavar="E1,E2",
                   help="epochs after which the rate is multiplied by --lr-decay "
                        f"(default: {','.join(map(str, d.lr_decay_epochs))})")
    p.add_argument("--lr-decay", type=float, help=f"decay factor (default: {d.lr_decay})")
    p.add_argument("--max-train", type=int, metavar="N",
                   help="train on a fixed random subset of N images (default: all)")
    p.add_argument("--eval-subset", type=int, metavar="N",
                   help=f"also record the accuracy on the first N test images (default: {d.eval_subset})")
    p.add_argument("--seed", type=int, help=f"seed of initialisation, order, augmentation (default: {d.seed})")
    p.add_argument("--backend", choices=["numpy", "cupy"], help="array backend (default: numpy)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="float type (default: float32)")
    p.add_argument("--augmentation", choices=["auto", "pad_crop", "decathlon", "none"],
                   help="augmentation protocol of the loader (default: auto, from the data)")
    p.add_argument("--save", metavar="PATH",
                   help="where to write the backbone .npz (default: <out>/backbone.npz)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/pretrain-<model>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/pretrain-*) from its "
                        "last checkpoint, with its saved settings")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (a terminal) and no per-epoch lines (a log file)")
    p.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="stop (as if killed) after N epochs of this invocation; for testing --resume")
    return p


def config_from_args(args) -> PretrainConfig:
    given = {k: v for k, v in vars(args).items() if k in FLAGS}
    validate.check_args(vars(args))
    validate.check_environment()
    cfg = PretrainConfig(**given)
    return validate.check_pretrain_config(cfg.validate())


def main(argv=None) -> int:
    with exit_on_error(PROG):
        validate.check_environment()  # NPMASK_THREADS, NPMASK_DATA: one line, before any work
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG) as ctx:
        try:
            result = run(args, argv, ctx)
        except StopRequested as stop:
            print(f"{stop}; continue with: {ctx.resume or PROG + ' --resume --out <run folder>'}",
                  file=sys.stderr)
            return 0
        print(f"backbone written to {result['save']} (test accuracy {result['test_acc']:.2f}%, "
              f"first {result['eval_subset']} test images {result['subset_acc']:.2f}%)")
    return 0


def run(args, argv=None, ctx=None) -> dict:
    ns = vars(args)
    if ns.get("resume"):
        validate.check_args(ns)
        folder = RunFolder(resume_target(ns.get("out"), "pretrain-"))
        validate.check_resume_folder(folder.path, "pretrain", PROG)
        folder.lock()  # one process per run folder; removes temp files of interrupted writes
        try:
            cfg = load_config(str(folder.config), PretrainConfig)
            validate.check_environment()
            validate.check_pretrain_config(cfg, where=str(folder.config))
            _check_data(cfg, check(cfg))
            cli.check_resume_conflicts({k: v for k, v in ns.items() if k in FLAGS}, cfg.to_dict(),
                                       FLAGS)
        except BaseException:
            folder.unlock()
            raise
    else:
        if ns.get("out"):  # before any data is generated or read
            validate.check_new_out(ns["out"], "pretrain", PROG)
        cfg = config_from_args(args)
        _check_data(cfg, check(cfg))
        out = ns.get("out") or cli.default_out("pretrain", cfg.model, cfg.domain)
        validate.check_new_out(out, "pretrain", PROG)
        folder = RunFolder(out)
        if folder.exists():
            raise ConfigError(f"run folder {out} already exists; pass --resume to continue it "
                              "or choose another --out")
        cfg.save = cfg.save or str(Path(out) / "backbone.npz")
        validate.check_save_path(cfg.save)
        with validate.new_folder(folder):
            save_config(str(folder.config), cfg,
                        {"command": cli.command_line("npmask.pretrain", argv)})
    if ctx is not None:
        ctx.on_exit(folder.unlock)
        ctx.resume = f"{PROG} --resume --out {folder.path}"
    return pretrain(cfg, folder, progress=not ns.get("quiet", False),
                    stop_after=ns.get("stop_after_epochs"),
                    command=cli.command_line("npmask.pretrain", argv))


def _check_data(cfg: PretrainConfig, root) -> None:
    """The domain's files (channels, archives, labels, sizes), read once before the run folder."""
    validate.check_data(root, [cfg.domain], input_size=cfg.input_size, augmentation=cfg.augmentation,
                        batch_size=cfg.batch_size, max_train=cfg.max_train)


if __name__ == "__main__":
    sys.exit(main())
