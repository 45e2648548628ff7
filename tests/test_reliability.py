"""The cache under careless and hostile use (findings F1-F6, F10, F12 of specs/reliability-findings.md):
shards never stale, damaged cache files repaired by the tool, hostile CSV rows rejected at index."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from rich.console import Console

from icf.clitools import UserError
from icf.data.sample import Sample
from icf.data.shards import ShardSet
from icf.data.synth import synthesize
from icf.pipeline.engine import RunOptions, run_stage
from icf.pipeline.ledger import Workspace
from icf.workflow.run import pipeline_stages, run_pipeline
from icf.workflow.status import dataset_status
from icf.stages.extract import ExtractStage
from icf.stages.index import run_index
from icf.stages.shard import ShardStage

QUIET = Console(file=open(os.devnull, "w"))
UNIT = 3
TINY = ExtractStage.Config(encoders="tiny")
SMALL = ShardStage.Config(image_size=32)


def run_all(ws: Workspace, root: Path, shard: ShardStage.Config = SMALL, **opts) -> dict:
    """index + every stage, as `icf stage all` does; summaries by stage name."""
    force_index = opts.pop("force_index", False)
    summaries = run_pipeline(ws, pipeline_stages({"extract": TINY, "shard": shard}),
                             RunOptions(executor="local", progress=False, **opts), QUIET,
                             index=lambda: run_index(ws, root, None, UNIT, force=force_index))
    return {s.stage: s for s in summaries}


def files(ws: Workspace) -> dict[str, bytes]:
    """shards.json, the text bank and every tar, by path relative to the dataset folder."""
    paths = [ws.root / "shards.json", *sorted((ws.root / "shards").rglob("*.*"))]
    return {str(p.relative_to(ws.root)): p.read_bytes() for p in paths if p.is_file()}


def states(ws: Workspace) -> dict[str, str]:
    return {e["stage"]: e["state"] for e in dataset_status(ws)}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A 9-clip synthetic AVSS tree and the files of a clean run over it."""
    base = tmp_path_factory.mktemp("rel")
    synthesize("avss", base / "data", clips=9, seed=5, size=32)
    ws = Workspace(base / "ref", "avss")
    run_all(ws, base / "data")
    return base / "data", ws, files(ws)


@pytest.fixture
def copy(ref, tmp_path):
    """A fresh copy of the reference workspace (same dataset root, so the same keys)."""
    root, ws, clean = ref
    shutil.copytree(ws.work, tmp_path / "w")
    return root, Workspace(tmp_path / "w", "avss"), clean


# ------------------------------------------------------------------------------ F1 / F4: never stale

def test_switching_an_option_back_restores_that_options_shards(copy):
    root, ws, clean = copy
    run_all(ws, root, shard=ShardStage.Config(image_size=24))
    assert ShardSet.load(ws.root).image_size == 24
    out = run_all(ws, root)  # back to 32: every unit is cached, only the tars are rewritten
    assert out["shard"].computed == 0 and files(ws) == clean
    assert states(ws)["shard"] == "done"


