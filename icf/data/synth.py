"""Synthetic AVSBench trees: the real on-disk layout, procedural content with audio-visual structure.

``synthesize(layout, out, clips, seed)`` writes a folder that the S4 / MS3 / AVSS adapters read exactly
like the real release (same CSV name and columns, folders, file names and types, GT availability;
``manifests/*.toml`` supplies every template). Content (Decisions D7):

* each class has a visual signature (shape, two-colour pattern, hue) and an audio signature
  (fundamental, number of harmonics, AM and FM rates), see :func:`signatures`;
* objects sit in distinct cells of a 3×3 grid, move linearly and scale across frames; sources sound
  in a random subset of the seconds (frame t ↔ second t); masks cover exactly the visible objects that
  sound in that second; silent distractors of other classes are visible;
* some clips add an off-screen source (sound, no object), some are silent, some have only an
  off-screen source; background noise at ``snr_db`` relative to one source at full level;
* S4 / AVSS v1s clips have one source, MS3 / AVSS v1m clips 2–3, AVSS v2 clips 1–3.

Deterministic: the same arguments give the same bytes (PIL with fixed parameters, no timestamps).
The per-clip schedule (:class:`ClipPlan`) comes from :func:`plan_clips`; the tree holds no extra files.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from icf.data.adapters import clip_paths
from icf.data.io import colorize
from icf.data.datasets import DatasetInfo, load_info, object_vocabulary
from icf.data.sample import DATASETS

AVSS_SUBSET_SHARES = {"v1s": 0.35, "v1m": 0.25, "v2": 0.40}  # more v1m than the real 4%, so each split has some
S4_STARTS = {0: 0.55, 1: 0.06, 2: 0.07, 3: 0.06, 4: 0.06, 5: 0.15, 6: 0.05}  # start=6 → a 4 s clip
KINDS = {"normal": 0.75, "offscreen": 0.10, "silent": 0.075, "offscreen_only": 0.075}
ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
SHAPES = ("circle", "square", "diamond", "triangle", "ring", "cross", "hexagon", "ellipse")
PATTERNS = ("solid", "hstripes", "vstripes", "checker", "rings", "diagonal")
SOUND_PROB = 0.7  # chance that a source sounds in a given second
JPEG_QUALITY = 90
PNG_LEVEL = 1


@dataclass(frozen=True)
class Signature:
    """How one class looks and sounds."""

    shape: str
    pattern: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    f0: float  # Hz
    harmonics: int
    am_rate: float  # Hz of amplitude modulation (0 = steady)
    fm_rate: float  # Hz of the ±3 % vibrato


@dataclass(frozen=True)
class Track:
    """One visible object: class, linear motion of its centre and scale (fractions of the image side)
    from the first to the last frame, and per second whether it sounds."""

    name: str
    start: tuple[float, float]  # (x, y) centre at frame 0
    end: tuple[float, float]  # (x, y) centre at frame T-1
    scale: tuple[float, float]  # half-extent at frame 0 and frame T-1
    sounding: tuple[bool, ...]

    def at(self, t: int, n_frames: int) -> tuple[float, float, float]:
        """``(x, y, half_extent)`` at frame ``t`` as fractions of the image side."""
        a = t / max(n_frames - 1, 1)
        lerp = lambda p, q: p + (q - p) * a  # noqa: E731
        return lerp(self.start[0], self.end[0]), lerp(self.start[1], self.end[1]), lerp(*self.scale)


@dataclass(frozen=True)
class ClipPlan:
    """Everything that determines one synthetic clip; rendering is a pure function of it.

    ``objects`` are drawn in order (later on top); ``offscreen`` are (class, per-second sounding) of
    sources that are heard but not seen. ``seconds`` is the audio length (4 for S4 start=6 clips).
    """

    row: dict[str, str]
    uid: str
    split: str
    subset: str
    n_frames: int
    seconds: float
    kind: str
    objects: tuple[Track, ...]
    offscreen: tuple[tuple[str, tuple[bool, ...]], ...]
    seed: int

    def sounding_objects(self, t: int) -> tuple[int, ...]:
        """Indices into ``objects`` of the visible objects that sound in second ``t``."""
        return tuple(i for i, o in enumerate(self.objects) if o.sounding[t])


def select_classes(vocabulary: tuple[str, ...], n: int) -> tuple[str, ...]:
    """``n`` classes spread evenly over ``vocabulary`` (deterministic, independent of the seed)."""
    if not 2 <= n <= len(vocabulary):
        raise ValueError(f"classes must be between 2 and {len(vocabulary)}, got {n}")
    step = len(vocabulary) / n
    return tuple(vocabulary[int(step * i + step / 2)] for i in range(n))


def signatures(names: tuple[str, ...]) -> dict[str, Signature]:
    """Visual and audio signature of each class, by its rank in ``names``: shapes, patterns, hues,
    fundamentals (150–2400 Hz, log-spaced), harmonic counts and modulation rates all differ between
    neighbours, so every pair of classes differs both visually and aurally."""
    out = {}
    n = len(names)
    for r, name in enumerate(names):
        hue = r / n
        bright = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))
        dark = tuple(int(255 * c) for c in colorsys.hsv_to_rgb((hue + 0.08) % 1.0, 0.6, 0.35))
        out[name] = Signature(
            shape=SHAPES[r % len(SHAPES)],
            pattern=PATTERNS[r % len(PATTERNS)],
            colors=(bright, dark),
            f0=150.0 * 2.0 ** (4.0 * r / max(n - 1, 1)),
            harmonics=1 + r % 4,
            am_rate=(0.0, 4.0, 8.0, 13.0)[(r // 2) % 4],
            fm_rate=0.5 + 2.0 * (r % 3),
        )
    return out


# ---------------------------------------------------------------------------------------------- planning


def _largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    weights = np.array(list(shares.values()), dtype=float)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return dict(zip(shares, counts.tolist()))


def _split_counts(n: int, sizes: dict[str, int]) -> dict[str, int]:
    """Clips per split for ``n`` clips in the real proportions, val and test non-empty when n ≥ 3."""
    counts = _largest_remainder(n, sizes)
    if n >= 3:
        for split in ("val", "test"):
            if counts[split] == 0:
                counts[split], counts["train"] = 1, counts["train"] - 1
    return counts


def _youtube_id(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        chars = ID_CHARS[rng.integers(0, len(ID_CHARS), 11)]
        if rng.random() < 0.1:
            chars[0] = "-"  # real ids may start with "-" (a CLI-option lookalike)
        vid = "".join(chars)
        if vid not in taken:
            taken.add(vid)
            return vid


def _schedule(rng: np.random.Generator, n: int, sound: bool) -> tuple[bool, ...]:
    """Per-second sounding flags: at least one second on when ``sound``, all off otherwise."""
    if not sound:
        return (False,) * n
    flags = rng.random(n) < SOUND_PROB
    flags[rng.integers(n)] = True
    return tuple(bool(f) for f in flags)


def _tracks(rng: np.random.Generator, names: list[str], sounding: list[tuple[bool, ...]]) -> tuple[Track, ...]:
    cells = rng.choice(9, size=len(names), replace=False)
    tracks = []
    for name, cell, flags in zip(names, cells, sounding):
        s0 = rng.uniform(0.10, 0.15)
        s1 = s0 * rng.uniform(0.75, 1.3)
        cx, cy = (cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3
        x0, y0 = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
        x1, y1 = x0 + rng.uniform(-0.08, 0.08), y0 + rng.uniform(-0.08, 0.08)
        m = max(s0, s1)
        clamp = lambda v: float(np.clip(v, m, 1 - m))  # noqa: E731  (keep the object inside the image)
        tracks.append(Track(name, (clamp(x0), clamp(y0)), (clamp(x1), clamp(y1)), (s0, s1), flags))
    return tuple(tracks)


def _hold_last(track: Track, seconds: int) -> Track:
    flags = track.sounding[:seconds] + (track.sounding[seconds - 1],) * (len(track.sounding) - seconds)
    return Track(track.name, track.start, track.end, track.scale, flags)


def _n_sources(subset: str, rng: np.random.Generator) -> int:
    if subset in ("s4", "v1s"):
        return 1
    if subset == "v2" and rng.random() < 0.5:
        return 1
    return int(rng.integers(2, 4))


def _plan_clip(
    info: DatasetInfo, subset: str, split: str, vid: str, classes: tuple[str, ...], seed: int
) -> ClipPlan:
    rng = np.random.default_rng(seed)
    sub = info.subset(subset)
    T = sub.n_frames
    kinds = [k for k in KINDS if not (info.name == "s4" and k == "offscreen_only")]
    kind = str(rng.choice(kinds, p=np.array([KINDS[k] for k in kinds]) / sum(KINDS[k] for k in kinds)))
    n_src = min(_n_sources(subset, rng), len(classes) - 1)
    n_dis = min(int(rng.integers(1, 3)), len(classes) - n_src - (kind in ("offscreen", "offscreen_only")))
    order = [str(c) for c in rng.permutation(classes)]
    sources, distractors = order[:n_src], order[n_src : n_src + n_dis]
    on_sound = kind in ("normal", "offscreen")
    flags = [_schedule(rng, T, on_sound) for _ in sources] + [(False,) * T for _ in distractors]
    names = sources + distractors
    perm = rng.permutation(len(names))  # random drawing order: sources are not always on top
    objects = _tracks(rng, [names[i] for i in perm], [flags[i] for i in perm])
    offscreen = ()
    if kind in ("offscreen", "offscreen_only"):
        offscreen = ((order[n_src + n_dis], _schedule(rng, T, True)),)

    row, seconds = _csv_row(info, subset, split, vid, rng, sources, objects, offscreen)
    if seconds < T:  # S4 start=6: the audio stops early; the mel stage repeats the last patch, so the
        objects = tuple(_hold_last(o, int(seconds)) for o in objects)  # frames after it repeat the last second
    return ClipPlan(row, row[info.csv.id], split, subset, T, seconds, kind, objects, offscreen, seed)


def _csv_row(
    info: DatasetInfo,
    subset: str,
    split: str,
    vid: str,
    rng: np.random.Generator,
    sources: list[str],
    objects: tuple[Track, ...],
    offscreen: tuple,
) -> tuple[dict[str, str], float]:
    """The metadata CSV row of a clip and its audio length in seconds."""
    sub = info.subset(subset)
    if info.name == "s4":
        start = int(rng.choice(list(S4_STARTS), p=list(S4_STARTS.values())))
        row = {"name": vid, "start": str(start), "category": sources[0], "split": split}
        return row, info.audio_seconds(subset, row)
    if info.name == "ms3":
        return {"video_id": vid, "split": split}, sub.audio_seconds
    heard = [o.name for o in objects if any(o.sounding)]
    a_obj = "_".join(n for n in sources if n in heard) or ("off-the-screen" if offscreen else "background")
    start = 0 if subset == "v1m" else int(rng.integers(0, 300 if subset == "v2" else 6))
    fields = {"vid": vid, "start_ms": start * 1000, "end_ms": (start + int(sub.audio_seconds)) * 1000}
    uid = sub.uid_pattern.format_map(fields)
    row = {"vid": vid, "uid": uid, "s_min": str(start // 60), "s_sec": str(start % 60), "a_obj": a_obj,
           "split": split, "label": subset}  # fmt: skip
    return row, sub.audio_seconds


def plan_clips(layout: str, clips: int, seed: int, classes: int = 8) -> list[ClipPlan]:
    """The plans of ``clips`` synthetic clips of ``layout`` (``s4`` | ``ms3`` | ``avss``), in CSV order.

    Splits follow the real proportions (``split_sizes`` in the manifest); AVSS clips are shared among
    v1s / v1m / v2 by :data:`AVSS_SUBSET_SHARES`. ``classes`` classes of the layout's vocabulary are used.
    """
    if layout not in DATASETS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(DATASETS)}")
    if clips < 1:
        raise ValueError(f"clips must be at least 1, got {clips}")
    info = load_info(layout)
    names = select_classes(object_vocabulary(layout), classes)
    rng = np.random.default_rng(seed)
    shares = AVSS_SUBSET_SHARES if layout == "avss" else {layout: 1.0}
    taken: set[str] = set()
    plans = []
    for subset, n in _largest_remainder(clips, shares).items():
        counts = _split_counts(n, info.subset(subset).split_sizes) if n else {}
        splits = [s for s, k in counts.items() for _ in range(k)]
        for split in rng.permutation(splits) if splits else []:
            vid = _youtube_id(rng, taken)
            if subset in ("ms3", "v1m") and rng.random() < 0.4:
                vid = f"{vid}_{rng.integers(0, 40)}"  # MS3 / v1m ids may carry a segment suffix
            plans.append(_plan_clip(info, subset, str(split), vid, names, int(rng.integers(2**63))))
    return plans


# ---------------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av, r2 = np.abs(u), np.abs(v), u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":
        return (v <= 0.8) & (au * 1.7 <= v + 0.9)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "hexagon":
        return (av <= 0.866) & (au + 0.577 * av <= 1.0)
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """0/1 per pixel: which of the class's two colours."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "hstripes":
        return np.floor((v + 1) * 2) % 2 == 1
    if pattern == "vstripes":
        return np.floor((u + 1) * 2) % 2 == 1
    if pattern == "checker":
        return (np.floor((u + 1) * 1.5) + np.floor((v + 1) * 1.5)) % 2 == 1
    if pattern == "rings":
        return np.floor(np.sqrt(u * u + v * v) * 2.5) % 2 == 1
    if pattern == "diagonal":
        return np.floor((u + v + 2) * 1.5) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def _background(plan: ClipPlan, size: int) -> np.ndarray:
    """Muted two-colour gradient with fixed grain, ``(size, size, 3)`` float32 in [0, 255]."""
    rng = np.random.default_rng([plan.seed, 1])
    c0, c1 = (
        np.array(colorsys.hsv_to_rgb(rng.random(), 0.25, rng.uniform(0.4, 0.65)), dtype=np.float32) * 255
        for _ in range(2)
    )
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    grain = rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    return c0 * (1 - a) + c1 * a + grain


