"""The four stages on synthetic AVSBench trees: outputs, broken samples, reruns, SIGKILL resume and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from icf.cli import app
from icf.data.sample import Sample
from icf.data.shard_format import decode_sample
from icf.data.shards import ShardSet
from icf.data.synth import synthesize
from icf.pipeline.engine import RunOptions, run_stage
from icf.pipeline.ledger import Workspace
from icf.stages import stage_classes
from icf.stages.extract import ExtractStage
from icf.stages.index import run_index
from icf.stages.mel import MelStage
from icf.workflow.run import pipeline_stages, run_pipeline

QUIET = Console(file=open(os.devnull, "w"))
UNIT = 3
TINY = ExtractStage.Config(encoders="tiny")


def run_all(ws: Workspace, root: Path | None, executor: str = "local", **stage_cfg) -> dict:
    """index (unless ``root`` is None) + every stage in order (as `icf stage all` does); returns the
    summaries by stage."""
    index = (lambda: run_index(ws, root, None, UNIT)) if root is not None else None
    summaries = run_pipeline(ws, pipeline_stages(stage_cfg), RunOptions(executor=executor, progress=False), QUIET, index=index)
    return {s.stage: s for s in summaries}


def shard_hashes(work: Path, dataset: str) -> dict[str, str]:
    """url → sha256 of every shard and the text bank, checking each against shards.json."""
    index = json.loads((work / dataset / "shards.json").read_text())
    hashes = {}
    for entries in index["splits"].values():
        for e in entries:
            data = (work / dataset / e["url"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["filesize"]
            hashes[e["url"]] = e["sha256"]
    hashes[index["text_bank"]] = hashlib.sha256((work / dataset / index["text_bank"]).read_bytes()).hexdigest()
    return hashes


def env() -> dict[str, str]:
    """Subprocess environment: offline, and no RAY_ADDRESS (a test cluster's) so `icf` embeds its own Ray."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**base, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def avss(tmp_path_factory):
    """A 9-clip synthetic AVSS tree (v1s / v1m / v2, every split) and its reference local run."""
    base = tmp_path_factory.mktemp("avss")
    synthesize("avss", base / "data", clips=9, seed=3, size=48)
    ws = Workspace(base / "ref", "avss")
    summaries = run_all(ws, base / "data", extract=TINY, shard=None)
    return base / "data", ws, summaries, shard_hashes(ws.work, "avss")


# ------------------------------------------------------------------------------------------------ mel

def vggish_log_mel(wave: np.ndarray) -> np.ndarray:
    """Independent float64 reference of the VGGish front end (mel_features.py's published algorithm),
    written differently from icf/stages/mel.py: an explicit DFT and a per-bin, per-band mel matrix."""
    n = 1 + (len(wave) - 400) // 160
    frames = np.stack([wave[i * 160 : i * 160 + 400] for i in range(n)]).astype(np.float64)
    window = np.array([0.5 - 0.5 * math.cos(2 * math.pi * k / 400) for k in range(400)])
    k = np.arange(257)[:, None] * np.arange(400)[None, :]  # 512-point DFT of a 400-sample frame (zero-padded)
    re, im = (frames * window) @ np.cos(2 * math.pi * k / 512).T, (frames * window) @ np.sin(2 * math.pi * k / 512).T
    spectrum = np.sqrt(re**2 + im**2)

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(125.0), mel(7500.0)
    edges = [lo + (hi - lo) * j / 65 for j in range(66)]
    bank = np.zeros((257, 64))
    for b in range(1, 257):  # the DC bin keeps weight 0
        m = mel(8000.0 * b / 256)
        for band in range(64):
            left, centre, right = edges[band : band + 3]
            if left < m < right:
                bank[b, band] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    return np.log(spectrum @ bank + 0.01)


def test_log_mel_matches_an_independent_vggish_reference_to_float16_resolution():
    stage = MelStage()
    stage.setup()
    rng = np.random.default_rng(0)
    wave = (rng.uniform(-0.5, 0.5, 80000) * np.linspace(0.01, 1, 80000)).astype(np.float32)  # 5 s, rising level
    ours = stage.patches(stage.log_mel(wave), 5).astype(np.float16)  # what the stage stores
    ref = vggish_log_mel(wave)
    assert ref.shape == (498, 64)  # VGGish: 498 STFT frames for 5 s
    ref_patches = ref[: 5 * 96].reshape(5, 96, 64)
    ulp = np.spacing(np.abs(ref_patches).astype(np.float16)).astype(np.float64)
    assert (np.abs(ours.astype(np.float64) - ref_patches) <= ulp).all()  # within one float16 step everywhere
    # the torchaudio filterbank (triangles linear in Hz) the stage used before is off by more than that
    hz_bank = torchaudio.functional.melscale_fbanks(257, 125.0, 7500.0, 64, 16000, norm=None, mel_scale="htk")
    x = torch.from_numpy(wave.astype(np.float64))
    frames = x.unfold(0, 400, 160) * torch.hann_window(400, periodic=True, dtype=torch.float64)
    old = torch.log(torch.fft.rfft(frames, 512).abs() @ hz_bank.double() + 0.01).numpy()
    assert (np.abs(old[: 5 * 96].reshape(5, 96, 64) - ref_patches) > 2 * ulp).any()  # max 0.012 here


def test_short_audio_repeats_the_last_patch_and_too_short_fails():
    stage = MelStage()
    stage.setup()
    four_s = stage.patches(stage.log_mel(np.zeros(4 * 16000, np.float32) + 0.1), 5)
    assert four_s.shape == (5, 96, 64)
    np.testing.assert_array_equal(four_s[4], four_s[3])
    with pytest.raises(ValueError, match="shorter than one 96-frame patch"):
        stage.patches(stage.log_mel(np.zeros(8000, np.float32)), 5)


def test_mel_resamples_and_downmixes_instead_of_failing(tmp_path):
    t = np.arange(5 * 44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "stereo44k.wav", np.stack([tone, tone], 1), 44100)
    t16 = np.arange(5 * 16000) / 16000
    sf.write(tmp_path / "ref16k.wav", (0.3 * np.sin(2 * np.pi * 440 * t16)).astype(np.float32), 16000)
    stage = MelStage()
    stage.setup()

    def sample(name):
        return Sample(name, "s4", "test", "s4", ("f",) * 5, ("",) * 5, (False,) * 5, str(tmp_path / f"{name}.wav"), (), 5)

    results = stage.process([sample("stereo44k"), sample("ref16k")], {})
    assert all(r.ok for r in results)
    a, b = (r.outputs["mel"].astype(np.float32) for r in results)
    assert a.shape == b.shape == (5, 96, 64)
    assert np.abs(a - b).mean() < 0.1  # the same tone, resampled 44.1k stereo → 16k mono


# ---------------------------------------------------------------------------------------- shard format

def test_shards_hold_every_member_the_trainer_reads(avss):
    root, ws, summaries, _ = avss
    assert {n: s.counts.get("ok", 0) for n, s in summaries.items() if n != "index"} == {"mel": 9, "extract": 9, "bank": 9, "shard": 9}
    shards = ShardSet.load(ws.root / "shards.json")
    assert shards.audio_bank is not None and shards.audio_bank.is_file() and "clap_latent" in shards.members
    assert shards.image_size == 224 and shards.num_classes == 71 and shards.classes[0] == "background"
    assert shards.encoders["clip_model"] == "icf-tiny-clip"
    with np.load(shards.text_bank) as bank:
        assert {"video", "segment", "frame", "audio", "names"} <= set(bank.files)
        assert bank["frame"].shape[0] == len(bank["names"]) == 70
    manifest_uids = ws.read_manifest().column("uid").to_pylist()
    seen = 0
    for split in shards.splits:
        for entry in shards.splits[split]:
            with tarfile.open(entry["url"]) as tar:
                infos = tar.getmembers()
                assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o644 for i in infos)
                raw: dict[str, dict] = {}
                for i in infos:
                    key, member = i.name.split(".", 1)
                    raw.setdefault(key, {"__key__": key})[member] = tar.extractfile(i).read()
            for key, members in raw.items():
                names = [m for m in members if m != "__key__"]
                clip = decode_sample(members)
                meta, t = clip["meta"], clip["meta"]["n_frames"]
                assert meta["split"] == split and key == meta["uid"].replace(".", "_")
                assert clip["frames"].shape == (t, 3, 224, 224) and clip["mel"].shape == (t, 96, 64)
                assert clip["clip"].shape[0] == t and clip["clap"].shape[0] == t and clip["clap_latent"].shape[0] == t
                assert clip["vclip_seg"].shape[0] == {5: 3, 10: 4}[t]  # AVSS window ⌈T/4⌉: 2 or 3 frames
                gt = clip["gt"].numpy()
                assert sorted(n for n in names if n.endswith(".png")) == [f"m{i}.png" for i in np.flatnonzero(gt)]
                assert np.load(io.BytesIO(members["mel.npy"])).dtype == np.float16
                norms = torch.linalg.vector_norm(clip["clip"], dim=-1)
                assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
                assert meta["labels"] == [shards.classes.index(c) for c in meta["classes"]]
                assert manifest_uids[meta["order"]] == meta["uid"]  # CSV position = manifest row
                seen += 1
    assert seen == 9


