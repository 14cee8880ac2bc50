"""python -m npmask.train on a tiny benchmark: every output file, exact resume, clean errors.

The data are two tiny 16x16 domains written in the npmask format, the backbone a randomly
initialised WRN-10-1 saved as a backbone file (no pretraining needed to test the machinery).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npmask import train
from npmask.backend import cupy_available
from npmask.data.format import write_domain
from npmask.training import checkpoint as ck
from npmask.training import cli
from npmask.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def write_tiny_benchmark(root: Path, size: int = 16, n_train: int = 64, n_test: int = 32) -> Path:
    """Domains base (5 classes), a (3), b (4): class k has a bright square in quadrant-ish k."""
    rng = np.random.default_rng(123)
    for name, k, mirror in [("base", 5, True), ("a", 3, True), ("b", 4, False)]:
        def split(n):
            y = rng.integers(0, k, n)
            x = rng.integers(0, 90, (n, size, size, 3))
            for i, c in enumerate(y):
                r0 = (c * 3) % (size - 6)
                x[i, r0:r0 + 6, r0:r0 + 6, c % 3] += 150
            return x.astype(np.uint8), y.astype(np.int64)
        write_domain(root / name, name=name, train=split(n_train), test=split(n_test),
                     class_names=[f"c{i}" for i in range(k)], mirror=mirror, source="test fixture",
                     licence="none")
    return root


def write_random_backbone(path: Path, size: int = 16) -> Path:
    from npmask import models
    from npmask.pretrained import save_backbone
    model = models.create("wrn10_1", num_classes=5, input_size=size, seed=3)
    save_backbone(path, model, {"model": "wrn10_1", "num_classes": 5, "input_size": size,
                                "dtype": "float32", "domain": "base"})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = write_tiny_benchmark(root / "data")
    backbone = write_random_backbone(root / "backbone.npz")
    return {"data": data, "backbone": backbone, "tmp": root}


def base_args(tiny, out, *extra):
    return ["--benchmark", "folder", "--data-root", str(tiny["data"]), "--domains", "a,b",
            "--model", "wrn10_1", "--input-size", "16", "--backbone", str(tiny["backbone"]),
            "--epochs", "2", "--batch-size", "16", "--lr-body", "1e-3", "--lr-head", "1e-2",
            "--lr-decay-epochs", "1", "--out", str(out), "--quiet", *extra]


def run_cli(args):
    return train.main(args)


def comparable_metrics(run: Path):
    """metrics.jsonl without wall-clock fields (those differ between runs)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if "seconds" not in k and k != "time"})
    return out


def domain_arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def reference_run(tiny):
    """An uninterrupted run: the numbers every resumed run must reproduce exactly."""
    out = tiny["tmp"] / "reference"
    assert run_cli(base_args(tiny, out)) == 0
    return out


