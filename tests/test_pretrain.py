"""python -m npmask.pretrain (tiny run, resume) and the shipped backbone's recorded accuracy."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from npmask import models, pretrain
from npmask.pretrained import (BackboneError, exists, info_path, load_backbone, read_info,
                               save_backbone, shipped_path)
from test_train import write_tiny_benchmark


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_benchmark(tmp_path_factory.mktemp("pre") / "data")


def args(data, out, *extra):
    return ["--data-root", str(data), "--domain", "base", "--model", "wrn10_1", "--input-size", "16",
            "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--lr-decay-epochs", "1",
            "--eval-subset", "20", "--out", str(out), "--quiet", *extra]


def evaluate_backbone(npz: Path, images, labels, mean, std) -> float:
    from npmask.data.loader import BatchIterator
    from npmask.training.loop import evaluate
    model, _ = load_backbone(npz)
    it = BatchIterator(images, labels, 100, mean=mean, std=std)
    return evaluate(model, it)["acc"]


def test_pretrain_writes_a_backbone_that_reproduces_its_recorded_accuracy(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(args(data, out)) == 0
    info = read_info(out / "backbone.npz")
    assert info["model"] == "wrn10_1" and info["num_classes"] == 5 and info["input_size"] == 16
    assert info["command"].startswith("python -m npmask.pretrain --data-root")
    assert info["config"]["epochs"] == 2 and info["environment"]["numpy"] == np.__version__
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    from npmask.data.format import load_domain
    dom = load_domain(data / "base")
    x, y = dom.test
    assert evaluate_backbone(out / "backbone.npz", x, y, dom.mean, dom.std) == info["test_acc"]
    assert evaluate_backbone(out / "backbone.npz", x[:20], y[:20], dom.mean, dom.std) == info["subset_acc"]
    assert (out / "plots" / "learning_curves.png").is_file()
    assert "backbone written to" in capsys.readouterr().out


def test_pretrain_resume_gives_the_same_backbone(data, tmp_path):
    ref, res = tmp_path / "ref", tmp_path / "res"
    assert pretrain.main(args(data, ref)) == 0
    assert pretrain.main(args(data, res, "--stop-after-epochs", "1")) == 0
    assert not (res / "backbone.npz").exists()
    assert pretrain.main(["--resume", "--out", str(res), "--quiet"]) == 0
    with np.load(ref / "backbone.npz") as a, np.load(res / "backbone.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_lr_decay_epochs_in_any_order_give_the_same_backbone(data, tmp_path):
    """As in npmask.train, the decay epochs are a set of epochs: 2,1 is 1,2."""
    runs = {}
    for order in ("1,2", "2,1"):
        argv = args(data, tmp_path / order.replace(",", "-"))
        argv[argv.index("--lr-decay-epochs") + 1] = order
        assert pretrain.main(argv) == 0
        runs[order] = tmp_path / order.replace(",", "-") / "backbone.npz"
    with np.load(runs["1,2"]) as a, np.load(runs["2,1"]) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_pretrain_resume_after_a_kill_between_log_line_and_checkpoint(data, tmp_path, monkeypatch):
    """Killed while logging epoch 2: the resumed run redoes epoch 2 and logs each epoch once."""
    from npmask.training.run_folder import RunFolder
    real_log = RunFolder.log
    calls = {"n": 0}

    def dies_on_second(self, record):
        calls["n"] += 1
        if calls["n"] == 2:
            real_log(self, record)  # the line is on disk, the checkpoint of epoch 2 is not
            raise KeyboardInterrupt
        return real_log(self, record)
    ref, res = tmp_path / "ref", tmp_path / "res"
    assert pretrain.main(args(data, ref)) == 0
    monkeypatch.setattr(RunFolder, "log", dies_on_second)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line with the --resume command, exit 130
        pretrain.main(args(data, res))
    assert e.value.code == 130
    assert pretrain.main(["--resume", "--out", str(res), "--quiet"]) == 0

    def epochs(run):
        return [(r["epoch"], r["train_loss"], r["test_acc"])
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert epochs(res) == epochs(ref) and [e[0] for e in epochs(res)] == [1, 2]


def test_pretrain_errors_are_one_line(data, tmp_path):
    for extra, fragment in [(["--domain", "nope"], "unknown domain 'nope'"),
                            (["--model", "wrn11_1"], "WRN depth must be 6n + 4"),
                            (["--data-root", str(tmp_path / "missing")], "does not exist")]:
        with pytest.raises(SystemExit) as e:
            pretrain.main(args(data, tmp_path / "x") + extra)
        assert str(e.value.code).startswith("python -m npmask.pretrain: error: ")
        assert fragment in str(e.value.code)


# ---------------------------------------------------------------------------------- shipped
def base_test_split(info, n):
    """The first ``n`` synthetic base test images, exactly as the shipped backbone saw them.

    Only the test split is drawn (generate_domain is what ensure_synthetic writes, image for
    image), which takes seconds instead of generating the whole benchmark.
    """
    from npmask.data import synthetic
    cfg = info["data_config"]
    x, y = synthetic.generate_domain("base", "test", cfg["base_test"], seed=cfg["seed"],
                                     image_size=cfg["image_size"])
    return x[:n], y[:n], cfg["fonts"] == synthetic.available_fonts()


@pytest.mark.skipif(not shipped_path().is_file(), reason="no shipped backbone in this checkout")
def test_shipped_backbone_reaches_its_recorded_base_accuracy():
    """Loads npmask/pretrained/wrn16_1_synthetic.npz and checks its accuracy on the first
    ``eval_subset`` base test images against the figure recorded beside it. The synthetic data
    depend on the fonts found (recorded in the JSON); with other fonts the images differ, so the
    tolerance is wider there."""
    info = read_info(shipped_path())
    assert info["model"] == "wrn16_1" and info["domain"] == "base"
    assert info["command"].startswith("python -m npmask.pretrain")
    n = info["eval_subset"]
    x, y, same_fonts = base_test_split(info, n)
    acc = evaluate_backbone(shipped_path(), x, y, np.asarray(info["mean"]), np.asarray(info["std"]))
    # The same images, whatever code generated them: the recorded fingerprint of the subset.
    from npmask.training.pretraining import images_fingerprint
    same_data = same_fonts and images_fingerprint(x, y) == info.get("eval_subset_sha256")
    tol = 0.5 if same_data else 5.0
    assert abs(acc - info["subset_acc"]) <= tol, (acc, info["subset_acc"], same_data)
    assert info["subset_acc"] > 100.0 / info["num_classes"] * 3  # far above chance


# ------------------------------------------------------------ a backbone's files, checked
def _backbone(tmp_path, **info) -> Path:
    """A tiny wrn10_1 backbone (float32) at tmp_path/bb.npz; ``info`` replaces fields of its JSON."""
    npz = tmp_path / "bb.npz"
    save_backbone(npz, models.create("wrn10_1", num_classes=5, input_size=8, seed=0),
                  {"model": "wrn10_1", "num_classes": 5, "input_size": 8, **info})
    return npz


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 0}, "field 'num_classes' must be an integer >= 1, got 0"),
    ({"input_size": True}, "field 'input_size' must be an integer >= 1, got true"),
    ({"model": None}, "field 'model' must be a model name, got null"),
    ({"dtype": "float16"}, "field 'dtype' must be float32 or float64, got \"float16\""),
    ({"domain": 3}, "field 'domain' must be a string"),
])
def test_read_info_names_the_field_that_is_wrong(tmp_path, change, message):
    """Each field load_backbone relies on is checked with its type and range (a bool is not an
    integer in JSON; a null field is present but wrong, not missing; float16 is no backbone dtype)."""
    npz = _backbone(tmp_path, **change)
    with pytest.raises(BackboneError, match=re.escape(f"backbone description {info_path(npz)}: {message}")):
        read_info(npz)


@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object, got list"),
                                            (b"\xff\xfe{", "is not valid JSON")])
def test_read_info_refuses_a_description_that_is_no_json_object(tmp_path, text, message):
    """A JSON list, or bytes that are not UTF-8: a BackboneError, not a TypeError or a traceback."""
    npz = _backbone(tmp_path)
    info = info_path(npz)
    info.write_bytes(text) if isinstance(text, bytes) else info.write_text(text)
    with pytest.raises(BackboneError, match=re.escape(message)):
        read_info(npz)


def test_load_backbone_takes_the_dtype_asked_for_over_the_stored_one(tmp_path):
    """--dtype float64 on a float32 backbone: the model is built (and the weights loaded) in float64."""
    model, info = load_backbone(_backbone(tmp_path), dtype="float64")
    assert info.get("dtype", "float32") == "float32"
    assert {str(v.dtype) for v in model.state_dict().values() if v.dtype.kind == "f"} == {"float64"}


@pytest.mark.parametrize("change, message", [
    ({"model": "nope"}, "unknown model 'nope'"),                      # models.create's ValueError
    ({"num_classes": 7}, "does not fit model 'wrn10_1'"),             # load_state_dict's ValueError
])
def test_load_backbone_turns_a_description_that_does_not_fit_into_a_backbone_error(tmp_path, change,
                                                                                  message):
    with pytest.raises(BackboneError, match=re.escape(message)):
        load_backbone(_backbone(tmp_path, **change))


def test_pytorch_weights_are_recognised_whatever_the_case_of_their_suffix(tmp_path):
    (tmp_path / "MODEL.PTH").write_bytes(b"weights")
    with pytest.raises(BackboneError, match="is PyTorch weights, not an npmask backbone"):
        load_backbone(tmp_path / "MODEL.PTH")


def test_exists_is_false_for_a_folder(tmp_path):
    """exists() says whether load_backbone could read the path: a folder named .npz is none."""
    (tmp_path / "bb.npz").mkdir()
    assert not exists(tmp_path / "bb.npz") and exists(_backbone(tmp_path / "bb.npz"))


# ---------------------------------------------------------------------------------- flags reach the run
def _pretrain_recorded(monkeypatch, calls):
    """npmask.pretrain.pretrain replaced by a recorder: the CLI runs, the training does not."""
    def fake(cfg, folder, **kw):
        calls.append({"cfg": cfg, **kw})
        return {"save": cfg.save, "test_acc": 81.25, "eval_subset": cfg.eval_subset,
                "subset_acc": 55.0}
    monkeypatch.setattr(pretrain, "pretrain", fake)


def test_pretrain_flags_reach_the_training(data, tmp_path, monkeypatch, capsys):
    """--max-train, --save, --quiet and --stop-after-epochs reach pretrain() with the recorded
    command, and the summary line prints the whole-test-set and subset accuracies in their places
    (kills dropping max_train from FLAGS, ignoring --save, progress/stop_after not passed, and
    the two accuracies swapped in the printed line)."""
    calls = []
    _pretrain_recorded(monkeypatch, calls)
    save = tmp_path / "elsewhere" / "bb.npz"
    assert pretrain.main(args(data, tmp_path / "run", "--max-train", "32", "--save", str(save),
                              "--stop-after-epochs", "1")) == 0
    (call,) = calls
    assert call["cfg"].max_train == 32 and call["cfg"].save == str(save)
    assert call["progress"] is False and call["stop_after"] == 1
    assert call["command"].startswith("python -m npmask.pretrain --data-root")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["max_train"] == 32 and saved["save"] == str(save)
    out = capsys.readouterr().out
    assert f"backbone written to {save} (test accuracy 81.25%, first 20 test images 55.00%)" in out
    assert pretrain.main(args(data, tmp_path / "run2")[:-1]) == 0  # without --quiet
    assert calls[-1]["progress"] is True and calls[-1]["stop_after"] is None
    assert calls[-1]["cfg"].save == str(tmp_path / "run2" / "backbone.npz")


def test_pretrain_resume_refuses_changed_settings_and_rechecks_the_data(data, tmp_path,
                                                                         monkeypatch):
    """--resume keeps the run's saved settings (a differing flag is a one-line error naming it)
    and reads the domain's files again before continuing (kills dropping check_resume_conflicts
    or the resume's _check_data)."""
    import shutil
    calls = []
    _pretrain_recorded(monkeypatch, calls)
    copy = shutil.copytree(data, tmp_path / "data")
    out = tmp_path / "run"
    assert pretrain.main(args(copy, out)) == 0
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--resume", "--out", str(out), "--quiet", "--epochs", "5"])
    assert "these flags differ: --epochs 5 (the run has 2)" in str(e.value.code)
    assert pretrain.main(["--resume", "--out", str(out), "--quiet", "--epochs", "2"]) == 0
    (copy / "base" / "meta.json").unlink()
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--resume", "--out", str(out), "--quiet"])
    assert str(e.value.code).startswith("python -m npmask.pretrain: error: ") and "base" in str(
        e.value.code)
    assert len(calls) == 2
