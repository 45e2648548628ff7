"""Atomic, deterministic writes and the per-unit output table.

Every file the engine writes goes through :func:`atomic_write`: the bytes land in a temp file beside the
target and are renamed over it, so a run killed at any instant leaves either the old file or the new one,
never half of one. Temp files carry a ``.tmp-<host>-<pid>-<random>`` infix (:func:`temp_path`) and are
ignored by readers; :func:`sweep_temp_files` deletes only those of processes that are gone, never a live
concurrent run's.

A unit's outputs are one parquet table in long form, one row per (uid, output name):
``uid: str, name: str, kind: "npy"|"raw", data: binary``. Arrays are stored as ``.npy`` bytes, raw bytes
(e.g. an encoded JPEG) as they are, so a stage may emit any mix of both and a variable set of names.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from icf.clitools import UserError
from icf.data.io import npy_bytes, npy_load

TMP_INFIX = ".tmp-"
Output = np.ndarray | bytes

_OUTPUT_SCHEMA = pa.schema(
    [("uid", pa.string()), ("name", pa.string()), ("kind", pa.string()), ("data", pa.binary())]
)


FOREIGN_TEMP_AGE_S = 24 * 3600  # another host's temp file is swept only when this old


def temp_path(path: Path) -> Path:
    """A unique temp name beside ``path`` that says which process writes it (host and pid)."""
    host = socket.gethostname().replace("-", "_") or "host"
    return path.with_name(f"{path.name}{TMP_INFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _writer_gone(tmp: Path) -> bool:
    """Whether the process that writes ``tmp`` is dead (same host: its pid is gone; another host: the file
    is older than a day; a name without host and pid: from an older version, so gone)."""
    parts = tmp.name.split(TMP_INFIX, 1)[1].split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid = parts[0], int(parts[1])
    if host != (socket.gethostname().replace("-", "_") or "host"):
        try:
            return time.time() - tmp.stat().st_mtime > FOREIGN_TEMP_AGE_S
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temp file and ``os.replace`` (atomic on POSIX).

    An ``OSError`` that names no file (a full disk fails ``write``, which has no file name) is raised again
    naming ``path``, so its one-line message says which file could not be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Pretty, key-sorted JSON written atomically (same object → same bytes)."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class CorruptFile(UserError):
    """A cache file that exists but cannot be read (truncated, not JSON / parquet); the message names it."""


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist; ``CorruptFile`` when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, IsADirectoryError) as err:
        raise CorruptFile(f"{path}: corrupt file ({type(err).__name__}: {err})") from None


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The table in ``path``; ``CorruptFile`` naming the file when it is truncated or not parquet."""
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorruptFile(f"{path}: corrupt file ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def parquet_problem(path: Path) -> str | None:
    """Why the parquet file at ``path`` cannot be read (missing, truncated, bad footer), or None.

    Reads only the footer, so it is cheap enough to run on every unit of a stage before trusting it.
    """
    if not path.is_file():
        return f"{path}: missing file"
    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        return f"{path}: corrupt file ({type(err).__name__}: {str(err).splitlines()[0]})"
    return None


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table to parquet bytes (no per-write metadata such as timestamps)."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, parquet_bytes(table))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A ``.npz`` archive with sorted members and a fixed timestamp, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy_bytes(arrays[name]))
    return buf.getvalue()


def write_outputs(path: Path, outputs: Mapping[str, Mapping[str, Output]]) -> None:
    """Write ``{uid: {name: array | bytes}}`` as one long parquet table, rows sorted by (uid, name)."""
    rows: dict[str, list] = {"uid": [], "name": [], "kind": [], "data": []}
    for uid in sorted(outputs):
        for name in sorted(outputs[uid]):
            value = outputs[uid][name]
            is_raw = isinstance(value, (bytes, bytearray))
            rows["uid"].append(uid)
            rows["name"].append(name)
            rows["kind"].append("raw" if is_raw else "npy")
            rows["data"].append(bytes(value) if is_raw else npy_bytes(value))
    atomic_write_parquet(path, pa.Table.from_pydict(rows, schema=_OUTPUT_SCHEMA))


def read_outputs(path: Path, uids: set[str] | None = None) -> dict[str, dict[str, Output]]:
    """Inverse of :func:`write_outputs`; ``uids`` restricts which samples are decoded."""
    if not path.exists():
        return {}
    table = read_parquet(path)
    result: dict[str, dict[str, Output]] = {}
    for uid, name, kind, data in zip(*(table.column(c).to_pylist() for c in ("uid", "name", "kind", "data"))):
        if uids is not None and uid not in uids:
            continue
        result.setdefault(uid, {})[name] = data if kind == "raw" else npy_load(data)
    return result


def sweep_temp_files(folder: Path) -> int:
    """Delete temp files a killed run left behind in ``folder`` (not a live run's); returns how many."""
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if TMP_INFIX in p.name and _writer_gone(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