# ---------------------------------------------------------------------------------- outputs
def test_end_to_end_writes_every_output_file(reference_run, capsys):
    run = reference_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["seed"] == 0 and cfg["config"]["variant"] == "full"
    assert cfg["config"]["domains"] == ["a", "b"]
    for key in ("python", "numpy", "npmask"):
        assert cfg["environment"][key]
    assert cfg["command"].startswith("python -m npmask.train")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["domain"], r["epoch"]) for r in records] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    for r in records:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "time"):
            assert key in r, key
        assert set(r["lr"]) == {"body", "head"}
    # step decay after epoch 1: epoch 2 runs at a tenth of the rates
    assert records[1]["lr"]["body"] == pytest.approx(records[0]["lr"]["body"] * 0.1)
    assert records[1]["lr"]["head"] == pytest.approx(1e-3)

    from npmask.storage import read_domain_file
    for d in ("a", "b"):
        meta, arrays = read_domain_file(run / "domains" / f"{d}.npz")
        assert meta["variant"] == "full" and any(k.startswith("mask/") for k in arrays)
    res = json.loads((run / "results.json").read_text())
    # the pretraining domain's column first (its JSON has no test_acc: measured once on its test split)
    assert list(res["acc"]) == ["base", "a", "b"] and res["score"] is None  # no finetune: no Emax
    assert res["base_domain"] == "base" and "measured on the 32 test images" in res["base_acc_source"]
    assert json.loads((run / "base_accuracy.json").read_text())["acc"] == res["acc"]["base"]
    assert res["acc"]["a"] == pytest.approx(records[1]["test_acc"])
    assert 1.0 < res["params"] < 1.2  # two domains of just over 1 bit per weight
    md = (run / "results.md").read_text()
    assert "| full |" in md and "missing" in md and "| Method | base | a | b |" in md
    for png in ("learning_curves.png", "masks_and_ks.png"):
        data = (run / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list((run / "checkpoints").iterdir())  # finished domains need no checkpoint


def test_emax_from_a_finetune_run_gives_the_score(tiny, reference_run, tmp_path):
    ft = tmp_path / "ft"
    assert run_cli(base_args(tiny, ft, "--variant", "finetune", "--epochs", "1")) == 0
    out = tmp_path / "full"
    assert run_cli(base_args(tiny, out, "--epochs", "1", "--emax-from", str(ft))) == 0
    res = json.loads((out / "results.json").read_text())
    ft_acc = json.loads((ft / "results.json").read_text())["acc"]
    expected = 0.0
    for d, a in res["acc"].items():
        emax = 2 * (1 - ft_acc[d] / 100)
        expected += 1000 / emax ** 2 * max(0.0, emax - (1 - a / 100)) ** 2
    assert list(res["acc"]) == ["base", "a", "b"]          # the sum runs over every domain
    assert res["score"] == pytest.approx(expected)
    assert res["sp"] == pytest.approx(res["score"] / res["params"])
    ft_res = json.loads((ft / "results.json").read_text())
    assert ft_res["score"] is None  # its own Emax was not known while it ran


# ---------------------------------------------------------------------------------- resume
def test_resume_after_stop_is_bit_identical(tiny, reference_run, tmp_path):
    out = tmp_path / "resumed"
    assert run_cli(base_args(tiny, out, "--stop-after-epochs", "1")) == 0
    state = load_checkpoint(str(out / "checkpoints" / "a.npz"))
    assert state["epoch"] == 1 and not (out / "results.json").exists()
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["acc"] == \
        json.loads((reference_run / "results.json").read_text())["acc"]
    assert comparable_metrics(out) == comparable_metrics(reference_run)
    for d in ("a", "b"):
        got, want = domain_arrays(out / "domains" / f"{d}.npz"), domain_arrays(
            reference_run / "domains" / f"{d}.npz")
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_kill_at_any_moment_keeps_a_checkpoint_and_resume_matches(tiny, reference_run, tmp_path):
    """SIGKILL a real training process as soon as the first checkpoint exists (mid-epoch or
    mid-write), then resume: the result equals the uninterrupted run."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "npmask.train", *base_args(tiny, out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "a.npz"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    # whatever was on disk is either a complete checkpoint or nothing; temporaries are ignored
    for name in leftovers:
        if not name.startswith("."):
            assert load_checkpoint(str(out / "checkpoints" / name))["epoch"] >= 1
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert comparable_metrics(out) == comparable_metrics(reference_run)
    for d in ("a", "b"):
        got, want = domain_arrays(out / "domains" / f"{d}.npz"), domain_arrays(
            reference_run / "domains" / f"{d}.npz")
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_kill_between_checkpoint_and_metrics_line_loses_no_line(tiny, reference_run, tmp_path,
                                                                   monkeypatch):
    """The process dies right after one of the two per-epoch writes (the metrics.jsonl line and
    the checkpoint): the resumed run's metrics.jsonl still equals the uninterrupted run's."""
    from npmask.training.run_folder import RunFolder
    real_log = RunFolder.log
    calls = {"n": 0}

    def dies_once(self, record):  # killed while the epoch-1 line of domain "a" is being logged
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_log(self, record)
    monkeypatch.setattr(RunFolder, "log", dies_once)
    out = tmp_path / "torn"
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line with the --resume command, exit 130
        run_cli(base_args(tiny, out))
    assert e.value.code == 130
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert comparable_metrics(out) == comparable_metrics(reference_run)


def test_the_graph_step_trains_the_reference_run_exactly_across_a_resume(tiny, reference_run,
                                                                        tmp_path, monkeypatch):
    """fit's cuda_graphs on NumPy (the CLI refuses it there: forced on here) runs GraphStep's
    emulation of the CUDA graphs: the same metrics and domain files as the plain run, also when
    stopped after an epoch and resumed (host step counts, device lr after the decay)."""
    from npmask.training import domain_training, graph_step
    real_fit, real_close, steps = domain_training.fit, graph_step.GraphStep.close, []
    monkeypatch.setattr(domain_training, "fit", lambda **kw: real_fit(**{**kw, "cuda_graphs": True}))

    def close(self):
        steps.append(dict(self.steps))
        real_close(self)
    monkeypatch.setattr(graph_step.GraphStep, "close", close)
    out = tmp_path / "graphs"
    assert run_cli(base_args(tiny, out, "--stop-after-epochs", "1")) == 0
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert len(steps) == 3 and all(s["replayed"] > 0 for s in steps), steps   # a, a resumed, b
    assert comparable_metrics(out) == comparable_metrics(reference_run)
    for d in ("a", "b"):
        got, want = (domain_arrays(r / "domains" / f"{d}.npz") for r in (out, reference_run))
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cuda_graphs_on_numpy_is_one_line(tiny, tmp_path):
    expect_exit(base_args(tiny, tmp_path / "x", "--cuda-graphs"), "--cuda-graphs needs --backend cupy")
    assert not (tmp_path / "x").exists()


def test_cuda_graphs_with_dropout_is_one_line_before_any_work(tiny, tmp_path, monkeypatch):
    from npmask.training import validate
    monkeypatch.setattr(validate, "check_backend", lambda backend: None)   # as if on a GPU
    out = tmp_path / "x"
    expect_exit(base_args(tiny, out, "--backend", "cupy", "--cuda-graphs", "--model", "vgg11",
                          "--input-size", "32"), "--cuda-graphs cannot capture dropout")
    assert not out.exists()


def test_resume_refuses_changed_settings(tiny, reference_run):
    with pytest.raises(SystemExit) as e:
        run_cli(["--resume", "--out", str(reference_run), "--epochs", "5", "--quiet"])
    assert "--epochs 5" in str(e.value) and "(the run has 2)" in str(e.value)


# ---------------------------------------------------------------------------------- checkpoints
def _tiny_fit(folder: Path, epochs: int, **kw):
    """fit() of a linear model on two fixed batches: SGD lr 0.1, x0.1 from epoch 2 on."""
    from npmask import nn
    from npmask.optim import SGD, MultiStepLR
    from npmask.training.fit import fit
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, rng=0))
    opt = SGD(model.parameter_refs(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), rng.integers(0, 3, 4))
               for _ in range(2)]
    folder.mkdir(exist_ok=True)
    return fit(model=model, optimizer=opt, scheduler=MultiStepLR(opt, milestones=[2]),
               batches_for_epoch=lambda e: batches, num_batches=2, epochs=epochs,
               checkpoint_path=folder / "checkpoint.npz", state_fn=model.state_dict,
               load_state_fn=model.load_state_dict, progress=False, **kw)


def test_fit_resumed_before_a_rate_decay_still_decays_on_time(tmp_path):
    """The scheduler's epoch comes back from the checkpoint. (The reference run decays at its
    resume point, where a scheduler restarted from epoch 0 happens to give the same rates.)"""
    from npmask.training.fit import StopRequested
    whole = _tiny_fit(tmp_path / "whole", 3)
    with pytest.raises(StopRequested):
        _tiny_fit(tmp_path / "cut", 3, epoch_budget=[1])      # killed after epoch 1 of 3
    resumed = _tiny_fit(tmp_path / "cut", 3)
    assert [r["lr"][""] for r in whole] == pytest.approx([0.1, 0.1, 0.01])
    assert [r["lr"] for r in resumed] == [r["lr"] for r in whole]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]


def test_fit_refuses_a_checkpoint_written_with_other_settings(tmp_path):
    from npmask.training.errors import ConfigError
    from npmask.training.fit import StopRequested
    with pytest.raises(StopRequested):
        _tiny_fit(tmp_path, 3, epoch_budget=[1], extra={"variant": "full", "seed": 0})
    with pytest.raises(ConfigError, match=r"other settings \(variant\); delete it"):
        _tiny_fit(tmp_path, 3, extra={"variant": "piggyback", "seed": 0})


def test_fit_records_a_non_finite_test_score_as_null(tmp_path):
    """evaluate() of an empty test set gives NaN: the record says null (metrics.jsonl is strict JSON)."""
    nan = {"loss": float("nan"), "acc": float("nan"), "n": 0, "seconds": 0.0}
    (record,) = _tiny_fit(tmp_path, 1, evaluate_fn=lambda: nan)
    assert record["test_loss"] is None and record["test_acc"] is None
    json.dumps(record, allow_nan=False)


def test_checkpoint_round_trip_keeps_structure_types_and_bits():
    rng = np.random.default_rng(0)
    state = {"epoch": 3, "model": {"layer.mask_real": rng.random((2, 3), dtype=np.float32)},
             "optimizer": {"body/lr": np.asarray(1e-4), "body/state.w.step": np.asarray(7)},
             "history": [{"loss": 0.5, "lr": {"": 0.1}, "bad": float("nan")}],
             "extra": {"seed": 1, 2: (1, "x", None, True)}}
    path = os.path.join(pytest.importorskip("tempfile").mkdtemp(), "c.npz")
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["extra"] == {"seed": 1, 2: (1, "x", None, True)}
    np.testing.assert_array_equal(back["model"]["layer.mask_real"], state["model"]["layer.mask_real"])
    assert back["model"]["layer.mask_real"].dtype == np.float32
    assert np.isnan(back["history"][0]["bad"]) and back["history"][0]["lr"] == {"": 0.1}


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(str(path), {"epoch": 1, "w": np.arange(5.0)})
    before = path.read_bytes()

    def crash(f, **arrays):  # write half a file, then die as a kill would
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(path), {"epoch": 2, "w": np.arange(5.0)})
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(str(path), {"epoch": 1, "w": np.arange(50.0)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def test_a_checkpoint_refuses_bool_dict_keys(tmp_path):
    """Keys are str or int; True would come back as a bool key that collides with 1."""
    with pytest.raises(TypeError, match="keys must be str or int"):
        save_checkpoint(str(tmp_path / "c.npz"), {"epoch": 1, "flags": {True: 1}})
    assert not (tmp_path / "c.npz").exists()


def test_an_unknown_skeleton_node_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown node"):
        ck.unflatten({"epoch": 1, "w": {"__set__": [1, 2]}}, {})


@pytest.mark.parametrize("epoch", [True, -1, 1.0, "1", None])
def test_a_checkpoint_epoch_must_be_a_plain_int_of_the_run(epoch):
    with pytest.raises(CheckpointError, match="field 'epoch'"):
        ck.checkpoint_epoch("c.npz", state={"epoch": epoch})
    assert ck.checkpoint_epoch("c.npz", 3, state={"epoch": 3}) == 3


def test_an_npz_with_a_foreign_skeleton_is_not_a_checkpoint(tmp_path):
    """A file with a __skeleton__ member is read as a checkpoint only if its header says so."""
    path = tmp_path / "c.npz"
    for header in ({"format": "something-else", "version": 1, "state": {"epoch": 1}},
                   {"version": 1, "state": {"epoch": 1}}):
        raw = json.dumps(header).encode()
        np.savez(path, **{ck.SKELETON_KEY: np.frombuffer(raw, dtype=np.uint8)})
        with pytest.raises(CheckpointError, match="not an npmask checkpoint"):
            load_checkpoint(str(path))


def test_resume_from_a_damaged_checkpoint_is_one_line_and_loses_nothing_else(tiny, reference_run,
                                                                             tmp_path):
    out = tmp_path / "damaged"
    assert run_cli(base_args(tiny, out, "--stop-after-epochs", "3")) == 0  # a done, b at epoch 1
    ckpt = out / "checkpoints" / "b.npz"
    good = ckpt.read_bytes()
    kept = {p: p.read_bytes() for p in [out / "domains" / "a.npz", out / "progress.json",
                                       out / "metrics.jsonl", out / "config.json"]}
    state = load_checkpoint(str(ckpt))
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name][:1]  # readable, but the wrong shape
    save_checkpoint(str(ckpt), state)
    expect_exit(["--resume", "--out", str(out), "--quiet"], str(ckpt), "does not fit this run",
                name, "delete it")
    ckpt.write_bytes(good[: len(good) // 2])  # truncated
    expect_exit(["--resume", "--out", str(out), "--quiet"], str(ckpt), "truncated or corrupt")
    for p, data in kept.items():
        assert p.read_bytes() == data, p  # nothing but the damaged file is touched
    ckpt.write_bytes(good)
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert comparable_metrics(out) == comparable_metrics(reference_run)  # the good one resumes


def test_a_damaged_base_accuracy_cache_is_measured_again(tiny, reference_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    cache = out / "base_accuracy.json"
    good = json.loads(cache.read_text())
    cache.write_text("{ torn")  # the backbone's JSON has no test_acc: this file is a cache
    assert run_cli(["--resume", "--out", str(out), "--quiet"]) == 0
    assert json.loads(cache.read_text()) == good
    assert json.loads((out / "results.json").read_text())["acc"] == json.loads(
        (reference_run / "results.json").read_text())["acc"]


# ---------------------------------------------------------------------------------- errors
def expect_exit(args, *fragments):
    with pytest.raises(SystemExit) as e:
        run_cli(args)
    msg = str(e.value.code)
    assert isinstance(e.value.code, str) and msg.startswith("python -m npmask.train: error: ")
    assert "\n" not in msg and "Traceback" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_unknown_model_variant_domain_are_one_line_errors(tiny, tmp_path):
    args = base_args(tiny, tmp_path / "x")
    expect_exit(args + ["--model", "resnet9000"], "unknown model 'resnet9000'", "wrn")
    expect_exit(args + ["--variant", "fancy"], "unknown variant 'fancy'", "piggyback", "full")
    expect_exit(args + ["--domains", "a,zebra"], "unknown domain(s) zebra", "available: a, b, base")
    assert not (tmp_path / "x").exists()  # nothing written for a rejected command


def test_pytorch_weights_or_a_folder_as_backbone_are_one_line_errors(tiny, tmp_path):
    for name in ("resnet50.safetensors", "model.pth"):  # before npmask.convert: says to run it
        (tmp_path / name).write_bytes(b"weights")
        args = base_args(tiny, tmp_path / "x")
        args[args.index("--backbone") + 1] = str(tmp_path / name)
        expect_exit(args, f"backbone {tmp_path / name} is PyTorch weights",
                    f"python -m npmask.convert {tmp_path / name} --model MODEL --out")
    (tmp_path / "bb.npz").mkdir()
    args[args.index("--backbone") + 1] = str(tmp_path / "bb.npz")
    expect_exit(args, "bb.npz is a folder; give the backbone's .npz file")
    assert not (tmp_path / "x").exists()


def test_a_text_file_named_npz_as_backbone_is_not_a_valid_npz(tiny, tmp_path):
    (tmp_path / "bb.npz").write_text("just some text\n")           # its description is fine
    (tmp_path / "bb.json").write_text(tiny["backbone"].with_suffix(".json").read_text())
    args = base_args(tiny, tmp_path / "x")
    args[args.index("--backbone") + 1] = str(tmp_path / "bb.npz")
    msg = expect_exit(args, f"backbone {tmp_path / 'bb.npz'} cannot be read", "not a valid .npz file")
    assert "pickle" not in msg and not (tmp_path / "x").exists()


def test_emax_from_a_file_says_it_must_be_a_folder(tiny, tmp_path):
    (tmp_path / "results.json").write_text('{"variant": "finetune", "acc": {"a": 90}}')
    msg = expect_exit(base_args(tiny, tmp_path / "x", "--emax-from", str(tmp_path / "results.json")),
                      f"--emax-from {tmp_path / 'results.json'} is a file", "must be the finetune "
                      "run's folder")
    assert "Not a directory" not in msg and not (tmp_path / "x").exists()


def test_missing_or_malformed_data_folder(tiny, tmp_path):
    expect_exit(base_args(tiny, tmp_path / "x") + ["--data-root", str(tmp_path / "nope")],
                "data folder", "does not exist")
    (tmp_path / "notes.txt").write_text("a file\n")
    msg = expect_exit(base_args(tiny, tmp_path / "x") + ["--data-root", str(tmp_path / "notes.txt")],
                      f"data folder {tmp_path / 'notes.txt'} is a file, not a folder")
    assert "does not exist" not in msg and not (tmp_path / "x").exists()
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(tiny["data"], bad)
    (bad / "a" / "meta.json").write_text("{ not json")
    expect_exit(base_args(tiny, tmp_path / "y") + ["--data-root", str(bad), "--domains", "a"],
                "meta.json")
    assert not (tmp_path / "y").exists()  # found before the run folder is created
    (bad / "b" / "train.npz").write_bytes(b"garbage")
    expect_exit(base_args(tiny, tmp_path / "z") + ["--data-root", str(bad), "--domains", "b"],
                "train.npz")
    assert not (tmp_path / "z").exists()  # the npz headers are checked before the run folder too
    good = (tiny["data"] / "b" / "train.npz").read_bytes()
    (bad / "b" / "train.npz").write_bytes(good[: len(good) // 2])  # truncated
    expect_exit(base_args(tiny, tmp_path / "t") + ["--data-root", str(bad), "--domains", "b"],
                "train.npz", "corrupt")
    assert not (tmp_path / "t").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_exit(base_args(tiny, tmp_path / "w") + ["--data-root", str(empty)], "holds no domain")


def test_a_crop_larger_than_the_stored_images_is_one_line_before_any_folder(tiny, tmp_path):
    # 16x16 data fed by the Decathlon protocol to a 64px network: its 64x64 crop cannot be cut
    backbone = write_random_backbone(tmp_path / "bb64.npz", size=64)
    args = base_args(tiny, tmp_path / "x", "--augmentation", "decathlon")
    args[args.index("--input-size") + 1] = "64"
    args[args.index("--backbone") + 1] = str(backbone)
    expect_exit(args, "domain 'a'", "crop 64x64 is larger than the (padded) image 16x16")
    assert not (tmp_path / "x").exists()


def test_a_constant_channel_in_the_training_images_is_one_line_before_any_folder(tiny, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny["data"], root)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8)
    x[..., 2] = 0  # blue is 0 in every training image: std 0, the loader would divide by it
    y = np.arange(32) % 3
    write_domain(root / "a", name="a", train=(x, y), test=(x[:8], y[:8]),
                 class_names=["c0", "c1", "c2"], mirror=True, source="test", licence="none")
    args = base_args(tiny, tmp_path / "x", "--domains", "a")
    args[args.index("--data-root") + 1] = str(root)
    expect_exit(args, f"{root / 'a' / 'meta.json'}: std [", "cannot be normalised")
    assert not (tmp_path / "x").exists()


def test_decathlon_benchmark_defaults_and_its_errors(tiny, tmp_path, monkeypatch):
    from npmask.metrics import decathlon_emax
    expect_exit(["--benchmark", "decathlon"], "--benchmark decathlon needs --data-root")
    expect_exit(["--benchmark", "decathlon", "--data-root", str(tiny["data"])],
                "lacks the decathlon domain(s) aircraft, cifar100", "available: a, b, base")
    # with its domains present: WRN-28-4 at 64x64, the published Emax, and a backbone required
    root = tmp_path / "dec"
    root.mkdir()
    big = write_tiny_benchmark(tmp_path / "72px", size=72, n_train=32, n_test=8)  # 64px crops
    for d in ["aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "vgg-flowers", "omniglot",
              "svhn", "ucf101"]:
        (root / d).symlink_to(big / "a")
    expect_exit(["--benchmark", "decathlon", "--data-root", str(root)],
                "needs --backbone", "--model wrn28_4 --input-size 64")
    # the tiny backbone is a 16px WRN-10-1: refused before any folder exists ...
    expect_exit(["--benchmark", "decathlon", "--data-root", str(root), "--backbone",
                 str(tiny["backbone"]), "--out", str(tmp_path / "never")],
                "is a wrn10_1, but the run asks for --model wrn28_4")
    assert not (tmp_path / "never").exists()
    # ... so the defaults are read with the backbone and data checks switched off
    from npmask.training import validate
    monkeypatch.setattr(validate, "check_train_run", lambda cfg, where=None: cfg)
    cfg = cli.train_config_from_args({"benchmark": "decathlon", "data_root": str(root),
                                      "backbone": str(tiny["backbone"])})
    assert (cfg.model, cfg.input_size, cfg.epochs, cfg.lr_decay_epochs) == ("wrn28_4", 64, 60, [45])
    assert (cfg.lr_body, cfg.lr_head, cfg.augmentation) == (1e-4, 1e-3, "decathlon")
    assert cfg.emax == decathlon_emax() and "published" in cfg.emax_source


@pytest.mark.skipif(cupy_available(), reason="a usable GPU is present")
def test_cupy_without_gpu_is_a_clear_error(tiny, tmp_path):
    expect_exit(base_args(tiny, tmp_path / "x") + ["--backend", "cupy"], "cupy")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from npmask.training import loop
    real = loop.softmax_cross_entropy
    calls = {"n": 0}
    steps_per_epoch = 64 // 16

    def poisoned(logits, labels):  # the loss turns NaN in the middle of epoch 2
        calls["n"] += 1
        loss, d = real(logits, labels)
        return (float("nan"), d) if calls["n"] > steps_per_epoch + 1 else (loss, d)
    monkeypatch.setattr(loop, "softmax_cross_entropy", poisoned)
    out = tmp_path / "nan"
    expect_exit(base_args(tiny, out), "non-finite loss", "epoch 2", "last good checkpoint")
    assert load_checkpoint(str(out / "checkpoints" / "a.npz"))["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--backend", "--model", "--variant", "--domains", "--epochs", "--batch-size",
                 "--lr-body", "--lr-head", "--lr-decay-epochs", "--seed", "--data-root", "--out",
                 "--resume", "--benchmark", "--backbone", "--emax-from", "--cuda-graphs"):
        assert flag in text, flag


@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")
def test_cupy_training_with_cuda_graphs_repeats_itself_and_agrees_without(tiny, tmp_path):
    """On a GPU: --cuda-graphs gives the same numbers twice, and those of the run without it to
    float32 rounding (its GEMMs are one cuBLAS call of its own, npmask.training.cuda_gemm)."""
    runs = [tmp_path / "graphs1", tmp_path / "graphs2", tmp_path / "plain"]
    for out in runs[:2]:
        assert run_cli(base_args(tiny, out, "--backend", "cupy", "--cuda-graphs")) == 0
    assert run_cli(base_args(tiny, runs[2], "--backend", "cupy")) == 0
    first, second, plain = (comparable_metrics(r) for r in runs)
    assert first == second
    assert [(r["domain"], r["epoch"]) for r in first] == [(r["domain"], r["epoch"]) for r in plain]
    for g, p in zip(first, plain):
        assert g["train_loss"] == pytest.approx(p["train_loss"], rel=1e-3)
        assert g["test_loss"] == pytest.approx(p["test_loss"], rel=1e-3)


@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a usable CUDA device")
def test_cupy_training_is_reproducible_and_agrees_with_numpy(tiny, reference_run, tmp_path):
    """On a GPU: the same seed gives the same numbers twice, and close to the NumPy run's."""
    runs = [tmp_path / "gpu1", tmp_path / "gpu2"]
    for out in runs:
        assert run_cli(base_args(tiny, out, "--backend", "cupy")) == 0
    first, second = comparable_metrics(runs[0]), comparable_metrics(runs[1])
    assert first == second
    cpu = comparable_metrics(reference_run)
    assert [(r["domain"], r["epoch"]) for r in first] == [(r["domain"], r["epoch"]) for r in cpu]
    for g, c in zip(first, cpu):
        # float32 sums in another order: the losses agree to rounding, grown over a few steps
        assert g["train_loss"] == pytest.approx(c["train_loss"], rel=1e-3)
        assert g["test_loss"] == pytest.approx(c["test_loss"], rel=1e-3)
    a, b = domain_arrays(runs[0] / "domains" / "a.npz"), domain_arrays(reference_run / "domains" / "a.npz")
    # The masks are packed bits; Adam's step on an R whose gradient is ~0 can take either sign
    # under float32 rounding, so a few bits may differ, never many.
    masks = [k for k in a if k.startswith("mask/")]
    same = sum(int((np.unpackbits(a[k]) == np.unpackbits(b[k])).sum()) for k in masks)
    total = sum(8 * a[k].size for k in masks)
    assert masks and same >= 0.99 * total, f"{total - same} of {total} mask bits differ"


