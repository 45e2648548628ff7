"""Runners: where units execute. Both yield one :class:`UnitReport` per unit as units finish.

* :class:`LocalRunner` — in-process, one unit after another (``--executor local``, for debugging).
* :class:`RayRunner` — CPU stages: one Ray task per unit (``max_retries`` reruns a unit whose worker
  died). Model stages: a pool of long-lived actors, so ``setup()`` loads weights once per worker, with
  ``num_gpus=1`` each when the cluster has GPUs (``max_restarts`` / ``max_task_retries`` bring a dead
  actor back and resend its unit). Tasks and actors use the SPREAD strategy so units fan out over nodes.
  Workers that died while the stage ran are named with their cause in ``RayRunner.restarts``
  (`icf.pipeline.restarts`), for the summary line.

The workspace must be a path every node sees (one machine, or a shared filesystem on a cluster).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from icf.clitools import UserError
from icf.pipeline.restarts import Restart, RestartWatch, phrase
from icf.pipeline.stage import Stage
from icf.pipeline.worker import UnitJob, UnitReport, run_unit

MAX_RETRIES = 3


class Runner(Protocol):
    def run(self, stage: Stage, jobs: Sequence[UnitJob]) -> Iterator[UnitReport]: ...


class LocalRunner:
    """Runs every unit in this process, with torch on one thread like a Ray worker (``num_cpus=1``).

    Float reductions on CPU may group differently with another thread count; one thread everywhere keeps
    the bytes every executor writes identical.
    """

    def run(self, stage: Stage, jobs: Sequence[UnitJob]) -> Iterator[UnitReport]:
        if not jobs:
            return
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            stage.setup()
            for job in jobs:
                yield run_unit(stage, job)
        finally:
            torch.set_num_threads(threads)


def _attempt() -> int:
    """How often Ray resent the task running in this worker (0 on its first try, and when unknown)."""
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - a private call: a Ray without it only loses the resend count
        return 0


def _task(stage: Stage, job: UnitJob) -> UnitReport:
    """Body of a Ray task: a CPU stage's setup is cheap, so it runs per unit."""
    stage.setup()
    return dataclasses.replace(run_unit(stage, job), attempt=_attempt())


class _StageActor:
    """Body of a Ray actor: ``setup()`` once, then any number of units.

    A `UserError` of ``setup()`` (weights that do not fit, say) is kept and raised by ``run``: raised in
    ``__init__`` it would kill the actor, which Ray restarts and then reports as a traceback."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.setup_error: UserError | None = None
        try:
            stage.setup()
        except UserError as err:
            self.setup_error = err

    def run(self, job: UnitJob) -> UnitReport:
        if self.setup_error is not None:
            raise self.setup_error
        return dataclasses.replace(run_unit(self.stage, job), attempt=_attempt())


def _user_errors(reports: Iterator[UnitReport]) -> Iterator[UnitReport]:
    """``reports``, with a `UserError` raised on a worker re-raised here as itself (one ``error:`` line), not
    wrapped in Ray's remote traceback."""
    import ray

    try:
        yield from reports
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise type(err.cause)(str(err.cause)) from None
        raise


_connected_here = False  # whether connect() opened the current Ray connection (disconnect() closes it)
_default_sigterm: object = None  # the SIGTERM handler before connect() replaced Ray's (restored by disconnect())
terminated_by: int | None = None  # the signal that stopped a run on Ray (`icf.workflow.run.ray_session` exits with it)
# Passed to every worker: a cluster started with `ray start` does not inherit the driver's environment, and
# without these the text towers' tokenizers try to reach the model hub (and retry for minutes offline).
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def connect(address: str | None) -> None:
    """Join ``address`` (``auto``, ``ray://host:port``; else ``$RAY_ADDRESS`` when set, as Ray does) or start
    an embedded Ray on this machine's CPUs. Reuses a live connection (e.g. one the caller opened)."""
    global _connected_here
    import ray

    if ray.is_initialized():
        return
    source = "--ray-address" if address else "$RAY_ADDRESS"  # errors name where the address came from
    address = address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    common = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                  runtime_env={"env_vars": env})
    if address:
        _check_reachable(address, source)
        try:
            ray.init(address=address, **common)
        except ConnectionError as err:
            raise UserError(f"{source} {address}: cannot join a Ray cluster ({str(err).splitlines()[0]})") from None
    else:
        # address="local": always a fresh instance, never a cluster that happens to run on this machine
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **common)
    _connected_here = True
    _stop_cleanly_on_sigterm()