def test_config_change_recomputes_that_stage_and_downstream_only(avss, tmp_path):
    root, ref_ws, summaries, ref_hashes = avss
    ws = Workspace(tmp_path / "w", "avss")
    shutil.copytree(ref_ws.root, ws.root)
    opts = RunOptions(executor="local", progress=False)
    mel = run_stage(ws, MelStage(MelStage.Config(n_mels=32)), opts, QUIET)
    assert mel.cache_key != summaries["mel"].cache_key and mel.computed == 9
    extract = run_stage(ws, ExtractStage(TINY), opts, QUIET)
    assert extract.cache_key == summaries["extract"].cache_key and extract.computed == 0
    shard = run_stage(ws, stage_classes()["shard"](), opts, QUIET)
    assert shard.cache_key != summaries["shard"].cache_key and shard.computed == 9
    clip = decode_sample(_first_sample(ws))
    assert clip["mel"].shape[-1] == 32
    again = run_all(ws, root, mel=MelStage.Config(n_mels=32), extract=TINY)
    assert sum(s.computed for n, s in again.items() if n != "index") == 0


def _first_sample(ws: Workspace) -> dict:
    index = json.loads((ws.root / "shards.json").read_text())
    url = ws.root / next(e for v in index["splits"].values() for e in v)["url"]
    with tarfile.open(url) as tar:
        infos = tar.getmembers()
        key = infos[0].name.split(".", 1)[0]
        return {"__key__": key, **{i.name.split(".", 1)[1]: tar.extractfile(i).read() for i in infos if i.name.startswith(key + ".")}}