# ------------------------------------------------------------------ flags shared by the commands
def test_flag_parsers_accept_none_and_spaces_around_names():
    """--lr-decay-epochs none means no decay (the help's [] case), and --domains "a, b" names a and
    b: a space after the comma must not make an unknown domain ' b'."""
    assert cli.int_list("none") == cli.int_list("None") == cli.int_list(" ") == []
    assert cli.int_list("10,13") == [10, 13]
    assert cli.name_list("a, b ,c,") == ["a", "b", "c"]
    assert cli.float_pair("1e-4,2e-4") == [1e-4, 2e-4]  # LO then HI, as --mask-init says


def test_workers_must_be_a_positive_integer(capsys):
    """--workers 0 would fall back silently to the default count; argparse refuses it instead."""
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as e:
            train.build_parser().parse_args(["--workers", bad])
        assert e.value.code == 2
        assert "--workers: must be a positive integer" in capsys.readouterr().err
    assert train.build_parser().parse_args(["--workers", "1"]).workers == 1


def test_default_out_and_the_recorded_command():
    """A run without --out lands in runs/train-<variant>-<time>, where a plain --resume looks for
    it (the prefix train-), and config.json records a command the shell can take back as it is."""
    out = Path(cli.default_out("train", "full", ""))
    assert out.parent == Path("runs") and out.name.startswith("train-full-")
    assert cli.command_line("npmask.train", ["--out", "my runs/x", "--domains", "a"]) == \
        "python -m npmask.train --out 'my runs/x' --domains a"


