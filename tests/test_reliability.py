"""Bad input, bad state and bad environment: one clear line, nothing lost, no junk left.

One test per guarantee (the numbered items of the reliability issue), on the tiny benchmark of
test_train.py (two 16x16 domains, a random WRN-10-1 backbone), runs of 1-2 epochs on 32 images.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from npmask import compare, pretrain, train
from npmask import io as npmask_io
from npmask.data.format import write_domain
from npmask.training import checkpoint as ck

from test_train import write_random_backbone, write_tiny_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    data = write_tiny_benchmark(root / "data")
    backbone = write_random_backbone(root / "backbone.npz")
    return {"data": data, "backbone": backbone, "tmp": root}


def args(tiny, out, *extra, domains="a,b", epochs=2):
    return ["--benchmark", "folder", "--data-root", str(tiny["data"]), "--domains", domains,
            "--model", "wrn10_1", "--input-size", "16", "--backbone", str(tiny["backbone"]),
            "--epochs", str(epochs), "--batch-size", "16", "--max-train", "32",
            "--lr-decay-epochs", "1", "--out", str(out), "--quiet", *extra]


def pargs(tiny, out, *extra):
    return ["--data-root", str(tiny["data"]), "--domain", "base", "--model", "wrn10_1",
            "--input-size", "16", "--epochs", "1", "--batch-size", "16", "--max-train", "32",
            "--eval-subset", "16", "--out", str(out), "--quiet", *extra]


def refused(main, argv, *parts, capsys=None):
    """main(argv) must stop with one line containing every part (and no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("python -m npmask."), msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def test_1_a_foreign_out_is_refused_before_any_data_is_generated(tmp_path, monkeypatch):
    from npmask.training import suites

    def no_generation(*args, **kwargs):
        raise AssertionError("the synthetic benchmark was generated before --out was checked")
    monkeypatch.setattr(suites, "ensure_synthetic", no_generation)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    for main, extra in ((train.main, []), (compare.main, ["--variants", "full"]),
                        (pretrain.main, [])):
        refused(main, ["--out", str(mine), "--quiet", *extra], "is not an npmask run folder")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted 2-epoch run of domains a and b."""
    out = tiny["tmp"] / "reference"
    assert train.main(args(tiny, out)) == 0
    return out


def same_result(run: Path, ref: Path) -> None:
    """Identical stored domains and per-epoch numbers (wall-clock fields aside)."""
    for d in ("a", "b"):
        assert (run / "domains" / f"{d}.npz").read_bytes() == (ref / "domains" / f"{d}.npz").read_bytes()

    def lines(r):
        return [{k: v for k, v in json.loads(x).items() if "seconds" not in k and k != "time"}
                for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert lines(run) == lines(ref)


def python_with(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


# ------------------------------------------------------------- 1. the user's files are never touched
def test_1_out_naming_a_foreign_folder_is_refused_and_stored_domains_are_checked(tiny, reference,
                                                                                   tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my own notes\n")
    refused(train.main, args(tiny, mine), "is not an npmask run folder", "results.md")
    assert sorted(p.name for p in mine.iterdir()) == ["results.md"]
    assert (mine / "results.md").read_text() == "my own notes\n"
    # another run's progress.json and domains/ without its config.json: not adopted as this run's
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    (other / "config.json").unlink()
    refused(train.main, args(tiny, other, "--variant", "piggyback"), "not an npmask run folder")
    # a pretrain folder is not a train folder
    pre = tmp_path / "pre"
    assert pretrain.main(pargs(tiny, pre)) == 0
    refused(train.main, args(tiny, pre), "is a pretrain run folder")
    refused(train.main, ["--resume", "--out", str(pre)], "is a pretrain run folder",
            "npmask.pretrain --resume")
    # on resume, a stored domain file of another variant is not counted as done
    swapped = tmp_path / "swapped"
    shutil.copytree(reference, swapped)
    doc = json.loads((swapped / "config.json").read_text())
    doc["config"]["variant"] = "piggyback"
    (swapped / "config.json").write_text(json.dumps(doc))
    before = (swapped / "domains" / "a.npz").read_bytes()
    refused(train.main, ["--resume", "--out", str(swapped), "--quiet"],
            "domains/a.npz holds variant 'full' (config.json says 'piggyback')")
    assert (swapped / "domains" / "a.npz").read_bytes() == before


def test_1_out_naming_an_existing_run_of_the_command_says_resume(tiny, reference, tmp_path):
    """A new run's --out that is already a run of the same command is refused with the way on
    (--resume), not as a run folder of another kind; an existing empty folder is taken."""
    from npmask.training.validate import check_new_out
    before = (reference / "metrics.jsonl").read_bytes()
    refused(train.main, args(tiny, reference), f"run folder {reference} already exists; pass "
                                               "--resume to continue it")
    assert (reference / "metrics.jsonl").read_bytes() == before
    (tmp_path / "empty").mkdir()
    check_new_out(tmp_path / "empty", "train", "python -m npmask.train")


def test_1_a_stored_domain_of_another_domain_or_backbone_is_not_this_runs(reference):
    """validate.check_stored_domain names each mismatch: domain, variant, backbone fingerprint."""
    from npmask.storage import read_domain_file
    from npmask.training.errors import ConfigError
    from npmask.training.validate import check_stored_domain
    path = reference / "domains" / "a.npz"
    fingerprint = read_domain_file(path)[0]["backbone_fingerprint"]
    check_stored_domain(path, domain="a", variant="full", fingerprint=fingerprint)
    for kw, part in ((dict(domain="b"), "holds domain 'a' (the run expects 'b')"),
                     (dict(variant="piggyback"), "holds variant 'full' (config.json says"),
                     (dict(fingerprint="0" * len(fingerprint)), "holds another backbone")):
        want = {**dict(domain="a", variant="full", fingerprint=fingerprint), **kw}
        with pytest.raises(ConfigError, match=re.escape(part)):
            check_stored_domain(path, **want)


# ------------------------------------------------------------- 2. validate before creating anything
def write_gray(root: Path) -> Path:
    rng = np.random.default_rng(0)
    write_domain(root / "g", name="g", class_names=["x", "y"], mirror=True, source="t",
                 licence="none",
                 train=(rng.integers(0, 255, (32, 16, 16, 1), dtype=np.uint8), rng.integers(0, 2, 32)),
                 test=(rng.integers(0, 255, (16, 16, 16, 1), dtype=np.uint8), rng.integers(0, 2, 16)))
    return root


def test_2_a_refused_command_leaves_no_folder_and_resume_finds_the_real_run(tiny, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the real run, interrupted
    assert train.main(args(tiny, "runs/train-real", epochs=2) + ["--stop-after-epochs", "1"]) == 0
    bb = tmp_path / "nc.npz"
    shutil.copy(tiny["backbone"], bb)
    info = json.loads(tiny["backbone"].with_suffix(".json").read_text())
    del info["num_classes"]
    bb.with_suffix(".json").write_text(json.dumps(info))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["data"], corrupt)
    raw = bytearray((corrupt / "a" / "train.npz").read_bytes())
    raw[300] ^= 0xFF
    (corrupt / "a" / "train.npz").write_bytes(bytes(raw))
    gray = write_gray(tmp_path / "gray")

    def without_out(argv):
        i = argv.index("--out")
        return argv[:i] + argv[i + 2:]
    cases = [
        (without_out(args(tiny, "x", "--seed", "-1")), "--seed must be >= 0"),
        (without_out(args(tiny, "x", "--tau", "nan")), "--tau must be a finite number"),
        (without_out(args(tiny, "x", "--mask-init", "1e-4,1e-4")), "0 < LO < HI"),
        (without_out(args(tiny, "x", "--backbone", str(bb))), "lacks field 'num_classes'"),
        (without_out(args(tiny, "x", "--data-root", str(corrupt))), "a/train.npz: corrupt"),
        (without_out(args(tiny, "x", "--data-root", str(gray), "--domains", "g")),
         "has 1 channel(s)"),
    ]
    for argv, part in cases:
        refused(train.main, argv, part)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train-real"]
    assert train.main(["--resume", "--quiet"]) == 0  # picks the interrupted run, not junk
    assert json.loads((tmp_path / "runs/train-real/progress.json").read_text())["done"].keys() \
        == {"a", "b"}


def test_2_resume_without_out_takes_the_newest_run_of_the_command(tmp_path):
    """What a plain --resume continues: the most recently modified folder under runs/ that holds a
    config.json and whose name has the command's prefix (train-, pretrain-, compare-)."""
    from npmask.training.run_folder import newest_run
    runs = tmp_path / "runs"
    for i, name in enumerate(["train-old", "train-new", "pretrain-newer", "train-junk"]):
        (runs / name).mkdir(parents=True)
        if name != "train-junk":  # a folder a refused command might have left: no config.json
            (runs / name / "config.json").write_text("{}")
        os.utime(runs / name, (1000 + i, 1000 + i))
    assert newest_run(runs, "train-") == str(runs / "train-new")
    assert newest_run(runs) == str(runs / "pretrain-newer")
    assert newest_run(runs, "compare-") is None and newest_run(tmp_path / "none", "train-") is None


# ------------------------------------------------------------- 3. complete, shared validation
@pytest.mark.parametrize("extra, part", [
    (["--lr-decay", "-1"], "--lr-decay must be a finite number"),
    (["--lr-decay", "nan"], "--lr-decay must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--max-train", "-5"], "--max-train must be >= 1"),
    (["--stop-after-epochs", "0"], "--stop-after-epochs must be >= 1"),
    (["--domains", ","], "--domains names no domain"),
    (["--mask-init", "1e-12,2e-12", "--tau", "1"], "leaves no margin in float32"),
    (["--mask-init", "1e-4,inf"], "0 < LO < HI"),
])
def test_3_every_setting_is_checked_by_train_and_compare(tiny, tmp_path, extra, part):
    refused(train.main, args(tiny, tmp_path / "t", *extra), part)
    refused(compare.main, args(tiny, tmp_path / "c", *extra) + ["--variants", "full"], part)
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


