"""One process at a time on a folder: one pipeline run per dataset workspace (finding F11), one trainer per run
folder (finding D7).

``icf stage …`` holds an exclusive ``flock`` on ``WORK/<dataset>/.lock`` for as long as it runs, and ``icf train``
one on ``RUN/.lock``; a second process on the same folder refuses at once with a one-line error naming the
holder (pid, host and command). The kernel drops the lock when the holder exits, however it exits (even
SIGKILL), so a killed process never leaves a stale lock behind. ``icf status``, ``icf verify`` and the eval
commands only read and take no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from icf.clitools import UserError

LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold the lock of ``folder`` (created when missing) for the block; ``UserError(busy(holder))`` when another
    process holds it, ``holder`` being ``pid N on HOST: icf …``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise UserError(busy(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(['icf', *sys.argv[1:]])}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def workspace_lock(dataset_dir: Path) -> AbstractContextManager[None]:
    """Hold the lock of ``WORK/<dataset>`` for the block; ``UserError`` when another process holds it."""
    return folder_lock(dataset_dir, lambda holder: f"{dataset_dir}: another icf run is working on this dataset "
                       f"({holder}); wait for it to finish (`icf status` shows its progress)")