def test_a_relative_backbone_is_recorded_as_an_absolute_path(tiny, tmp_path, monkeypatch):
    """config.json must name the backbone so that --resume finds it from another folder."""
    import shutil
    shutil.copy(tiny["backbone"], tmp_path / "bb.npz")
    shutil.copy(tiny["backbone"].with_suffix(".json"), tmp_path / "bb.json")
    monkeypatch.chdir(tmp_path)
    cfg = cli.train_config_from_args({"benchmark": "folder", "data_root": str(tiny["data"]),
                                      "domains": ["a"], "model": "wrn10_1", "input_size": 16,
                                      "backbone": "bb.npz"})
    assert cfg.backbone == str((tmp_path / "bb.npz").resolve())


def test_the_synthetic_notes_say_when_its_protocol_was_changed(tiny):
    """The synthetic preset's note explains its scaled rates; once a flag changes the protocol the
    note says so instead. The other presets keep their own note whatever the flags."""
    common = {"data_root": str(tiny["data"]), "domains": ["a"], "model": "wrn10_1",
              "input_size": 16, "backbone": str(tiny["backbone"])}
    syn = cli.train_config_from_args({"benchmark": "synthetic", **common})
    assert syn.notes == cli.BENCHMARKS["synthetic"].notes and "x10" in syn.notes
    changed = cli.train_config_from_args({"benchmark": "synthetic", **common, "epochs": 2})
    assert changed.notes == "protocol settings changed on the command line (see the fields above)"
    folder = cli.train_config_from_args({"benchmark": "folder", **common, "epochs": 2})
    assert folder.notes == cli.BENCHMARKS["folder"].notes


