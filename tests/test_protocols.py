"""The paper's protocol presets on small fixtures in their real formats.

``--benchmark decathlon`` (table 4) on domains shaped as data_scripts/decathlon.py writes them
(72x72, meta extra protocol/full_view, train/val/test) and ``--benchmark imagenet_to_sketch``
(tables 1-3) on image folders converted by data_scripts/image_folder.py. The presets name
ResNet-50 / WRN-28-4; the runs here override the model with a small WRN (the protocol, not the
network, is under test).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from npmask import train
from npmask.metrics import decathlon_emax
from npmask.training.suites import SKETCH_TARGETS, get_benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data_scripts"))
import _common as C  # noqa: E402  (what the data scripts write domains with)


def _backbone(path: Path, size: int, domain: str, test_acc: float) -> Path:
    from npmask import models
    from npmask.pretrained import save_backbone
    model = models.create("wrn10_1", num_classes=5, input_size=size, seed=3)
    save_backbone(path, model, {"model": "wrn10_1", "num_classes": 5, "input_size": size,
                                "dtype": "float32", "domain": domain, "test_acc": test_acc})
    return path


def _split(rng, n, k, size):
    y = rng.integers(0, k, n)
    x = rng.integers(0, 90, (n, size, size, 3))
    for i, c in enumerate(y):
        x[i, 4 * c:4 * c + 12, 4 * c:4 * c + 12, c % 3] += 150
    return x.astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory):
    """Decathlon domains in data_scripts/decathlon.py's layout, except that dtd's meta says mirror
    (as a folder converted by another tool may): the protocol must still not mirror it."""
    root = tmp_path_factory.mktemp("decathlon")
    rng = np.random.default_rng(0)
    for ds, k in (("imagenet12", 5), ("dtd", 3), ("gtsrb", 4)):
        C.save_domain(root / "data" / ds, name=ds, train=_split(rng, 40, k, 72),
                      val=_split(rng, 24, k, 72), test=_split(rng, 16, k, 72),
                      class_names=[f"c{i}" for i in range(k)], mirror=ds != "gtsrb",
                      source="test fixture", licence="none", options={"size": 72},
                      extra={"protocol": "decathlon", "full_view": ds == "gtsrb"})
    _backbone(root / "wrn.npz", 64, "imagenet12", 59.87)   # the published ImageNet accuracy
    return root


def _dec_args(root, out, *extra):
    return ["--benchmark", "decathlon", "--data-root", str(root / "data"), "--domains", "dtd,gtsrb",
            "--model", "wrn10_1", "--backbone", str(root / "wrn.npz"), "--epochs", "1",
            "--out", str(out), "--quiet", *extra]


def test_decathlon_preset_records_the_papers_protocol_and_scores_imagenet(decathlon, tmp_path):
    out = tmp_path / "run"
    assert train.main(_dec_args(decathlon, out, "--variant", "full")) == 0
    doc = json.loads((out / "config.json").read_text())
    cfg = doc["config"]
    assert cfg["benchmark"] == "decathlon" and cfg["input_size"] == 64 and cfg["batch_size"] == 32
    assert (cfg["lr_body"], cfg["lr_head"], cfg["momentum"]) == (1e-4, 1e-3, 0.9)
    assert cfg["lr_decay_epochs"] == [45] and cfg["lr_decay"] == 0.1
    assert cfg["augmentation"] == "decathlon" and cfg["train_split"] == "train+val"
    assert cfg["emax"] == pytest.approx(decathlon_emax())
    prog = json.loads((out / "progress.json").read_text())["done"]
    assert prog["dtd"]["train_images"] == 40 + 24                   # train + val
    assert prog["gtsrb"]["test_images"] == 16
    res = json.loads((out / "results.json").read_text())
    assert list(res["acc"]) == ["imagenet12", "dtd", "gtsrb"]
    assert res["acc"]["imagenet12"] == 59.87                        # from the backbone's JSON
    assert res["score_per_domain"]["imagenet12"] == pytest.approx(250.0)  # the published Emax
    assert res["score"] == pytest.approx(sum(res["score_per_domain"].values()))
    assert "| Method | imagenet12 | dtd | gtsrb |" in (out / "results.md").read_text()


def test_decathlon_train_split_and_crop_choice_are_named_and_recorded(decathlon, tmp_path):
    out = tmp_path / "run"
    assert train.main(_dec_args(decathlon, out, "--variant", "classifier_only", "--train-split",
                                "train", "--augmentation", "decathlon_crop64")) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["train_split"] == "train" and cfg["augmentation"] == "decathlon_crop64"
    assert json.loads((out / "progress.json").read_text())["done"]["dtd"]["train_images"] == 40


def test_decathlon_iterators_mirror_and_crop_as_the_paper(decathlon):
    from npmask.data.format import load_domain
    from npmask.training.batches import make_iterators
    common = dict(batch_size=8, seed=0, backend="numpy", dtype=np.float32, input_size=64)
    dtd = load_domain(decathlon / "data" / "dtd")
    gtsrb = load_domain(decathlon / "data" / "gtsrb")
    tr, te = make_iterators(dtd, protocol="decathlon", train_split="train+val", **common)
    assert not tr.augmentation.mirror and tr.output_shape == (3, 64, 64)   # dtd: never mirrored
    assert tr.num_samples == 64
    tr, te = make_iterators(gtsrb, protocol="decathlon", **common)
    assert tr.output_shape == te.output_shape == (3, 72, 72)               # whole, at 72
    tr, te = make_iterators(gtsrb, protocol="decathlon_crop64", **common)
    assert tr.output_shape == te.output_shape == (3, 64, 64)               # the paper's text


def test_train_val_without_a_val_split_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    C.save_domain(tmp_path / "data" / "svhn", name="svhn", train=_split(rng, 40, 3, 72),
                  test=_split(rng, 8, 3, 72), class_names=["a", "b", "c"], mirror=False,
                  source="test fixture", licence="none", options={"size": 72},
                  extra={"protocol": "decathlon", "full_view": True})
    _backbone(tmp_path / "wrn.npz", 64, "imagenet12", 59.87)
    with pytest.raises(SystemExit) as e:
        train.main(["--benchmark", "decathlon", "--data-root", str(tmp_path / "data"),
                    "--domains", "svhn", "--model", "wrn10_1", "--backbone",
                    str(tmp_path / "wrn.npz"), "--epochs", "1", "--out", str(tmp_path / "o"),
                    "--quiet"])
    assert "train+val: domain 'svhn' has no val split" in str(e.value.code)


@pytest.fixture(scope="module")
def sketch(tmp_path_factory):
    """The five ImageNet-to-Sketch domains as image folders, converted by image_folder.py."""
    from PIL import Image
    import image_folder
    root = tmp_path_factory.mktemp("sketch")
    rng = np.random.default_rng(2)
    for ds in SKETCH_TARGETS[:2]:
        for split, n in (("train", 36), ("test", 8)):
            x, y = _split(rng, n, 3, 48)
            for i, (img, c) in enumerate(zip(x, y)):
                folder = root / "src" / ds / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{i}.png")
        image_folder.convert(root / "src" / ds, root / "data" / ds, name=ds, size=37, quiet=True)
    _backbone(root / "wrn.npz", 32, "imagenet", 76.1)
    return root


def test_imagenet_to_sketch_preset(sketch, tmp_path):
    bench = get_benchmark("imagenet_to_sketch")
    assert (bench.model, bench.input_size, bench.batch_size) == ("resnet50", 224, 32)
    assert bench.default_domains == ["cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart",
                                     "sketches"]
    out = tmp_path / "run"
    assert train.main(["--benchmark", "imagenet_to_sketch", "--data-root", str(sketch / "data"),
                       "--domains", ",".join(SKETCH_TARGETS[:2]), "--model", "wrn10_1",
                       "--input-size", "32", "--backbone", str(sketch / "wrn.npz"),
                       "--epochs", "1", "--variant", "finetune", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["benchmark"] == "imagenet_to_sketch" and cfg["augmentation"] == "imagenet"
    assert (cfg["lr_body"], cfg["lr_head"], cfg["momentum"], cfg["batch_size"]) == (1e-4, 1e-3, 0.9, 32)
    assert cfg["lr_decay_epochs"] == [15] and cfg["train_split"] == "train"
    res = json.loads((out / "results.json").read_text())
    assert list(res["acc"]) == ["imagenet", *SKETCH_TARGETS[:2]]
    assert res["acc"]["imagenet"] == 76.1 and res["score"] is None   # Emax: from this finetune run
    out2 = tmp_path / "full"
    assert train.main(["--benchmark", "imagenet_to_sketch", "--data-root", str(sketch / "data"),
                       "--domains", ",".join(SKETCH_TARGETS[:2]), "--model", "wrn10_1",
                       "--input-size", "32", "--backbone", str(sketch / "wrn.npz"), "--epochs", "1",
                       "--variant", "classifier_only", "--emax-from", str(out), "--out", str(out2),
                       "--quiet"]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["score_per_domain"]["imagenet"] == pytest.approx(250.0)


def test_every_preset_has_the_documented_defaults():
    """The presets as docs/design.md and the README state them: network, input size, epochs, decay
    epochs, rates (the synthetic ones 10x the paper's), batch and augmentation."""
    from npmask.training.suites import PAPER_LR_BODY, PAPER_LR_HEAD, SYNTHETIC_LR_SCALE
    assert (PAPER_LR_BODY, PAPER_LR_HEAD, SYNTHETIC_LR_SCALE) == (1e-4, 1e-3, 10.0)
    want = {  # model, input size, epochs, decay after, lr body, lr head, augmentation
        "synthetic": ("wrn16_1", 32, 5, [4], 1e-3, 1e-2, "pad_crop"),
        "decathlon": ("wrn28_4", 64, 60, [45], 1e-4, 1e-3, "decathlon"),
        "imagenet_to_sketch": ("resnet50", 224, 30, [15], 1e-4, 1e-3, "imagenet"),
        "folder": ("wrn16_1", 32, 10, [8], 1e-4, 1e-3, "auto"),
    }
    for name, (model, size, epochs, decay, lr_body, lr_head, aug) in want.items():
        b = get_benchmark(name)
        assert (b.model, b.input_size, b.epochs, b.lr_decay_epochs, b.augmentation) == \
            (model, size, epochs, decay, aug), name
        assert (b.lr_body, b.lr_head, b.batch_size) == (pytest.approx(lr_body),
                                                        pytest.approx(lr_head), 32), name


def test_requested_domains_keep_their_order(decathlon):
    """--domains gtsrb,dtd trains gtsrb first and lists it first in results: not sorted."""
    from npmask.training.suites import choose_domains
    root = decathlon / "data"
    assert choose_domains(get_benchmark("folder"), root, ["gtsrb", "dtd"]) == ["gtsrb", "dtd"]
    assert choose_domains(get_benchmark("decathlon"), root, ["gtsrb", "dtd"]) == ["gtsrb", "dtd"]
