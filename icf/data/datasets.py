"""Dataset descriptors: ``manifests/{s4,ms3,avss}.toml`` loaded into typed, frozen records, the one home of
every dataset fact (classes, palette, layouts, frames per clip, segment divisor, train crop rule, binary or
semantic masks); config, encoders, stages, metrics and the synthetic generator derive theirs from it.

The TOML files are the project's single source of truth for class lists, palettes, frame counts,
ground-truth rules, CSV names/columns, on-disk path templates and expected split sizes. Adapters, the
synthetic generator, metrics and shard writers read them through :func:`load_info`; no other module
keeps its own class list.

The files live in the project root (``manifests/``, the one copy that is edited and reviewed). This
package reaches them through ``icf/descriptors``, a symlink to that folder, which a wheel or a
plain ``pip install .`` ships as package data (``pyproject.toml``), so editable and regular installs
read the same files.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from icf.data.sample import DATASETS

MANIFEST_DIR = Path(__file__).parents[1] / "descriptors"
SPLITS = ("train", "val", "test")

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class SubsetInfo:
    """One subset of a dataset (S4 and MS3 have one; AVSS has v1s, v1m, v2).

    Attributes:
        name: subset name (the AVSS ``label`` value; the dataset name for S4/MS3).
        n_frames: T, frames per clip (one per second).
        audio_seconds: nominal audio length in seconds.
        gt_only: per split, the 0-based frames that carry GT; a split not listed has GT everywhere.
        split_sizes: clips per split in the real release.
        uid_pattern: how the clip id is built from CSV fields (AVSS only, documentation + synth).
    """

    name: str
    n_frames: int
    audio_seconds: float
    gt_only: dict[str, tuple[int, ...]]
    split_sizes: dict[str, int]
    uid_pattern: str = ""

    def gt_frames(self, split: str) -> tuple[bool, ...]:
        """Per-frame GT flags for a clip of this subset in ``split`` (length ``n_frames``)."""
        if split not in self.gt_only:
            return (True,) * self.n_frames
        keep = set(self.gt_only[split])
        return tuple(t in keep for t in range(self.n_frames))


@dataclass(frozen=True)
class CsvInfo:
    """The metadata CSV: file name, exact header, and which columns mean what."""

    file: str
    columns: tuple[str, ...]
    id: str
    split: str
    subset: str  # column naming the subset, "" when the dataset has a single subset
    classes: str  # column naming the sounding classes, "" when the CSV names none
    class_separator: str  # splits the classes field into names, "" = the field is one name
    trailing_newline: bool
    aliases: dict[str, str] = field(default_factory=dict)  # typo -> class name
    not_objects: tuple[str, ...] = ()  # tokens that name no on-screen sounding object


@dataclass(frozen=True)
class LayoutInfo:
    """Path templates relative to the dataset root, formatted with the CSV row and ``n``.

    ``n`` is the on-disk frame number: ``first_frame + t`` for the 0-based frame index ``t``.
    """

    first_frame: int
    frame: str
    mask: str
    audio: str
    color_mask: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """Everything the code needs to know about one AVSBench dataset (one TOML file).

    Attributes:
        name: ``s4`` | ``ms3`` | ``avss``.
        mask_kind: ``binary`` (0/255 PNGs → 0/1) or ``semantic`` (class-index PNGs).
        classes: class names in id order (AVSS: 71 incl. background at 0; S4: 23; MS3: none).
        palette: RGB colour per mask value (AVSS: 71 official colours; binary: black, white).
        vocabulary: dataset whose object classes describe this dataset's content (MS3 → ``avss``).
        to_avss: S4 category → AVSS class name (empty elsewhere).
        start_column / video_seconds: S4 clip trimming (``start``; 10 s raw videos), see
            :meth:`audio_seconds`.
        class_index_file / class_index_offset: AVSS ``label2idx.json`` and its id offset (value − 1).
        segment_divisor: segment windows hold ⌈T / segment_divisor⌉ frames (ICF §3.2: 2 for S4/MS3, 4 for AVSS).
        train_crop: whether train frames are centre-cropped to a square (else resized) when sharded.
    """

    name: str
    title: str
    mask_kind: str
    sample_rate: int
    image_size: int
    classes: tuple[str, ...]
    palette: tuple[RGB, ...]
    csv: CsvInfo
    layout: LayoutInfo
    subsets: dict[str, SubsetInfo]
    vocabulary: str
    to_avss: dict[str, str]
    start_column: str = ""
    video_seconds: float = 0.0
    class_index_file: str = ""
    class_index_offset: int = 0
    segment_divisor: int = 2
    train_crop: bool = False

    @property
    def binary(self) -> bool:
        """Binary masks (S4, MS3: one mask logit) rather than class-index masks (AVSS)."""
        return self.mask_kind == "binary"

    @property
    def num_logits(self) -> int:
        """Mask logits per pixel a model predicts: 1 for binary datasets, one per class (71) for AVSS."""
        return 1 if self.binary else self.num_classes

    def crops(self, split: str) -> bool:
        """Whether frames of ``split`` are centre-cropped when sharded (the train split of ``train_crop`` datasets)."""
        return self.train_crop and split == "train"

    @property
    def num_classes(self) -> int:
        """Number of entries in :attr:`classes` (71 for AVSS)."""
        return len(self.classes)

    @property
    def max_frames(self) -> int:
        """Largest T over the subsets (10 for AVSS, 5 otherwise)."""
        return max(s.n_frames for s in self.subsets.values())

    @property
    def split_sizes(self) -> dict[str, int]:
        """Clips per split in the real release, summed over subsets."""
        return {sp: sum(s.split_sizes.get(sp, 0) for s in self.subsets.values()) for sp in SPLITS}

    def class_id(self, name: str) -> int:
        """Index of ``name`` in :attr:`classes` (raises ``KeyError`` naming the dataset)."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not a {self.name} class (manifests/{self.name}.toml)") from None

    def subset(self, name: str) -> SubsetInfo:
        """The :class:`SubsetInfo` called ``name`` (raises ``KeyError`` listing the known ones)."""
        try:
            return self.subsets[name]
        except KeyError:
            raise KeyError(f"unknown {self.name} subset {name!r}; expected one of {sorted(self.subsets)}") from None

    def audio_seconds(self, subset: str, row: dict[str, str]) -> float:
        """Expected audio length of one CSV row: the subset's nominal length, except S4 clips that
        start after second ``video_seconds - audio_seconds`` of their raw video, which are shorter
        (``t = 5 if start <= 5 else 10 - start`` in the official preprocessing)."""
        nominal = self.subset(subset).audio_seconds
        if not self.start_column:
            return nominal
        return min(nominal, self.video_seconds - float(row[self.start_column]))


