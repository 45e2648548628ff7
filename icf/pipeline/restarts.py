"""Worker restarts on Ray, in words: which workers died while a stage ran, and why.

Ray resends a unit whose task worker died (``max_retries``) and restarts a dead actor, resending its unit
(``max_restarts`` / ``max_task_retries``), so the stage completes, but the cause otherwise shows only in Ray's
log. :class:`RestartWatch` diffs Ray's worker table (GCS: every worker's ``exit_type`` and ``exit_detail``)
from before the first unit to after the last one, keeps the workers of this job that died unintentionally,
and :func:`cause` turns each death into a short phrase for the summary line.

What Ray knows, measured on Ray 2.60: an exit code (``sys.exit(3)``: "exit code 3"), a SIGTERM, and a kill
by its memory monitor (``NODE_OUT_OF_MEMORY``). A worker killed with SIGKILL (the kernel's OOM killer), a
segfault and ``os._exit`` all read alike ("connection error ... End of file"): the raylet ignores SIGCHLD, so
no process keeps the exit status. Two local clues refine that case for a worker on this machine: its stderr
log holding a fatal-signal report (``*** SIGSEGV received``: a crash), and the kernel's ``oom_kill`` counter
(``/proc/vmstat``) having risen while the stage ran (out of memory).

The worker table is read with Ray's GCS state accessor (``ray._private.state``): the public state API
(``ray.util.state.list_workers``) needs the dashboard, which icf's embedded Ray does not start
(``include_dashboard=False``), so it is only the fallback, for a Ray whose accessor fails. Every read is
guarded: diagnostics that fail leave the restart count to the units Ray resent (their attempt numbers), with
"cause unknown", and never fail the stage.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INTENDED = frozenset({"INTENDED_USER_EXIT", "INTENDED_SYSTEM_EXIT"})  # ray.kill, idle workers: not a failure
UNKNOWN = "cause unknown"
# faulthandler's "Fatal Python error: ..." line → the signal (when Ray's own "*** SIGxxx received" is absent)
FATAL_ERRORS = {"Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT", "Bus error": "SIGBUS",
                "Floating point exception": "SIGFPE", "Illegal instruction": "SIGILL"}


@dataclass(frozen=True)
class Restart:
    """One worker that died while a stage ran.

    Attributes:
        pid: its process id (0 when only the resent unit tells that a worker died).
        cause: `cause`'s phrase.
        exit_type: Ray's ``WorkerExitType`` name ("" when Ray's table was not readable).
        node: the IP address of its node.
        remote: whether that is another machine than the driver's (the summary line names it then).
        detail: Ray's exit detail, verbatim (for ``--json``).
        log: Ray's log folder, given when the cause is unknown.
    """

    pid: int
    cause: str
    exit_type: str = ""
    node: str = ""
    remote: bool = False
    detail: str = ""
    log: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cause(exit_type: str | None, detail: str = "", fatal_signal: str | None = None, oom_killed: bool = False) -> str | None:
    """Ray's verdict on a dead worker (``WorkerExitType`` name and exit detail) as a short phrase; None for an
    intended exit (``ray.kill``, an idle worker reclaimed), which is no restart.

    Args:
        fatal_signal: a fatal signal the worker's own log reports (``"SIGSEGV"``), see `fatal_signal`.
        oom_killed: the kernel's OOM killer fired on the worker's machine while the stage ran.
    """
    detail = detail or ""
    if exit_type in INTENDED:
        return None
    if exit_type == "NODE_OUT_OF_MEMORY":
        used = re.search(r"was ([\d.]+)GB used / ([\d.]+)GB limit", detail)
        at = f" at {used[1]} of {used[2]} GB" if used else ""
        return f"out of memory, killed by Ray's memory monitor{at}"
    if exit_type == "USER_ERROR":
        return "its setup raised an error"
    signal = re.search(r"receives? an? (SIG[A-Z]+)", detail)
    if signal:
        return f"stopped by {signal[1]}"
    code = re.search(r"exit code (-?\d+)", detail)
    if code:
        return f"exited with code {code[1]}"
    if fatal_signal:
        return f"crashed with {fatal_signal}"
    if exit_type == "SYSTEM_ERROR" or re.search(r"End of file|Socket closed|Connection reset|unrecoverable", detail):
        if oom_killed:
            return "out of memory, killed by the kernel"
        return "ended abruptly: SIGKILL, a crash or os._exit"
    return UNKNOWN


def phrase(restarts: Iterable[Restart | dict], resent: int = 0) -> str:
    """``"3 worker restarts (3 units resent): out of memory, killed by the kernel (pids 1234, 1240), exited
    with code 1 (pid 1250)"``; "" when there were none. Restarts of one cause are grouped; one on another
    machine names it; an unknown cause points at Ray's log folder."""
    items = [r if isinstance(r, dict) else r.to_dict() for r in restarts]
    if not items:
        return ""
    out = f"{len(items)} worker restart{'' if len(items) == 1 else 's'}"
    if resent:
        out += f" ({resent} unit{'' if resent == 1 else 's'} resent)"
    groups: dict[tuple[str, str], list[str]] = {}
    for r in items:
        pids = groups.setdefault((r["cause"], r.get("node", "") if r.get("remote") else ""), [])
        if r.get("pid"):
            pids.append(str(r["pid"]))
    parts = []
    for (why, node), pids in groups.items():
        where = ([f"pid{'s' if len(pids) > 1 else ''} {', '.join(pids)}"] if pids else []) + ([f"on {node}"] if node else [])
        parts.append(f"{why} ({' '.join(where)})" if where else why)
    out += ": " + ", ".join(parts)
    log_dir = next((r["log"] for r in items if r.get("log")), "")
    return out + (f"; see Ray's log at {log_dir}" if log_dir else "")


