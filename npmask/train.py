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

import sys
import time
from pathlib import Path

from .backend import get_backend
from .training import cli
from .training.config import TrainConfig, load_config, save_config
from .training.errors import ConfigError, exit_on_error

PROG = "python -m npmask.train"

FLAGS = {  # config field -> flag (for messages and --resume checks)
    "benchmark": "--benchmark", "data_root": "--data-root", "domains": "--domains",
    "model": "--model", "input_size": "--input-size", "backbone": "--backbone",
    "variant": "--variant", "epochs": "--epochs", "batch_size": "--batch-size",
    "lr_body": "--lr-body", "lr_head": "--lr-head", "momentum": "--momentum",
    "lr_decay_epochs": "--lr-decay-epochs", "lr_decay": "--lr-decay",
    "weight_decay": "--weight-decay", "max_train": "--max-train", "seed": "--seed",
    "mask_init": "--mask-init", "tau": "--tau",
    "backend": "--backend", "dtype": "--dtype", "augmentation": "--augmentation",
    "train_split": "--train-split",
}


def build_parser():
    from .masking.variants import VARIANTS
    from .training.benchmarks import BENCHMARKS
    syn = BENCHMARKS["synthetic"]
    p = cli.parser(PROG, __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1]
                   .split("Examples::")[0].strip(), epilog="examples:" + __doc__.split("Examples::")[1])
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
    g.add_argument("--domains", type=cli.name_list, metavar="D1,D2",
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
    g.add_argument("--lr-decay-epochs", type=cli.int_list, metavar="E1,E2",
                   help="multiply both learning rates by --lr-decay after these epochs (default "
                        f"synthetic: {','.join(map(str, syn.lr_decay_epochs))}; decathlon: 45)")
    g.add_argument("--lr-decay", type=float, help="step-decay factor (default: 0.1)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (default: 0, as the paper)")
    g.add_argument("--max-train", type=int, metavar="N",
                   help="use a fixed random subset of N training images per domain (default: all)")
    g.add_argument("--mask-init", type=cli.float_pair, metavar="LO,HI",
                   help="real masks start as R ~ U(tau+LO, tau+HI), so M is all ones (default: "
                        "1e-4,2e-4 as the paper; Piggyback's code starts 5e-3 above its threshold)")
    g.add_argument("--tau", type=float, help="mask threshold: M = 1[R >= tau] (default: 0)")
    g.add_argument("--seed", type=int, help="seed of mask init, heads, batch order, augmentation "
                                            "(default: 0)")
    g = p.add_argument_group("where and how")
    g.add_argument("--backend", choices=["numpy", "cupy"], help="array backend (default: numpy)")
    g.add_argument("--dtype", choices=["float32", "float64"], help="float type (default: float32)")
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
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--stop-after-epochs", type=int, metavar="N",
                   help="stop (as if killed) after N epochs of this invocation; for testing --resume")
    return p


def config_from_args(ns: dict) -> TrainConfig:
    """Build the run's config: the flags given, then the benchmark's defaults."""
    from .training.benchmarks import choose_domains, get_benchmark, resolve_data_root
    bench = get_benchmark(ns.get("benchmark", "synthetic"))
    given = {k: v for k, v in ns.items() if k in FLAGS}
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
    cli.check_variant(cfg.variant)
    get_backend(cfg.backend)  # --backend cupy without a GPU: one clear line, before any work
    cli.check_model(cfg.model, cfg.input_size)
    root = resolve_data_root(bench.name, cfg.data_root)
    cfg.data_root = str(root)
    cfg.domains = choose_domains(bench, root, cfg.domains or None)
    if bench.base_domain in cfg.domains:
        raise ConfigError(f"{bench.base_domain!r} is the pretraining domain of the {bench.name} "
                          "benchmark; it is the backbone itself and is not trained again")
    cfg.backbone = resolve_backbone(cfg, bench, root)
    if ns.get("emax_from"):
        from .training.domain_training import emax_from_run
        cfg.emax, cfg.emax_source = emax_from_run(ns["emax_from"])
    return cfg


def resolve_backbone(cfg: TrainConfig, bench, root) -> str:
    """The backbone file: --backbone, else (synthetic) the shipped one, pretrained when missing."""
    from . import pretrained
    if cfg.backbone is not None:
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
    return str(path)


def pretrain_on_the_spot(cfg: TrainConfig, root) -> Path:
    """No shipped backbone for this model: pretrain one on the synthetic base domain now."""
    from .pretrain import pretrain
    from .training.config import PretrainConfig
    from .training.run_folder import RunFolder
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
    pretrain(pcfg, folder)
    return Path(pcfg.save)


def prepare(args, argv=None):
    """(config, run folder) for a new run or a resumed one."""
    from .training.run_folder import RunFolder
    ns = vars(args)
    if ns.get("resume"):
        from .training.run_folder import resume_target
        folder = RunFolder(resume_target(ns.get("out"), "train-"))
        cfg = load_config(str(folder.config))
        given = {k: v for k, v in ns.items() if k in FLAGS}
        cli.check_resume_conflicts(given, cfg.to_dict(), FLAGS)
        get_backend(cfg.backend)
        if ns.get("emax_from"):
            from .training.domain_training import emax_from_run
            cfg.emax, cfg.emax_source = emax_from_run(ns["emax_from"])
            save_config(str(folder.config), cfg, {"command": cli.command_line("npmask.train", argv)})
        _drop_metrics_after_checkpoints(folder)
        return cfg, folder
    cfg = config_from_args(ns)
    out = ns.get("out") or cli.default_out("train", cfg.variant)
    folder = RunFolder(out)
    if folder.exists():
        raise ConfigError(f"run folder {out} already exists; pass --resume to continue it or "
                          "choose another --out")
    folder.create()
    save_config(str(folder.config), cfg, {"command": cli.command_line("npmask.train", argv)})
    return cfg, folder


def _drop_metrics_after_checkpoints(folder) -> None:
    """Keep metrics.jsonl consistent with what the run resumes from (see run_folder)."""
    from .training.checkpoint import load_checkpoint
    done = folder.progress()["done"]
    keep_epochs = {}
    for r in folder.read_metrics():
        d = r.get("domain")
        if d is None or d in done or d in keep_epochs:
            continue
        ck = folder.checkpoint(d)
        keep_epochs[d] = int(load_checkpoint(str(ck))["epoch"]) if ck.is_file() else 0
    if keep_epochs:
        folder.truncate_metrics(lambda r: r.get("domain") not in keep_epochs
                                or r.get("epoch", 0) <= keep_epochs[r["domain"]])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .training.fit import StopRequested
    with exit_on_error(PROG):
        start = time.time()
        cfg, folder = prepare(args, argv)
        print(f"run folder: {folder.path}", file=sys.stderr)
        from .training.domain_training import train_domains
        try:
            res = train_domains(cfg, folder, data_root=cfg.data_root,
                                progress=not vars(args).get("quiet", False),
                                stop_after=vars(args).get("stop_after_epochs"),
                                log=lambda s: print(s, file=sys.stderr))
        except StopRequested as stop:
            print(f"{stop}; continue with: {PROG} --resume --out {folder.path}", file=sys.stderr)
            return 0
        print_results(cfg, res, folder, time.time() - start)
    return 0


def print_results(cfg, res, folder, seconds) -> None:
    from .training.results import text_table
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