def test_3_pretrain_environment_and_stored_config_are_checked(tiny, reference, tmp_path,
                                                               monkeypatch):
    for extra, part in [(["--max-train", "-1"], "--max-train must be >= 1"),
                        (["--eval-subset", "-1"], "--eval-subset must be >= 1"),
                        (["--momentum", "nan"], "--momentum must be a finite number"),
                        (["--lr-decay", "-2"], "--lr-decay must be a finite number")]:
        refused(pretrain.main, pargs(tiny, tmp_path / "p", *extra), part)
    assert not (tmp_path / "p").exists()
    # --save never overwrites a file that is not a backbone
    notes = tmp_path / "notes.npz"
    notes.write_bytes(b"mine")
    refused(pretrain.main, pargs(tiny, tmp_path / "p", "--save", str(notes)),
            "is not an npmask backbone")
    refused(pretrain.main, pargs(tiny, tmp_path / "p", "--save", str(tmp_path / "README.md")),
            "ending in .npz")
    assert notes.read_bytes() == b"mine" and not (tmp_path / "p").exists()
    monkeypatch.setenv("NPMASK_THREADS", "many")
    refused(train.main, args(tiny, tmp_path / "t"), "NPMASK_THREADS must be a positive integer")
    monkeypatch.delenv("NPMASK_THREADS")
    monkeypatch.setenv("NPMASK_DATA", str(tiny["backbone"]))
    refused(train.main, args(tiny, tmp_path / "t"), "NPMASK_DATA", "is not a folder")
    monkeypatch.delenv("NPMASK_DATA")
    # a hand-edited config.json is held to the same rules on --resume
    for key, value, part in [("epochs", "3", "setting 'epochs' must be int"),
                             ("momentum", 2.0, "--momentum must lie in [0, 1)"),
                             ("seed", -1, "--seed must be >= 0")]:
        run = tmp_path / f"edited-{key}"
        shutil.copytree(reference, run)
        doc = json.loads((run / "config.json").read_text())
        doc["config"][key] = value
        (run / "config.json").write_text(json.dumps(doc))
        (run / "progress.json").unlink()
        refused(train.main, ["--resume", "--out", str(run), "--quiet"], "config.json", part)
    # the non-finite-loss advice is one the program then follows
    from npmask.training.loop import train_epoch
    import inspect
    src = inspect.getsource(train_epoch)
    assert "Start a new run" in src and "--resume keeps the saved rates" in src