def render_frame(
    plan: ClipPlan, t: int, size: int, sigs: dict[str, Signature], background: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t`` of a clip: RGB ``(size, size, 3)`` uint8 and the owner map ``(size, size)`` int16
    (index + 1 into ``plan.objects`` of the object seen at each pixel, 0 = background)."""
    rgb = (_background(plan, size) if background is None else background).copy()
    owner = np.zeros((size, size), dtype=np.int16)
    for k, obj in enumerate(plan.objects):
        x, y, s = obj.at(t, plan.n_frames)
        cx, cy, r = x * size, y * size, max(s * size, 1.0)
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, size)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, size)
        v, u = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u, v = (u + 0.5 - cx) / r, (v + 0.5 - cy) / r
        sig = sigs[obj.name]
        inside = _shape_mask(sig.shape, u, v)
        second = _pattern(sig.pattern, u, v)
        color = np.where(second[..., None], np.float32(sig.colors[1]), np.float32(sig.colors[0]))
        rgb[y0:y1, x0:x1][inside] = color[inside]
        owner[y0:y1, x0:x1][inside] = k + 1
    return np.clip(rgb, 0, 255).round().astype(np.uint8), owner


def frame_mask(plan: ClipPlan, owner: np.ndarray, t: int, info: DatasetInfo) -> np.ndarray:
    """GT of frame ``t`` from its owner map: 0/1 (binary datasets) or class ids (AVSS), uint8 ``(H, W)``,
    covering exactly the visible pixels of the objects that sound in second ``t``."""
    lut = np.zeros(len(plan.objects) + 1, dtype=np.uint8)
    for k in plan.sounding_objects(t):
        lut[k + 1] = 1 if info.binary else info.class_id(plan.objects[k].name)
    return lut[owner]


def _tone(sig: Signature, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS periodic tone of a class: ``harmonics`` partials (1/h), vibrato at ``fm_rate``, AM."""
    time = np.arange(n, dtype=np.float64) / sr
    freq = sig.f0 * (1 + 0.03 * np.sin(2 * np.pi * sig.fm_rate * time))
    phase = 2 * np.pi * np.cumsum(freq) / sr + rng.uniform(0, 2 * np.pi)
    wave = sum(np.sin(h * phase) / h for h in range(1, sig.harmonics + 1))
    if sig.am_rate:
        wave = wave * (0.6 + 0.4 * np.sin(2 * np.pi * sig.am_rate * time))
    return wave / np.sqrt(np.mean(wave**2))


def _gate(flags: tuple[bool, ...], n: int, sr: int) -> np.ndarray:
    """Per-sample on/off envelope from per-second flags, with 20 ms ramps (no clicks)."""
    steps = np.repeat(np.asarray(flags, dtype=np.float64), sr)[:n]
    steps = np.pad(steps, (0, n - len(steps)), mode="edge")
    ramp = int(0.02 * sr)
    kernel = np.ones(ramp) / ramp
    return np.convolve(np.pad(steps, (ramp // 2, ramp - ramp // 2 - 1), mode="edge"), kernel, mode="valid")


def render_audio(plan: ClipPlan, sigs: dict[str, Signature], snr_db: float, sr: int) -> np.ndarray:
    """The clip's audio, float32 ``(seconds · sr,)``: every source (visible or off-screen) gated by its
    per-second flags, at a random level in [0.6, 1], plus white noise ``snr_db`` below one unit-RMS source."""
    rng = np.random.default_rng([plan.seed, 2])
    n = int(round(plan.seconds * sr))
    mix = np.zeros(n)
    sources = [(o.name, o.sounding) for o in plan.objects] + list(plan.offscreen)
    for name, flags in sources:
        if any(flags):
            mix += rng.uniform(0.6, 1.0) * _tone(sigs[name], n, sr, rng) * _gate(flags, n, sr)
    mix += rng.normal(0, 10 ** (-snr_db / 20), n)
    return np.clip(0.15 * mix, -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- writing


def _save_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG", compress_level=PNG_LEVEL)


def _save_jpg(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_wav(wav: np.ndarray, sr: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, subtype="PCM_16", format="WAV")
    path.write_bytes(buf.getvalue())


def _write_clip(info: DatasetInfo, root: Path, plan: ClipPlan, size: int, sigs: dict, snr_db: float) -> None:
    frames, masks, _, audio = clip_paths(info, root, plan.row, plan.subset)
    background = _background(plan, size)
    for t, (frame_path, mask_path) in enumerate(zip(frames, masks)):
        rgb, owner = render_frame(plan, t, size, sigs, background)
        (_save_jpg if frame_path.endswith(".jpg") else _save_png)(rgb, Path(frame_path))
        if not mask_path:
            continue
        mask = frame_mask(plan, owner, t, info)
        if info.binary:
            _save_png(mask * np.uint8(255), Path(mask_path))
        else:
            _save_png(mask, Path(mask_path))
            color = info.layout.color_mask.format_map(dict(plan.row, n=info.layout.first_frame + t))
            _save_png(colorize(mask, info.palette), root / color)
    _save_wav(render_audio(plan, sigs, snr_db, info.sample_rate), info.sample_rate, Path(audio))


def _write_metadata(info: DatasetInfo, root: Path, plans: list[ClipPlan]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(info.csv.columns)
    writer.writerows([p.row[c] for c in info.csv.columns] for p in plans)
    text = buf.getvalue()
    (root / info.csv.file).write_text(text if info.csv.trailing_newline else text.rstrip("\n"), encoding="utf-8")
    if info.class_index_file:
        index = {name: i + info.class_index_offset for i, name in enumerate(info.classes)}
        (root / info.class_index_file).write_text(json.dumps(index, indent=4), encoding="utf-8")


def synthesize(
    layout: str,
    out: str | Path,
    clips: int,
    seed: int = 0,
    size: int = 224,
    snr_db: float = 20.0,
    classes: int = 8,
) -> list[ClipPlan]:
    """Write a synthetic ``layout`` tree of ``clips`` clips into ``out`` (the dataset root: the folder
    that will hold the metadata CSV; it must not exist or be empty). Frames are ``size``×``size``;
    ``snr_db`` sets the background noise, ``classes`` how many classes of the vocabulary appear.
    Returns the clip plans (the ground-truth schedule), in CSV order."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root}: output folder exists and is not empty")
    plans = plan_clips(layout, clips, seed, classes)
    info = load_info(layout)
    sigs = signatures(select_classes(object_vocabulary(layout), classes))
    root.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        _write_clip(info, root, plan, size, sigs, snr_db)
    _write_metadata(info, root, plans)
    return plans