# ------------------------------------------------------------------------------------------- reading Ray


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, (bytes, bytearray)) else str(value or "")


def _gcs_workers() -> list[dict[str, Any]]:
    """Every worker in Ray's GCS worker table (alive and dead) as plain dicts, read through the driver's GCS
    connection (no dashboard needed)."""
    from ray._private.state import state
    from ray.core.generated import common_pb2, gcs_pb2

    rows = []
    for raw in state._connect_and_get_accessor().get_worker_table():
        w = gcs_pb2.WorkerTableData.FromString(raw)
        if w.worker_type != common_pb2.WORKER:
            continue
        rows.append({"worker_id": w.worker_address.worker_id.hex(), "alive": w.is_alive, "pid": w.pid,
                     "job_id": w.job_id.hex(), "node": w.worker_address.ip_address,
                     "exit_type": common_pb2.WorkerExitType.Name(w.exit_type) if w.HasField("exit_type") else None,
                     "detail": w.exit_detail})
    return rows


def _state_api_workers() -> list[dict[str, Any]]:
    """The same rows from Ray's public state API, which needs the cluster's dashboard."""
    from ray.util.state import list_workers

    rows = []
    for w in list_workers(detail=True, limit=100_000, timeout=10, raise_on_missing_output=False):
        w = w if isinstance(w, dict) else asdict(w)
        if w.get("worker_type") not in (None, "WORKER"):
            continue
        rows.append({"worker_id": _hex(w.get("worker_id")), "alive": bool(w.get("is_alive")), "pid": w.get("pid") or 0,
                     "job_id": _hex(w.get("job_id")), "node": w.get("ip") or "",
                     "exit_type": w.get("exit_type"), "detail": w.get("exit_detail") or ""})
    return rows


def read_workers() -> list[dict[str, Any]] | None:
    """Ray's worker table (`_gcs_workers`, else `_state_api_workers`); None when neither answers."""
    for source in (_gcs_workers, _state_api_workers):
        try:
            return source()
        except Exception as err:  # noqa: BLE001 - diagnostics never fail a stage
            log.debug("worker table from %s: %s", source.__name__, err)
    return None