def test_3_the_checks_of_settings_environment_and_data_at_their_boundaries(tiny, tmp_path,
                                                                           monkeypatch):
    """npmask.training.validate at the edges the command-line tests do not reach: a bool is not an
    int, --input-size 0, an empty or a not-yet-existing NPMASK_DATA, a domain with exactly one
    batch of training images (accepted), --max-train above the domain's size (the domain's size
    counts), a label equal to the number of classes."""
    import dataclasses
    from npmask.data.format import DataFormatError
    from npmask.training import validate
    from npmask.training.config import TrainConfig
    from npmask.training.errors import ConfigError
    cfg = TrainConfig(model="wrn10_1", input_size=16)
    validate.check_train_config(cfg)
    with pytest.raises(ConfigError, match="setting 'epochs' must be int, got True"):
        validate.check_train_config(dataclasses.replace(cfg, epochs=True))
    with pytest.raises(ConfigError, match="--input-size must be >= 1, got 0"):
        validate.check_train_config(dataclasses.replace(cfg, input_size=0))
    monkeypatch.setenv("NPMASK_DATA", "")
    with pytest.raises(ConfigError, match="NPMASK_DATA is set but empty"):
        validate.check_environment()
    monkeypatch.setenv("NPMASK_DATA", str(tmp_path / "made-when-data-is-generated"))
    validate.check_environment()
    # domain a of the tiny benchmark has 64 training images
    data = dict(input_size=16, augmentation="auto")
    validate.check_data(tiny["data"], ["a"], batch_size=64, max_train=None, **data)
    validate.check_data(tiny["data"], ["a"], batch_size=32, max_train=32, **data)
    with pytest.raises(ConfigError, match="domain 'a' has 64 training images, fewer than one batch"):
        validate.check_data(tiny["data"], ["a"], batch_size=65, max_train=None, **data)
    with pytest.raises(ConfigError, match=r"has 64 training images \(--max-train\), fewer than one "
                                          "batch of 65"):
        validate.check_data(tiny["data"], ["a"], batch_size=65, max_train=100, **data)
    # a label equal to the number of classes is out of range (domain a has classes 0, 1, 2)
    shutil.copytree(tiny["data"] / "a", tmp_path / "bad" / "a")
    with np.load(tmp_path / "bad" / "a" / "train.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"][0] = 3
    np.savez(tmp_path / "bad" / "a" / "train.npz", **arrays)
    with pytest.raises(DataFormatError, match=r"train.npz: labels out of range \[0, 2\]: found "
                                              r"\[0, 3\]"):
        validate.check_data(tmp_path / "bad", ["a"], batch_size=16, max_train=None, **data)


