"""The manifest: one row per CSV row of a dataset, with the clip's paths and whether its files are usable.

:func:`build_manifest` is the library behind ``icf stage index``: adapters turn the CSV into Samples,
:func:`check_sample` checks each one's metadata and (cheaply) its files, and every row is kept with
``status`` ``ok`` or ``failed`` and an ``error`` that names the file (or CSV line) and the reason. Only
problems with the dataset as a whole (unknown dataset, missing root or CSV, wrong header) raise
``UserError``.

Media checks read headers, never full decodes: images are opened with PIL (PNG chunks CRC-verified,
JPEGs checked for their end-of-image marker), WAVs with ``soundfile.info`` plus a RIFF size check.

Each row also gets a ``digest``: a hash of its fields and of every file's size and mtime (a cheap
``stat``, no read). It is the clip's input signature downstream, so editing one clip's files in place
recomputes that clip alone, and a rescan re-checks only the rows whose digest changed.

Rows that would corrupt the output fail here with a reason: a uid that an earlier row already has (the
first row is kept), a uid whose WebDataset key (:func:`sample_key`) collides with an earlier row's, and
a uid or file path that leaves ``root`` (``..``, absolute paths).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from icf.data.adapters import load_rows
from icf.data.io import COLOUR_MODES, INDEX_MODES, check_wav, missing_reason
from icf.data.manifests import SPLITS, load_info
from icf.data.sample import Sample

MANIFEST_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("subset", pa.string()),
        ("frame_paths", pa.list_(pa.string())),
        ("mask_paths", pa.list_(pa.string())),
        ("gt_frames", pa.list_(pa.bool_())),
        ("audio_path", pa.string()),
        ("classes", pa.list_(pa.string())),
        ("n_frames", pa.int32()),
        ("extra", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("digest", pa.string()),
    ]
)
MAX_ERRORS = 3  # problems listed per row; the rest are counted


def _image_size(path: str) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` of an image, checked without decoding pixels.

    Raises ``ValueError`` naming the file: missing, unreadable, corrupt PNG chunk, truncated JPEG.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {missing_reason(Path(path))}")
    try:
        with Image.open(path) as img:
            size, mode, fmt = img.size, img.mode, img.format
            if fmt == "PNG":
                img.verify()  # walks every chunk and checks its CRC; no inflate
    except Exception as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None
    if fmt == "JPEG":
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 64))
            if b"\xff\xd9" not in fh.read():
                raise ValueError(f"{path}: truncated JPEG (no end-of-image marker)")
    return size, mode


def _metadata_errors(sample: Sample) -> list[str]:
    info = load_info(sample.dataset)
    errors = []
    if sample.split not in SPLITS:
        errors.append(f"unknown split {sample.split!r} (expected {', '.join(SPLITS)})")
    for name in sample.classes:
        if name not in info.classes:
            errors.append(f"unknown class {name!r} (not in manifests/{sample.dataset}.toml)")
    return errors


def _media_errors(sample: Sample) -> list[str]:
    info = load_info(sample.dataset)
    errors = []
    for frame, mask in zip(sample.frame_paths, sample.mask_paths):
        try:
            frame_size, _ = _image_size(frame)
        except ValueError as err:
            errors.append(str(err))
            frame_size = None
        if not mask:
            continue
        try:
            mask_size, mode = _image_size(mask)
        except ValueError as err:
            errors.append(str(err))
            continue
        if info.mask_kind == "semantic" and mode not in INDEX_MODES + COLOUR_MODES:
            errors.append(f"{mask}: class mask must be a class-index (L, P) or palette-colour (RGB) PNG, found mode {mode}")
        if frame_size is not None and mask_size != frame_size:
            errors.append(
                f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its frame is {frame_size[0]}x{frame_size[1]}"
            )
    try:
        check_wav(sample.audio_path)
    except ValueError as err:
        errors.append(str(err))
    return errors


def check_sample(sample: Sample, check_media: bool = True) -> str:
    """Everything wrong with one Sample, as one line (``""`` when it is usable).

    Checks the split and class names against the manifest and, with ``check_media``, that every frame,
    every GT mask (same size as its frame) and the WAV exist and are readable. At most
    ``MAX_ERRORS`` problems are spelled out; each names the file and the reason.
    """
    errors = _metadata_errors(sample)
    if check_media:
        errors += _media_errors(sample)
    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"and {len(errors) - MAX_ERRORS} more problems"]
    return "; ".join(errors)


def sample_key(uid: str) -> str:
    """WebDataset key of a clip in the tar shards: the uid with dots replaced (the key ends at the first dot)."""
    return uid.replace(".", "_")


def _uid_errors(samples: list[Sample]) -> list[str]:
    """Per row, why its uid cannot be used: an earlier row has it, or an earlier row's uid has the same
    WebDataset key (``abc.1`` and ``abc_1``), or it is a path that climbs out (``..``, absolute)."""
    seen: set[str] = set()
    keys: dict[str, str] = {}
    out = []
    for s in samples:
        parts = s.uid.replace("\\", "/").split("/")
        if not s.uid.strip() or s.uid.startswith("/") or any(p in ("", ".", "..") for p in parts):
            out.append(f"uid {s.uid!r} is not a plain relative name (empty, absolute, or with '.'/'..' parts)")
        elif s.uid in seen:
            out.append(f"duplicate uid {s.uid!r} (an earlier CSV row has it)")
        elif sample_key(s.uid) in keys:
            out.append(f"uid {s.uid!r} collides with the earlier uid {keys[sample_key(s.uid)]!r}: both are the "
                       f"WebDataset key {sample_key(s.uid)!r}")
        else:
            out.append("")
        seen.add(s.uid)
        keys.setdefault(sample_key(s.uid), s.uid)
    return out


def sample_files(sample: Sample) -> list[str]:
    """Every file a clip is read from: frames, GT masks, the WAV."""
    return [*sample.frame_paths, *(m for m in sample.mask_paths if m), sample.audio_path]


def outside_root(sample: Sample, root: Path) -> str:
    """The first of the clip's files whose path leaves ``root`` (``..`` in the CSV), as a reason, or ``""``.

    Paths are normalised, not resolved, so a dataset whose folders are symlinks still works."""
    base = os.path.normpath(os.path.abspath(root))
    for path in sample_files(sample):
        full = os.path.normpath(os.path.abspath(path))
        if os.path.commonpath([base, full]) != base:
            return f"{path}: outside the dataset root {base} (path traversal in the CSV?)"
    return ""


def _stat(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def row_digest(row: Mapping[str, Any], files: Sequence[list[int] | None], problem: str) -> str:
    """The clip's input signature: its manifest fields, its files' size/mtime, and any CSV-level problem."""
    payload = json.dumps([dict(row), list(files), problem], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


Progress = Callable[[int, int], None]
Previous = Mapping[str, Mapping[str, Any]]  # uid → an earlier manifest row (its digest, status and error)


def build_manifest(
    dataset: str,
    root: str | Path,
    splits: Sequence[str] | None = None,
    check_media: bool = True,
    workers: int = 8,
    progress: Progress | None = None,
    previous: Previous | None = None,
) -> pa.Table:
    """The manifest of ``dataset`` under ``root``: one row per CSV row (in CSV order), optionally only
    ``splits``.

    Columns: :meth:`Sample.to_row` fields, ``status`` (``ok`` | ``failed``), ``error`` (``""`` when
    ok) and ``digest``, typed by :data:`MANIFEST_SCHEMA`. Bad rows never raise (a malformed CSV row is a
    failed row with no files); ``UserError`` is raised for an unknown dataset or split, a missing root, a
    missing CSV or one with the wrong columns. Media checks run on a pool of ``workers`` threads (they are
    I/O bound); ``progress(done, total)`` is called as rows are checked. A row whose digest equals its
    ``previous`` row's keeps that row's verdict without re-reading its files.
    """
    loaded = load_rows(dataset, root, splits)
    samples = [s for s, _ in loaded]
    rows = [(s, problem or uid_err) for (s, problem), uid_err in zip(loaded, _uid_errors(samples))]
    previous = previous or {}

    def check(item: tuple[Sample, str]) -> tuple[str, str]:
        sample, problem = item
        problem = problem or outside_root(sample, Path(root))
        base = sample.to_row()
        digest = row_digest(base, [] if problem else [_stat(p) for p in sample_files(sample)], problem)
        before = previous.get(sample.uid)
        if before is not None and before.get("digest") == digest:
            return digest, before["error"] or ""
        return digest, problem or check_sample(sample, check_media)

    found = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(check, rows):
            found.append(result)
            if progress is not None:
                progress(len(found), len(rows))
    table_rows = []
    for sample, (digest, error) in zip(samples, found):
        table_rows.append({**sample.to_row(), "status": "failed" if error else "ok", "error": error, "digest": digest})
    return pa.Table.from_pylist(table_rows, schema=MANIFEST_SCHEMA)


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as parquet at ``path`` atomically (temp file in the same folder + ``os.replace``),
    so a killed run never leaves a half-written manifest. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_samples(table: pa.Table, ok_only: bool = True) -> list[Sample]:
    """Samples back from a manifest table (only the ``ok`` rows unless ``ok_only`` is False)."""
    return [Sample.from_row(r) for r in table.to_pylist() if r["status"] == "ok" or not ok_only]