@pytest.mark.parametrize("damage", ["delete_index", "truncate_index", "delete_tar", "truncate_tar"])
def test_deleted_or_broken_shards_are_rebuilt_by_stage_all(copy, damage):
    root, ws, clean = copy
    tar = sorted((ws.root / "shards" / "test").glob("*.tar"))[0]
    target = ws.root / "shards.json" if "index" in damage else tar
    if damage.startswith("delete"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:100])
    assert states(ws)["shard"] == "damaged"
    out = run_all(ws, root)
    assert out["shard"].computed == 0 and files(ws) == clean and states(ws)["shard"] == "done"


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_deleted_or_truncated_extract_text_bank_is_rewritten_by_stage_all(copy, damage):
    """The extract stage's dataset-level output (the prompt text bank) is checked like the shards: gone or cut,
    the stage shows as damaged and ``stage all`` writes it again, to the same bytes, without recomputing a clip."""
    root, ws, clean = copy
    bank = ws.stage_dir("extract", ws.current("extract")["cache_key"]) / "text_bank.npz"
    data = bank.read_bytes()
    if damage == "delete":
        bank.unlink()
    else:
        bank.write_bytes(data[: len(data) // 2])
    assert states(ws)["extract"] == "damaged"
    out = run_all(ws, root)
    assert out["extract"].computed == 0 and bank.read_bytes() == data and files(ws) == clean
    assert states(ws)["extract"] == "done"


# ------------------------------------------------------------------------------ F10: media edited in place

def test_a_media_file_edited_in_place_recomputes_that_clip_alone(ref, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ref[0], root)
    ws = Workspace(tmp_path / "w", "avss")
    run_all(ws, root)
    clean = files(ws)
    victim = Sample.from_row(next(r for r in ws.read_manifest().to_pylist() if r["status"] == "ok"))
    saved = {p: Path(p).read_bytes() for p in (victim.audio_path, victim.frame_paths[0])}
    sf.write(victim.audio_path, np.zeros(16000 * 5, np.float32), 16000, subtype="PCM_16")
    frame = Image.open(victim.frame_paths[0])
    Image.new(frame.mode, frame.size, "red").save(victim.frame_paths[0])
    out = run_all(ws, root)
    assert out["index"].rebuilt and out["index"].rechecked == 1
    assert out["mel"].computed == 1 and out["extract"].computed == 1 and out["shard"].computed == 1
    assert files(ws) != clean and states(ws)["shard"] == "done"
    again = run_all(ws, root)
    assert not again["index"].rebuilt and sum(again[s].computed for s in ("mel", "extract", "shard")) == 0
    for path, data in saved.items():  # the original files (with a new mtime): the same shards again
        Path(path).write_bytes(data)
    restored = run_all(ws, root)
    assert restored["mel"].computed == 1 and files(ws) == clean


# ------------------------------------------------------------------------------ F3: the tool repairs its cache

@pytest.mark.parametrize("kind", ["out.parquet", "status.parquet", "stats.json"])
def test_a_truncated_unit_file_is_reported_and_recomputed(copy, kind):
    root, ws, clean = copy
    key = ws.current("extract")["cache_key"]
    path = ws.stage_dir("extract", key) / f"unit-00001.{kind}"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    entry = next(e for e in dataset_status(ws) if e["stage"] == "extract")
    assert entry["state"] == "damaged" and str(path) in entry["problems"][0]
    with pytest.raises(UserError, match="extract"):  # a downstream stage refuses to read it
        run_stage(ws, ShardStage(SMALL), RunOptions(executor="local", progress=False, force=True), QUIET)
    out = run_all(ws, root)
    assert out["extract"].units_run == 1 and files(ws) == clean and states(ws)["extract"] == "done"


def test_force_and_only_recompute_without_reading_a_corrupt_file(copy):
    root, ws, clean = copy
    key = ws.current("extract")["cache_key"]
    path = ws.stage_dir("extract", key) / "unit-00001.out.parquet"
    path.write_bytes(path.read_bytes()[:200])
    unit = [r["uid"] for r in ws.read_manifest().to_pylist() if r["unit"] == 1]
    only = run_stage(ws, ExtractStage(TINY), RunOptions(executor="local", progress=False, only=frozenset(unit[:1])), QUIET)
    assert only.computed == 1 and only.counts["pending"] == len(unit) - 1  # the rest of the damaged unit waits
    run_stage(ws, ExtractStage(TINY), RunOptions(executor="local", progress=False, force=True), QUIET)
    assert states(ws)["extract"] == "done"
    out = run_all(ws, root)
    assert files(ws) == clean and out["extract"].computed == 0


def test_a_missing_upstream_file_never_fails_downstream_clips(copy):
    root, ws, clean = copy
    key = ws.current("extract")["cache_key"]
    (ws.stage_dir("extract", key) / "unit-00001.out.parquet").unlink()
    with pytest.raises(UserError, match="damaged unit"):
        run_stage(ws, ShardStage(SMALL), RunOptions(executor="local", progress=False, force=True), QUIET)
    out = run_all(ws, root)  # extract recomputes the unit; shard has nothing to redo
    assert out["extract"].units_run == 1 and out["shard"].failed == 0 and files(ws) == clean


def test_a_corrupt_manifest_or_stats_is_rebuilt_by_the_index(copy):
    root, ws, clean = copy
    ws.manifest.write_bytes(ws.manifest.read_bytes()[:50])
    with pytest.raises(UserError, match="manifest.parquet: corrupt file"):
        dataset_status(ws)
    run_all(ws, root)
    ws.manifest_stats.write_text("{")
    out = run_all(ws, root)
    assert sum(out[s].computed for s in ("mel", "extract", "shard")) == 0 and files(ws) == clean


# ------------------------------------------------------------------------------ F5 / F6 / F12: hostile rows

def _append(root: Path, *lines: str) -> None:
    csv = root / "metadata.csv"
    text = csv.read_text().rstrip("\n")
    csv.write_text(text + "\n" + "\n".join(lines) + "\n")


@pytest.fixture
def tree(ref, tmp_path):
    shutil.copytree(ref[0], tmp_path / "data")
    return tmp_path / "data"


def _first_row(root: Path) -> tuple[str, list[str]]:
    lines = (root / "metadata.csv").read_text().splitlines()
    return lines[0], lines[1].split(",")


def test_duplicate_uid_keeps_the_first_row(tree, tmp_path):
    header, row = _first_row(tree)
    _append(tree, ",".join(row))
    ws = Workspace(tmp_path / "w", "avss")
    out = run_all(ws, tree)
    assert out["index"].failed == 1 and "duplicate uid" in out["index"].failures[0][1]
    uid = row[header.split(",").index("uid")]
    assert out["shard"].counts["ok"] == 9 and out["shard"].counts.get("skipped", 0) == 0
    shards = ShardSet.load(ws.root)
    assert sum(shards.num_samples(s) for s in shards.splits if shards.splits[s]) == 9
    assert uid in dict(out["index"].failures)


def test_uids_that_collide_as_webdataset_keys_fail_at_index(tree, tmp_path):
    header, row = _first_row(tree)
    cols = header.split(",")
    i = cols.index("uid")
    dotted, under = list(row), list(row)
    dotted[i], under[i] = "abc.1", "abc_1"
    _append(tree, ",".join(dotted), ",".join(under))
    ws = Workspace(tmp_path / "w", "avss")
    summary = run_index(ws, tree, None, UNIT)
    reasons = dict(summary.failures)
    assert "collides with the earlier uid 'abc.1'" in reasons["abc_1"]


def test_a_uid_that_climbs_out_of_the_root_fails_at_index(tree, tmp_path):
    header, row = _first_row(tree)
    cols = header.split(",")
    uid = row[cols.index("uid")]
    evil = list(row)
    evil[cols.index("uid")] = f"../../{tree.name}/{row[cols.index('label')]}/{uid}"
    _append(tree, ",".join(evil))
    ws = Workspace(tmp_path / "w", "avss")
    summary = run_index(ws, tree, None, UNIT)
    reason = dict(summary.failures)[evil[cols.index("uid")]]
    assert "not a plain relative name" in reason


def test_paths_outside_the_root_are_rejected(tmp_path):
    from icf.stages.index import outside_root

    root = tmp_path / "d"
    inside = Sample("u", "s4", "train", "s4", (str(root / "a.png"),), ("",), (False,), str(root / "a.wav"), (), 1)
    outside = Sample("u", "s4", "train", "s4", (str(root / ".." / "x.png"),), ("",), (False,), str(root / "a.wav"), (), 1)
    assert outside_root(inside, root) == ""
    assert "outside the dataset root" in outside_root(outside, root)


def test_a_media_symlink_to_a_file_outside_the_root_fails_at_index(tree, tmp_path):
    """Findings 2, D11: a frame that is a symlink to a file outside ``--root`` was packed into the shards.
    It fails at index now; a symlinked folder inside the tree (a dataset spread over disks) still works."""
    ws = Workspace(tmp_path / "w", "avss")
    rows = run_index_rows(ws, tree)
    victim, other = Sample.from_row(rows[0]), Sample.from_row(rows[1])
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(victim.frame_paths[2], secret)
    os.remove(victim.frame_paths[2])
    os.symlink(secret, victim.frame_paths[2])
    clip = Path(other.audio_path).parent
    shutil.move(clip, tmp_path / "disk2")
    os.symlink(tmp_path / "disk2", clip)
    reasons = dict(run_index(ws, tree, None, UNIT).failures)
    assert reasons == {victim.uid: f"{victim.frame_paths[2]}: a symlink to {secret}, outside the dataset root {tree}"}


def test_a_bank_borrowed_from_its_own_dataset_is_refused_before_any_work(copy):
    """Findings 2, D17: ``stage bank --bank-from avss`` on AVSS computed a bank in a new key, then blamed a
    missing npz and left ``icf status`` showing bank and shard stale. Now it refuses first, changing nothing."""
    from icf.stages.bank import BankStage

    root, ws, clean = copy
    before = states(ws)
    own = BankStage(BankStage.Config(bank_from="avss"))
    with pytest.raises(UserError, match="--bank-from avss: avss cannot borrow its own bank"):
        run_stage(ws, own, RunOptions(executor="local", progress=False), QUIET)
    with pytest.raises(UserError, match="cannot borrow its own bank"):
        run_pipeline(ws, pipeline_stages({"extract": TINY, "bank": own.cfg, "shard": SMALL}),
                     RunOptions(executor="local", progress=False), QUIET, index=lambda: run_index(ws, root, None, UNIT))
    assert states(ws) == before and set(before.values()) == {"done"} and files(ws) == clean


# ------------------------------------------------------------------------------ F2: shards verified when read

def _test_tar(ws: Workspace) -> Path:
    return sorted((ws.root / "shards" / "test").glob("*.tar"))[0]


def _member_offsets(tar: Path) -> list[int]:
    """Byte offset of each sample's first member header in ``tar``."""
    import tarfile

    starts, seen = [], set()
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key = m.name.split(".")[0]
            if key not in seen:
                seen.add(key)
                starts.append(m.offset)
    return starts


def _stream_all(ws: Workspace, split: str = "test", workers: int = 0) -> int:
    from icf.data.shards import ShardStream, make_loader

    stream = ShardStream(ShardSet.load(ws.root), split, 1, 32, train=False)
    return sum(len(b["uid"]) for b in make_loader(stream, workers))


def _rewrite_index(ws: Workspace, tar: Path, **fields) -> None:
    import json

    doc = json.loads((ws.root / "shards.json").read_text())
    for entries in doc["splits"].values():
        for e in entries:
            if (ws.root / e["url"]) == tar:
                e.update(fields)
    (ws.root / "shards.json").write_text(json.dumps(doc))


def test_a_truncated_or_altered_shard_is_a_one_line_error_naming_it(copy):
    import hashlib

    from icf.clitools import one_line
    from icf.data.shard_check import ShardError

    root, ws, clean = copy
    tar = _test_tar(ws)
    n = _stream_all(ws)
    assert n == sum(e["nsamples"] for e in ShardSet.load(ws.root).splits["test"])
    data = tar.read_bytes()
    tar.write_bytes(data[: _member_offsets(tar)[-1]])  # cut at a sample boundary: one clip fewer
    with pytest.raises(ShardError, match=f"{tar.name}: shard is .* bytes, shards.json says {len(data)}"):
        ShardSet.load(ws.root)
    cut = tar.read_bytes()
    _rewrite_index(ws, tar, filesize=len(cut), sha256=hashlib.sha256(cut).hexdigest())
    with pytest.raises(ShardError, match=f"holds {n - 1} samples, shards.json says {n}"):
        _stream_all(ws)
    tar.write_bytes(data[: len(data) // 2 + 7])  # mid-member
    _rewrite_index(ws, tar, filesize=len(data) // 2 + 7)
    with pytest.raises(ShardError, match="unreadable shard"):
        _stream_all(ws)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x01  # one bit inside a member
    tar.write_bytes(bytes(flipped))
    _rewrite_index(ws, tar, filesize=len(data), nsamples=n, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(Exception) as info:  # through two DataLoader workers: still one line
        _stream_all(ws, workers=2)
    message = one_line(str(info.value))
    assert "\n" not in message and message.startswith(str(tar)) and "sha256 differs" in message
    assert "icf stage shard --dataset avss" in message and "--force" in message


def test_verify_names_every_damaged_file_and_stage_all_repairs_them(copy):
    from typer.testing import CliRunner

    from icf.cli import app

    root, ws, clean = copy
    cli = CliRunner()
    ok = cli.invoke(app, ["verify", "--dataset", "avss", "--work", str(ws.work)])
    assert ok.exit_code == 0 and "all intact" in ok.output
    tar = _test_tar(ws)
    flipped = bytearray(tar.read_bytes())
    flipped[1000] ^= 0x10
    tar.write_bytes(bytes(flipped))
    unit = ws.stage_dir("mel", ws.current("mel")["cache_key"]) / "unit-00002.out.parquet"
    unit.write_bytes(unit.read_bytes()[:-30])
    bad = cli.invoke(app, ["verify", "--dataset", "avss", "--work", str(ws.work), "--json"])
    assert bad.exit_code == 1
    import json

    problems = json.loads(bad.stdout)["problems"]
    assert len(problems) == 2 and any(str(unit) in p for p in problems) and any("sha256 differs" in p for p in problems)
    run_all(ws, root)  # the unit is recomputed (footer check); the tar has the right size, so it needs --force
    assert cli.invoke(app, ["verify", "--dataset", "avss", "--work", str(ws.work)]).exit_code == 1
    run_stage(ws, ShardStage(SMALL), RunOptions(executor="local", progress=False, force=True), QUIET)
    assert cli.invoke(app, ["verify", "--dataset", "avss", "--work", str(ws.work)]).exit_code == 0
    assert files(ws) == clean


# ------------------------------------------------------------------------------ newcomer: no weights, no flags

def test_a_random_roberta_clap_without_a_text_folder_builds_offline_and_says_so(tmp_path):
    from icf.encoders.clap import ClapEncoder
    from icf.encoders.spec import TINY_CLAP, EncoderWeightsError

    with pytest.warns(UserWarning, match="no --clap-text-dir.*'transformer' text tower"):
        clap = ClapEncoder(TINY_CLAP, "roberta")  # the default spec's text model, no folder, no weights
    assert clap.tmodel == "transformer" and clap.encode_text(["a dog"]).shape == (1, clap.dim)
    weights = tmp_path / "clap.pt"
    weights.write_bytes(b"x")
    with pytest.raises(EncoderWeightsError, match="--clap-text-dir"):  # a LAION checkpoint needs RoBERTa
        ClapEncoder(TINY_CLAP, "roberta", weights=str(weights))


# ------------------------------------------------------------------------------ F11: concurrent runs

def test_a_second_run_on_a_locked_workspace_refuses(copy):
    from typer.testing import CliRunner

    from icf.cli import app
    from icf.pipeline.lock import workspace_lock

    root, ws, clean = copy
    with workspace_lock(ws.root):
        res = CliRunner().invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(ws.work),
                                       "--executor", "local", "--encoders", "tiny", "--image-size", "32", "--no-progress"])
        assert res.exit_code == 2 and "another icf run is working on this dataset (pid" in res.output
    res = CliRunner().invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(ws.work),
                                   "--executor", "local", "--encoders", "tiny", "--image-size", "32", "--no-progress"])
    assert res.exit_code == 0 and files(ws) == clean  # released when the holder is done


def test_sweeping_never_deletes_a_live_runs_temp_files(tmp_path):
    import subprocess
    import sys

    from icf.pipeline.store import TMP_INFIX, sweep_temp_files, temp_path
    from icf.stages.shard import _TarWriter

    folder = tmp_path / "shards" / "train"
    first = _TarWriter(folder, "avss-train", 10**9)
    first.add("clip1", {"x.npy": b"0" * 1000})
    _TarWriter(folder, "avss-train", 10**9)  # a second run starting its finish step sweeps the folder
    assert first.close()[0]["nsamples"] == 1  # the first run's in-flight tar survived
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = Path(str(temp_path(folder / "y.tar")).replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    orphan.write_bytes(b"half")
    legacy = folder / f"z.tar{TMP_INFIX}0123456789ab"
    legacy.write_bytes(b"half")
    live = temp_path(folder / "w.tar")
    live.write_bytes(b"writing")
    assert sweep_temp_files(folder) == 2 and live.exists() and not orphan.exists() and not legacy.exists()


# ------------------------------------------------------------------------------ F14: media edge cases

def test_a_16_bit_frame_is_scaled_not_clipped_and_a_symlink_loop_is_named(tmp_path):
    from icf.data.io import read_rgb

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 … 65472
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    rgb = read_rgb(tmp_path / "wide.png")
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257).astype(np.uint8))  # not all white
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match="loop.jpg: broken or looping symlink"):
        read_rgb(loop)