def test_3_a_refused_block_removes_only_the_folder_it_made(tmp_path):
    """validate.new_folder: when the block writing a new run's first files fails, a folder it
    created is removed again, but an empty folder the user made beforehand stays; both unlocked."""
    from npmask.training.run_folder import RunFolder
    from npmask.training.validate import new_folder
    mine = tmp_path / "mine"
    mine.mkdir()
    for out in (mine, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            with new_folder(RunFolder(out)):
                raise OSError("disk full (simulated)")
        assert not (out / ".lock").exists()
    assert mine.is_dir() and not (tmp_path / "new").exists()


# ------------------------------------------------------------- 4. 1-channel data
def test_4_a_grayscale_domain_is_refused_up_front_naming_the_flag(tiny, tmp_path):
    gray = write_gray(tmp_path / "gray")
    msg = refused(train.main, args(tiny, tmp_path / "g", "--data-root", str(gray), "--domains",
                                   "g"), "has 1 channel(s)", "--channels 3")
    assert "data_scripts/mnist.py" in msg and not (tmp_path / "g").exists()
    refused(pretrain.main, pargs(tiny, tmp_path / "p", "--data-root", str(gray), "--domain", "g"),
            "--channels 3")


# ------------------------------------------------------------- 5. one run folder, one process
def test_5_a_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tiny, reference,
                                                                              tmp_path):
    from npmask.training.lock import RunLock
    run = tmp_path / "run"
    assert train.main(args(tiny, run, "--stop-after-epochs", "1")) == 0
    with RunLock(run):  # this process holds the folder, as a live training would
        metrics = (run / "metrics.jsonl").read_bytes()
        p = python_with(f"""
            from npmask import train
            train.main(["--resume", "--out", {str(run)!r}, "--quiet"])""")
        assert p.returncode == 1 and "Traceback" not in p.stderr
        assert f"is in use by process {os.getpid()}" in p.stderr
        assert (run / "metrics.jsonl").read_bytes() == metrics
    assert not (run / ".lock").exists()
    # a process SIGKILLed while it holds the lock: its lock file stays, stale; the next run takes
    # it over and ends with exactly the uninterrupted run's numbers
    p = python_with(f"""
        import os, signal
        from npmask import train
        from npmask.training.run_folder import RunFolder
        real = RunFolder.log
        def log(self, record):
            real(self, record)
            os.kill(os.getpid(), signal.SIGKILL)
        RunFolder.log = log
        train.main(["--resume", "--out", {str(run)!r}, "--quiet"])""")
    assert p.returncode == -signal.SIGKILL and (run / ".lock").exists()
    assert train.main(["--resume", "--out", str(run), "--quiet"]) == 0
    assert not (run / ".lock").exists()
    same_result(run, reference)


