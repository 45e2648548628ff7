"""Trainer: exact resume, run files, and the eval / predict commands on the trained run.

The shards come from conftest's ``avss_shards`` (small AVSS shards with the tiny encoders' dimensions:
random embeddings, one coloured square per frame whose class is the clip's label).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from icf.cli import app
from icf.clitools import UserError
from icf.eval.visualize import LABEL_W, TEXT_H
from icf.train import checkpoint
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.trainer import lr_factor, train


FAST = ["train.batch_size=2", "model.image_size=32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    root = tmp_path_factory.mktemp("work")
    avss_shards(root, n_train=6, n_val=3)  # 3 steps per epoch at batch 2
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
    from icf.train.run import load_trained, read_run_file

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


def test_train_config_file_sits_under_set_and_loader_workers_flag(work: Path, tmp_path: Path) -> None:
    """``icf train --config FILE``: its tables override the preset, ``--set`` overrides the file; the DataLoader
    flag is ``--loader-workers`` (``--workers`` is the stage commands' Ray workers)."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[model]\nimage_size = 32\n[train]\nbatch_size = 2\nlr = 5e-4\nepochs = 3\n")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", str(work), "--out", str(run), "--config", str(cfg),
                                   "--set", "train.lr=2e-4", "--max-steps", "1", "--loader-workers", "0"])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "run.json").read_text())
    assert (doc["model"]["image_size"], doc["train"]["batch_size"], doc["train"]["lr"], doc["train"]["epochs"]) == (32, 2, 2e-4, 3)
    assert [r["step"] for r in read_metrics(run)] == [1]
    bad = CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", str(work), "--out", str(tmp_path / "r2"), "--workers", "2"])
    assert bad.exit_code == 2 and "--workers" in bad.output