# ------------------------------------------------------------------------------------- broken samples

def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_broken_samples_are_recorded_and_left_out(tmp_path):
    root = tmp_path / "data"
    synthesize("s4", root, clips=8, seed=1, size=32)
    with (root / "s4_meta_data.csv").open("a") as fh:
        fh.write("zzzzzzzzzzz,0,helicopter,holdout\n")  # unknown split: failed at index, in no shard
    ws = Workspace(tmp_path / "w", "s4")
    index = run_index(ws, root, None, UNIT)
    s = {r["uid"]: Sample.from_row(r) for r in ws.read_manifest().to_pylist() if r["status"] == "ok"}
    a, b, c, d, e, f, g, *_ = sorted(s)
    _truncate(s[a].audio_path)  # truncated WAV
    Path(s[b].audio_path).write_bytes(Path(s[b].audio_path).read_bytes()[:44])  # empty WAV (header only)
    wave, sr = sf.read(s[c].audio_path, dtype="float32")
    wave[100] = np.nan
    sf.write(s[c].audio_path, wave, sr, subtype="FLOAT")  # NaN in the audio → NaN in the mel
    wave, sr = sf.read(s[d].audio_path, dtype="float32")
    up = np.repeat(wave, 3)  # 16 kHz → 48 kHz, same duration
    sf.write(s[d].audio_path, np.stack([up, up], 1), 48000, subtype="PCM_16")  # 48 kHz stereo: fine
    Path(s[e].frame_paths[2]).unlink()  # missing frame
    gt_mask = next(m for m, g in zip(s[f].mask_paths, s[f].gt_frames) if g)
    Image.new("L", (7, 9)).save(gt_mask)  # mask of the wrong size
    Image.new("RGB", (40, 30)).save(s[g].frame_paths[3])  # one frame of another size than the rest
    assert index.failed == 1  # the holdout row; the rest broke after indexing: the stages must catch every case

    out = run_all(ws, None, extract=TINY)  # no re-index: it would catch most of them first
    mel, extract, shard = out["mel"], out["extract"], out["shard"]
    reasons = {stage: dict(summary.failures) for stage, summary in out.items() if stage != "index"}
    assert set(reasons["mel"]) == {a, b, c}
    assert s[a].audio_path in reasons["mel"][a] and "truncated" in reasons["mel"][a]
    assert s[b].audio_path in reasons["mel"][b] and "empty" in reasons["mel"][b]
    assert "NaN or Inf in the mel output" in reasons["mel"][c]
    assert set(reasons["extract"]) == {a, b, e, g}  # extract reads its own inputs: the NaN WAV still embeds
    assert s[e].frame_paths[2] in reasons["extract"][e]
    assert reasons["extract"][g].startswith(f"{s[g].frame_paths[3]}: frame 3 is 40x30, but frame 0")
    assert reasons["shard"] == {f: reasons["shard"][f]} and gt_mask in reasons["shard"][f] and "7x9" in reasons["shard"][f]
    assert shard.counts == {"ok": 2, "failed": 1, "skipped": 6}  # a, b, c (mel), e, g (extract), the holdout row
    assert mel.counts["ok"] == 5 and extract.counts["ok"] == 4
    assert set(json.loads((ws.root / "shards.json").read_text())["splits"]) <= {"train", "val", "test"}
    assert not (ws.root / "shards" / "holdout").exists()
    shards = ShardSet.load(ws.root / "shards.json")
    assert sum(shards.num_samples(sp) for sp in shards.splits if shards.splits[sp]) == 2

    # --retry-failed after repairing the frame recomputes only what failed, here and downstream
    Image.new("RGB", (32, 32)).save(s[e].frame_paths[2])
    fixed = run_stage(ws, ExtractStage(TINY), RunOptions(executor="local", progress=False, retry_failed=True),
                      QUIET, {"mel": mel.cache_key})
    assert fixed.computed == 4 and set(dict(fixed.failures)) == {a, b, g}  # a, b, g still broken; e repaired
    bank = run_stage(ws, stage_classes()["bank"](), RunOptions(executor="local", progress=False), QUIET)
    assert bank.computed == 1 and bank.units_run == 1  # e, now embedded, gets its labels
    again = run_stage(ws, stage_classes()["shard"](), RunOptions(executor="local", progress=False), QUIET)
    assert again.counts["ok"] == 3 and again.units_run == 1


