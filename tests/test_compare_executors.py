"""npmask.compare's jobs: one run folder per (variant, domain, seed), the local and Ray executors.

The Ray tests need the optional extra (``pip install 'npmask[ray]'``; CI installs it) and are
skipped without it; each starts a local Ray cluster of 2 CPUs in a driver subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npmask import compare, train
from npmask.training.domain_training import emax_from_run
from npmask.backend import BackendError
from npmask.training import validate
from npmask.training.config import TrainConfig
from test_train import write_random_backbone, write_tiny_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    return {"data": write_tiny_benchmark(root / "data"),
            "backbone": write_random_backbone(root / "backbone.npz"), "tmp": root}


def common(tiny, epochs=1):
    return ["--benchmark", "folder", "--data-root", str(tiny["data"]), "--domains", "a,b",
            "--model", "wrn10_1", "--input-size", "16", "--backbone", str(tiny["backbone"]),
            "--epochs", str(epochs), "--batch-size", "16", "--lr-body", "1e-3", "--lr-head", "1e-2",
            "--quiet"]


def grid_args(tiny, out, epochs=1, variants="finetune,full", *extra):
    return common(tiny, epochs) + ["--variants", variants, "--out", str(out), *extra]


def results(out):
    doc = json.loads((Path(out) / "results.json").read_text())
    return doc["rows"], doc["runs"]


def test_a_job_gives_the_numbers_of_a_run_training_every_domain(tiny, tmp_path):
    """The per-domain seed depends on (seed, domain) only: the job layout changes no number."""
    assert compare.main(grid_args(tiny, tmp_path / "cmp", 2, "full", "--seed", "4")) == 0
    assert train.main(common(tiny, 2) + ["--variant", "full", "--seed", "4",
                                         "--out", str(tmp_path / "run")]) == 0
    whole = json.loads((tmp_path / "run" / "results.json").read_text())
    rows, _ = results(tmp_path / "cmp")
    assert rows[0]["acc"] == whole["acc"]          # base, a, b: the same accuracies
    assert rows[0]["params"] == pytest.approx(whole["params"])


def test_a_failed_job_is_marked_and_does_not_stop_the_others(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    a = grid_args(tiny, out, 2, "finetune,full", "--max-train", "16")  # finetune below 100%
    assert compare.main(a + ["--stop-after-epochs", "5"]) == 0  # finetune a, b; 1 epoch of full/a
    bad = out / "full" / "a" / "checkpoints" / "a.npz"
    assert bad.is_file()
    bad.write_bytes(b"not a checkpoint")  # damaged storage: this job cannot continue
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare.main(a)  # the same command again continues the comparison
    message = str(e.value.code)
    assert message.startswith("python -m npmask.compare: error: 1 of 4 jobs failed")
    assert "full/a seed 0" in message and "a.npz" in message and "\n" not in message
    err = capsys.readouterr().err
    assert "continuing the comparison" in err
    assert "full/b seed 0: " in err and "[4/4 done" in err      # the other job still trained
    rows = {r["method"]: r for r in results(out)[0]}
    assert rows["full"]["failed"].keys() == {"a"} and rows["full"]["score"] is None
    assert rows["full"]["acc"]["b"] is not None and rows["finetune"]["score"] is not None
    text = (out / "results.md").read_text()
    assert "| full | " in text and "| failed |" in text and "**Failed**: `full` on `a`" in text
    bad.unlink()  # fixed: the next run trains that job again, the table is complete
    assert compare.main(a) == 0
    rows = {r["method"]: r for r in results(out)[0]}
    assert "failed" not in rows["full"] and rows["full"]["score"] is not None


def test_a_failed_finetune_job_leaves_emax_undefined(tiny, tmp_path, monkeypatch):
    """Emax comes from the finetune row only when all its jobs ended: no S-score from a partial one."""
    from npmask.training import grid
    run_job = grid.run_job

    def failing_finetune_on_a(spec, **kw):
        if (spec["variant"], spec["domain"]) == ("finetune", "a"):
            return {"status": "failed", "error": "simulated: disk full"}
        return run_job(spec, **kw)
    monkeypatch.setattr(grid, "run_job", failing_finetune_on_a)
    with pytest.raises(SystemExit) as e:
        compare.main(grid_args(tiny, tmp_path / "cmp", 1, "finetune,classifier_only"))
    assert "1 of 4 jobs failed" in str(e.value.code) and "simulated: disk full" in str(e.value.code)
    rows, _ = results(tmp_path / "cmp")
    assert [r["score"] for r in rows] == [None, None]
    assert "Emax: missing (the finetune row failed on a)" in (tmp_path / "cmp" / "results.md").read_text()


def test_a_killed_driver_is_continued_by_the_same_command(tiny, tmp_path):
    """SIGKILL mid-job, then the same command: finished jobs skipped, the partial one resumed."""
    out, a = tmp_path / "cmp", grid_args(tiny, tmp_path / "cmp", 3)
    proc = subprocess.Popen([sys.executable, "-m", "npmask.compare", *a], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "finetune" / "b" / "checkpoints" / "b.npz").is_file():
            proc.kill()  # finetune/a is done, finetune/b is between epochs
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the command ended before the kill"
    assert compare.main(a) == 0
    assert compare.main(grid_args(tiny, tmp_path / "ref", 3)) == 0   # uninterrupted
    assert results(out) == results(tmp_path / "ref")
    logged = [json.loads(line)["epoch"] for line in
              (out / "finetune" / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3], logged   # resumed after its last epoch, not trained again


def test_job_specs_put_finetune_first_and_every_job_in_its_own_folder(tmp_path):
    """The local executor runs the specs in order: finetune first within each seed. A job's folder
    is <out>/[seed<k>/]<variant>/<domain>, its config trains that one domain with that variant and
    seed, and every job, of every seed, shares the comparison folder (its base-accuracy cache)."""
    from npmask.training import grid
    base = TrainConfig(domains=["a", "b"], seed=3)
    specs = grid.job_specs(base, ["full", "finetune"], None, tmp_path, "cmd")
    assert [(s["variant"], s["domain"], s["seed"]) for s in specs] == [
        ("finetune", "a", 3), ("finetune", "b", 3), ("full", "a", 3), ("full", "b", 3)]
    assert specs[2]["folder"] == str(tmp_path / "full" / "a")
    cfg = TrainConfig.from_dict(specs[2]["config"])
    assert (cfg.variant, cfg.domains, cfg.seed) == ("full", ["a"], 3)
    specs = grid.job_specs(base, ["full"], [0, 1], tmp_path, "cmd")
    assert [s["folder"] for s in specs] == [str(tmp_path / f"seed{k}" / "full" / d)
                                            for k in (0, 1) for d in ("a", "b")]
    assert [TrainConfig.from_dict(s["config"]).seed for s in specs] == [0, 0, 1, 1]
    assert {s["part_of"] for s in specs} == {str(tmp_path)}


def test_the_local_executor_reports_each_job_with_the_grids_counts(tmp_path, monkeypatch):
    """One line per finished job: done/total, the one job now running, the ones queued behind it;
    running() is what a cluster's driver sees of a job: its folder's lock file."""
    from npmask.training import grid
    specs = grid.job_specs(TrainConfig(domains=["a", "b", "c"]), ["full"], None, tmp_path, "cmd")
    monkeypatch.setattr(grid, "run_job", lambda spec, **kw: {
        "status": "done", "acc": 50.0, "epochs": 2, "skipped": spec["domain"] == "b",
        "seconds": 3.0})
    lines = []
    assert len(grid.run_local(specs, progress=False, echo=lines.append)) == 3
    assert lines == ["[1/3 done, 1 running, 1 queued] full/a seed 0: 50.00% (2 epochs, 3 s)",
                     "[2/3 done, 1 running, 0 queued] full/b seed 0: 50.00% (already done)",
                     "[3/3 done, 0 running, 0 queued] full/c seed 0: 50.00% (2 epochs, 3 s)"]
    # --stop-after-epochs: the epochs each job's progress.json records count; a damaged one, 0
    from npmask.training.fit import StopRequested
    from npmask.training.run_folder import RunFolder
    ran = []

    def one_epoch(spec, **kw):
        ran.append(spec["domain"])
        folder = RunFolder(spec["folder"]).create()
        if spec["domain"] == "a":
            folder.progress_file.write_text('{"done": []}')
        else:
            folder.mark_done(spec["domain"], {"test_acc": 50.0, "epochs": 1})
        return {"status": "done", "acc": 50.0, "epochs": 1, "seconds": 1.0}
    monkeypatch.setattr(grid, "run_job", one_epoch)
    with pytest.raises(StopRequested):
        grid.run_local(specs, progress=False, stop_after=1, echo=lines.append)
    assert ran == ["a", "b"]
    for spec in specs[:2]:
        shutil.rmtree(spec["folder"])
    ran.clear()
    with pytest.raises(StopRequested):
        grid.run_local(specs[1:], progress=False, stop_after=2, echo=lines.append)
    assert ran == ["b", "c"]  # stopped when the budget is spent, not one job later
    assert not grid.running(specs[0])
    from npmask.training.lock import RunLock
    Path(specs[0]["folder"]).mkdir(parents=True)
    with RunLock(specs[0]["folder"]):
        assert grid.running(specs[0]) and not grid.running(specs[1])


def test_a_job_is_skipped_only_when_finished_and_refused_when_its_settings_differ(tiny, tmp_path):
    """run_job: a job whose progress.json says done but whose results.json is missing (killed
    between the two writes) is finished, not skipped; a job folder written with other settings
    is a failed job naming them, not trained on with its stored settings."""
    from npmask.training import grid
    cfg = TrainConfig(benchmark="folder", data_root=str(tiny["data"]), domains=["a"],
                      model="wrn10_1", input_size=16, backbone=str(tiny["backbone"]), epochs=1,
                      batch_size=16, max_train=16)
    spec, = grid.job_specs(cfg, ["full"], None, tmp_path, "cmd")
    res = grid.run_job(spec)
    assert res["status"] == "done" and not res["skipped"]
    results = Path(spec["folder"]) / "results.json"
    results.unlink()
    res = grid.run_job(spec)
    assert res["status"] == "done" and not res["skipped"] and results.is_file()
    assert grid.run_job(spec)["skipped"]
    other, = grid.job_specs(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 2}), ["full"], None,
                            tmp_path, "cmd")
    res = grid.run_job(other)
    assert res["status"] == "failed" and "was written with other settings (epochs)" in res["error"]


def test_the_backbones_accuracy_is_measured_once_per_comparison(tiny, tmp_path):
    out = tmp_path / "cmp"
    a = grid_args(tiny, out, 1)
    assert compare.main(a + ["--stop-after-epochs", "2"]) == 0   # finetune/a, 1 epoch of b
    shared = out / "base_accuracy.json"   # measured by that job (the backbone's JSON lacks it)
    doc = json.loads(shared.read_text())
    assert doc["domain"] == "base" and "measured on the 32 test images" in doc["source"]
    shared.write_text(json.dumps({**doc, "acc": 12.5}))   # a mark: later jobs must reuse it
    assert compare.main(a) == 0
    for job in ("full/a", "full/b"):   # (finetune/b started before the mark)
        assert json.loads((out / job / "results.json").read_text())["acc"]["base"] == 12.5


def test_executor_flags_are_checked(tiny, tmp_path):
    for extra, part in [(["--address", "auto"], "--address only applies with --executor ray"),
                        (["--cpus-per-job", "2"], "--cpus-per-job only applies with --executor ray"),
                        (["--address", "auto", "--gpus-per-job", "1"],
                         "--address, --gpus-per-job only apply with --executor ray"),
                        (["--executor", "ray", "--cpus-per-job", "0"], "--cpus-per-job must be"),
                        (["--executor", "ray", "--gpus-per-job", "-1"], "--gpus-per-job must be"),
                        (["--executor", "ray", "--stop-after-epochs", "1"],
                         "--stop-after-epochs only applies with --executor local")]:
        with pytest.raises(SystemExit) as e:
            compare.main(grid_args(tiny, tmp_path / "x", 1, "full", *extra))
        assert part in str(e.value.code), (extra, e.value.code)
        assert not (tmp_path / "x").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    monkeypatch.delitem(sys.modules, "npmask.training.ray_executor", raising=False)
    with pytest.raises(SystemExit) as e:
        compare.main(grid_args(tiny, tmp_path / "x", 1, "full", "--executor", "ray"))
    assert str(e.value.code) == ("python -m npmask.compare: error: --executor ray needs Ray, which "
                                 "is not installed: pip install 'npmask[ray]' (or pip install "
                                 "'ray>=2.9')")
    assert not (tmp_path / "x").exists()  # said before the comparison folder is created


def test_on_ray_the_driver_leaves_the_device_check_to_the_jobs(tiny, tmp_path, monkeypatch):
    """A head node without a GPU can drive GPU jobs: --backend cupy is checked by name only there."""
    with validate.device_checked_by_workers():
        validate.check_train_config(TrainConfig(backend="cupy"))
        with pytest.raises(BackendError, match="unknown backend 'magic'"):
            validate.check_backend("magic")
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "npmask.training.ray_executor", raising=False)
    with pytest.raises(SystemExit) as e:
        compare.main(grid_args(tiny, tmp_path / "x", 1, "full", "--backend", "cupy",
                               "--executor", "ray"))
    assert "--executor ray needs Ray" in str(e.value.code)   # past every check, device included


def test_nothing_but_the_ray_executor_imports_ray():
    code = ("import pkgutil, sys, npmask\n"
            "for m in pkgutil.walk_packages(npmask.__path__, 'npmask.'):\n"
            "    if m.name != 'npmask.training.ray_executor':\n"
            "        __import__(m.name)\n"
            "print(len(sys.modules), 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "False"


# ---------------------------------------------------------------------------------------- Ray
DRIVER = ("import sys, ray\n"
          "ray.init(num_cpus=2, include_dashboard=False)  # a local cluster of 2 CPUs\n"
          "from npmask import compare\n"
          "sys.exit(compare.main(sys.argv[1:]))\n")


def ray_driver(args, **kw):
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPMASK_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args, "--executor", "ray"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_ray_grid_gives_the_local_executors_table(tiny, tmp_path):
    pytest.importorskip("ray")
    proc = ray_driver(grid_args(tiny, tmp_path / "ray"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert compare.main(grid_args(tiny, tmp_path / "local")) == 0
    assert results(tmp_path / "ray") == results(tmp_path / "local")
    lines = [line for line in err.splitlines() if " seed 0: " in line]
    assert len(lines) == 4 and lines[-1].startswith("[4/4 done, 0 running, 0 queued]"), err[-3000:]
    assert "| finetune |" in out


@pytest.mark.slow
def test_ray_worker_killed_mid_job_is_retried_from_its_checkpoint(tiny, tmp_path):
    pytest.importorskip("ray")
    epochs = 4
    proc = ray_driver(grid_args(tiny, tmp_path / "ray", epochs))
    killed, deadline = None, time.time() + 300
    while killed is None and proc.poll() is None and time.time() < deadline:
        for job in sorted((tmp_path / "ray").glob("*/*")):  # <out>/<variant>/<domain>
            ckpt, lock = job / "checkpoints" / f"{job.name}.npz", job / ".lock"
            try:
                pid = int(lock.read_text().split()[0]) if ckpt.is_file() else None
            except (OSError, ValueError, IndexError):
                pid = None
            if pid:  # the Ray worker training this job, after at least one epoch
                os.kill(pid, signal.SIGKILL)
                killed = job
                break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    assert killed is not None, "no job was caught mid-training: " + err[-2000:]
    assert proc.returncode == 0, err[-3000:]
    assert compare.main(grid_args(tiny, tmp_path / "local", epochs)) == 0
    assert results(tmp_path / "ray") == results(tmp_path / "local")
    # the retry resumed from the checkpoint: every epoch is logged once, not run again from 1
    epochs_logged = [json.loads(line)["epoch"] for line in
                     (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1)), epochs_logged


def test_a_comparisons_finetune_folder_gives_emax_to_a_train_run(tiny, tmp_path):
    """--emax-from accepts the finetune folder of a comparison, whose jobs are one folder per domain."""
    out = tmp_path / "cmp"
    assert compare.main(grid_args(tiny, out, 1, "finetune", "--max-train", "16")) == 0
    rows, _ = results(out)
    acc = rows[0]["acc"]
    emax, source = emax_from_run(out / "finetune")
    assert set(emax) >= {"a", "b"} and "finetune runs in" in source
    for d in ("a", "b"):
        assert emax[d] == pytest.approx(2 * (1 - acc[d] / 100))
    run = tmp_path / "run"
    assert train.main(common(tiny) + ["--variant", "full", "--max-train", "16", "--out", str(run),
                                      "--emax-from", str(out / "finetune")]) == 0
    assert json.loads((run / "results.json").read_text())["score"] is not None
