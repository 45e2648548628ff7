"""Trainer: exact resume, run files, and the eval / predict commands on the trained run.

``write_avss_shards`` (also used by test_train_ray.py) writes small AVSS-format shards with the tiny encoders'
dimensions: embeddings are random (the trainer only needs their shapes); frames show one coloured square
per clip whose class is the clip's label.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from icf.cli import app
from icf.clitools import UserError
from icf.data.manifests import load_info
from icf.encoders import EncoderSpec, text_bank
from icf.encoders.videoclip import segment_window, segment_windows
from icf.eval.visualize import LABEL_W, TEXT_H
from icf.train import checkpoint
from icf.methods.icf import frozen_towers
from icf.train.trainer import RunSpec, lr_factor, read_metrics, train


def _enc(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, a)
    else:
        Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def write_avss_shards(work: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``WORK/avss/shards.json`` + one tar per split; returns the shards.json path."""
    info = load_info("avss")
    spec = EncoderSpec.tiny()
    encoders = frozen_towers(spec, "cpu")
    dims = {"clip": encoders.clip.dim, "vclip": encoders.videoclip.dim, "clap": encoders.clap.dim}
    root = work / "avss"
    (root / "shards").mkdir(parents=True, exist_ok=True)
    np.savez(root / "text_bank.npz", **text_bank(encoders, info.classes))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        url = f"shards/avss-{split}-000000.tar"
        with wds.TarWriter(str(root / url)) as w:
            for i in range(n):
                t = 10 if i % 2 == 0 else 5
                label = 1 + i % 3
                s = {"__key__": f"{split}{i:03d}"}
                for f in range(t):
                    img = np.full((size, size, 3), 40, np.uint8)
                    m = np.zeros((size, size), np.uint8)
                    y, x = rng.integers(0, size // 2, 2)
                    img[y : y + size // 3, x : x + size // 3] = info.palette[label]
                    m[y : y + size // 3, x : x + size // 3] = label
                    s[f"f{f}.jpg"], s[f"m{f}.png"] = _enc(img, "JPEG"), _enc(m, "PNG")
                s["gt.npy"] = _enc(np.ones(t, bool), "npy")
                s["mel.npy"] = _enc(rng.standard_normal((t, 96, 64)).astype(np.float16) + label, "npy")
                s["clip.npy"] = _enc(rng.standard_normal((t, dims["clip"])).astype(np.float16), "npy")
                s["vclip.npy"] = _enc(rng.standard_normal(dims["vclip"]).astype(np.float16), "npy")
                n_seg = len(segment_windows(t, segment_window(t, 4)))
                s["vclip_seg.npy"] = _enc(rng.standard_normal((n_seg, dims["vclip"])).astype(np.float16), "npy")
                s["clap.npy"] = _enc(rng.standard_normal((t, dims["clap"])).astype(np.float16), "npy")
                s["clap_clip.npy"] = _enc(rng.standard_normal(dims["clap"]).astype(np.float16), "npy")
                meta = {"uid": f"{split}.{i:03d}", "dataset": "avss", "split": split, "subset": "v2" if t == 10 else "v1m",
                        "n_frames": t, "classes": [info.classes[label]], "labels": [label]}
                s["meta.json"] = json.dumps(meta).encode()
                w.write(s)
        splits[split] = [{"url": url, "nsamples": n, "filesize": (root / url).stat().st_size, "sha256": ""}]
    doc = {"dataset": "avss", "cache_key": "test", "image_size": size, "num_classes": info.num_classes,
           "classes": list(info.classes), "encoders": spec.to_dict(), "text_bank": "text_bank.npz", "splits": splits}
    (root / "shards.json").write_text(json.dumps(doc))
    return root / "shards.json"



FAST = ["train.batch_size=2", "model.image_size=32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("work")
    write_avss_shards(root, n_train=6, n_val=3)  # 3 steps per epoch at batch 2
    return root


def _spec(work: Path, out: str, max_steps: int) -> RunSpec:
    return RunSpec(dataset="avss", preset="tiny", work=work, out=work / "runs" / out, epochs=3, max_steps=max_steps,
                   overrides=FAST, seed=7)


def _losses(run: Path) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run)]


def test_resume_reproduces_the_uninterrupted_run(work: Path) -> None:
    full = train(_spec(work, "full", 4))
    part = train(_spec(work, "part", 2))
    state = checkpoint.load(part / checkpoint.CHECKPOINT)
    assert state["step"] == 2 and state["position"] == {"epoch": 0, "batch": 2}
    assert {"model", "optimizer", "scheduler", "rng", "step", "position"} <= state.keys()
    train(_spec(work, "part", 4), resume=True)  # crosses the epoch boundary after step 3
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (ra["step"], key)
    assert {"seg", "cf", "cdcl", "lr", "grad_norm"} <= a[0].keys()
    assert checkpoint.load(full / checkpoint.CHECKPOINT)["position"] == {"epoch": 1, "batch": 1}
    assert Image.open(full / "loss.png").size[0] > 100
    doc = json.loads((full / "run.json").read_text())
    assert doc["model"]["image_size"] == 32 and doc["train"]["seed"] == 7


def test_a_method_other_than_icf_trains_and_runs_record_their_method(work: Path) -> None:
    from icf.model.bidir import BidirSegmenter
    from icf.train.trainer import load_trained, read_run_file

    run = train(RunSpec(dataset="avss", preset="tiny", method="bidir", work=work, out=work / "runs" / "bidir", epochs=1,
                        max_steps=2, overrides=FAST, seed=7))
    doc = json.loads((run / "run.json").read_text())
    assert doc["method"] == doc["model"]["method"] == "bidir"
    model, *_ = load_trained(run, device=torch.device("cpu"))
    assert isinstance(model, BidirSegmenter) and model.context is not None
    assert "mit" not in read_metrics(run)[0]  # no ICF terms: the plain segmenter's Eq. 18 loss
    # a run file written before the registry (no "method", retired keys) is an icf run
    old = work / "runs" / "old"
    old.mkdir(parents=True)
    doc["model"].pop("method")
    doc["model"].pop("options")
    doc.pop("method")
    doc["model"].update(hard_top1=False, mit_pool=2)
    (old / "run.json").write_text(json.dumps(doc))
    assert read_run_file(old)[1].method == "icf"
    with pytest.raises(UserError, match="unknown ablate"):
        train(RunSpec(dataset="avss", preset="tiny", method="bidir", work=work, out=work / "runs" / "bad", ablate=frozenset({"mit"})))


def test_schedule_shape() -> None:
    from icf.config import TrainConfig

    cfg = TrainConfig(warmup_steps=2, schedule="poly")
    f = [lr_factor(s, 10, cfg) for s in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0 and all(x > y for x, y in zip(f[2:], f[3:]))
    assert lr_factor(10, 10, TrainConfig(schedule="cosine")) == pytest.approx(0.0)


def test_step_schedule_and_lr_floor() -> None:
    """``step`` drops by gamma at each milestone epoch (epoch = total / epochs steps); ``min_lr_ratio`` floors
    poly and cosine, whose shape is otherwise kept (DDESeg: cosine 1e-4 → 4e-5)."""
    from icf.config import TrainConfig

    cfg = TrainConfig(schedule="step", epochs=4, milestones=(2, 3), gamma=0.5)
    assert [lr_factor(s, 40, cfg) for s in (0, 19, 20, 29, 30, 39)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    for schedule in ("poly", "cosine"):
        plain, floored = TrainConfig(schedule=schedule), TrainConfig(schedule=schedule, min_lr_ratio=0.4)
        for s in (0, 3, 7, 10):
            assert lr_factor(s, 10, floored) == pytest.approx(0.4 + 0.6 * lr_factor(s, 10, plain))
    assert lr_factor(10, 10, TrainConfig(schedule="cosine", min_lr_ratio=0.4)) == pytest.approx(0.4)
    for bad in (dict(schedule="step"), dict(milestones=(3, 2)), dict(milestones=(0,)), dict(gamma=0.0),
                dict(min_lr_ratio=1.5)):
        with pytest.raises(ValueError, match="train\\.(schedule|milestones|gamma|min_lr_ratio)"):
            TrainConfig(**bad)
    assert TrainConfig(schedule="step", milestones=[11]).milestones == (11,)  # as read back from run.json


def test_decay_norms_false_exempts_1d_parameters() -> None:
    from icf.config import TrainConfig
    from icf.train.trainer import make_optimizer

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)

        def parameter_groups(self, cfg: TrainConfig) -> list[dict]:
            return [{"params": list(self.parameters()), "lr": cfg.lr}]

    model = Tiny()
    decay = {id(p): g["weight_decay"] for g in make_optimizer(model, TrainConfig(weight_decay=0.05, decay_norms=False)).param_groups
             for p in g["params"]}
    assert decay == {id(model.lin.weight): 0.05, id(model.lin.bias): 0.0, id(model.norm.weight): 0.0, id(model.norm.bias): 0.0}
    default = make_optimizer(model, TrainConfig(weight_decay=0.05))
    assert {g["weight_decay"] for g in default.param_groups} == {0.05}


def test_method_preset_sits_between_project_preset_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import dataclasses

    from icf import methods
    from icf.methods.base import MethodSpec
    from icf.train.trainer import build_configs

    @dataclasses.dataclass(frozen=True)
    class Opts:
        width: int = 1
        depth: int = 1

    def presets(name, model, train):
        return (dataclasses.replace(model, d_model=32), dataclasses.replace(train, schedule="step", milestones=(2,)),
                {"width": 7 if name == "tiny" else 9, "depth": 3})

    base = methods.get("bidir")
    fake = dataclasses.replace(base, name="fake", options=Opts, segmenter=None, presets=presets)
    monkeypatch.setattr(methods, "registry", lambda: {**{"bidir": base}, "fake": fake})
    spec = RunSpec(dataset="s4", preset="tiny", method="fake", work=tmp_path, out=tmp_path / "r",
                   overrides=["method.depth=5", "train.gamma=0.5"])
    model_cfg, train_cfg = build_configs(spec)
    assert model_cfg.d_model == 32 and model_cfg.image_size == 64  # method preset over the project's tiny preset
    assert model_cfg.options == {"width": 7, "depth": 5}  # --set wins over the method's default options
    assert (train_cfg.schedule, train_cfg.milestones, train_cfg.gamma) == ("step", (2,), 0.5)
    plain, _ = build_configs(dataclasses.replace(spec, method="bidir", overrides=[]))
    assert plain.d_model == 48 and plain.options == {}


def test_eval_and_predict_commands(work: Path, tmp_path: Path) -> None:
    run = work / "runs" / "full"
    if not (run / checkpoint.CHECKPOINT).exists():
        train(_spec(work, "full", 4))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.strip().splitlines()[-1])
    assert {"J", "F", "JF", "FDR", "n_frames", "J_present", "F_present"} <= r.keys()
    assert r["n_frames"] == 10 + 5 + 10  # val clips of 10, 5, 10 frames, all with GT
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", "--snr-db", "0", "--frame-mix", "0.5"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["setting"] == "snr 0 dB, frame-mix 0.5"
    res = runner.invoke(app, ["predict", "--run", str(run), "--out", str(tmp_path / "viz"), "--limit", "2"])
    assert res.exit_code == 0, res.output
    panels = sorted((tmp_path / "viz").glob("*.png"))
    assert [p.name for p in panels] == ["val.000.png", "val.001.png"]
    w, h = Image.open(panels[1]).size  # clip 1: 5 real frames of 32 px, 5·32 + 4·2 wide, 3·32 + 2·2 high, ×5 to ≥160 px
    assert w == 5 * (5 * 32 + 4 * 2) + LABEL_W  # + the row-name column
    assert h >= 5 * (3 * 32 + 2 * 2) + 2 * TEXT_H  # + the IoU line and at least one legend line
    res = runner.invoke(app, ["eval", "--run", str(tmp_path), "--split", "val"])
    assert res.exit_code == 2 and "not a training run" in res.output
