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

from ..io import atomic_write_text
from .errors import ConfigError


class RunFolder:
    """Paths and small-file helpers of one run folder (created on demand)."""

    def __init__(self, path):
        self.path = Path(path)

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

    # ------------------------------------------------------------------ metrics.jsonl
    def log(self, record: dict) -> None:
        """Append one JSON line (with a wall-clock ``time`` stamp) to metrics.jsonl."""
        record = dict(record)
        record.setdefault("time", round(time.time(), 3))
        line = json.dumps(record, sort_keys=False) + "\n"
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

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
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # an incomplete line written while the process was killed
        return out

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
            return json.loads(self.progress_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{self.progress_file} is not valid JSON ({err})") from None

    def mark_done(self, domain: str, result: dict) -> None:
        prog = self.progress()
        prog["done"][domain] = result
        atomic_write_text(str(self.progress_file), json.dumps(prog, indent=2) + "\n")


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
