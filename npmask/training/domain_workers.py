"""Training several target domains at a time, one process each.

The domains of a run are independent (each has its own seed, masks, k's, batch norm and head on the
shared frozen backbone), so training them side by side gives each one the numbers it gets when
the domains are trained one after the other: the same batches and the same arithmetic, in
another process. On a CPU whose cores a small network's training step cannot keep busy (its
NumPy calls are too short for threads to share them out), this is what uses the other cores.

Each worker loads the run's backbone, trains one domain into the run folder (checkpoints,
metrics.jsonl lines, ``domains/<d>.npz``), and hands its result record back; the parent records
it in progress.json (one writer) as each domain finishes. Workers are started with ``spawn``
(a clean interpreter: no threads or BLAS state copied by a fork), each with the parent's
settings (``npmask.config``) and its share of npmask's threads.
"""
from __future__ import annotations

import multiprocessing
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ..config import settings
from .backbone import load_run_backbone
from .run_folder import RunFolder


def train_in_workers(train_domain, cfg, folder, domains, *, data_root, progress: bool, workers: int):
    """Yield ``(domain, result)`` as the domains finish, ``workers`` processes at a time.

    ``train_domain``: :func:`npmask.training.domain_training.train_domain` (a module-level
    function, which the worker imports by name).
    """
    chosen = {**settings.as_dict(), "threads": max(1, settings.threads // workers)}
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(domains)), mp_context=ctx,
                               initializer=_ignore_interrupts)
    pending = {pool.submit(_train_one, train_domain, cfg, str(folder.path), d, data_root,
                           progress, chosen): d for d in domains}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                d = pending.pop(future)
                yield d, future.result()          # a worker's error is raised here
    finally:
        if pending:   # an error, Ctrl-C, or the caller gave up: stop the other domains now (their
            for future in pending:               # checkpoints are whole: --resume continues them)
                future.cancel()
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=True)


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C goes to the parent, which stops the workers (one line, no tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_one(train_domain, cfg, folder_path: str, d: str, data_root, progress: bool,
               chosen: dict) -> dict:
    """In a worker: train domain ``d`` of the run in ``folder_path`` with the settings ``chosen``
    (the parent's, as ``using`` may have changed them); returns its result record."""
    for name, value in chosen.items():
        setattr(settings, name, value)
    model, _ = load_run_backbone(cfg)
    if cfg.backend != "numpy":
        model.to(cfg.backend)

    def echo(line):   # each epoch's line; no progress bars (two would overwrite each other)
        print(line, file=sys.stderr, flush=True)
    return train_domain(cfg, RunFolder(folder_path), model, d, data_root=data_root,
                        progress=False, echo=echo if progress else None)