def test_5_the_lock_file_names_its_holder_and_a_second_taker_in_this_process_is_refused(tmp_path):
    """The lock file holds exactly "<pid> <host>" (a longer stale content is not left behind), the
    refusal names both, and acquire() on the lock already held is a no-op, not a refusal."""
    import socket
    from npmask.training.lock import RunLock, RunLockError
    (tmp_path / ".lock").write_text("4194303 the-long-name-of-a-machine-that-is-gone\n")  # stale
    lock = RunLock(tmp_path).acquire()
    try:
        me = f"{os.getpid()} {socket.gethostname()}"
        assert (tmp_path / ".lock").read_text() == me + "\n"
        assert lock.acquire() is lock and lock.held  # the holder taking it again keeps it
        with pytest.raises(RunLockError, match=f"in use by process {os.getpid()} on "
                                               f"{socket.gethostname()} "):
            RunLock(tmp_path).acquire()  # another open file: flock refuses it, as in a 2nd process
    finally:
        lock.release()
    assert not (tmp_path / ".lock").exists() and not lock.held


def test_5_release_drops_the_flock_not_only_the_file(tmp_path):
    """A process that opened .lock just before the holder removed it must get the flock once the
    holder released: release() closes the file that holds the flock."""
    fcntl = pytest.importorskip("fcntl")
    from npmask.training.lock import RunLock
    lock = RunLock(tmp_path).acquire()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)  # the waiting process's open, before the release
    try:
        lock.release()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the flock is held
    finally:
        os.close(fd)