def test_the_pretraining_domain_as_a_target_is_refused_before_any_work(tiny, tmp_path):
    out = tmp_path / "x"
    args = base_args(tiny, out, "--domains", "a,base")
    args[args.index("folder")] = "synthetic"
    expect_exit(args, "'base' is the pretraining domain of the synthetic benchmark")
    assert not out.exists()


def test_a_missing_shipped_backbone_is_pretrained_with_the_runs_settings(tiny, tmp_path,
                                                                          monkeypatch):
    """No shipped backbone for --model: npmask.train pretrains one on the spot with the run's seed,
    input size, backend and dtype, into runs/pretrain-<model>-synthetic, and unlocks the folder;
    the run records the backbone's absolute path (a --resume from another folder finds it)."""
    from npmask.training.config import TrainConfig
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_pretrain(pcfg, folder):
        seen["cfg"] = pcfg
    monkeypatch.setattr(cli, "pretrain", fake_pretrain)
    cfg = TrainConfig(model="wrn10_1", input_size=16, seed=7, dtype="float64")
    path = cli.resolve_backbone(cfg, cli.BENCHMARKS["synthetic"], tiny["data"])
    pcfg = seen["cfg"]
    out = Path("runs/pretrain-wrn10_1-synthetic")
    assert Path(pcfg.save) == out / "backbone.npz"
    assert Path(path) == (tmp_path / out / "backbone.npz").resolve()     # absolute in config.json
    assert (pcfg.model, pcfg.input_size, pcfg.seed, pcfg.dtype, pcfg.backend) == \
        ("wrn10_1", 16, 7, "float64", "numpy")
    assert pcfg.data_root == str(tiny["data"]) and (out / "config.json").is_file()
    from npmask.training.run_folder import RunFolder
    RunFolder(out).lock()   # released by resolve_backbone: a later train may take it
    RunFolder(out).unlock()