# ------------------------------------------------------------------------------------- SIGKILL resume

def test_sigkill_mid_stage_then_rerun_gives_the_same_shards(avss, tmp_path):
    root, _, summaries, ref_hashes = avss
    ws = Workspace(tmp_path / "w", "avss")
    run_index(ws, root, None, UNIT)
    run_stage(ws, MelStage(), RunOptions(executor="local", progress=False), QUIET)
    cmd = [sys.executable, "-m", "icf.cli", "stage", "extract", "--dataset", "avss", "--work", str(ws.work),
           "--encoders", "tiny", "--executor", "local", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = summaries["extract"].cache_key
    folder = ws.stage_dir("extract", key)
    total = summaries["extract"].units
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(folder.glob("unit-*.stats.json")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(folder.glob("unit-*.stats.json")))
    assert 1 <= done_at_kill < total, "the stage was not interrupted mid-way"
    rest = run_all(ws, root, extract=TINY)
    assert rest["mel"].computed == 0 and rest["extract"].units_run == total - done_at_kill
    assert shard_hashes(ws.work, "avss") == ref_hashes


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_index_user_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["stage", "index", "--dataset", "s4", "--root", str(tmp_path / "nope"), "--work", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "nope" in res.output
    res = runner.invoke(app, ["stage", "index", "--dataset", "s5", "--root", str(tmp_path), "--work", str(tmp_path)])
    assert res.exit_code == 2 and "unknown dataset 's5'" in res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "s4_meta_data.csv").write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["stage", "index", "--dataset", "s4", "--root", str(bad), "--work", str(tmp_path)])
    assert res.exit_code == 2 and "s4_meta_data.csv" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("command", [["stage", "mel"], ["stage", "extract", "--encoders", "tiny"], ["stage", "shard"],
                                     ["stage", "all"], ["status"]])
def test_cli_every_command_without_a_manifest_says_what_to_do(command, tmp_path):
    res = CliRunner().invoke(app, [*command, "--dataset", "ms3", "--work", str(tmp_path)])
    message = res.output.strip()
    assert res.exit_code == 2 and "Traceback" not in res.output and len(message.splitlines()) == 1, res.output
    assert message.startswith("error:") and ("run `icf stage index" in message or "--root is required" in message)
    res = CliRunner().invoke(app, [*command, "--dataset", "coco", "--work", str(tmp_path)])
    assert res.exit_code == 2 and "unknown dataset 'coco'" in res.output


