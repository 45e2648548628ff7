"""Worker restarts in words (no Ray started here: the Ray runs are in test_pipeline.py): Ray's exit types and
details as phrases, the summary's phrase, the local clues, and a watch whose diagnostics fail."""

from __future__ import annotations

import pytest

from icf.pipeline import restarts
from icf.pipeline.engine import StageSummary
from icf.pipeline.restarts import UNKNOWN, Restart, RestartWatch, cause, fatal_signal, phrase

# exit details as Ray 2.60 wrote them for a worker that ... (EOF_DETAIL: SIGKILL, os._exit or SIGSEGV alike)
EOF_DETAIL = ("Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
              "the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called")
LEASED = ("The leased worker has unrecoverable failure. Worker is requested to be destroyed when it is returned. RPC "
          "error: Socket closed")  # the same, seen from the task's owner
EXIT_4 = "Worker exits unexpectedly. Worker exits with an exit code 4."  # sys.exit(4) in an actor
SIGTERM = ("The leased worker has unrecoverable failure. Worker is requested to be destroyed when it is returned. "
           "Worker exits with an exit code 1. The process receives a SIGTERM.")
MONITOR = ("Task was killed due to the node running low on memory. Memory on the node (IP: 10.0.0.5, ID: 3f2a) was "
           "31.52GB used / 32.00GB limit (0.985000), which exceeds the memory usage threshold of 0.95.")
KILLED = "Worker exits because the actor is killed. The actor is dead because it was killed by `ray.kill`."


def test_every_ray_exit_type_has_a_phrase_and_intended_exits_are_no_restart():
    from ray.core.generated import common_pb2

    for name in common_pb2.WorkerExitType.keys():
        said = cause(name, "")
        if name.startswith("INTENDED_"):
            assert said is None, name
        else:
            assert said and said != UNKNOWN, name


@pytest.mark.parametrize("exit_type, detail, clues, said", [
    ("SYSTEM_ERROR", EOF_DETAIL, {}, "ended abruptly: SIGKILL, a crash or os._exit"),
    ("SYSTEM_ERROR", LEASED, {}, "ended abruptly: SIGKILL, a crash or os._exit"),
    ("SYSTEM_ERROR", EOF_DETAIL, {"oom_killed": True}, "out of memory, killed by the kernel"),
    ("SYSTEM_ERROR", EOF_DETAIL, {"fatal_signal": "SIGSEGV"}, "crashed with SIGSEGV"),
    ("SYSTEM_ERROR", EXIT_4, {"oom_killed": True}, "exited with code 4"),  # Ray's word beats a clue
    ("SYSTEM_ERROR", SIGTERM, {}, "stopped by SIGTERM"),
    ("NODE_OUT_OF_MEMORY", MONITOR, {}, "out of memory, killed by Ray's memory monitor at 31.52 of 32.00 GB"),
    ("NODE_OUT_OF_MEMORY", "", {}, "out of memory, killed by Ray's memory monitor"),
    ("USER_ERROR", "an exception in __init__", {}, "its setup raised an error"),
    ("INTENDED_SYSTEM_EXIT", KILLED, {}, None),
    (None, "", {}, UNKNOWN),
])
def test_cause_in_words(exit_type, detail, clues, said):
    assert cause(exit_type, detail, **clues) == said


def test_phrase_groups_causes_names_other_nodes_and_points_unknown_causes_at_the_log():
    assert phrase([]) == ""
    one = [Restart(1234, "exited with code 3")]
    assert phrase(one, resent=1) == "1 worker restart (1 unit resent): exited with code 3 (pid 1234)"
    many = [Restart(1234, "out of memory, killed by the kernel"), Restart(1240, "out of memory, killed by the kernel"),
            Restart(77, "crashed with SIGSEGV", node="10.0.0.7", remote=True),
            Restart(0, UNKNOWN, log="/tmp/ray/session_x/logs")]
    assert phrase([r.to_dict() for r in many], resent=2) == (
        "4 worker restarts (2 units resent): out of memory, killed by the kernel (pids 1234, 1240), crashed with "
        "SIGSEGV (pid 77 on 10.0.0.7), cause unknown; see Ray's log at /tmp/ray/session_x/logs")