def test_the_backbones_own_domain_is_no_target_of_a_folder_run(tiny, tmp_path):
    """--benchmark folder has no pretraining domain of its own: the backbone's (its JSON's domain,
    here base, which the data folder holds too) is left out of the default targets, and naming it
    in --domains is refused before the run folder exists (training would refuse it only after)."""
    cfg = cli.train_config_from_args({"benchmark": "folder", "data_root": str(tiny["data"]),
                                      "model": "wrn10_1", "input_size": 16,
                                      "backbone": str(tiny["backbone"])})
    assert cfg.domains == ["a", "b"]
    out = tmp_path / "x"
    expect_exit(base_args(tiny, out, "--domains", "a,base"),
                "'base' is the pretraining domain of backbone", "leave it out of --domains")
    assert not out.exists()
    only = tmp_path / "only-base"
    only.mkdir()
    (only / "base").symlink_to(tiny["data"] / "base")
    expect_exit(["--benchmark", "folder", "--data-root", str(only), "--model", "wrn10_1",
                 "--input-size", "16", "--backbone", str(tiny["backbone"]), "--out", str(out)],
                "holds no target domain besides 'base'")
    assert not out.exists()


# ---------------------------------------------------------------------------------- domain training
def test_each_domain_gets_its_own_seed_from_the_run_seed_and_its_name():
    """A domain's seed depends on its name, not only on the run seed: two domains of one run must
    not share mask inits, batch orders and augmentation. The values are pinned: changing the
    derivation changes every recorded run's numbers."""
    from npmask.training.domain_training import domain_seed
    assert (domain_seed(0, "a"), domain_seed(0, "b"), domain_seed(1, "a")) == \
        (2598482685, 4059100481, 121187926)


