"""The synthetic generator: exact AVSBench layouts, GT rules, masks = sounding objects, audio that follows
the schedule, determinism. Expected paths are written out literally from the official loaders' paths (Decisions D1)."""

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from icf.cli import app
from icf.data.io import decolorize
from icf.data.datasets import load_info, object_vocabulary
from icf.data.synth import plan_clips, select_classes, signatures, synthesize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "avsbench"
SIZE = 48
SNR_DB = 30.0
CLIPS = {"s4": 14, "ms3": 8, "avss": 24}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    return {
        layout: (base / layout, synthesize(layout, base / layout, n, seed=1, size=SIZE, snr_db=SNR_DB))
        for layout, n in CLIPS.items()
    }


def _csv_rows(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _files(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _expected_files(layout, root):
    if layout == "s4":
        files = {"s4_meta_data.csv"}
        for r in _csv_rows(root / "s4_meta_data.csv"):
            n, c, s = r["name"], r["category"], r["split"]
            files |= {f"s4_data/visual_frames/{s}/{c}/{n}/{n}_{k}.png" for k in range(1, 6)}
            files |= {f"s4_data/gt_masks/{s}/{c}/{n}/{n}_{k}.png" for k in ([1] if s == "train" else range(1, 6))}
            files.add(f"s4_data/audio_wav/{s}/{c}/{n}.wav")
    elif layout == "ms3":
        files = {"ms3_meta_data.csv"}
        for r in _csv_rows(root / "ms3_meta_data.csv"):
            v, s = r["video_id"], r["split"]
            files |= {f"ms3_data/visual_frames/{v}/{v}.mp4_{k}.png" for k in range(1, 6)}
            files |= {f"ms3_data/gt_masks/{s}/{v}/{v}_{k}.png" for k in range(1, 6)}
            files.add(f"ms3_data/audio_wav/{s}/{v}.wav")
    else:
        files = {"metadata.csv", "label2idx.json"}
        for r in _csv_rows(root / "metadata.csv"):
            clip, T = f"{r['label']}/{r['uid']}", 10 if r["label"] == "v2" else 5
            gt = [0] if (r["label"], r["split"]) == ("v1s", "train") else range(T)
            files |= {f"{clip}/frames/{i}.jpg" for i in range(T)} | {f"{clip}/audio.wav"}
            files |= {f"{clip}/labels_{kind}/{i}.png" for i in gt for kind in ("semantic", "rgb")}
    return files


@pytest.mark.parametrize("layout", ["s4", "ms3", "avss"])
def test_layout_is_exactly_the_real_one(trees, layout):
    root, plans = trees[layout]
    assert _files(root) == _expected_files(layout, root)
    info = load_info(layout)
    text = (root / info.csv.file).read_text()
    assert text.split("\n", 1)[0] == ",".join(info.csv.columns)
    assert text.endswith("\n") == (layout != "avss")  # the real metadata.csv has no final newline
    assert len(_csv_rows(root / info.csv.file)) == len(plans) == CLIPS[layout]
    if layout == "avss" and SHARED.is_dir():
        assert json.loads((root / "label2idx.json").read_text()) == json.loads((SHARED / "label2idx.json").read_text())


def test_avss_uids_follow_the_release_patterns(trees):
    for r in _csv_rows(trees["avss"][0] / "metadata.csv"):
        start = int(r["s_min"]) * 60 + int(r["s_sec"])
        length = {"v1s": 5000, "v2": 10000}.get(r["label"])
        expected = r["vid"] if length is None else f"{r['vid']}_{start * 1000}_{start * 1000 + length}"
        assert r["uid"] == expected


@pytest.mark.parametrize("layout", ["s4", "ms3", "avss"])
def test_media_formats(trees, layout):
    root, plans = trees[layout]
    info = load_info(layout)
    for path in root.rglob("*.wav"):
        meta = sf.info(path)
        assert (meta.samplerate, meta.channels, meta.subtype) == (16000, 1, "PCM_16")
    for path in root.rglob("*.png"):
        with Image.open(path) as img:
            assert img.size == (SIZE, SIZE)
            if "labels_rgb" in path.parts or "visual_frames" in path.parts:
                assert img.mode == "RGB"
            else:
                assert img.mode == "L"
                values = set(np.unique(np.asarray(img)).tolist())
                if info.mask_kind == "binary":
                    assert values <= {0, 255}
                else:
                    chosen = {info.class_id(c) for c in select_classes(object_vocabulary(layout), 8)}
                    assert values <= {0} | chosen
    for path in root.rglob("*.jpg"):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (SIZE, SIZE))


def test_audio_lengths(trees):
    root, plans = trees["s4"]
    for r in _csv_rows(root / "s4_meta_data.csv"):
        path = root / f"s4_data/audio_wav/{r['split']}/{r['category']}/{r['name']}.wav"
        assert sf.info(path).frames == (4 if r["start"] == "6" else 5) * 16000
    root, plans = trees["avss"]
    for p in plans:
        assert sf.info(root / p.subset / p.uid / "audio.wav").frames == (10 if p.subset == "v2" else 5) * 16000


def test_palette_colours_match_labels_semantic(trees):
    root, _ = trees["avss"]
    palette = load_info("avss").palette
    n = 0
    for sem in root.glob("*/*/labels_semantic/*.png"):
        rgb = np.asarray(Image.open(sem.parent.parent / "labels_rgb" / sem.name))
        assert np.array_equal(decolorize(rgb, palette), np.asarray(Image.open(sem)))
        n += 1
    assert n > 0


def _box(obj, t, T, margin=1.5):
    x, y, s = obj.at(t, T)
    return (x - s) * SIZE - margin, (x + s) * SIZE + margin, (y - s) * SIZE - margin, (y + s) * SIZE + margin


def _inside(box, px, py):
    return box[0] <= px <= box[1] and box[2] <= py <= box[3]


@pytest.mark.parametrize("layout", ["s4", "ms3", "avss"])
def test_masks_cover_exactly_the_sounding_objects(trees, layout):
    """Checked against the plan's geometry and schedule only (not the renderer): every labelled pixel
    lies in the box of a sounding object of that class, each sounding object appears, and the centre
    of a silent object (when no sounding object's box reaches it) is background."""
    root, plans = trees[layout]
    info = load_info(layout)
    checked = 0
    for p in plans:
        folder = {"s4": lambda: f"s4_data/gt_masks/{p.split}/{p.row.get('category')}/{p.uid}/{p.uid}_{{}}.png",
                  "ms3": lambda: f"ms3_data/gt_masks/{p.split}/{p.uid}/{p.uid}_{{}}.png",
                  "avss": lambda: f"{p.subset}/{p.uid}/labels_semantic/{{}}.png"}[layout]()  # fmt: skip
        first = 0 if layout == "avss" else 1
        for t in range(p.n_frames):
            path = root / folder.format(t + first)
            if not path.exists():
                continue
            mask = np.asarray(Image.open(path))
            value = lambda o: 255 if info.mask_kind == "binary" else info.class_id(o.name)  # noqa: E731
            sounding = [p.objects[k] for k in p.sounding_objects(t)]
            boxes = [(_box(o, t, p.n_frames), value(o)) for o in sounding]
            ys, xs = np.nonzero(mask)
            for py, px in zip(ys + 0.5, xs + 0.5):
                assert any(_inside(b, px, py) and v == mask[int(py), int(px)] for b, v in boxes)
            for o in sounding:
                assert (mask == value(o)).any()
            assert mask.any() == bool(sounding)
            for o in p.objects:
                x, y, _ = o.at(t, p.n_frames)
                if not any(o.sounding[t:t + 1]) and not any(_inside(b, x * SIZE, y * SIZE) for b, _ in boxes):
                    assert mask[int(y * SIZE), int(x * SIZE)] == 0
            checked += 1
    assert checked > 0


def test_frames_show_the_class_colours(trees):
    root, plans = trees["s4"]
    sigs = signatures(select_classes(object_vocabulary("s4"), 8))
    seen = 0
    for p in plans:
        for t in range(p.n_frames):
            frame = np.asarray(Image.open(root / f"s4_data/visual_frames/{p.split}/{p.row['category']}/{p.uid}/{p.uid}_{t + 1}.png"))
            for k, o in enumerate(p.objects):
                x, y, _ = o.at(t, p.n_frames)
                covered = any(_inside(_box(q, t, p.n_frames), x * SIZE, y * SIZE) for q in p.objects[k + 1 :])
                if sigs[o.name].shape == "ring" or covered:
                    continue
                assert tuple(frame[int(y * SIZE), int(x * SIZE)]) in sigs[o.name].colors
                seen += 1
    assert seen > 0


def _band_power(segment, f0, sr=16000):
    spec = np.abs(np.fft.rfft(segment * np.hanning(len(segment)))) ** 2
    freqs = np.fft.rfftfreq(len(segment), 1 / sr)
    return spec[(freqs > f0 * 0.95) & (freqs < f0 * 1.05)].sum()


def test_audio_follows_the_schedule(trees):
    root, plans = trees["s4"]
    sigs = signatures(select_classes(object_vocabulary("s4"), 8))
    tested = 0
    for p in plans:
        src = [o for o in p.objects if any(o.sounding)]
        if p.kind != "normal" or len(src) != 1 or all(src[0].sounding[: int(p.seconds)]):
            continue
        wav, sr = sf.read(root / f"s4_data/audio_wav/{p.split}/{p.row['category']}/{p.uid}.wav")
        power = [_band_power(wav[t * sr + 400 : (t + 1) * sr - 400], sigs[src[0].name].f0) for t in range(int(p.seconds))]
        on = [pw for pw, f in zip(power, src[0].sounding) if f]
        off = [pw for pw, f in zip(power, src[0].sounding) if not f]
        assert min(on) > 100 * max(off)
        tested += 1
    assert tested > 0


def test_offscreen_and_silent_clips(trees):
    root, plans = trees["avss"]
    kinds = Counter(p.kind for p in plans)
    assert kinds["offscreen_only"] and kinds["silent"] and kinds["normal"]
    noise_rms = 0.15 * 10 ** (-SNR_DB / 20)
    for p in plans:
        if p.kind not in ("offscreen_only", "silent"):
            continue
        masks = [np.asarray(Image.open(m)) for m in (root / p.subset / p.uid / "labels_semantic").glob("*.png")]
        assert masks and not any(m.any() for m in masks)
        wav, _ = sf.read(root / p.subset / p.uid / "audio.wav")
        rms = np.sqrt(np.mean(wav**2))
        if p.kind == "silent":
            assert rms == pytest.approx(noise_rms, rel=0.1) and p.row["a_obj"] == "background"
        else:
            assert rms > 5 * noise_rms and p.row["a_obj"] == "off-the-screen"


def test_plans_have_distractors_multi_sources_and_real_quirks():
    avss = plan_clips("avss", 200, seed=0)
    assert all(any(not any(o.sounding) for o in p.objects) for p in avss)  # a silent visible object
    assert Counter(p.subset for p in avss).keys() == {"v1s", "v1m", "v2"}
    assert {(p.subset, p.split) for p in avss} == {(s, sp) for s in ("v1s", "v1m", "v2") for sp in ("train", "val", "test")}
    sources = Counter((p.subset, sum(any(o.sounding) for o in p.objects)) for p in avss if p.kind == "normal")
    assert sources[("v1m", 2)] and sources[("v1m", 3)] and sources[("v2", 1)] and not sources[("v1s", 2)]
    assert any(p.uid.startswith("-") for p in avss)
    assert any(p.offscreen and any(o.sounding for o in p.objects) for p in avss)
    s4 = plan_clips("s4", 200, seed=0)
    assert any(p.row["start"] == "6" and p.seconds == 4 for p in s4)
    assert Counter(p.split for p in s4) == {"train": 140, "val": 30, "test": 30}  # 3452 : 740 : 740


def _tree_hash(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    for layout in ("avss", "ms3"):
        a = synthesize(layout, tmp_path / f"{layout}a", 6, seed=3, size=32)
        b = synthesize(layout, tmp_path / f"{layout}b", 6, seed=3, size=32)
        synthesize(layout, tmp_path / f"{layout}c", 6, seed=4, size=32)
        assert a == b
        assert _tree_hash(tmp_path / f"{layout}a") == _tree_hash(tmp_path / f"{layout}b")
        assert _tree_hash(tmp_path / f"{layout}a") != _tree_hash(tmp_path / f"{layout}c")


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        synthesize("s4", tmp_path / "x", 2)


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--layout", "ms3", "--out", str(tmp_path / "m"), "--clips", "4", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 ms3 clips" in result.output and "ms3/train" in result.output
    assert len(_csv_rows(tmp_path / "m" / "ms3_meta_data.csv")) == 4
    bad = runner.invoke(app, ["synth", "--layout", "coco", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and not (tmp_path / "n").exists()
    bad = runner.invoke(app, ["synth", "--layout", "avss", "--out", str(tmp_path / "n"), "--classes", "1"])
    assert bad.exit_code == 2 and not (tmp_path / "n").exists()
    # --dataset is the name every command shares (--layout stays an alias); without --out it writes under --work
    result = runner.invoke(app, ["synth", "--dataset", "s4", "--work", str(tmp_path / "w"), "--clips", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "synth-s4" / "s4_meta_data.csv").is_file()