def test_the_summary_line_and_json_carry_the_restarts():
    s = StageSummary("extract", "k1", units=2, units_run=2, computed=5, counts={"ok": 5})
    assert "restart" not in s.line() and s.to_dict()["restarts"] == [] and s.to_dict()["units_resent"] == 0
    s.restarts, s.resent = [Restart(1234, "out of memory, killed by the kernel", "SYSTEM_ERROR").to_dict()], 1
    assert s.line().endswith("; 1 worker restart (1 unit resent): out of memory, killed by the kernel (pid 1234)")
    assert s.to_dict()["restarts"][0]["pid"] == 1234 and s.to_dict()["units_resent"] == 1


def test_fatal_signal_from_the_workers_stderr_log(tmp_path):
    wid = "ab" * 28
    (tmp_path / f"worker-{wid}-01000000-41.err").write_text("x\n*** SIGSEGV received at time=1 on cpu 1 ***\n")
    (tmp_path / f"worker-{wid}-ffffffff-42.err").write_text("Fatal Python error: Aborted\n\nStack ...\n")
    (tmp_path / f"worker-{wid}-01000000-43.err").write_text("an ordinary traceback\n")
    assert fatal_signal(str(tmp_path), wid, 41) == "SIGSEGV"
    assert fatal_signal(str(tmp_path), wid, 42) == "SIGABRT"
    assert fatal_signal(str(tmp_path), wid, 43) is None
    assert fatal_signal(str(tmp_path / "absent"), wid, 41) is None and fatal_signal(None, wid, 41) is None


def _row(wid, alive=False, job="01000000", exit_type="SYSTEM_ERROR", detail=EOF_DETAIL, pid=10, node="10.0.0.1"):
    return {"worker_id": wid, "alive": alive, "pid": pid, "job_id": job, "node": node, "exit_type": exit_type,
            "detail": detail}


def test_the_watch_keeps_this_jobs_unintended_deaths_since_it_began(monkeypatch):
    tables = [[_row("old", pid=1)],
              [_row("old", pid=1), _row("alive", alive=True), _row("other-job", job="02000000"),
               _row("killed", exit_type="INTENDED_SYSTEM_EXIT", detail=KILLED),
               _row("mine", pid=1234), _row("far", pid=99, node="10.0.0.9", detail=EXIT_4)]]
    monkeypatch.setattr(restarts, "_driver", lambda: ("01000000", "10.0.0.1", "/logs"))
    monkeypatch.setattr(restarts, "read_workers", lambda: tables.pop(0) if len(tables) > 1 else tables[0])
    monkeypatch.setattr(restarts, "oom_kills", lambda: 0)
    watch = RestartWatch.begin()
    got = watch.end(resent=3)
    assert [(r.pid, r.cause, r.remote) for r in got] == [
        (99, "exited with code 4", True), (1234, "ended abruptly: SIGKILL, a crash or os._exit", False),
        (0, UNKNOWN, False)]  # a third resend that no death in the table explains
    assert got[-1].log == "/logs"


def test_a_watch_whose_diagnostics_fail_never_raises_and_counts_the_resends(monkeypatch):
    def broken():
        raise RuntimeError("no GCS")

    monkeypatch.setattr(restarts, "_driver", lambda: ("01000000", "10.0.0.1", None))
    monkeypatch.setattr(restarts, "_gcs_workers", broken)
    monkeypatch.setattr(restarts, "_state_api_workers", broken)
    watch = RestartWatch.begin()
    assert not watch.ok
    assert watch.end() == [] and watch.end(resent=1) == [Restart(0, UNKNOWN)]
    monkeypatch.setattr(restarts, "_driver", broken)  # Ray not even connected
    assert RestartWatch.begin().end(resent=0) == []
