"""Shards are checked against ``shards.json`` whenever they are read (finding F2: a truncated or altered tar
must never give a silent run on fewer clips, nor a ``tarfile`` traceback).

* :func:`size_problem`: the tar exists and has the recorded ``filesize`` (``ShardSet.load`` runs it on
  every shard: one ``stat`` each).
* :func:`read_checked`: streams one tar's samples while hashing the bytes as they are read, then checks
  the recorded ``sha256`` and ``nsamples`` once the tar is exhausted (no second read of the file). A
  damaged tar raises :class:`ShardError` naming the file and the command that rebuilds it, or, when
  ``shards.json`` itself changed since the reader loaded it (shards rebuilt mid-run), saying so.
* :func:`shard_problem`: the full check (size, sha256, sample count) without decoding, for ``icf verify``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from webdataset.tariterators import group_by_keys, tar_file_expander

from icf.clitools import UserError


class ShardError(UserError):
    """A shard does not match ``shards.json`` (missing, truncated, altered, wrong sample count)."""


def rebuild_hint(dataset_dir: Path, altered: bool = False) -> str:
    """How to rebuild the shards of ``WORK/<dataset>`` (the folder holding ``shards.json``): ``stage all``
    notices a missing or resized tar by itself; an altered tar of the right size needs ``--force``."""
    command = "stage shard" if altered else "stage all"
    force = " --force" if altered else ""
    return (f"rebuild the shards with `icf {command} --dataset {dataset_dir.name} --work {dataset_dir.parent}{force}` "
            "(with the options of the run that made them)")


def rebuilt_since(entry: dict[str, Any]) -> bool:
    """Whether ``shards.json`` no longer lists the tar of ``entry`` (read from it earlier, ``url`` absolute) as
    it did: the shards were rebuilt while a run was reading them (``icf stage shard`` under a trainer)."""
    url = Path(entry["url"])
    try:
        doc = json.loads((url.parents[2] / "shards.json").read_text())
        now = [e for entries in doc["splits"].values() for e in entries if url.parents[2] / e["url"] == url]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False  # gone or unreadable: the rebuild hint applies
    return not now or any(now[0].get(k) != entry.get(k) for k in ("filesize", "sha256", "nsamples"))


def remedy(entry: dict[str, Any], altered: bool = False) -> str:
    """What to do about a tar that does not match its ``shards.json`` entry: nothing is wrong with the shards
    when they were rebuilt under the reader (start the run again), else `rebuild_hint`."""
    if rebuilt_since(entry):
        return ("the shards were rebuilt while this run read them (shards.json has changed since it started); "
                "they are consistent: start the run again")
    return rebuild_hint(Path(entry["url"]).parents[2], altered)


def size_problem(entry: dict[str, Any]) -> str | None:
    """Why the tar of a ``shards.json`` entry (``url`` absolute) is not the recorded file, by size alone."""
    path = Path(entry["url"])
    if not path.is_file():
        return f"{path}: shard missing"
    size = path.stat().st_size
    if "filesize" in entry and size != int(entry["filesize"]):
        return f"{path}: shard is {size} bytes, shards.json says {entry['filesize']}"
    return None


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into a sha256."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        """Hash the rest of the file (tar end blocks the reader did not need); return the hex digest."""
        for block in iter(lambda: self.fh.read(1 << 20), b""):
            self.sha.update(block)
        return self.sha.hexdigest()


def read_checked(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (as ``wds.tarfile_to_samples`` yields them), checked against ``entry``.

    Raises :class:`ShardError` for an unreadable tar, a sample count or a sha256 that differs from
    ``shards.json`` (the last two once the tar has been read to its end).
    """
    url = entry["url"]
    problem = size_problem(entry)
    if problem:
        raise ShardError(f"{problem}; {remedy(entry)}")
    count = 0
    try:
        with open(url, "rb") as fh:
            reader = _HashingReader(fh)
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
                count += 1
                yield sample
            digest = reader.drain()
    except (tarfile.TarError, ValueError, OSError, EOFError) as err:
        raise ShardError(f"{url}: unreadable shard ({type(err).__name__}: {err}); {remedy(entry, altered=True)}") from None
    if count != int(entry["nsamples"]):
        raise ShardError(f"{url}: shard holds {count} samples, shards.json says {entry['nsamples']}; {remedy(entry, altered=True)}")
    if entry.get("sha256") and digest != entry["sha256"]:
        raise ShardError(f"{url}: shard sha256 differs from shards.json (altered file); {remedy(entry, altered=True)}")


def shard_problem(entry: dict[str, Any]) -> str | None:
    """Everything :func:`read_checked` checks, without decoding a sample; None when the shard is intact."""
    try:
        for _ in read_checked(entry):
            pass
    except ShardError as err:
        return str(err)
    return None
