"""manifests/*.toml against the real AVSBench metadata in ../shared/avsbench (read only here, in tests)."""

import csv
import json
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from icf.data.adapters import class_tokens
from icf.data.datasets import MANIFEST_DIR, load_info, object_vocabulary, parse_info

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "avsbench"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/avsbench not available")


def _rows(name):
    with (SHARED / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _header(name):
    with (SHARED / name).open(newline="") as fh:
        return next(csv.reader(fh))


def _voc_palette(n):
    """The official get_v2_pallete bit-interleave, written out independently."""
    colors = []
    for j in range(n):
        lab, rgb = j, [0, 0, 0]
        for i in range(8):
            for ch in range(3):
                rgb[ch] |= ((lab >> ch) & 1) << (7 - i)
            lab >>= 3
        colors.append(tuple(rgb))
    return colors


@needs_shared
def test_avss_classes_and_palette_match_the_release():
    info = load_info("avss")
    label2idx = json.loads((SHARED / "label2idx.json").read_text())
    assert list(info.classes) == list(label2idx)
    assert all(label2idx[name] == i + info.class_index_offset for i, name in enumerate(info.classes))
    assert info.classes[0] == "background" and info.num_classes == 71
    official = [tuple(e["rgb"]) for e in json.loads((SHARED / "avss_classes_palette.json").read_text())]
    assert list(info.palette) == official == _voc_palette(71)
    assert len(set(info.palette)) == 71


@needs_shared
def test_csv_headers_and_split_sizes_match_the_release():
    for dataset in ("s4", "ms3", "avss"):
        info = load_info(dataset)
        assert list(info.csv.columns) == _header(info.csv.file)
        rows = _rows(info.csv.file)
        found = Counter((r.get(info.csv.subset, dataset), r[info.csv.split]) for r in rows)
        expected = {(s.name, sp): n for s in info.subsets.values() for sp, n in s.split_sizes.items()}
        assert dict(found) == expected
    assert load_info("avss").split_sizes == {"train": 8498, "val": 1304, "test": 1554}


@needs_shared
def test_s4_classes_and_mapping_to_avss_match_the_csvs():
    s4, avss = load_info("s4"), load_info("avss")
    s4_rows = _rows("s4_meta_data.csv")
    assert list(s4.classes) == sorted({r["category"] for r in s4_rows})
    v1s = {r["vid"]: r for r in _rows("metadata.csv") if r["label"] == "v1s"}
    joined = {(r["category"], class_tokens(avss, v1s[r["name"]]["a_obj"])) for r in s4_rows}
    assert joined == {(cat, (target,)) for cat, target in s4.to_avss.items()}
    assert set(s4.to_avss.values()) <= set(avss.classes)


@needs_shared
def test_every_a_obj_token_is_a_class_or_a_declared_quirk():
    info = load_info("avss")
    tokens = Counter(t for r in _rows("metadata.csv") for t in r["a_obj"].split(info.csv.class_separator))
    unknown = {t for t in tokens if t not in info.classes}
    assert unknown == set(info.csv.aliases) | {"off-the-screen"}
    assert all(target in info.classes for target in info.csv.aliases.values())


def test_frames_gt_rules_and_audio_lengths():
    s4, ms3, avss = load_info("s4"), load_info("ms3"), load_info("avss")
    assert s4.subset("s4").gt_frames("train") == (True, False, False, False, False)
    assert s4.subset("s4").gt_frames("test") == (True,) * 5
    assert ms3.subset("ms3").gt_frames("train") == (True,) * 5
    assert avss.subset("v1s").gt_frames("train") == (True, False, False, False, False)
    assert avss.subset("v1s").gt_frames("val") == (True,) * 5
    assert avss.subset("v1m").gt_frames("train") == (True,) * 5
    assert avss.subset("v2").gt_frames("train") == (True,) * 10
    assert (s4.max_frames, ms3.max_frames, avss.max_frames) == (5, 5, 10)
    assert s4.audio_seconds("s4", {"start": "6"}) == 4 and s4.audio_seconds("s4", {"start": "5"}) == 5
    assert avss.audio_seconds("v2", {}) == 10 and avss.audio_seconds("v1m", {}) == 5
    assert ms3.classes == () and s4.num_classes == 23
    assert s4.palette == ms3.palette == ((0, 0, 0), (255, 255, 255))


def test_vocabularies():
    assert object_vocabulary("ms3") == object_vocabulary("avss") == load_info("avss").classes[1:]
    assert object_vocabulary("s4") == load_info("s4").classes


def test_lookups_and_invariants_fail_loudly():
    info = load_info("avss")
    assert info.class_id("woman") == 70 and info.class_id("background") == 0
    with pytest.raises(KeyError, match="not a avss class"):
        info.class_id("unicorn")
    with pytest.raises(KeyError, match="unknown avss subset"):
        info.subset("v3")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_info("coco")
    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "manifests" / "avss.toml").read_text())
    raw["palette"] = raw["palette"][:-1]
    with pytest.raises(ValueError, match="70 palette colours for 71 classes"):
        parse_info(raw)


def test_a_regular_install_ships_the_root_manifests(tmp_path):
    """`pip install .` (not editable) must carry manifests/*.toml: install a copy of the source tree into a
    folder and load every descriptor from there, away from the source tree."""
    assert MANIFEST_DIR.resolve() == REPO / "manifests"  # the package reads the one root copy
    src, target = tmp_path / "src", tmp_path / "site"
    keep = {"pyproject.toml", "README.md", "icf", "manifests"}
    shutil.copytree(REPO, src, symlinks=True, ignore=lambda d, names: [n for n in names if Path(d) == REPO and n not in keep])
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(src)], check=True, capture_output=True, timeout=120)
    shutil.rmtree(src)
    probe = ("import icf.data.datasets as m; print(m.__file__); "
             "print(*(len(m.load_info(d).classes) for d in ('s4', 'ms3', 'avss')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True, timeout=60).stdout.split("\n")
    assert out[0] == str(target / "icf" / "data" / "datasets.py")
    assert out[1] == "23 0 71"


def test_descriptors_carry_the_facts_the_code_derives_from_them():
    """Frames, logits, segment divisor, crop rule and mask kind live in the descriptors alone; the presets, the
    metrics and the shard stage read them from there."""
    from icf.config import preset
    from icf.eval.metrics import BinaryMetrics, SemanticMetrics, make_metrics

    facts = {d: (info.max_frames, info.num_logits, info.segment_divisor, info.binary, info.crops("train"), info.crops("val"))
             for d in ("s4", "ms3", "avss") for info in [load_info(d)]}
    assert facts == {"s4": (5, 1, 2, True, False, False), "ms3": (5, 1, 2, True, False, False),
                     "avss": (10, 71, 4, False, True, False)}
    for d, (frames, logits, divisor, binary, *_) in facts.items():
        model, _ = preset("tiny", d)
        assert (model.frames, model.num_classes, model.segment_div) == (frames, logits, divisor)
        assert isinstance(make_metrics(d), BinaryMetrics if binary else SemanticMetrics)
    assert make_metrics("avss").num_classes == 71