def _stop_cleanly_on_sigterm() -> None:
    """Replace the handler Ray's core worker installs for SIGTERM (it aborts with exit 134 and a native stack
    dump) by one that unwinds: finished units are kept and Ray is shut down, as without Ray. Ray's ``get``
    turns the ``SystemExit`` into ``SystemExit(1)``; ``terminated_by`` keeps the signal for the exit code."""
    global _default_sigterm
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        global terminated_by
        terminated_by = signum
        sys.exit(128 + signum)

    _default_sigterm = signal.signal(signal.SIGTERM, stop)


def _check_reachable(address: str, source: str) -> None:
    """Fail fast (``UserError`` naming ``source``, the flag or variable that gave the address) when nothing
    listens at a ``host:port`` address: Ray itself keeps retrying for minutes. ``auto`` and ``ray://``
    addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        fix = "use --ray-address auto" if source == "--ray-address" else "unset RAY_ADDRESS for an embedded Ray"
        raise UserError(f"{source} {address}: no Ray cluster answers there ({err}); start one with "
                        f"`ray start --head` or {fix}") from None


def disconnect() -> None:
    """Close the connection :func:`connect` opened (stopping an embedded Ray); leave any other alone."""
    global _connected_here, _default_sigterm
    if _connected_here:
        import ray

        ray.shutdown()
        _connected_here = False
    if _default_sigterm is not None:
        signal.signal(signal.SIGTERM, _default_sigterm)
        _default_sigterm = None


class RayRunner:
    """Runs units on the connected Ray cluster.

    Args:
        workers: actors for model stages (default: one per GPU, else one per CPU of the cluster).
        address: the cluster to join, see :func:`connect`; Ray starts only when there is a unit to run,
            so a rerun with nothing to do costs no Ray start-up.
        max_retries: how often a unit is resent after its worker or actor died.

    After a run: ``restarts``, the workers that died while it ran, with their causes (`RestartWatch`), and
    ``resent``, how often Ray resent a unit (each unit is still reported, and counted, once).
    """

    def __init__(self, workers: int | None = None, address: str | None = None, max_retries: int = MAX_RETRIES) -> None:
        self.workers = workers
        self.address = address
        self.max_retries = max_retries
        self.restarts: list[Restart] = []
        self.resent = 0

    def run(self, stage: Stage, jobs: Sequence[UnitJob]) -> Iterator[UnitReport]:
        self.restarts, self.resent = [], 0
        if not jobs:
            return iter(())
        connect(self.address)
        return self._watched(_user_errors(self._actors(stage, jobs) if stage.uses_model else self._tasks(stage, jobs)))

    def _watched(self, reports: Iterator[UnitReport]) -> Iterator[UnitReport]:
        """``reports``, noting the resent units and, at the end, the workers that died meanwhile. When Ray
        gives up on a unit (its worker died ``max_retries + 1`` times), the error gets those deaths as a note."""
        import ray

        watch = RestartWatch.begin()  # before the first unit is submitted
        try:
            for report in reports:
                self.resent += report.attempt
                yield report
        except ray.exceptions.RayError as err:
            if not isinstance(err, ray.exceptions.RayTaskError):  # a dead worker, not an error in the unit
                self.restarts = watch.end(self.resent + 1)  # + the death Ray gave up after
                if self.restarts:
                    err.add_note(f"while the stage ran: {phrase(self.restarts, self.resent)}")
            raise
        self.restarts = watch.end(self.resent)

    def _tasks(self, stage: Stage, jobs: Sequence[UnitJob]) -> Iterator[UnitReport]:
        import ray

        remote = ray.remote(_task).options(
            num_cpus=1, max_retries=self.max_retries, retry_exceptions=False, scheduling_strategy="SPREAD"
        )
        stage_ref = ray.put(stage)
        pending = [remote.remote(stage_ref, job) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def _actors(self, stage: Stage, jobs: Sequence[UnitJob]) -> Iterator[UnitReport]:
        import ray
        from ray.util import ActorPool

        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = self.workers or gpus or max(1, int(resources.get("CPU", 1)))
        cls = ray.remote(_StageActor).options(
            num_cpus=1,
            num_gpus=1 if gpus else 0,
            max_restarts=self.max_retries,
            max_task_retries=self.max_retries,
            scheduling_strategy="SPREAD",
        )
        actors = [cls.remote(stage) for _ in range(min(n, len(jobs)))]
        try:
            yield from ActorPool(actors).map_unordered(lambda actor, job: actor.run.remote(job), list(jobs))
        finally:
            for actor in actors:
                ray.kill(actor)


def make_runner(executor: str, workers: int | None = None, address: str | None = None) -> Runner:
    if executor == "local":
        return LocalRunner()
    if executor == "ray":
        return RayRunner(workers, address)
    raise ValueError(f"unknown executor {executor!r}; expected 'ray' or 'local'")
