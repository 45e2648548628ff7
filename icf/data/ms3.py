"""AVSBench-object Multi-sources (MS3) adapter: ``ms3_meta_data.csv`` (``video_id,split``).

Layout (``manifests/ms3.toml``): frames ``ms3_data/visual_frames/{id}/{id}.mp4_{1..5}.png`` (no split
folder, ``.mp4_`` infix), masks ``ms3_data/gt_masks/{split}/{id}/{id}_{1..5}.png`` (all frames, all
splits), audio ``ms3_data/audio_wav/{split}/{id}.wav``. The CSV names no classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from icf.data.adapters import Row, make_sample, rows_to_samples
from icf.data.datasets import DatasetInfo, load_info
from icf.data.sample import Sample


def sample_from_row(info: DatasetInfo, root: Path, row: Row) -> Sample:
    """One CSV row → Sample (no classes, no extra fields)."""
    return make_sample(info, root, row, "ms3", (), {})


def load(root: str | Path, splits: Sequence[str] | None = None) -> list[tuple[Sample, str]]:
    """``(Sample, problem)`` per CSV row under ``root`` (the ``Multi-sources/`` folder), in CSV order."""
    return rows_to_samples(load_info("ms3"), root, splits, sample_from_row)