def test_decay_epochs_in_any_order_make_one_schedule():
    """--lr-decay-epochs 2,1 is 1,2 (the scheduler itself refuses unsorted milestones)."""
    from npmask.training.config import TrainConfig
    from npmask.training.domain_training import build_optimizers

    class NoParameters:
        def parameter_groups(self):
            return {"body": [], "head": []}
    _, sched = build_optimizers(NoParameters(), TrainConfig(lr_decay_epochs=[2, 1]))
    assert sched.milestones == [1, 2]


def test_both_optimisers_take_the_runs_rates_momentum_and_weight_decay():
    """--weight-decay reaches Adam (body) and SGD (head) alike, --momentum the head's SGD."""
    from npmask.training.config import TrainConfig
    from npmask.training.domain_training import build_optimizers

    class NoParameters:
        def parameter_groups(self):
            return {"body": [], "head": []}
    cfg = TrainConfig(lr_body=2e-4, lr_head=3e-3, momentum=0.5, weight_decay=5e-4)
    opt, _ = build_optimizers(NoParameters(), cfg)
    body, head = opt.groups["body"], opt.groups["head"]
    assert (body.lr, body.weight_decay) == (2e-4, 5e-4)
    assert (head.lr, head.momentum, head.weight_decay) == (3e-3, 0.5, 5e-4)


def test_the_printed_results_say_whether_the_s_score_is_known(capsys):
    """Without Emax the summary says the S-score is missing; with it, where Emax came from."""
    from npmask.training.config import TrainConfig

    class Folder:
        path = "runs/x"
    res = {"acc": {"a": 50.0}, "score": None, "params": 1.1, "sp": None}
    cfg = TrainConfig(emax_source="2 x the test error of the finetune run in ft")
    train.print_results(cfg, res, Folder, 1.0)
    out = capsys.readouterr().out
    assert "S-score, S_p: missing" in out and "Emax:" not in out
    train.print_results(cfg, {**res, "score": 120.0, "sp": 109.0}, Folder, 1.0)
    out = capsys.readouterr().out
    assert "Emax: 2 x the test error of the finetune run in ft" in out and "missing" not in out