def test_a_full_disk_mid_run_is_one_line_after_the_summaries_of_what_finished(ref, tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from icf.cli import app
    from icf.pipeline import store

    real = store.atomic_write

    def fills_up(path, data):
        if "/shard/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store, "atomic_write", fills_up)
    res = CliRunner().invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(ref[0]), "--work", str(tmp_path / "w"),
                                   "--executor", "local", "--encoders", "tiny", "--image-size", "32", "--no-progress"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and lines[-1].startswith("error:") and "No space left on device" in lines[-1]
    assert "Traceback" not in res.output and any(line.startswith("extract [") for line in lines)


# ------------------------------------------------------------------------------ findings 2, D8: transient failures heal

def test_a_clip_whose_files_were_briefly_missing_is_recomputed_once_they_are_back(tree, tmp_path):
    """Files moved away after the index and moved back unchanged (same size and mtime, so the same input
    signature): ``stage all`` recomputes the clip instead of keeping its 'missing file' failure, and
    ``icf status`` no longer names a missing file that exists."""
    ws = Workspace(tmp_path / "w", "avss")
    run_index(ws, tree, None, UNIT)
    victim = Sample.from_row(ws.read_manifest().to_pylist()[0])
    moved = {p: tmp_path / f"away{i}" for i, p in enumerate((victim.audio_path, victim.frame_paths[3]))}
    for path, away in moved.items():
        os.rename(path, away)
    stages = pipeline_stages({"extract": TINY, "shard": SMALL})
    summaries = {s.stage: s for s in run_pipeline(ws, stages, RunOptions(executor="local", progress=False), QUIET)}
    assert summaries["extract"].failed == 1 and summaries["mel"].failed == 1
    for path, away in moved.items():
        os.rename(away, path)
    entry = next(e for e in dataset_status(ws) if e["stage"] == "extract")
    assert entry["state"] == "incomplete" and "readable again" in entry["failures"][0]["error"]
    out = run_all(ws, tree)
    assert not out["index"].rebuilt  # the clip's files are as they were at index time
    assert out["extract"].computed == 1 and out["mel"].computed == 1 and out["extract"].failed == 0
    assert out["shard"].counts["ok"] == 9
    shards = ShardSet.load(ws.root)
    assert sum(shards.num_samples(s) for s in shards.splits if shards.splits[s]) == 9
    assert all(e["state"] == "done" and not e["failures"] for e in dataset_status(ws))
    again = run_all(ws, tree)
    assert sum(again[s].computed for s in ("mel", "extract", "shard")) == 0


def test_a_clip_that_failed_for_content_is_not_recomputed_on_every_run(tree, tmp_path):
    """Only failures that blame a missing or unreadable file are re-checked: a clip whose audio is too short
    (a content failure) stays failed without being recomputed."""
    ws = Workspace(tmp_path / "w", "avss")
    victim = Sample.from_row(next(r for r in run_index_rows(ws, tree)))
    sf.write(victim.audio_path, np.zeros(800, np.float32), 16000, subtype="PCM_16")  # 0.05 s
    first = run_all(ws, tree)
    assert first["extract"].failed == 1
    again = run_all(ws, tree)
    assert again["extract"].failed == 1 and again["extract"].computed == 0 and again["mel"].computed == 0


def run_index_rows(ws: Workspace, root: Path) -> list[dict]:
    run_index(ws, root, None, UNIT)
    return ws.read_manifest().to_pylist()
