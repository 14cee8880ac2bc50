"""``npmask.compare --executor ray``: one Ray task per (variant, domain, seed) job.

Imported only when that executor is chosen (Ray is the optional extra ``npmask[ray]``); nothing
else in npmask imports ray. Each task runs :func:`npmask.training.grid.run_job` -- the same code
the local executor runs -- on a worker with the resources asked for (``--cpus-per-job``,
``--gpus-per-job``), so a multi-GPU node or a cluster trains several jobs at once. Ray ships the
job's plain-dict spec to the worker and its small result dict back; the trained domain stays in the
job's run folder, which the worker writes under ``--out``: on a cluster of several machines ``--out``
(and the data and backbone) must be on storage every node sees at the same path.

A worker that dies (killed, out of memory, its node lost) is retried by Ray up to ``RETRIES``
times; the retry takes over the job folder's lock (the kernel dropped the dead worker's) and
resumes from the job's last checkpoint, so the result is the one an uninterrupted run gives.
"""
from __future__ import annotations

import os

import ray

from .grid import report_line, run_job, running

RETRIES = 3  # Ray retries of a job whose worker process died


def _task(spec: dict, progress: bool) -> dict:
    return run_job(spec, progress=progress, log=print if progress else None)


def run(specs, *, address=None, cpus: float = 1.0, gpus: float = 0.0, progress: bool = False,
        echo=print) -> list[dict]:
    """Run every job on Ray (connecting to ``address``, or starting a local cluster when None and
    none is running in this process yet); one outcome per spec, in order."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=progress, include_dashboard=False,
                 configure_logging=False)
    env = {} if "NPMASK_THREADS" in os.environ else {"NPMASK_THREADS": str(max(1, int(cpus)))}
    task = ray.remote(_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES,
                                     retry_exceptions=False, runtime_env={"env_vars": env})
    index = {task.remote(spec, progress): i for i, spec in enumerate(specs)}
    outcomes = [None] * len(specs)
    pending, done = list(index), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            i = index[ref]
            try:
                outcomes[i] = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died RETRIES + 1 times, or Ray failed
                text = str(err).strip().splitlines()
                outcomes[i] = {"status": "failed",
                               "error": f"{type(err).__name__}: {text[0] if text else ''}"}
            done += 1
            now = sum(running(specs[index[r]]) for r in pending)
            echo(report_line(specs[i], outcomes[i], done=done, total=len(specs), running=now,
                             queued=len(pending) - now))
    return outcomes
