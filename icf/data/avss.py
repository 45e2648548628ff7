"""AVSBench-semantic (AVSS) adapter: ``metadata.csv`` (``vid,uid,s_min,s_sec,a_obj,split,label``).

Layout (``manifests/avss.toml``): ``{label}/{uid}/frames/{0..T-1}.jpg``, ``audio.wav``,
``labels_semantic/{i}.png`` (class ids) and ``labels_rgb/{i}.png`` (palette colours), T = 5 for v1s/v1m
and 10 for v2; v1s train has GT on frame 0 only. The Sample's masks are the ``labels_semantic`` PNGs; a
clip that ships only ``labels_rgb`` (what the official loader reads) gets those instead, and
:func:`icf.data.io.read_mask` maps their colours back to class ids. ``a_obj`` is a ``_``-joined list of
sounding classes; ``h orse`` is read as ``horse`` and ``off-the-screen`` / ``background`` name no
on-screen object (they are kept verbatim in ``extra['a_obj']``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from icf.clitools import UserError
from icf.data.adapters import Row, RowError, check_root, class_tokens, make_sample, rows_to_samples
from icf.data.datasets import DatasetInfo, load_info
from icf.data.sample import Sample


def check_class_index(root: Path, info: DatasetInfo) -> None:
    """If ``root`` holds ``label2idx.json``, it must map every class to its manifest id + offset.

    The manifest is the source of truth (the file may be absent); a file that disagrees means the tree
    uses another class numbering, and its ``labels_semantic`` ids would be misread: ``UserError``.
    """
    path = root / info.class_index_file
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable class index ({err})") from None
    expected = {name: i + info.class_index_offset for i, name in enumerate(info.classes)}
    if not isinstance(found, dict):
        raise UserError(f"{path}: expected a JSON object {{class name: index}}")
    for name in dict.fromkeys([*expected, *found]):
        if found.get(name) != expected.get(name):
            raise UserError(
                f"{path}: {name!r} -> {found.get(name)} but manifests/{info.name}.toml says {expected.get(name)}"
            )


def mask_template(info: DatasetInfo, root: Path, row: Row) -> str:
    """The layout template of this clip's masks: ``labels_semantic``, or ``labels_rgb`` when only that
    folder exists."""
    first = dict(row, n=info.layout.first_frame)
    semantic = (root / info.layout.mask.format_map(first)).parent
    colour = (root / info.layout.color_mask.format_map(first)).parent
    return info.layout.color_mask if not semantic.is_dir() and colour.is_dir() else info.layout.mask


def sample_from_row(info: DatasetInfo, root: Path, row: Row) -> Sample:
    """One CSV row → Sample. Raises ``RowError`` for a ``label`` that is not a known subset (its frame
    count is unknown)."""
    subset = row[info.csv.subset]
    if subset not in info.subsets:
        raise RowError(f"unknown label {subset!r}; expected one of {', '.join(info.subsets)}")
    extra = {k: row[k] for k in ("vid", "s_min", "s_sec", info.csv.classes)}
    classes = class_tokens(info, row[info.csv.classes])
    return make_sample(info, root, row, subset, classes, extra, mask_template(info, root, row))


def load(root: str | Path, splits: Sequence[str] | None = None) -> list[tuple[Sample, str]]:
    """``(Sample, problem)`` per CSV row under ``root`` (the ``AVSS/`` folder), in CSV order, all three
    subsets. A ``label2idx.json`` that disagrees with the manifest is a ``UserError``."""
    info = load_info("avss")
    check_class_index(check_root(root), info)
    return rows_to_samples(info, root, splits, sample_from_row)