def oom_kills() -> int | None:
    """The kernel's count of processes its OOM killer killed on this machine (``/proc/vmstat``), or None."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def fatal_signal(logs: str | None, worker_id: str, pid: int) -> str | None:
    """The fatal signal a dead worker's stderr log (``worker-<id>-<job>-<pid>.err`` in Ray's log folder, when
    this machine sees it) reports: Ray's ``*** SIGSEGV received`` or faulthandler's ``Fatal Python error``."""
    if not logs or not worker_id:
        return None
    try:
        for path in Path(logs).glob(f"worker-{worker_id}-*-{pid}.err"):
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 65536))
                tail = f.read().decode("utf-8", "replace")
            found = re.findall(r"\*\*\* (SIG[A-Z]+) received", tail)
            if found:
                return found[-1]
            fatal = re.findall(r"Fatal Python error: ([A-Za-z ]+)", tail)
            if fatal:
                return FATAL_ERRORS.get(fatal[-1].strip())
    except OSError:
        pass
    return None


def _driver() -> tuple[str, str, str | None]:
    """This driver's Ray job id, node IP address and Ray's log folder on this machine (None when unknown)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not connected")
    try:
        logs = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        logs = None
    return ray.get_runtime_context().get_job_id(), ray.util.get_node_ip_address(), logs


class RestartWatch:
    """Notes Ray's dead workers before a stage dispatches (`begin`) and names the ones that died since
    (`end`). Costs two reads of the GCS worker table (about a millisecond each on one machine)."""

    def __init__(self) -> None:
        self.ok = False  # whether the worker table was readable at the start
        self.job = ""
        self.here = ""
        self.logs: str | None = None
        self.dead: set[str] = set()
        self.oom: int | None = None

    @classmethod
    def begin(cls) -> RestartWatch:
        watch = cls()
        try:
            watch.job, watch.here, watch.logs = _driver()
            rows = read_workers()
            if rows is not None:
                watch.dead = {r["worker_id"] for r in rows if not r["alive"]}
                watch.ok = True
            watch.oom = oom_kills()
        except Exception as err:  # noqa: BLE001 - diagnostics never fail a stage
            log.debug("restart watch: %s", err)
        return watch

    def end(self, resent: int = 0) -> list[Restart]:
        """The workers of this job that died unintentionally since `begin`, with their causes; when Ray resent
        more units than that (or the table is unreadable), one "cause unknown" restart for each unexplained
        resend."""
        found = self._died()
        for _ in range(8 if self.ok else 0):  # the raylet may report a death a moment after the resend
            if len(found) >= resent:
                break
            time.sleep(0.25)
            found = self._died()
        return found + [Restart(0, UNKNOWN, log=self.logs or "") for _ in range(resent - len(found))]

    def _died(self) -> list[Restart]:
        found: list[Restart] = []
        try:
            rows = read_workers() if self.ok else None
            oom_rose = self.oom is not None and (oom_kills() or 0) > self.oom
            for r in rows or []:
                if r["alive"] or r["worker_id"] in self.dead or (self.job and r["job_id"] != self.job):
                    continue
                local = not r["node"] or not self.here or r["node"] == self.here
                sig = fatal_signal(self.logs, r["worker_id"], r["pid"]) if local else None
                why = cause(r["exit_type"], r["detail"], sig, oom_rose and local)
                if why is not None:
                    found.append(Restart(int(r["pid"]), why, r["exit_type"] or "", r["node"], not local, r["detail"],
                                         (self.logs or "") if why == UNKNOWN else ""))
        except Exception as err:  # noqa: BLE001 - diagnostics never fail a stage
            log.debug("restart watch: %s", err)
        return sorted(found, key=lambda r: r.pid)