def test_cli_strict_and_status(tmp_path):
    root = tmp_path / "data"
    synthesize("s4", root, clips=4, seed=2, size=32)
    _truncate(next(root.rglob("*.wav")))
    work = str(tmp_path / "w")
    runner = CliRunner()
    res = runner.invoke(app, ["stage", "index", "--dataset", "s4", "--root", str(root), "--work", work, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["counts"] == {"ok": 3, "failed": 1}  # one JSON object
    res = runner.invoke(app, ["stage", "index", "--dataset", "s4", "--root", str(root), "--work", work, "--strict"])
    assert res.exit_code == 1
    res = runner.invoke(app, ["stage", "mel", "--dataset", "s4", "--work", work, "--executor", "local", "--strict"])
    assert res.exit_code == 0  # the index failure is skipped here, not a mel failure
    res = runner.invoke(app, ["status", "--dataset", "s4", "--work", work, "--json"])
    entries = {e["stage"]: e for e in json.loads(res.stdout)["stages"]}
    assert entries["index"]["counts"]["failed"] == 1 and "truncated" in entries["index"]["failures"][0]["error"]
    assert entries["mel"]["counts"] == {"ok": 3, "failed": 0, "skipped": 1, "pending": 0}
    assert entries["mel"]["units_pending"] == 0 and entries["extract"]["cache_key"] is None
    assert [entries[n]["state"] for n in ("index", "mel", "extract", "shard")] == ["done", "done", "not run", "not run"]
    res = runner.invoke(app, ["status", "--dataset", "s4", "--work", work])
    assert "not done: extract, bank, shard" in res.stdout and "1 failures recorded; --failed lists them" in res.stdout
    res = runner.invoke(app, ["status", "--dataset", "s4", "--work", work, "--failed"])
    assert res.exit_code == 0 and "truncated WAV" in res.stdout
    runner.invoke(app, ["stage", "index", "--dataset", "s4", "--root", str(root), "--work", work, "--unit-size", "1"])
    res = runner.invoke(app, ["status", "--dataset", "s4", "--work", work, "--json"])
    assert {e["stage"]: e["state"] for e in json.loads(res.stdout)["stages"]}["mel"] == "stale"  # new units upstream


def test_cli_stage_all_on_embedded_ray_matches_the_local_run(avss, tmp_path):
    """`icf stage all` with the default executor (an embedded Ray started by the command), then a no-op rerun."""
    root, _, _, ref_hashes = avss
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "icf.cli", "stage", "all", "--dataset", "avss", "--root", str(root), "--work",
           str(work), "--encoders", "tiny", "--unit-size", str(UNIT), "--json"]
    first = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert shard_hashes(work, "avss") == ref_hashes
    again = subprocess.run(cmd + ["--executor", "local"], env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [s.get("computed", 0) for s in json.loads(again.stdout)["stages"]] == [0, 0, 0, 0, 0]
    assert shard_hashes(work, "avss") == ref_hashes


def test_a_stage_option_named_like_a_run_option_is_refused_by_name(monkeypatch):
    """A stage whose Config field collides with a shared run option (--workers) gets a command that says so;
    every other command keeps working."""
    import dataclasses

    import typer

    from icf.pipeline.stage import Stage
    from icf.workflow import cli as workflow_cli

    class Clashing(Stage):
        name, version = "clashing", "1"

        @dataclasses.dataclass(frozen=True)
        class Config:
            workers: int = 3

    monkeypatch.setattr(workflow_cli, "stage_classes", lambda: {**stage_classes(), "clashing": Clashing})
    monkeypatch.setattr(workflow_cli, "stage_app", typer.Typer(no_args_is_help=True))
    app2 = typer.Typer()
    workflow_cli.register(app2)
    runner = CliRunner()
    res = runner.invoke(app2, ["stage", "clashing", "--dataset", "s4"])
    assert res.exit_code == 2 and "stage 'clashing'" in res.output and "--workers" in res.output
    res = runner.invoke(app2, ["stage", "all", "--dataset", "s4"])
    assert res.exit_code == 2 and "collide with the run option(s) --workers" in res.output
    assert runner.invoke(app2, ["stage", "mel", "--help"]).exit_code == 0