def _subset(raw: dict) -> SubsetInfo:
    return SubsetInfo(
        name=raw["name"],
        n_frames=int(raw["frames"]),
        audio_seconds=float(raw["audio_seconds"]),
        gt_only={split: tuple(int(t) for t in frames) for split, frames in raw.get("gt_frames", {}).items()},
        split_sizes={k: int(v) for k, v in raw["split_sizes"].items()},
        uid_pattern=raw.get("uid", ""),
    )


def parse_info(raw: dict) -> DatasetInfo:
    """Build a :class:`DatasetInfo` from the parsed TOML dict (checks the invariants it relies on)."""
    c = raw["csv"]
    tokens = c.get("tokens", {})
    info = DatasetInfo(
        name=raw["name"],
        title=raw["title"],
        mask_kind=raw["mask_kind"],
        sample_rate=int(raw["sample_rate"]),
        image_size=int(raw["image_size"]),
        classes=tuple(raw["classes"]),
        palette=tuple(tuple(int(v) for v in rgb) for rgb in raw["palette"]),
        csv=CsvInfo(
            file=c["file"],
            columns=tuple(c["columns"]),
            id=c["id"],
            split=c["split"],
            subset=c.get("subset", ""),
            classes=c.get("classes", ""),
            class_separator=c.get("class_separator", ""),
            trailing_newline=bool(c.get("trailing_newline", True)),
            aliases=dict(tokens.get("aliases", {})),
            not_objects=tuple(tokens.get("not_objects", ())),
        ),
        layout=LayoutInfo(**raw["layout"]),
        subsets={s["name"]: _subset(s) for s in raw["subsets"]},
        vocabulary=raw.get("vocabulary", raw["name"]),
        to_avss=dict(raw.get("to_avss", {})),
        start_column=raw.get("clip", {}).get("start_column", ""),
        video_seconds=float(raw.get("clip", {}).get("video_seconds", 0.0)),
        class_index_file=raw.get("class_index", {}).get("file", ""),
        class_index_offset=int(raw.get("class_index", {}).get("offset", 0)),
        segment_divisor=int(raw["segment_divisor"]),
        train_crop=bool(raw["train_crop"]),
    )
    if info.mask_kind not in ("binary", "semantic"):
        raise ValueError(f"{info.name}: mask_kind must be binary or semantic, not {info.mask_kind!r}")
    if info.mask_kind == "semantic" and len(info.palette) != len(info.classes):
        raise ValueError(f"{info.name}: {len(info.palette)} palette colours for {len(info.classes)} classes")
    if info.mask_kind == "binary" and len(info.palette) != 2:
        raise ValueError(f"{info.name}: a binary dataset needs exactly 2 palette colours")
    if len(set(info.classes)) != len(info.classes):
        raise ValueError(f"{info.name}: duplicate class names")
    for col in (info.csv.id, info.csv.split, info.csv.subset, info.csv.classes, info.start_column):
        if col and col not in info.csv.columns:
            raise ValueError(f"{info.name}: column {col!r} is not in csv.columns {info.csv.columns}")
    return info


@cache
def load_info(dataset: str) -> DatasetInfo:
    """The descriptor of ``dataset`` (``s4`` | ``ms3`` | ``avss``), read once from ``manifests/``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    path = MANIFEST_DIR / f"{dataset}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset manifest not found (this icf install lacks its package data)")
    with path.open("rb") as fh:
        return parse_info(tomllib.load(fh))


def object_vocabulary(dataset: str) -> tuple[str, ...]:
    """Names of the objects that can sound in ``dataset``: its own classes, or those of its
    :attr:`DatasetInfo.vocabulary` dataset (MS3 → AVSS), without ``background``."""
    info = load_info(dataset)
    source = load_info(info.vocabulary) if info.vocabulary != dataset else info
    return tuple(c for c in source.classes if c != "background")
