"""The manifest: one row per CSV row of a dataset, with the clip's paths and whether its files are usable.

:func:`build_manifest` is the library behind ``icf stage index``: adapters turn the CSV into Samples,
:func:`check_sample` checks each one's metadata and (cheaply) its files, and every row is kept with
``status`` ``ok`` or ``failed`` and an ``error`` that names the file (or CSV line) and the reason. Only
problems with the dataset as a whole (unknown dataset, missing root or CSV, wrong header) raise
``UserError``.

Media checks read headers, never full decodes: images are opened with PIL (PNG chunks CRC-verified,
JPEGs checked for their end-of-image marker), WAVs with ``soundfile.info`` plus a RIFF size check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from icf.data.adapters import load_rows
from icf.data.io import COLOUR_MODES, INDEX_MODES, check_wav
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
    ]
)
MAX_ERRORS = 3  # problems listed per row; the rest are counted


def _image_size(path: str) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` of an image, checked without decoding pixels.

    Raises ``ValueError`` naming the file: missing, unreadable, corrupt PNG chunk, truncated JPEG.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing file")
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


def _duplicate_errors(samples: list[Sample]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in samples:
        out.append(f"duplicate uid {s.uid!r} (an earlier CSV row has it)" if s.uid in seen else "")
        seen.add(s.uid)
    return out


Progress = Callable[[int, int], None]


def build_manifest(
    dataset: str,
    root: str | Path,
    splits: Sequence[str] | None = None,
    check_media: bool = True,
    workers: int = 8,
    progress: Progress | None = None,
) -> pa.Table:
    """The manifest of ``dataset`` under ``root``: one row per CSV row (in CSV order), optionally only
    ``splits``.

    Columns: :meth:`Sample.to_row` fields, ``status`` (``ok`` | ``failed``) and ``error`` (``""`` when
    ok), typed by :data:`MANIFEST_SCHEMA`. Bad rows never raise (a malformed CSV row is a failed row
    with no files); ``UserError`` is raised for an unknown dataset or split, a missing root, a missing
    CSV or one with the wrong columns. Media checks run on a pool of ``workers`` threads (they are I/O
    bound); ``progress(done, total)`` is called as rows are checked.
    """
    rows = load_rows(dataset, root, splits)
    samples = [s for s, _ in rows]

    def check(item: tuple[Sample, str]) -> str:
        sample, problem = item
        return problem or check_sample(sample, check_media)

    found = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for error in pool.map(check, rows):
            found.append(error)
            if progress is not None:
                progress(len(found), len(rows))
    table_rows = []
    for sample, dup, err in zip(samples, _duplicate_errors(samples), found):
        error = "; ".join(e for e in (dup, err) if e)
        table_rows.append({**sample.to_row(), "status": "failed" if error else "ok", "error": error})
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
