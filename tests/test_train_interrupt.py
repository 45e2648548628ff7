"""Training under interruption (finding F7, F8): SIGINT / SIGTERM checkpoint before stopping, a resumed run
logs each step once, ``--out`` never appends to another run, ``max_steps`` 0 takes no step."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from icf.clitools import UserError
from icf.train import checkpoint
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.trainer import train
from test_train import FAST


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    root = tmp_path_factory.mktemp("work")
    avss_shards(root, n_train=6, n_val=3)  # 3 steps per epoch at batch 2
    return root


def _spec(work: Path, out: str, max_steps: int | None) -> RunSpec:
    # checkpoint_every larger than the run: only the signal handler can have written a checkpoint mid-run
    return RunSpec(dataset="avss", preset="tiny", work=work, out=work / "runs" / out, epochs=3, max_steps=max_steps,
                   overrides=FAST, seed=7, checkpoint_every=1000)


def _signal_after(run: Path, steps: int, sig: int) -> threading.Thread:
    """Send ``sig`` to this process once ``run``'s metrics.jsonl holds ``steps`` records."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and len(read_metrics(run)) < steps:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_logs_each_step_once(work, sig, raised):
    run = work / "runs" / f"sig{int(sig)}"
    before = signal.getsignal(sig)
    watcher = _signal_after(run, 2, sig)
    with pytest.raises(raised):
        train(_spec(work, run.name, 8))
    watcher.join()
    done = checkpoint.load(run / checkpoint.CHECKPOINT)["step"]
    logged = [r["step"] for r in read_metrics(run)]
    assert done >= 2 and logged == list(range(1, done + 1))  # the checkpoint holds every logged step
    assert signal.getsignal(sig) == before  # the trainer's handler is gone again
    with (run / "metrics.jsonl").open("a") as fh:  # as if the run had logged a step past its checkpoint
        fh.write('{"step": %d, "total": 1.0}\n' % (done + 1))
    train(_spec(work, run.name, 5), resume=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_out_on_an_existing_run_refuses_even_without_a_checkpoint(work):
    run = work / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run"):
        train(_spec(work, "taken", 2))
    assert read_metrics(run) == [{"step": 1}]


def test_max_steps_zero_takes_no_step(work):
    run = train(_spec(work, "zero", 0))
    assert read_metrics(run) == [] and not (run / checkpoint.CHECKPOINT).exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_file(work, monkeypatch):
    def full_disk(payload, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(UserError, match="cannot write the checkpoint .*disk full"):
        train(_spec(work, "full-disk", 1))
    assert [p.name for p in (work / "runs" / "full-disk").iterdir() if ".tmp" in p.name] == []
