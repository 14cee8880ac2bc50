"""The benchmarks a run can use: where the data is, which network, which domains, which Emax.

- ``synthetic``: the built-in benchmark (npmask.data.synthetic), generated once into a cache
  folder; a small WRN pretrained on its ``base`` domain ships with npmask. 32x32 images, CPU sized.
- ``decathlon`` (table 4): the Visual Decathlon converted by data_scripts/decathlon.py
  (``--data-root``), WRN-28-4 at 64x64, 60 epochs with decay after 45, batch 32, scored with the
  published fine-tuning errors (ImageNet's included). No mirroring for SVHN, Omniglot, GTSRB and
  DTD; the final run trains on train + val (``--train-split train`` keeps val apart for choosing
  the schedule). Crops: ``--augmentation decathlon`` (default) feeds GTSRB, Omniglot and SVHN whole
  at 72 as the residual-adapters loader the paper follows, whose fine-tuning baseline defines
  Emax; ``decathlon_crop64`` crops every domain to 64 as the paper's text says.
- ``imagenet_to_sketch`` (tables 1-3): CUBS, Stanford Cars, Flowers, WikiArt and Sketch as
  data_scripts/image_folder.py converts them, ResNet-50 at 224x224 (``--model densenet121`` or
  ``vgg16`` for the other columns), Piggyback's augmentation (random-size crop + mirroring; test
  resize 256, centre 224: store the images at 256 with ``--size 256``), Adam 1e-4 / SGD 1e-3
  momentum 0.9, batch 32, both x0.1 after 15 of 30 epochs (the paper gives the decay; 30 epochs is
  Piggyback's schedule), Emax from a finetune run.
- ``folder``: any set of converted domains under ``--data-root`` (by default every one but the
  backbone's pretraining domain, named in its JSON), WRN-16-1 at 32x32 unless
  ``--model``/``--input-size`` say otherwise, the paper's rates, 10 epochs with decay after 8, the
  augmentation chosen from the images ("auto"); Emax from a finetune run.

Learning rates. The paper's rates (Adam 1e-4, SGD 1e-3) were tuned for 60 epochs over data sets
of thousands to tens of thousands of images. The CPU default here is 5 epochs over 5,000 images
per domain, 780 optimiser steps; with the paper's rates the masks barely move in that time,
so the synthetic benchmark scales both rates by :data:`SYNTHETIC_LR_SCALE` and says so in
config.json; x10 beat the paper's rates and x30 in a short run, recorded in
``benchmarks/results/compare_synthetic.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.format import check_domain_files, list_domains
from ..data.synthetic import DOMAINS as SYNTHETIC_DOMAINS
from ..data.synthetic import TARGETS as SYNTHETIC_TARGETS
from ..data.synthetic import ensure_synthetic
from ..metrics import decathlon_emax
from .errors import ConfigError

PAPER_LR_BODY = 1e-4  # Adam: masks, k's, batch norm (paper, section 4)
PAPER_LR_HEAD = 1e-3  # SGD with momentum 0.9: the classifier
SYNTHETIC_LR_SCALE = 10.0

DECATHLON_TARGETS = ["aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "vgg-flowers",
                     "omniglot", "svhn", "ucf101"]
# The ImageNet-to-Sketch domains under the names data_scripts/image_folder.py gives them (Piggyback's
# folder names).
SKETCH_TARGETS = ["cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart", "sketches"]


@dataclass
class Benchmark:
    """Defaults of one benchmark (each can be overridden on the command line)."""

    name: str
    model: str
    input_size: int
    epochs: int
    lr_body: float
    lr_head: float
    lr_decay_epochs: list
    base_domain: str | None
    default_domains: list | None = None   # None: every domain under the data root but the base
    emax: dict | None = None              # {domain: Emax as a fraction}; None: from a finetune run
    emax_source: str | None = None
    augmentation: str = "auto"
    notes: str = ""
    pretrain: dict = field(default_factory=dict)
    batch_size: int = 32
    train_split: str = "train"


BENCHMARKS = {
    "synthetic": Benchmark(
        name="synthetic", model="wrn16_1", input_size=32, epochs=5,
        lr_body=PAPER_LR_BODY * SYNTHETIC_LR_SCALE, lr_head=PAPER_LR_HEAD * SYNTHETIC_LR_SCALE,
        lr_decay_epochs=[4], base_domain="base", augmentation="pad_crop",
        default_domains=list(SYNTHETIC_TARGETS),
        notes=(f"learning rates = paper's x{SYNTHETIC_LR_SCALE:g} (Adam {PAPER_LR_BODY:g}, SGD "
               f"{PAPER_LR_HEAD:g}) because a synthetic run takes 780 steps per domain (5 epochs "
               "of 5,000 images), far fewer than the paper's 60 epochs; decay x0.1 after 4 of 5 "
               "epochs (the paper: after 45 of 60)")),
    "decathlon": Benchmark(
        name="decathlon", model="wrn28_4", input_size=64, epochs=60,
        lr_body=PAPER_LR_BODY, lr_head=PAPER_LR_HEAD, lr_decay_epochs=[45],
        base_domain="imagenet12", default_domains=DECATHLON_TARGETS,
        emax=decathlon_emax(),
        emax_source="published fine-tuning errors x2 (Rebuffi et al. 2017)",
        augmentation="decathlon", train_split="train+val",
        notes=("the paper's Decathlon protocol (table 4): no mirroring for svhn, omniglot, gtsrb, "
               "dtd; trained on train+val; augmentation 'decathlon' feeds gtsrb, omniglot and svhn "
               "whole at 72 as the residual-adapters loader ('decathlon_crop64': all cropped to "
               "64, the paper's text)")),
    "imagenet_to_sketch": Benchmark(
        name="imagenet_to_sketch", model="resnet50", input_size=224, epochs=30,
        lr_body=PAPER_LR_BODY, lr_head=PAPER_LR_HEAD, lr_decay_epochs=[15],
        base_domain="imagenet", default_domains=SKETCH_TARGETS, augmentation="imagenet",
        notes=("the paper's ImageNet-to-Sketch protocol (tables 1-3): 224x224, random-size crop + "
               "mirroring (test: resize 256, centre 224) as Piggyback, Adam 1e-4 / SGD 1e-3 "
               "momentum 0.9, batch 32, x0.1 after 15 epochs (of 30, Piggyback's schedule); "
               "ResNet-50, or --model densenet121 / vgg16")),
    "folder": Benchmark(
        name="folder", model="wrn16_1", input_size=32, epochs=10,
        lr_body=PAPER_LR_BODY, lr_head=PAPER_LR_HEAD, lr_decay_epochs=[8],
        base_domain=None, augmentation="auto", notes="any converted domains; paper's rates"),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}") from None


def check_data_folder(root) -> None:
    """ConfigError unless ``root`` is a folder, saying whether it is missing or a file."""
    root = Path(root)
    if root.is_file():
        raise ConfigError(f"data folder {root} is a file, not a folder; give the folder of "
                          "converted domains")
    if not root.is_dir():
        raise ConfigError(f"data folder {root} does not exist")


def resolve_data_root(benchmark: str, data_root, domains=None) -> str:
    """The data folder: ``data_root`` when given (it must exist), else the synthetic cache.

    The synthetic benchmark is generated on first use and reused afterwards: only ``domains``
    (default: its target domains), so a two-domain run waits for two domains.
    """
    if data_root is not None:
        check_data_folder(data_root)
        return str(Path(data_root))
    if benchmark != "synthetic":
        raise ConfigError(f"--benchmark {benchmark} needs --data-root DIR (a folder of converted "
                          "domains, e.g. made by data_scripts)")
    wanted = list(domains) if domains else list(SYNTHETIC_TARGETS)
    unknown = [d for d in wanted if d not in SYNTHETIC_DOMAINS]
    if unknown:
        raise ConfigError(f"unknown domain(s) {', '.join(unknown)} of the synthetic benchmark; its "
                          f"domains are {', '.join(SYNTHETIC_DOMAINS)}")
    return str(ensure_synthetic(domains=wanted, progress=True))


def available_domains(root) -> list[str]:
    """Domain folders under ``root`` (each holding meta.json)."""
    return list_domains(root)


def choose_domains(bench: Benchmark, root, requested, base_domain: str | None = None) -> list[str]:
    """The target domains of a run: ``requested`` (checked to exist) or the benchmark default, which
    leaves out ``base_domain``, the backbone's pretraining domain (default: the benchmark's own).

    Each chosen domain's meta.json and the headers of its npz files are checked here (a few
    hundred bytes each), so a malformed or truncated folder stops the command before a run folder
    is created.
    """
    chosen = _choose(bench, root, requested, base_domain or bench.base_domain)
    for d in chosen:
        check_domain_files(Path(root) / d)  # DataFormatError naming the file and the problem
    return chosen


def _choose(bench: Benchmark, root, requested, base_domain) -> list[str]:
    have = available_domains(root)
    if not have:
        raise ConfigError(f"data folder {root} holds no domain (no sub-folder with a meta.json)")
    if requested:
        unknown = [d for d in requested if d not in have]
        if unknown:
            raise ConfigError(f"unknown domain(s) {', '.join(unknown)} in {root}; "
                              f"available: {', '.join(have)}")
        return list(requested)
    if bench.default_domains is not None:
        missing = [d for d in bench.default_domains if d not in have]
        if missing:
            raise ConfigError(f"data folder {root} lacks the {bench.name} domain(s) "
                              f"{', '.join(missing)}; available: {', '.join(have)}")
        return list(bench.default_domains)
    targets = [d for d in have if d != base_domain]
    if not targets:
        raise ConfigError(f"data folder {root} holds no target domain besides {base_domain!r}, the "
                          "backbone's pretraining domain")
    return targets