def test_5_a_lock_file_removed_between_open_and_flock_is_opened_again(tmp_path, monkeypatch):
    """The holder removes .lock between our open and our flock: the flock we then get is on a file
    no longer at the path, which a third process would create and lock too. acquire() sees the
    inode change and locks the file now at the path."""
    fcntl = pytest.importorskip("fcntl")
    import types
    from npmask.training import lock as lock_module
    calls = []

    def flock(fd, op):
        fcntl.flock(fd, op)
        calls.append(op)
        if len(calls) == 1:
            os.unlink(tmp_path / ".lock")  # the previous holder's release, just then
    monkeypatch.setattr(lock_module, "fcntl", types.SimpleNamespace(
        flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    with lock_module.RunLock(tmp_path):
        assert len(calls) == 2
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------- 6. environment failures
def test_6_environment_failures_are_one_line_naming_the_path(tiny, reference, tmp_path,
                                                            monkeypatch):
    run = tmp_path / "full-disk"
    real = ck.atomic_write_bytes
    calls = {"n": 0}

    def disk_full(path, write):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint of domain a (the checkpoints' own writes)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, write)
    monkeypatch.setattr(ck, "atomic_write_bytes", disk_full)
    msg = refused(train.main, args(tiny, run), "No space left on device", "checkpoints/a.npz",
                  "--resume --out")
    monkeypatch.setattr(ck, "atomic_write_bytes", real)
    assert "Traceback" not in msg
    assert train.main(["--resume", "--out", str(run), "--quiet"]) == 0
    same_result(run, reference)
    # permission denied / read-only output folder (simulated: root ignores file modes)
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if "denied" in str(self):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", denied)
    refused(train.main, args(tiny, tmp_path / "denied" / "run"), "Permission denied",
            str(tmp_path / "denied"))
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    # --out below a file, and on a drive that is not there (/proc takes no folders)
    (tmp_path / "afile").write_text("x")
    refused(train.main, args(tiny, tmp_path / "afile" / "run"), "is a file, not a folder")
    refused(train.main, args(tiny, "/proc/npmask-no-drive/run"), "/proc/npmask-no-drive")
    # files and folders npmask writes follow the umask (mkdtemp/mkstemp made them private)
    old = os.umask(0o022)
    try:
        write_gray(tmp_path / "shared")
        assert (tmp_path / "shared" / "g").stat().st_mode & 0o777 == 0o755
        from npmask.multidomain import MultiDomainModel
        from npmask.pretrained import load_backbone
        from npmask.storage import save_domain
        m = MultiDomainModel(load_backbone(tiny["backbone"])[0])
        m.add_domain("a", 3, "full")
        save_domain(m, "a", tmp_path / "a.npz")
        assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root bypasses file modes; the same path is tested above by raising "
                           "PermissionError from mkdir")
def test_6_a_real_read_only_folder(tiny, tmp_path):  # pragma: no cover - root in CI
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(train.main, args(tiny, ro / "run"), "not writable")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------- 7. every file read defensively
def test_7_malformed_files_are_one_line_naming_file_and_field(tiny, reference, tmp_path):
    from npmask.multidomain import MultiDomainModel
    from npmask.pretrained import load_backbone
    from npmask.storage import DomainFileError, load_domain, read_domain_file
    from npmask.training.run_folder import RunFolder

    def copy(name):
        run = tmp_path / name
        shutil.copytree(reference, run)
        return run
    run = copy("progress")
    (run / "progress.json").write_text('{"done": [1, 2]}')
    refused(train.main, ["--resume", "--out", str(run)], "progress.json", "field 'done'")
    # a torn last metrics line must not swallow the next record
    folder = RunFolder(tmp_path / "torn")
    folder.path.mkdir()
    folder.log({"epoch": 1})
    with open(folder.metrics, "a") as f:
        f.write('{"epoch": 2, "tr')
    folder.log({"epoch": 2})
    assert [r["epoch"] for r in folder.read_metrics()] == [1, 2]
    # checkpoint skeleton referring to a missing array
    path = tmp_path / "c.npz"
    ck.save_checkpoint(str(path), {"epoch": 1, "w": np.arange(3.0)})
    with np.load(path) as z:
        members = {k: z[k] for k in z.files if k != "a0"}
    np.savez(path, **members)
    with pytest.raises(ck.CheckpointError, match="array 'a0'"):
        ck.load_checkpoint(str(path))
    # a checkpoint whose epoch exceeds the run's
    run = tmp_path / "ahead"
    assert train.main(args(tiny, run, "--stop-after-epochs", "1")) == 0
    state = ck.load_checkpoint(str(run / "checkpoints" / "a.npz"))  # after epoch 1 of a
    state["epoch"] = 7
    ck.save_checkpoint(str(run / "checkpoints" / "a.npz"), state)
    refused(train.main, ["--resume", "--out", str(run), "--quiet"], "holds epoch 7",
            "the run has 2 epochs")
    # --emax-from results.json with a wrong type
    em = tmp_path / "em"
    em.mkdir()
    (em / "results.json").write_text('{"variant": "finetune", "acc": [90, 80]}')
    refused(train.main, args(tiny, tmp_path / "x", "--emax-from", str(em)), "results.json",
            "field 'acc'")
    # backbone JSON with a wrong type
    bb = tmp_path / "bb.npz"
    shutil.copy(tiny["backbone"], bb)
    info = json.loads(tiny["backbone"].with_suffix(".json").read_text())
    info["input_size"] = "16"
    bb.with_suffix(".json").write_text(json.dumps(info))
    refused(train.main, args(tiny, tmp_path / "x", "--backbone", str(bb)), "bb.json",
            "field 'input_size'")
    # domain files: wrong meta types, NaN k's, negative BN variance
    model = MultiDomainModel(load_backbone(tiny["backbone"])[0])

    def doctored(name, edit_meta=None, edit_arrays=None):
        meta, arrays = read_domain_file(reference / "domains" / "a.npz")
        if edit_meta:
            edit_meta(meta)
        if edit_arrays:
            edit_arrays(arrays)
        arrays["__meta__"] = np.array(json.dumps(meta))
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arrays)
        return p
    bad_meta = doctored("meta", edit_meta=lambda m: m.update(num_classes="three"))
    with pytest.raises(DomainFileError, match="field 'num_classes'"):
        load_domain(model, bad_meta)
    huge = doctored("huge", edit_meta=lambda m: m.update(num_classes=10 ** 30))
    with pytest.raises(DomainFileError, match="'num_classes' is 1000000000000000000000000000000 "
                                              "but the stored classifier has shape"):
        load_domain(model, huge)  # not an OverflowError or a MemoryError building the head

    def nan_k(arrays):
        key = next(k for k in arrays if k.startswith("param/") and k.endswith(".k1"))
        arrays[key] = np.full_like(arrays[key], np.nan)
    with pytest.raises(DomainFileError, match="NaN"):
        load_domain(model, doctored("nank", edit_arrays=nan_k))

    def neg_var(arrays):
        key = next(k for k in arrays if k.endswith("running_var"))
        arrays[key] = -np.abs(arrays[key]) - 1
    with pytest.raises(DomainFileError, match="negative variances"):
        load_domain(model, doctored("negvar", edit_arrays=neg_var))
    assert model.domains == [model.base_domain]  # a refused file adds nothing


def test_7_progress_json_and_metrics_lines_are_checked_field_by_field(tmp_path):
    """progress.json: test_acc a number in [0, 100] (both ends allowed), epochs an integer >= 0,
    text that is not JSON a ConfigError naming the file; metrics.jsonl: a line that is JSON but not
    an object is skipped like a torn one, not handed to code that calls .get on it."""
    from npmask.training.errors import ConfigError
    from npmask.training.run_folder import RunFolder, check_progress
    for acc, epochs in ((0, 0), (100, 3), (57.5, 1)):
        check_progress({"done": {"a": {"test_acc": acc, "epochs": epochs}}}, "progress.json")
    for acc, epochs, field in ((100.5, 1, "done.a.test_acc"), (-0.5, 1, "done.a.test_acc"),
                               (True, 1, "done.a.test_acc"), (50, -1, "done.a.epochs"),
                               (50, 2.0, "done.a.epochs"), (50, False, "done.a.epochs")):
        with pytest.raises(ConfigError, match=f"progress.json: field '{field}' must be"):
            check_progress({"done": {"a": {"test_acc": acc, "epochs": epochs}}}, "progress.json")
    folder = RunFolder(tmp_path)
    folder.progress_file.write_text('{"done": {"a": ')
    with pytest.raises(ConfigError, match="progress.json is not valid JSON"):
        folder.progress()
    folder.metrics.write_text('{"epoch": 1}\n[2]\n3\n"four"\n{"epoch": 5}\n')
    assert folder.read_metrics() == [{"epoch": 1}, {"epoch": 5}]


def test_7_open_npz_takes_an_empty_npz_and_refuses_other_files(tmp_path):
    """An .npz without arrays is a zip with no entry (it starts with the end-of-directory record,
    not a file header): still an .npz. A file that is not a zip is a clear ValueError."""
    np.savez(tmp_path / "empty.npz")
    with npmask_io.open_npz(tmp_path / "empty.npz") as z:
        assert z.files == []
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a valid .npz file: it is not a zip archive"):
        npmask_io.open_npz(tmp_path / "text.npz")


# ------------------------------------------------------------- 8. clean interruption
def test_8_ctrl_c_is_one_line_and_interrupted_writes_leave_nothing(tiny, reference, tmp_path,
                                                                   monkeypatch, capsys):
    from npmask.training.run_folder import RunFolder
    run = tmp_path / "run"
    real = RunFolder.log

    def ctrl_c(self, record):
        raise KeyboardInterrupt
    monkeypatch.setattr(RunFolder, "log", ctrl_c)
    with pytest.raises(SystemExit) as e:
        train.main(args(tiny, run))
    monkeypatch.setattr(RunFolder, "log", real)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert f"interrupted; continue with: python -m npmask.train --resume --out {run}" in err
    # temp files of interrupted writes are removed on the next start; renames fsync the folder
    (run / ".config.json.x1y2.tmp").write_text("half")
    (run / "domains" / ".tmp-abc.npz").write_text("half")
    synced = []
    real_sync = npmask_io.fsync_dir
    monkeypatch.setattr(npmask_io, "fsync_dir", lambda folder: (synced.append(str(folder)),
                                                         real_sync(folder)))
    assert train.main(["--resume", "--out", str(run), "--quiet"]) == 0
    assert not (run / ".config.json.x1y2.tmp").exists()
    assert not (run / "domains" / ".tmp-abc.npz").exists()
    assert str(run / "checkpoints") in synced and str(run) in synced
    same_result(run, reference)


@pytest.mark.parametrize("when", ["before", "after"])
def test_8_a_kill_during_the_domain_file_rename(tiny, reference, tmp_path, when):
    run = tmp_path / when
    p = python_with(f"""
        import os, signal
        real = os.replace
        def replace(src, dst, *a, **k):
            if str(dst).endswith(os.path.join("domains", "a.npz")):
                if {when!r} == "after":
                    real(src, dst, *a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)
        os.replace = replace
        from npmask import train
        train.main({args(tiny, run)!r})""")
    assert p.returncode == -signal.SIGKILL, p.stderr
    temps = list((run / "domains").glob(".tmp-*"))
    assert bool(temps) == (when == "before")
    assert train.main(["--resume", "--out", str(run), "--quiet"]) == 0
    assert not list((run / "domains").glob(".tmp-*")) and not (run / ".lock").exists()
    same_result(run, reference)


def test_8_an_atomic_write_reaches_the_disk_before_its_rename_with_the_umasks_rights(tmp_path,
                                                                                      monkeypatch):
    """npmask.io.atomic_write_bytes fsyncs the temporary file before renaming it over the target
    (else a power cut can leave the new name on an empty file), and the file gets the umask's
    rights like any other file, not mkstemp's private 0o600."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(npmask_io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(npmask_io.os, "replace",
                        lambda src, dst: (events.append("replace"), real_replace(src, dst)))
    old = os.umask(0o022)
    try:
        npmask_io.atomic_write_text(str(tmp_path / "config.json"), "{}\n")
    finally:
        os.umask(old)
    assert "fsync" in events[:events.index("replace")], events
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "config.json").read_text() == "{}\n"


def test_8_stale_temps_are_removed_only_where_asked(tmp_path):
    """remove_stale_temps(recursive=False) leaves the sub-folders' temporary files: a comparison
    folder cleans only its own, as its job folders may be written by other processes right now.
    Only the temporary names of npmask's writes are removed."""
    (tmp_path / "job").mkdir()
    for p in (tmp_path / ".compare.json.abc.tmp", tmp_path / "job" / ".config.json.abc.tmp",
              tmp_path / "job" / ".tmp-abc.npz", tmp_path / "notes.tmp", tmp_path / ".keep"):
        p.write_text("x")
    assert npmask_io.remove_stale_temps(tmp_path, recursive=False) == [
        str(tmp_path / ".compare.json.abc.tmp")]
    assert sorted(npmask_io.remove_stale_temps(tmp_path)) == sorted(
        [str(tmp_path / "job" / ".config.json.abc.tmp"), str(tmp_path / "job" / ".tmp-abc.npz")])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".keep", "notes.tmp"]


