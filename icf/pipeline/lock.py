"""One pipeline run per dataset workspace at a time (finding F11).

``icf stage …`` holds an exclusive ``flock`` on ``WORK/<dataset>/.lock`` for as long as it runs; a
second run on the same workspace refuses at once with a one-line error naming the holder (pid and
command). The kernel drops the lock when the holder exits, however it exits (even SIGKILL), so a killed
run never leaves a stale lock behind. ``icf status`` and ``icf verify`` only read and take no lock.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from icf.clitools import UserError

LOCK_FILE = ".lock"


@contextmanager
def workspace_lock(dataset_dir: Path) -> Iterator[None]:
    """Hold the lock of ``WORK/<dataset>`` for the block; ``UserError`` when another process holds it."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    path = dataset_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{dataset_dir}: another icf run is working on this dataset ({holder}); wait for it "
                            "to finish (`icf status` shows its progress)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(['icf', *sys.argv[1:]])}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
