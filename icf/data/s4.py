"""AVSBench-object Single-source (S4) adapter: ``s4_meta_data.csv`` (``name,start,category,split``).

Layout (``manifests/s4.toml``): ``s4_data/visual_frames/{split}/{category}/{name}/{name}_{1..5}.png``,
masks at the same place under ``gt_masks`` (train: only ``_1.png``), audio
``s4_data/audio_wav/{split}/{category}/{name}.wav``. Clips with ``start`` = 6 have 4 s of audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from icf.data.adapters import Row, class_tokens, make_sample, rows_to_samples
from icf.data.datasets import DatasetInfo, load_info
from icf.data.sample import Sample


def sample_from_row(info: DatasetInfo, root: Path, row: Row) -> Sample:
    """One CSV row → Sample; the category is the single sounding class, ``start`` kept in ``extra``."""
    classes = class_tokens(info, row[info.csv.classes])
    return make_sample(info, root, row, "s4", classes, {info.start_column: row[info.start_column]})


def load(root: str | Path, splits: Sequence[str] | None = None) -> list[tuple[Sample, str]]:
    """``(Sample, problem)`` per CSV row under ``root`` (the ``Single-source/`` folder), in CSV order."""
    return rows_to_samples(load_info("s4"), root, splits, sample_from_row)
