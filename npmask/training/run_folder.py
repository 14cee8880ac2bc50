"""The folder a training run leaves behind, and the per-epoch log inside it.

Layout (every file is written atomically, see :mod:`npmask.training.checkpoint`)::

    <run>/config.json              every setting, the seed, library versions
    <run>/metrics.jsonl            one JSON object per line: one per epoch, per domain
    <run>/progress.json            which domains are finished, with their test accuracy
    <run>/checkpoints/<d>.npz      the last completed epoch of the domain being trained
    <run>/domains/<d>.npz          the stored domain (1-bit masks, k's, BN, head; npmask.storage)
    <run>/results.md               the results table (accuracies, S-score, # Params, S_p)
    <run>/results.json             the same numbers, machine-readable
    <run>/plots/*.png              learning curves, mask density and k values per layer

``metrics.jsonl`` is appended just before the checkpoint of the same epoch is written. On resume
the lines of epochs *after* the checkpoint (possible only if the process died between the two
writes) are dropped, so the log always matches the state the run continues from.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:          # Windows: no flock, so npmask.train trains one domain at a time there
    fcntl = None
CONCURRENT_LOGS = fcntl is not None   # several processes may append to one metrics.jsonl

from ..io import atomic_write_text, remove_stale_temps
from .checkpoint import checkpoint_epoch
from .errors import ConfigError
from .lock import RunLock


class RunFolder:
    """Paths and small-file helpers of one run folder (created on demand)."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = None

    # ------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    @property
    def results_md(self) -> Path:
        return self.path / "results.md"

    @property
    def results_json(self) -> Path:
        return self.path / "results.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def checkpoint(self, domain: str) -> Path:
        return self.path / "checkpoints" / f"{domain}.npz"

    def domain_file(self, domain: str) -> Path:
        return self.path / "domains" / f"{domain}.npz"

    def create(self) -> "RunFolder":
        for p in (self.path, self.path / "checkpoints", self.path / "domains", self.plots):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.config.is_file()

    # ------------------------------------------------------------------ one process per folder
    def lock(self) -> "RunFolder":
        """Take the folder's lock (npmask.training.lock; RunLockError, one line, when another live
        process holds it), then remove the temporary files of writes a killed process left."""
        if self._lock is None:
            self._lock = RunLock(self.path).acquire()
            remove_stale_temps(self.path)
        return self

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ metrics.jsonl
    def log(self, record: dict) -> None:
        """Append one JSON line (with a wall-clock ``time`` stamp) to metrics.jsonl."""
        record = dict(record)
        record.setdefault("time", round(time.time(), 3))
        line = json.dumps(record, sort_keys=False) + "\n"
        with open(self.metrics, "a", encoding="utf-8") as f:
            if fcntl is not None:      # domains trained side by side append to the same file
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            self._cut_torn_line()
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _cut_torn_line(self) -> None:
        """A process killed mid-append leaves a last line without its newline; appending to it
        would glue the next record onto it and lose both. Cut it (it never was a record)."""
        try:
            with open(self.metrics, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return

    def read_metrics(self) -> list[dict]:
        """Every complete line of metrics.jsonl (a torn last line from a kill is skipped)."""
        if not self.metrics.is_file():
            return []
        out = []
        with open(self.metrics, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # an incomplete line written while the process was killed
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def drop_metrics_after_checkpoints(self) -> None:
        """On resume: drop the lines of epochs after each unfinished domain's checkpoint (written
        by a process killed between the two writes), so the log matches what the run resumes from."""
        done = self.progress()["done"]
        keep_epochs = {}
        for r in self.read_metrics():
            d = r.get("domain")
            if d is None or d in done or d in keep_epochs:
                continue
            ck = self.checkpoint(d)
            keep_epochs[d] = checkpoint_epoch(ck) if ck.is_file() else 0
        if keep_epochs:
            self.truncate_metrics(lambda r: r.get("domain") not in keep_epochs
                                  or r.get("epoch", 0) <= keep_epochs[r["domain"]])

    def truncate_metrics(self, keep) -> None:
        """Rewrite metrics.jsonl keeping only the records for which ``keep(record)`` is true."""
        kept = [r for r in self.read_metrics() if keep(r)]
        atomic_write_text(str(self.metrics), "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ progress.json
    def progress(self) -> dict:
        """``{"done": {domain: {...results...}}}`` (empty for a new run)."""
        if not self.progress_file.is_file():
            return {"done": {}}
        try:
            prog = json.loads(self.progress_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{self.progress_file} is not valid JSON ({err})") from None
        check_progress(prog, self.progress_file)
        return prog

    def mark_done(self, domain: str, result: dict) -> None:
        prog = self.progress()
        prog["done"][domain] = result
        atomic_write_text(str(self.progress_file), json.dumps(prog, indent=2) + "\n")


def check_progress(prog, path) -> None:
    """progress.json must be ``{"done": {domain: {"test_acc": number, "epochs": int, ...}}}``."""
    def bad(field, want, got):
        raise ConfigError(f"{path}: field {field!r} must be {want}, got {json.dumps(got)[:80]}; "
                          "the file is damaged (move it away to train every domain again)")
    if not isinstance(prog, dict):
        bad("(top level)", "an object", prog)
    if not isinstance(prog.get("done"), dict):
        bad("done", "an object mapping domain -> results", prog.get("done"))
    for d, r in prog["done"].items():
        if not isinstance(r, dict):
            bad(f"done.{d}", "an object", r)
        acc = r.get("test_acc")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 100:
            bad(f"done.{d}.test_acc", "a number in [0, 100]", acc)
        ep = r.get("epochs")
        if not isinstance(ep, int) or isinstance(ep, bool) or ep < 0:
            bad(f"done.{d}.epochs", "an integer >= 0", ep)


def newest_run(root, prefix: str = "") -> str | None:
    """The most recently modified run folder (one holding config.json) under ``root`` whose name
    starts with ``prefix``; None when there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir()
            if p.name.startswith(prefix) and (p / "config.json").is_file()]
    return str(max(runs, key=lambda p: p.stat().st_mtime)) if runs else None


def resume_target(out, prefix: str, what: str = "run folder") -> str:
    """The folder ``--resume`` continues: ``out`` when given, else the newest ``runs/<prefix>*``.

    Raises ConfigError when neither exists.
    """
    out = out or newest_run("runs", prefix)
    if out is None:
        raise ConfigError(f"--resume: no {what} given (--out) and none found under runs/")
    return out
