"""Adapters on a small tree built from REAL rows of the AVSBench CSVs (paths written out literally from
the official loaders' paths (Decisions D1), independent of the manifest templates), and on synthetic trees."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from icf.clitools import UserError
from icf.data.adapters import load_samples
from icf.stages.index import build_manifest
from icf.data.io import colorize, decolorize, read_mask, read_rgb, read_wav
from icf.data.datasets import load_info
from icf.data.synth import plan_clips, synthesize

# Verbatim rows of the released s4_meta_data.csv, ms3_meta_data.csv and AVSS metadata.csv (../shared/avsbench),
# chosen for their quirks; kept here so the tests run without that folder.
S4_CSV = """name,start,category,split
-_wznbUu3DY,0,helicopter,train
d-adbXZYHxI,6,lions_roaring,train
0d9u2CymIxc,0,helicopter,test
"""  # leading "-", start=6 (4 s), a test clip
MS3_CSV = """video_id,split
jlhuZfcw61w,train
xv7eM6-UmkY_36,val
A7N2Japi3-A_4,train
"""
AVSS_CSV = """vid,uid,s_min,s_sec,a_obj,split,label
-9-Jylm9GiA,-9-Jylm9GiA_440000_450000,7,20,off-the-screen,train,v2
--iSerV5DbY,--iSerV5DbY_68000_78000,1,8,man_hair-dryer,train,v2
zVfLHhs9uv8,zVfLHhs9uv8_3000_8000,0,3,h orse,train,v1s
__GOGlHL23s,__GOGlHL23s_4000_9000,0,4,bird,val,v1s
_fvpYLXtQHQ_1,_fvpYLXtQHQ_1,0,0,guitar_violin,test,v1m
IrYMIVbDsh8_0,IrYMIVbDsh8_0,0,0,background,train,v1m
"""  # v2 off-the-screen with a leading "-"; two classes, one with "-"; "h orse"; v1s val; two sources; "background"
S4_IDS = ["-_wznbUu3DY", "d-adbXZYHxI", "0d9u2CymIxc"]
MS3_IDS = ["jlhuZfcw61w", "xv7eM6-UmkY_36", "A7N2Japi3-A_4"]
AVSS_UIDS = ["-9-Jylm9GiA_440000_450000", "--iSerV5DbY_68000_78000", "zVfLHhs9uv8_3000_8000",
             "__GOGlHL23s_4000_9000", "_fvpYLXtQHQ_1", "IrYMIVbDsh8_0"]
W, H = 40, 32


def _real_rows(text):
    lines = text.splitlines()
    header = lines[0].split(",")
    return header, [dict(zip(header, line.split(","))) for line in lines[1:]]


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _img(path, mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((H, W, 3) if mode == "RGB" else (H, W), value, dtype=np.uint8)
    if mode != "RGB":
        arr[H // 4 : H // 2, W // 4 : W // 2] = 255 if mode == "L" else 7
    Image.fromarray(arr).save(path)


def _wav(path, seconds, sr=16000, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    data = np.stack([tone, np.zeros_like(tone)], 1) if channels == 2 else tone
    sf.write(path, data, sr, subtype="PCM_16")


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory):
    """Single-source/, Multi-sources/, AVSS/ with real CSV rows and tiny media at the official paths."""
    base = tmp_path_factory.mktemp("real")
    header, rows = _real_rows(S4_CSV)
    s4 = base / "Single-source"
    _write_csv(s4 / "s4_meta_data.csv", header, rows)
    for r in rows:
        name, cat, split = r["name"], r["category"], r["split"]
        for k in range(1, 6):
            _img(s4 / f"s4_data/visual_frames/{split}/{cat}/{name}/{name}_{k}.png")
            if split != "train" or k == 1:
                _img(s4 / f"s4_data/gt_masks/{split}/{cat}/{name}/{name}_{k}.png", "L")
        _wav(s4 / f"s4_data/audio_wav/{split}/{cat}/{name}.wav", 4 if r["start"] == "6" else 5)

    header, rows = _real_rows(MS3_CSV)
    ms3 = base / "Multi-sources"
    _write_csv(ms3 / "ms3_meta_data.csv", header, rows)
    for i, r in enumerate(rows):
        vid, split = r["video_id"], r["split"]
        for k in range(1, 6):
            _img(ms3 / f"ms3_data/visual_frames/{vid}/{vid}.mp4_{k}.png")
            _img(ms3 / f"ms3_data/gt_masks/{split}/{vid}/{vid}_{k}.png", "L")
        _wav(ms3 / f"ms3_data/audio_wav/{split}/{vid}.wav", 5, sr=44100 if i == 0 else 16000, channels=2 if i == 0 else 1)

    header, rows = _real_rows(AVSS_CSV)
    avss = base / "AVSS"
    _write_csv(avss / "metadata.csv", header, rows)
    (avss / "label2idx.json").write_text(json.dumps({c: i + 1 for i, c in enumerate(load_info("avss").classes)}))
    for r in rows:
        clip = avss / r["label"] / r["uid"]
        n = 10 if r["label"] == "v2" else 5
        for i in range(n):
            _img(clip / f"frames/{i}.jpg")
            if not (r["label"] == "v1s" and r["split"] == "train") or i == 0:
                _img(clip / f"labels_semantic/{i}.png", "P")
                _img(clip / f"labels_rgb/{i}.png")
        _wav(clip / "audio.wav", n)
    return base


def test_s4_real_rows(real_tree):
    root = real_tree / "Single-source"
    samples = {s.uid: s for s in load_samples("s4", root)}
    assert list(samples) == S4_IDS
    s = samples["-_wznbUu3DY"]
    assert s.split == "train" and s.classes == ("helicopter",) and s.n_frames == 5
    assert s.frame_paths[0] == str(root / "s4_data/visual_frames/train/helicopter/-_wznbUu3DY/-_wznbUu3DY_1.png")
    assert s.mask_paths == (str(root / "s4_data/gt_masks/train/helicopter/-_wznbUu3DY/-_wznbUu3DY_1.png"), "", "", "", "")
    assert s.gt_frames == (True, False, False, False, False)
    assert s.audio_path == str(root / "s4_data/audio_wav/train/helicopter/-_wznbUu3DY.wav")
    short = samples["d-adbXZYHxI"]
    assert short.extra == {"start": "6"} and short.classes == ("lions_roaring",)
    assert read_wav(short.audio_path).shape == (4 * 16000,)
    assert samples["0d9u2CymIxc"].gt_frames == (True,) * 5 and "" not in samples["0d9u2CymIxc"].mask_paths
    assert [s.uid for s in load_samples("s4", root, ["test"])] == ["0d9u2CymIxc"]


def test_ms3_real_rows_and_stereo_44k_audio(real_tree):
    root = real_tree / "Multi-sources"
    samples = {s.uid: s for s in load_samples("ms3", root)}
    s = samples["xv7eM6-UmkY_36"]
    assert s.split == "val" and s.classes == () and s.gt_frames == (True,) * 5
    assert s.frame_paths[4] == str(root / "ms3_data/visual_frames/xv7eM6-UmkY_36/xv7eM6-UmkY_36.mp4_5.png")
    assert s.mask_paths[4] == str(root / "ms3_data/gt_masks/val/xv7eM6-UmkY_36/xv7eM6-UmkY_36_5.png")
    assert s.audio_path == str(root / "ms3_data/audio_wav/val/xv7eM6-UmkY_36.wav")
    wav = read_wav(samples["jlhuZfcw61w"].audio_path)  # stereo 44.1 kHz, tone on the left channel only
    assert wav.dtype == np.float32 and wav.shape == (5 * 16000,)
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) * 16000 / len(wav) == pytest.approx(440, abs=1)
    assert np.sqrt(np.mean(wav[1000:-1000] ** 2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)  # mean of L, R


def test_avss_real_rows_and_quirks(real_tree):
    root = real_tree / "AVSS"
    samples = {s.uid: s for s in load_samples("avss", root)}
    assert list(samples) == AVSS_UIDS
    off = samples["-9-Jylm9GiA_440000_450000"]
    assert off.subset == "v2" and off.n_frames == 10 and off.classes == () and off.extra["a_obj"] == "off-the-screen"
    assert off.frame_paths[9] == str(root / "v2/-9-Jylm9GiA_440000_450000/frames/9.jpg")
    assert off.mask_paths[0] == str(root / "v2/-9-Jylm9GiA_440000_450000/labels_semantic/0.png")
    assert off.audio_path == str(root / "v2/-9-Jylm9GiA_440000_450000/audio.wav")
    assert samples["--iSerV5DbY_68000_78000"].classes == ("man", "hair-dryer")
    horse = samples["zVfLHhs9uv8_3000_8000"]
    assert horse.classes == ("horse",) and horse.extra["a_obj"] == "h orse"
    assert horse.gt_frames == (True, False, False, False, False) and horse.mask_paths[1:] == ("",) * 4
    assert samples["__GOGlHL23s_4000_9000"].gt_frames == (True,) * 5
    assert samples["_fvpYLXtQHQ_1"].classes == ("guitar", "violin") and samples["_fvpYLXtQHQ_1"].n_frames == 5
    assert samples["IrYMIVbDsh8_0"].classes == ()
    assert read_mask(off.mask_paths[0], "avss").max() == 7 and read_rgb(off.frame_paths[0]).shape == (H, W, 3)


def test_manifest_of_the_real_rows_is_all_ok(real_tree):
    for dataset, folder, n in (("s4", "Single-source", 3), ("ms3", "Multi-sources", 3), ("avss", "AVSS", 6)):
        table = build_manifest(dataset, real_tree / folder)
        assert table.num_rows == n
        assert table.column("status").to_pylist() == ["ok"] * n, table.column("error").to_pylist()


def test_binary_masks_read_as_0_1(real_tree):
    s = load_samples("s4", real_tree / "Single-source")[0]
    mask = read_mask(s.mask_paths[0], "s4")
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == (H // 4) * (W // 4)


def test_metadata_errors_are_user_errors(real_tree, tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_samples("coco", real_tree)
    with pytest.raises(UserError, match="dataset root not found"):
        load_samples("s4", tmp_path / "nope")
    (tmp_path / "meta.csv").write_text("vid,uid\n")
    with pytest.raises(UserError, match="meta.csv: --root is a file; give the dataset folder"):
        load_samples("s4", tmp_path / "meta.csv")
    with pytest.raises(UserError, match="s4_meta_data.csv: metadata CSV not found"):
        load_samples("s4", real_tree / "AVSS")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_samples("s4", real_tree / "Single-source", ["dev"])
    bad = tmp_path / "bad"
    shutil.copytree(real_tree / "AVSS", bad, ignore=shutil.ignore_patterns("v1s", "v1m", "v2"))
    text = (bad / "metadata.csv").read_text()
    (bad / "metadata.csv").write_text(text.replace(",v1m\n", ",v3\n", 1))
    with pytest.raises(UserError, match=r"metadata.csv:\d+: unknown label 'v3'"):
        load_samples("avss", bad)
    (bad / "metadata.csv").write_text(text.replace("label", "subset", 1))
    with pytest.raises(UserError, match="expected columns vid,uid,s_min,s_sec,a_obj,split,label, found vid,"):
        load_samples("avss", bad)
    (bad / "metadata.csv").write_text(text + "\nabc,abc,0,0,dog,train\n")
    with pytest.raises(UserError, match=r"metadata.csv:\d+: expected 7 fields, found 6"):
        load_samples("avss", bad)
    (bad / "metadata.csv").write_text(text)
    index = json.loads((bad / "label2idx.json").read_text())
    index["dog"], index["cat"] = index["cat"], index["dog"]
    (bad / "label2idx.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="label2idx.json: 'cat' -> 18 but manifests/avss.toml says 13"):
        load_samples("avss", bad)


@pytest.mark.parametrize("layout", ["s4", "ms3", "avss"])
def test_adapters_read_synthetic_trees(layout, tmp_path):
    plans = synthesize(layout, tmp_path / layout, clips=9, seed=5, size=32)
    samples = load_samples(layout, tmp_path / layout)
    assert [s.uid for s in samples] == [p.uid for p in plans] == [p.uid for p in plan_clips(layout, 9, 5)]
    assert [(s.split, s.subset, s.n_frames) for s in samples] == [(p.split, p.subset, p.n_frames) for p in plans]
    if layout == "s4":
        assert [s.classes for s in samples] == [(p.row["category"],) for p in plans]
    if layout == "avss":  # classes = the visible objects that sound at some point
        for s, p in zip(samples, plans):
            assert set(s.classes) == {o.name for o in p.objects if any(o.sounding)}


def test_io_errors_name_the_file_and_the_reason(tmp_path):
    wav = tmp_path / "a.wav"
    _wav(wav, 1)
    data = wav.read_bytes()
    wav.write_bytes(data[:1000])
    with pytest.raises(ValueError, match=f"{wav}: truncated WAV"):
        read_wav(wav)
    wav.write_bytes(data[:44])
    with pytest.raises(ValueError, match=f"{wav}: empty audio"):
        read_wav(wav)
    wav.write_bytes(b"RIFF\x00\x00")
    with pytest.raises(ValueError, match=f"{wav}: unreadable audio"):
        read_wav(wav)
    with pytest.raises(ValueError, match=f"{tmp_path / 'no.wav'}: missing audio file"):
        read_wav(tmp_path / "no.wav")
    png = tmp_path / "m.png"
    _img(png, value=1)  # an RGB mask is read through the palette, and (1, 1, 1) is not in it
    with pytest.raises(ValueError, match=rf"{png}: {H * W} pixels have colours outside the palette, e.g. \(1, 1, 1\)"):
        read_mask(png, "avss")
    Image.new("LA", (4, 4)).save(png)
    with pytest.raises(ValueError, match=f"{png}: class mask must be a class-index .* found mode LA"):
        read_mask(png, "avss")
    Image.fromarray(np.full((4, 4), 71, dtype=np.uint8)).save(png)
    with pytest.raises(ValueError, match=f"{png}: class id 71 out of range"):
        read_mask(png, "avss")
    png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{png}: unreadable image"):
        read_rgb(png)


def test_palette_round_trip():
    palette = load_info("avss").palette
    ids = np.arange(71, dtype=np.uint8).reshape(1, 71).repeat(3, 0)
    rgb = colorize(ids, palette)
    assert tuple(rgb[0, 70]) == (32, 128, 128) and np.array_equal(decolorize(rgb, palette), ids)
    rgb[1, 5] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"1 pixels have colours outside the palette, e.g. \(1, 2, 3\)"):
        decolorize(rgb, palette)


def test_avss_clip_with_only_labels_rgb_reads_the_colour_masks(tmp_path):
    """A copy that ships only labels_rgb (what the official loader reads): masks come from the palette."""
    root = tmp_path / "avss"
    synthesize("avss", root, clips=6, seed=3, size=32)
    before = {s.uid: s for s in load_samples("avss", root)}
    uid = next(u for u, s in before.items() if s.subset == "v2")
    semantic = Path(before[uid].mask_paths[0]).parent
    ids = [read_mask(p, "avss") for p in before[uid].mask_paths]
    assert any(m.any() for m in ids)  # some frame has a labelled object, so the comparison means something
    shutil.rmtree(semantic)
    after = {s.uid: s for s in load_samples("avss", root)}
    assert after[uid].mask_paths == tuple(p.replace("/labels_semantic/", "/labels_rgb/") for p in before[uid].mask_paths)
    assert all(after[u] == before[u] for u in before if u != uid)
    for path, expected in zip(after[uid].mask_paths, ids):
        assert np.array_equal(read_mask(path, "avss"), expected)
    table = build_manifest("avss", root)
    assert set(table.column("status").to_pylist()) == {"ok"}
