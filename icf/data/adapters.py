"""What the three AVSBench adapters share: reading the metadata CSV and turning a row into a Sample.

The on-disk layout of each dataset is described by path templates in its manifest TOML
(``[layout]``), formatted with the CSV row; the per-dataset modules (:mod:`icf.data.s4`,
:mod:`icf.data.ms3`, :mod:`icf.data.avss`) only say which subset a row belongs to, which classes it
names and which fields to keep. Adapters build Samples from the CSV and never open media; the index
stage (:mod:`icf.stages.index`) checks the files.

Two levels of trouble: a problem with the dataset as a whole (missing root or CSV, wrong header,
undecodable CSV, an unterminated quote) raises ``UserError``; a problem with one row (wrong number of fields, unknown AVSS
label) is a :class:`RowError`, which :func:`load_rows` keeps as that row's reason and
:func:`load_samples` raises as a ``UserError``.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from icf.clitools import UserError
from icf.data.datasets import SPLITS, DatasetInfo
from icf.data.sample import DATASETS, Sample

Row = dict[str, str]


def check_root(root: str | Path) -> Path:
    """The dataset root as an absolute path; ``UserError`` if it is not an existing folder."""
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: --root is a file; give the dataset folder that holds the metadata CSV")
    if not path.is_dir():
        raise UserError(f"{path}: dataset root not found (expected the folder that holds the metadata CSV)")
    return path.resolve()


class RowError(ValueError):
    """One CSV row cannot become a Sample (wrong number of fields, unknown subset); names the reason."""


def read_csv(root: Path, info: DatasetInfo) -> list[tuple[int, Row, str]]:
    """Rows of the dataset's metadata CSV as ``(line number, {column: value}, problem)``.

    ``problem`` is ``""`` for a well-formed row; a row with the wrong number of fields keeps the fields
    it has (missing ones ``""``) and says so. Raises ``UserError`` naming the file when it is missing,
    unreadable or not UTF-8, when its header is not exactly ``info.csv.columns``, or when a record is
    malformed (an unterminated quote), naming the line.
    """
    path = root / info.csv.file
    if not path.is_file():
        raise UserError(f"{path}: metadata CSV not found (is --root the folder that holds {info.csv.file}?)")
    expected = list(info.csv.columns)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, None)
            if header != expected:
                found = ",".join(header) if header else "an empty file"
                raise UserError(f"{path}: expected columns {','.join(expected)}, found {found}")
            rows = []
            for start, fields in _records(reader, path):
                if not fields:
                    continue
                problem = "" if len(fields) == len(expected) else f"expected {len(expected)} fields, found {len(fields)}"
                rows.append((start, dict(zip(expected, fields + [""] * len(expected))), problem))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable metadata CSV ({err})") from None
    return rows


def _records(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each record of a strict ``csv.reader``. No metadata field holds a line
    break, so a record that spans lines means an unterminated quote, which would swallow the rows after it:
    ``UserError`` naming the line where it starts (as for any other quoting error)."""
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader, None)
        except csv.Error as err:
            raise UserError(f"{path}:{start}: malformed CSV record ({err}; an unterminated quote?)") from None
        if fields is None:
            return
        if reader.line_num > start:
            raise UserError(f"{path}:{start}: a quoted field runs over lines {start}-{reader.line_num} "
                            "(an unterminated quote?)")
        yield start, fields
def clip_paths(
    info: DatasetInfo, root: Path, row: Row, subset: str, mask_template: str = ""
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[bool, ...], str]:
    """``(frame_paths, mask_paths, gt_frames, audio_path)`` of one CSV row, from the layout templates
    (``mask_template`` replaces the layout's ``mask`` when given).

    ``mask_paths[t]`` is ``""`` where frame ``t`` has no GT in this split (S4 train, AVSS v1s train).
    """
    sub = info.subset(subset)
    split = row[info.csv.split]
    gt = sub.gt_frames(split)
    lay = info.layout

    def path(template: str, t: int | None = None) -> str:
        fields = dict(row, n=lay.first_frame + t) if t is not None else row
        return str(root / template.format_map(fields))

    frames = tuple(path(lay.frame, t) for t in range(sub.n_frames))
    masks = tuple(path(mask_template or lay.mask, t) if gt[t] else "" for t in range(sub.n_frames))
    return frames, masks, gt, path(lay.audio)


