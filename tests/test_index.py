"""The manifest: ok rows, failed rows with reasons (never raising), UserError for whole-dataset problems,
atomic writing and the round trip back to Samples."""

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from icf.clitools import UserError
from icf.data.adapters import load_samples
from icf.data.sample import Sample
from icf.stages.index import MANIFEST_SCHEMA, build_manifest, check_sample, write_manifest
from icf.data.synth import synthesize

SIZE = 32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("index")
    for layout, n in (("s4", 8), ("avss", 10)):
        synthesize(layout, base / layout, n, seed=2, size=SIZE)
    return base


@pytest.fixture
def tree(pristine, tmp_path):
    """A private copy that a test may damage."""
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


def _errors(table):
    return dict(zip(table.column("uid").to_pylist(), table.column("error").to_pylist()))


def test_all_ok_rows(pristine):
    for layout in ("s4", "avss"):
        table = build_manifest(layout, pristine / layout)
        assert table.schema == MANIFEST_SCHEMA
        assert table.num_rows == len(load_samples(layout, pristine / layout))
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert set(table.column("error").to_pylist()) == {""}


def test_failed_rows_name_the_file_and_the_reason(tree):
    root = tree / "s4"
    samples = load_samples("s4", root)
    missing, truncated, resized, corrupt, empty, healthy = samples[:6]
    os.remove(missing.frame_paths[2])
    data = open(truncated.audio_path, "rb").read()
    open(truncated.audio_path, "wb").write(data[: len(data) // 2])
    Image.new("L", (SIZE + 8, SIZE)).save(resized.mask_paths[0])
    open(corrupt.mask_paths[0], "wb").write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    sf.write(empty.audio_path, np.zeros(0), 16000, subtype="PCM_16")

    table = build_manifest("s4", root)
    errors = _errors(table)
    assert table.num_rows == len(samples)
    assert errors[missing.uid] == f"{missing.frame_paths[2]}: missing file"
    assert errors[truncated.uid].startswith(f"{truncated.audio_path}: truncated WAV")
    assert errors[resized.uid] == f"{resized.mask_paths[0]}: mask is {SIZE + 8}x{SIZE} but its frame is {SIZE}x{SIZE}"
    assert errors[corrupt.uid].startswith(f"{corrupt.mask_paths[0]}: unreadable image")
    assert errors[empty.uid] == f"{empty.audio_path}: empty audio (0 samples)"
    assert errors[healthy.uid] == ""
    statuses = dict(zip(table.column("uid").to_pylist(), table.column("status").to_pylist()))
    assert [statuses[s.uid] for s in samples[:6]] == ["failed"] * 5 + ["ok"]


def test_truncated_png_and_jpeg_and_wrong_mode_class_mask(tree):
    root = tree / "avss"
    samples = load_samples("avss", root)
    png, jpeg, la, rgb = samples[:4]
    path = png.mask_paths[0]
    open(path, "wb").write(open(path, "rb").read()[:-20])
    data = open(jpeg.frame_paths[1], "rb").read()
    open(jpeg.frame_paths[1], "wb").write(data[: len(data) - 100])
    Image.new("LA", (SIZE, SIZE)).save(la.mask_paths[0])
    Image.new("RGB", (SIZE, SIZE)).save(rgb.mask_paths[0])  # a palette-colour mask (labels_rgb style) is fine
    errors = _errors(build_manifest("avss", root))
    assert errors[png.uid].startswith(f"{path}: unreadable image")
    assert errors[jpeg.uid] == f"{jpeg.frame_paths[1]}: truncated JPEG (no end-of-image marker)"
    assert errors[la.uid] == (f"{la.mask_paths[0]}: class mask must be a class-index (L, P) or palette-colour (RGB) "
                              "PNG, found mode LA")
    assert errors[rgb.uid] == ""


def test_whole_clip_missing_lists_a_few_problems(tree):
    root = tree / "avss"
    sample = load_samples("avss", root)[0]
    shutil.rmtree(os.path.dirname(sample.audio_path))
    error = _errors(build_manifest("avss", root))[sample.uid]
    assert error.startswith(f"{sample.frame_paths[0]}: missing file; ")
    assert error.count("missing file") == 3 and error.endswith("more problems")


def test_metadata_problems_are_failed_rows(tree):
    root = tree / "s4"
    csv_path = root / "s4_meta_data.csv"
    lines = csv_path.read_text().splitlines()
    name, start, category, split = lines[1].split(",")
    lines[1] = f"{name},{start},unicorn_singing,{split}"
    lines[2] = ",".join(lines[2].split(",")[:3] + ["holdout"])
    lines.append(lines[3])
    csv_path.write_text("\n".join(lines) + "\n")
    table = build_manifest("s4", root, check_media=False)
    errors = table.column("error").to_pylist()
    assert errors[0] == "unknown class 'unicorn_singing' (not in manifests/s4.toml)"
    assert errors[1] == "unknown split 'holdout' (expected train, val, test)"
    assert errors[-1].startswith("duplicate uid") and errors[2] == ""


def test_malformed_csv_rows_are_failed_rows(tree):
    root = tree / "avss"
    csv_path = root / "metadata.csv"
    text = csv_path.read_text().rstrip("\n")
    n = len(text.splitlines())
    csv_path.write_text(text + "\nabc,abc_0_5000,0,0,dog,train\nxyz,xyz_0_5000,0,0,dog,test,v3\n")
    table = build_manifest("avss", root)
    rows = {r["uid"]: r for r in table.to_pylist()}
    assert table.num_rows == n + 1  # one row per CSV row (header excluded)
    assert rows["abc_0_5000"]["error"] == f"{csv_path}:{n + 1}: expected 7 fields, found 6"
    assert rows["xyz_0_5000"]["error"] == f"{csv_path}:{n + 2}: unknown label 'v3'; expected one of v1s, v1m, v2"
    assert rows["xyz_0_5000"]["status"] == "failed" and rows["xyz_0_5000"]["n_frames"] == 0
    assert sum(r["status"] == "ok" for r in rows.values()) == n - 1
    with pytest.raises(UserError, match="expected 7 fields, found 6 \\(and 1 more bad rows\\)"):
        load_samples("avss", root)  # the strict reader (used for scoring) refuses such a tree


def test_progress_reports_every_row(pristine):
    calls = []
    table = build_manifest("s4", pristine / "s4", progress=lambda done, total: calls.append((done, total)))
    n = table.num_rows
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_user_errors_for_the_dataset_as_a_whole(tree, tmp_path):
    with pytest.raises(UserError, match="dataset root not found"):
        build_manifest("s4", tmp_path / "missing")
    with pytest.raises(UserError, match="unknown dataset 'coco'"):
        build_manifest("coco", tree / "s4")
    with pytest.raises(UserError, match="ms3_meta_data.csv: metadata CSV not found"):
        build_manifest("ms3", tree / "s4")
    (tree / "s4" / "s4_meta_data.csv").write_text("name,category,split\nabc,dog_barking,train\n")
    with pytest.raises(UserError, match="s4_meta_data.csv: expected columns name,start,category,split, found name,category,split"):
        build_manifest("s4", tree / "s4")
    (tree / "s4" / "s4_meta_data.csv").write_bytes(b"\xff\xfename,start\n")
    with pytest.raises(UserError, match="s4_meta_data.csv: unreadable metadata CSV"):
        build_manifest("s4", tree / "s4")


def test_check_media_off_and_splits(tree):
    root = tree / "s4"
    sample = load_samples("s4", root)[0]
    os.remove(sample.audio_path)
    assert check_sample(sample) == f"{sample.audio_path}: missing audio file"
    assert check_sample(sample, check_media=False) == ""
    test_only = build_manifest("s4", root, splits=["test"])
    assert set(test_only.column("split").to_pylist()) == {"test"} and test_only.num_rows > 0


def test_write_is_atomic_and_round_trips(pristine, tmp_path):
    table = build_manifest("avss", pristine / "avss")
    path = write_manifest(table, tmp_path / "work" / "avss" / "manifest.parquet")
    assert sorted(os.listdir(path.parent)) == ["manifest.parquet"]
    back = pq.read_table(path)
    assert back.equals(table)
    assert [Sample.from_row(r) for r in back.to_pylist()] == load_samples("avss", pristine / "avss")


def test_an_unterminated_quote_refuses_the_csv_naming_its_line(tree):
    """Findings 2, D9: ``"abc,…`` on row 4 of 10 made ``csv.reader`` read to the end of the file inside one
    field, so the six rows after it vanished without a word. Now the CSV is refused, naming the line."""
    root = tree / "avss"
    csv_path = root / "metadata.csv"
    lines = csv_path.read_text().splitlines()
    lines[4] = '"' + lines[4]
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"{csv_path}:5: .*unterminated quote"):
        build_manifest("avss", root)
    lines[7] = lines[7] + '"'  # a second stray quote closes it: rows 5-8 would become one field
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"{csv_path}:5: a quoted field runs over lines 5-8"):
        build_manifest("avss", root)


def test_a_label_png_holding_jpeg_bytes_fails_at_index(tree):
    """Findings 2, D4: JPEG bytes under ``labels_semantic/0.png`` (mode L) passed the index, and their
    compression noise invented class ids on ~10 % of the pixels. A mask must be a PNG."""
    from icf.data.io import read_mask

    root = tree / "avss"
    sample = load_samples("avss", root)[0]
    path = sample.mask_paths[0]
    ids = np.asarray(Image.open(path))
    Image.fromarray(ids).save(path, format="JPEG", quality=90)
    error = _errors(build_manifest("avss", root))[sample.uid]
    assert error.startswith(f"{path}: a mask must be a PNG (lossless), found JPEG bytes")
    with pytest.raises(ValueError, match="a mask must be a PNG"):
        read_mask(path, "avss")