# ------------------------------------------------------------- 9. the Python API
def test_9_api_misuse_is_a_value_error_naming_the_layer_and_shapes():
    from npmask import models, nn
    from npmask.masking.layers import MaskedConv2d, MaskedLinear
    from npmask.multidomain import MultiDomainModel
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 4.*must be a NumPy or CuPy array.*list"):
        conv.forward(x.tolist())
    conv.forward(x)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 4.*gradient has shape \(2, 4, 4, 4\).*"
                                         r"\(2, 4, 8, 8\)"):
        conv.backward(np.zeros((2, 4, 4, 4), np.float32))
    masked = MaskedConv2d(nn.Conv2d(3, 4, 3, padding=1), "full")
    masked.forward(x)
    with pytest.raises(ValueError, match=r"MaskedConv2d.*gradient has shape \(1, 4, 8, 8\)"):
        masked.backward(np.zeros((1, 4, 8, 8), np.float32))  # broadcastable: must not pass
    with pytest.raises(ValueError, match=r"MaskedConv2d wraps a convolution.*Linear.*\(3, 5\)"):
        MaskedConv2d(nn.Linear(5, 3), "full")
    with pytest.raises(ValueError, match=r"MaskedLinear wraps a Linear.*Conv2d.*\(4, 3, 3, 3\)"):
        MaskedLinear(nn.Conv2d(3, 4, 3), "full")
    model = MultiDomainModel(models.create("wrn10_1", num_classes=5, input_size=16))
    with pytest.raises(ValueError, match="MultiDomainModel.*list"):
        model.forward(np.zeros((1, 3, 16, 16), np.float32).tolist())