def make_sample(
    info: DatasetInfo,
    root: Path,
    row: Row,
    subset: str,
    classes: tuple[str, ...],
    extra: dict[str, str],
    mask_template: str = "",
) -> Sample:
    """A :class:`Sample` for one CSV row whose subset, class names and extra fields are known."""
    frames, masks, gt, audio = clip_paths(info, root, row, subset, mask_template)
    return Sample(
        uid=row[info.csv.id],
        dataset=info.name,
        split=row[info.csv.split],
        subset=subset,
        frame_paths=frames,
        mask_paths=masks,
        gt_frames=gt,
        audio_path=audio,
        classes=classes,
        n_frames=len(frames),
        extra=extra,
    )


def class_tokens(info: DatasetInfo, value: str) -> tuple[str, ...]:
    """Sounding-class names named by a CSV classes field: split on the separator, typos mapped by
    ``aliases``, tokens in ``not_objects`` (``off-the-screen``, ``background``) dropped, order kept."""
    parts = value.split(info.csv.class_separator) if info.csv.class_separator else [value]
    names = (info.csv.aliases.get(p, p) for p in parts if p)
    return tuple(dict.fromkeys(n for n in names if n not in info.csv.not_objects))


def broken_sample(info: DatasetInfo, row: Row, where: str) -> Sample:
    """A stand-in for a row that cannot become a Sample: no files, uid from the row (or ``where``)."""
    return Sample(
        uid=row.get(info.csv.id) or where,
        dataset=info.name,
        split=row.get(info.csv.split, ""),
        subset=row.get(info.csv.subset, "") if info.csv.subset else info.name,
        frame_paths=(),
        mask_paths=(),
        gt_frames=(),
        audio_path="",
        classes=(),
        n_frames=0,
    )


def rows_to_samples(
    info: DatasetInfo,
    root: str | Path,
    splits: Sequence[str] | None,
    sample_from_row: Callable[[DatasetInfo, Path, Row], Sample],
) -> list[tuple[Sample, str]]:
    """``(Sample, problem)`` for every CSV row (in file order) whose split is in ``splits`` (all rows when
    None, including rows with an unknown split, which the index marks failed).

    ``sample_from_row`` is the dataset's row → Sample rule; a :class:`RowError` it raises, like a row
    with the wrong number of fields, gives :func:`broken_sample` and ``"csv-path:line: reason"``.
    Raises ``UserError`` for an unknown split name, a missing root or CSV, or a wrong header.
    """
    unknown = [s for s in splits or () if s not in SPLITS]
    if unknown:
        raise UserError(f"unknown split {unknown[0]!r}; expected some of {', '.join(SPLITS)}")
    path = check_root(root)
    out = []
    for line, row, problem in read_csv(path, info):
        if splits is not None and row[info.csv.split] not in splits:
            continue
        where = f"{path / info.csv.file}:{line}"
        try:
            if problem:
                raise RowError(problem)
            out.append((sample_from_row(info, path, row), ""))
        except RowError as err:
            out.append((broken_sample(info, row, where), f"{where}: {err}"))
    return out


def load_rows(
    dataset: str, root: str | Path, splits: Sequence[str] | None = None
) -> list[tuple[Sample, str]]:
    """``(Sample, problem)`` for every CSV row of ``dataset`` under ``root`` (in CSV order), optionally only
    ``splits``; ``problem`` is ``""`` or names the CSV line and why the row is unusable.

    ``root`` is the folder that holds the metadata CSV (``Single-source/``, ``Multi-sources/``,
    ``AVSS/``). Dispatches to ``icf.data.<dataset>.load``. Raises ``UserError`` for an unknown dataset
    or split, a missing root or CSV, or a wrong header.
    """
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return importlib.import_module(f"icf.data.{dataset}").load(root, splits)


def load_samples(dataset: str, root: str | Path, splits: Sequence[str] | None = None) -> list[Sample]:
    """Samples of every CSV row, as :func:`load_rows`, but a malformed row is a ``UserError`` too."""
    rows = load_rows(dataset, root, splits)
    problems = [p for _, p in rows if p]
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more bad rows)" if len(problems) > 1 else ""))
    return [s for s, _ in rows]