def test_emax_from_given_on_resume_is_saved_with_the_run(tiny, tmp_path):
    """--resume --emax-from scores the run and records Emax in config.json, so a later --resume
    (or reading the folder) keeps it."""
    ft = tmp_path / "ft"
    assert run_cli(base_args(tiny, ft, "--variant", "finetune", "--epochs", "1")) == 0
    out = tmp_path / "full"
    assert run_cli(base_args(tiny, out, "--epochs", "1", "--stop-after-epochs", "1")) == 0
    assert run_cli(["--resume", "--out", str(out), "--quiet", "--emax-from", str(ft)]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert set(saved["emax"]) == {"base", "a", "b"} and "finetune run" in saved["emax_source"]
    assert json.loads((out / "results.json").read_text())["score"] is not None


def _train_without_fitting(tiny, out, monkeypatch, *extra):
    """train.main on the tiny benchmark with fit() replaced by one instant epoch: everything that
    builds a domain (data, masks, settings, storage) runs for real, the training steps do not."""
    from npmask.training import domain_training
    epoch = {"epoch": 1, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0}
    monkeypatch.setattr(domain_training, "fit", lambda **kw: [dict(epoch)])
    assert run_cli(base_args(tiny, out, *extra)) == 0
    return json.loads((out / "progress.json").read_text())["done"]


def test_max_train_caps_the_training_images_of_every_domain(tiny, tmp_path, monkeypatch):
    """--max-train N reaches each domain's loader: it trains on N images, not on all 64 (kills
    the mutation that leaves max_train out of train_domain's make_iterators)."""
    done = _train_without_fitting(tiny, tmp_path / "run", monkeypatch, "--max-train", "16")
    assert {d: r["train_images"] for d, r in done.items()} == {"a": 16, "b": 16}
    assert {d: r["test_images"] for d, r in done.items()} == {"a": 32, "b": 32}


def test_tau_and_mask_init_reach_every_stored_domain(tiny, tmp_path, monkeypatch):
    """--tau and --mask-init build the domain's masks and are recorded in its stored file (kills
    the mutations that leave tau or mask_init out of train_domain's add_domain)."""
    from npmask.storage import read_domain_file
    out = tmp_path / "run"
    _train_without_fitting(tiny, out, monkeypatch, "--tau", "0.25", "--mask-init", "0.01,0.02")
    for d in ("a", "b"):
        meta, _ = read_domain_file(out / "domains" / f"{d}.npz")
        assert meta["tau"] == 0.25 and meta["mask_init"] == [0.01, 0.02], meta


@pytest.mark.parametrize("text", ["{ torn", "[]", '"base"', "null", '{"acc": 50.0}',
                                  '{"domain": "base", "acc": 50.0}'])
def test_a_base_accuracy_cache_that_is_not_a_full_record_is_not_used(tmp_path, text):
    """base_accuracy.json is only a cache: torn JSON, a non-object or an object missing any of
    domain/acc/source is measured again (here: no data, so "missing"), never returned as the
    pretraining domain's accuracy (kills the mutations that drop the isinstance/keys check)."""
    from types import SimpleNamespace

    from npmask.training.domain_training import base_accuracy
    (tmp_path / "base_accuracy.json").write_text(text, encoding="utf-8")
    cfg = SimpleNamespace(backbone=str(tmp_path / "backbone.npz"))
    model = SimpleNamespace(base_domain="base")
    base = base_accuracy(cfg, SimpleNamespace(path=str(tmp_path)), model, {}, data_root=None)
    assert base["domain"] == "base" and base["acc"] is None and base["source"].startswith("missing")
    good = {"domain": "base", "acc": 50.0, "source": "measured on the 32 test images of 'base'"}
    (tmp_path / "base_accuracy.json").write_text(json.dumps(good), encoding="utf-8")
    assert base_accuracy(cfg, SimpleNamespace(path=str(tmp_path)), model, {}, data_root=None) == good


def test_the_s_score_needs_emax_for_every_domain_including_the_base():
    """score(): with Emax for only some domains the S-score and S_p are None, not a partial sum or
    an error (kills all(...) -> any(...) in the Emax coverage check)."""
    from npmask.training.domain_training import score
    acc = {"base": 60.0, "a": 80.0}
    assert score(acc, {"a": 0.4}, [])["score"] is None
    assert score(acc, None, [])["score"] is None
    full = score(acc, {"base": 0.8, "a": 0.4}, [])
    assert full["score"] == pytest.approx(1000.0 / 0.8 ** 2 * 0.4 ** 2 + 1000.0 / 0.4 ** 2 * 0.2 ** 2)


def test_emax_from_a_100_percent_accurate_finetune_run_is_refused(tmp_path):
    """A finetune run with 100% on a domain gives Emax 0 there, where the S-score is undefined:
    --emax-from refuses it in one line naming the domain; below 100% is accepted (kills the
    mutations that drop or invert the `perfect` check in _finetune_accuracies)."""
    from npmask.training.domain_training import emax_from_run
    from npmask.training.errors import ConfigError
    res = {"variant": "finetune", "acc": {"base": 70.0, "a": 100.0, "b": 99.5}}
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"100% accurate on a, so Emax"):
        emax_from_run(tmp_path)
    res["acc"]["a"] = 99.0
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    emax, _ = emax_from_run(tmp_path)
    assert emax == pytest.approx({"base": 0.6, "a": 0.02, "b": 0.01})


def test_resume_without_the_runs_backend_fails_before_touching_the_folder(tiny, tmp_path,
                                                                         monkeypatch):
    """--resume of a run whose backend (here cupy, made unimportable) is missing on this machine
    is a one-line error before anything is written: --emax-from is not saved into config.json and
    metrics.jsonl stays as it was. (check_train_run's check_backend and _resume_config's
    get_backend both guard this; with neither, train_domains would fail after the rewrite.)"""
    import npmask.backend
    out = tmp_path / "run"
    assert run_cli(base_args(tiny, out, "--epochs", "1", "--stop-after-epochs", "1")) == 0
    stored = json.loads((out / "config.json").read_text())
    stored["config"]["backend"] = "cupy"  # as if trained on a GPU machine
    (out / "config.json").write_text(json.dumps(stored, indent=2))
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "results.json").write_text(json.dumps(
        {"variant": "finetune", "acc": {"base": 60.0, "a": 80.0, "b": 70.0}}))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".lock"}
    monkeypatch.setattr(npmask.backend, "_import_cupy", lambda: None)
    expect_exit(["--resume", "--out", str(out), "--quiet", "--emax-from", str(ft)],
                "CuPy is not installed")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".lock"}
    assert after == before
