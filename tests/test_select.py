"""Checkpoint selection on the val split (``train.val_every``, ``best.pt``, ``run.json``'s ``best``) and the
``--checkpoint`` choice of ``icf eval`` / ``predict`` / ``compare``.

Tiny AVSS runs on conftest's ``avss_shards`` (6 train clips at batch 2 = 3 steps per epoch, 3 val clips). The
selection logic is checked with scripted validators (a fixed sequence of val scores, so the best epoch is known);
one real validating run checks the end-to-end path, that validation leaves training unchanged, and that a resumed
validating run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icf.cli import app
from icf.config import TrainConfig
from icf.eval.evaluate import validate
from icf.train import checkpoint
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.select import due, selection_metric
from icf.train.trainer import train

FAST = ["train.batch_size=2", "model.image_size=32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    root = tmp_path_factory.mktemp("work")
    avss_shards(root, n_train=6, n_val=3)
    return root


def _spec(work: Path, out: str, max_steps: int | None = None, epochs: int = 3, extra: tuple[str, ...] = (),
          method: str = "bidir") -> RunSpec:
    """A tiny run; ``bidir`` (the plain segmenter) where only the selection logic is under test, as it is cheaper."""
    return RunSpec(dataset="avss", preset="tiny", method=method, work=work, out=work / "runs" / out, epochs=epochs,
                   max_steps=max_steps, overrides=[*FAST, *extra], seed=7)


class Scripted:
    """A validator returning the next of ``values`` as J, and keeping a copy of the weights it was shown."""

    def __init__(self, values: list[float]) -> None:
        self.values: Iterator[float] = iter(values)
        self.seen: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, shards, split, image_size, device) -> dict:
        assert split == "val"
        self.seen.append({k: v.clone() for k, v in checkpoint.trainable_state(model).items()})
        return {"J": next(self.values), "F": 0.5, "split": split, "n_frames": 3}


def _run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _steps(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run)]


def test_official_validation_rule_and_selection_metric() -> None:
    """0-based epoch index e: validate when e >= val_start_epoch and e % val_every == 0 (AVSS train.sh: 15, 2)."""
    avss = TrainConfig(val_every=2, val_start_epoch=15)
    assert [n for n in range(1, 61) if due(avss, n)] == list(range(17, 60, 2))  # e = 16, 18, …, 58
    assert [n for n in range(1, 6) if due(TrainConfig(val_every=1), n)] == [1, 2, 3, 4, 5]
    assert not any(due(TrainConfig(), n) for n in range(1, 10))
    assert selection_metric(TrainConfig(), "tpavi") == "J" and selection_metric(TrainConfig(), "ddeseg") == "J_dh"
    assert selection_metric(TrainConfig(select_metric="F"), "ddeseg") == "F"
    from icf import methods
    from icf.config import preset

    for dataset, rule in (("s4", (1, 0)), ("ms3", (1, 0)), ("avss", (2, 15))):  # TPAVI's official recipe
        train_cfg = methods.get("tpavi").preset("paper-pvt", *preset("paper-pvt", dataset))[1]
        assert (train_cfg.val_every, train_cfg.val_start_epoch, train_cfg.select_metric) == (*rule, "auto")
    for bad in (dict(val_every=-1), dict(val_start_epoch=-2), dict(select_metric="FDR")):
        with pytest.raises(ValueError, match="train\\.(val_every|val_start_epoch|select_metric)"):
            TrainConfig(**bad)


def test_a_selection_metric_the_dataset_lacks_is_refused_before_training(work: Path) -> None:
    from icf.clitools import UserError

    with pytest.raises(UserError, match="select_metric=F_boundary: avss validation does not compute it"):
        train(_spec(work, "refused", extra=("train.val_every=1", "train.select_metric=F_boundary")), validate=Scripted([]))
    assert read_metrics(work / "runs" / "refused") == []


def test_best_checkpoint_keeps_the_early_peak(work: Path) -> None:
    scripted = Scripted([0.2, 0.5, 0.3])  # the val score peaks after epoch 2 (step 6)
    run = train(_spec(work, "peak", extra=("train.val_every=1",)), validate=scripted)
    assert _run_json(run)["best"] == {"epoch": 2, "step": 6, "metric": "J", "value": 0.5, "split": "val"}
    best = checkpoint.load(run / checkpoint.BEST)
    assert (best["step"], best["epoch"], best["metric"], best["value"]) == (6, 2, "J", 0.5)
    for name, tensor in scripted.seen[1].items():  # the weights it was shown at epoch 2, not the last ones
        assert torch.equal(best["model"][name], tensor), name
    assert any(not torch.equal(scripted.seen[1][n], t) for n, t in scripted.seen[2].items())
    vals = [r for r in read_metrics(run) if r.get("split") == "val"]
    assert [(r["epoch"], r["step"], r["val_J"], r["select"]) for r in vals] == [(1, 3, 0.2, "J"), (2, 6, 0.5, "J"), (3, 9, 0.3, "J")]
    assert checkpoint.load(run / checkpoint.CHECKPOINT)["step"] == 9


def test_resume_keeps_the_best(work: Path) -> None:
    """The best of the interrupted part survives --resume: a later, lower peak does not replace it."""
    run = train(_spec(work, "keep", max_steps=4, extra=("train.val_every=1",)), validate=Scripted([0.5]))
    assert _run_json(run)["best"]["epoch"] == 1
    first = checkpoint.load(run / checkpoint.BEST)["model"]
    train(_spec(work, "keep", max_steps=9), resume=True, validate=Scripted([0.3, 0.4]))
    assert _run_json(run)["best"] == {"epoch": 1, "step": 3, "metric": "J", "value": 0.5, "split": "val"}
    assert all(torch.equal(t, checkpoint.load(run / checkpoint.BEST)["model"][n]) for n, t in first.items())
    assert [r["val_J"] for r in read_metrics(run) if r.get("split") == "val"] == [0.5, 0.3, 0.4]


def _noisy_validate(model, shards, split, image_size, device) -> dict:
    """The real validation, after drawing from every global RNG (as a stochastic predictor would)."""
    random.random()
    np.random.rand()
    torch.rand(3)
    return validate(model, shards, split, image_size, device)


def test_validation_leaves_training_unchanged_and_resume_reproduces_it(work: Path) -> None:
    """Real validating ICF runs (ICF's training draws from the global RNG: SC's diffusion), 2 epochs of 2 steps: the
    training steps equal those of a run that never validates, and a copy stopped after step 3 (mid-epoch 2, after
    the first validation) and resumed reproduces the steps, val records, best and best.pt of the uninterrupted one."""
    every = ("train.batch_size=3", "train.val_every=1")
    plain = train(_spec(work, "plain", epochs=2, extra=("train.batch_size=3",), method="icf"))
    full = train(_spec(work, "full", epochs=2, extra=every, method="icf"), validate=_noisy_validate)
    part = train(_spec(work, "part", max_steps=3, epochs=2, extra=every, method="icf"), validate=_noisy_validate)
    train(_spec(work, "part", max_steps=4, method="icf"), resume=True, validate=_noisy_validate)
    steps = [r for r in _steps(full) if r.get("split") != "val"]
    assert len(steps) == 4 and {"cf", "cdcl"} <= steps[0].keys()
    for ra, rb in zip(steps, _steps(plain), strict=True):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6), ra["step"]
    a, b = _steps(full), _steps(part)
    assert [r.get("split") for r in a] == [None, None, "val", None, None, "val"] == [r.get("split") for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            same = rb[key] == ra[key] if isinstance(ra[key], str) else rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6)
            assert same, (ra["step"], key)
    assert {"val_J", "val_F", "val_J_present", "val_FDR"} <= a[-1].keys()
    best_a, best_b = _run_json(full)["best"], _run_json(part)["best"]
    assert best_a.keys() == best_b.keys() and best_a["epoch"] == best_b["epoch"] and best_a["split"] == "val"
    assert best_b["value"] == pytest.approx(best_a["value"], rel=1e-6)
    wa, wb = (checkpoint.load(r / checkpoint.BEST)["model"] for r in (full, part))
    assert all(torch.allclose(wa[n], wb[n], rtol=1e-5, atol=1e-6) for n in wa)


def test_cli_val_every_and_checkpoint_choice(work: Path, tmp_path: Path) -> None:
    """``icf train --val-every`` keeps best.pt (validated by the app's default validator); ``icf eval`` / ``predict``
    / ``compare`` load the checkpoint ``--checkpoint`` names and say which; ``best`` of a run without one is refused."""
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--dataset", "avss", "--method", "bidir", "--work", str(work), "--out", str(run),
                              "--epochs", "2", "--val-every", "1", *(a for s in FAST for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    best = _run_json(run)["best"]
    assert (run / checkpoint.BEST).is_file() and best["split"] == "val" and _run_json(run)["train"]["val_every"] == 1

    def eval_json(*extra: str) -> dict:
        out = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.output.strip().splitlines()[-1])

    assert eval_json()["loaded"] == {"checkpoint": "best.pt", "step": best["step"]}
    assert eval_json("--checkpoint", "best")["loaded"]["checkpoint"] == "best.pt"
    last = eval_json("--checkpoint", "last")
    assert last["loaded"] == {"checkpoint": "checkpoint.pt", "step": 6}
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--checkpoint", "last"])
    assert res.exit_code == 0 and "checkpoint.pt, step 6" in res.output
    res = runner.invoke(app, ["predict", "--run", str(run), "--out", str(tmp_path / "viz"), "--limit", "1"])
    assert res.exit_code == 0 and f"best.pt, step {best['step']}" in res.output
    res = runner.invoke(app, ["compare", str(run), "--split", "val", "--json", "--checkpoint", "last"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["checkpoint"] == "last" and doc["runs"][0]["loaded"]["checkpoint"] == "checkpoint.pt"
    assert "F_boundary" not in doc["metrics"]  # AVSS runs: no boundary F column (S4/MS3 runs get one)

    plain = tmp_path / "plain"
    res = runner.invoke(app, ["train", "--dataset", "avss", "--method", "bidir", "--work", str(work), "--out", str(plain),
                              "--max-steps", "1", *(a for s in FAST for a in ("--set", s))])
    assert res.exit_code == 0 and not (plain / checkpoint.BEST).exists() and "best" not in _run_json(plain)
    res = runner.invoke(app, ["eval", "--run", str(plain), "--split", "val", "--json"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["loaded"]["checkpoint"] == "checkpoint.pt"
    for cmd in (["eval", "--run", str(plain)], ["compare", str(plain)]):
        res = runner.invoke(app, [*cmd, "--checkpoint", "best"])
        assert res.exit_code == 2 and "no best.pt" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--run", str(plain), "--checkpoint", "newest"])
    assert res.exit_code == 2 and "--checkpoint must be one of" in res.output
    res = runner.invoke(app, ["train", "--resume", str(plain), "--val-every", "1"])
    assert res.exit_code == 2 and "--val-every applies to a new run" in res.output


def test_eval_json_names_protocols_and_the_padding_switch(work: Path) -> None:
    """``icf eval --json``: a protocol per metric; ``--avss-padding official`` scores the 5-frame val clip padded to
    10 frames (n_padded) and says so; an unknown padding is refused (S4/MS3 refusal: tests/test_score.py)."""
    run = work / "runs" / "plain"
    if not (run / checkpoint.CHECKPOINT).exists():
        train(_spec(work, "plain", epochs=2, extra=("train.batch_size=3",), method="icf"))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    real = json.loads(res.output.strip().splitlines()[-1])
    numeric = {k for k, v in real.items() if isinstance(v, float)}
    assert numeric <= real["protocols"].keys() and "COMBO-AVS" in real["protocols"]["J"]
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", "--avss-padding", "official"])
    assert res.exit_code == 0, res.output
    padded = json.loads(res.output.strip().splitlines()[-1])
    assert padded["n_padded"] == 5 and padded["n_frames"] == real["n_frames"] == 25  # val clips of 10, 5, 10 frames
    assert "official avss/test.py" in padded["protocols"]["J"] and padded["J"] != real["J"]
    assert padded["FDR"] == real["FDR"]
    res = runner.invoke(app, ["eval", "--run", str(run), "--avss-padding", "zeros"])
    assert res.exit_code == 2 and "--avss-padding must be one of" in res.output


def test_compare_shows_boundary_f_when_runs_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """S4/MS3 runs carry QDFormer's F_boundary / JF_boundary: ``icf compare`` adds those columns (mean ± std)."""
    from icf.eval import compare

    def fake(runs, split, settings, on_eval=None, which="auto", allow_other_shards=False):
        doc = {"method": "qdformer", "preset": "tiny", "train": {"seed": 0}}
        return [{"run": r, "doc": {**doc, "train": {"seed": i}}, "seed": i, "steps": 1, "planned_steps": 1,
                 "loaded": {"checkpoint": "best.pt", "step": 1}, "shards_key": "k",
                 "results": {"clean": {"J": 0.5, "F": 0.6, "F_boundary": 0.2 + 0.2 * i, "JF_boundary": 0.35 + 0.1 * i}}}
                for i, r in enumerate(runs)]

    monkeypatch.setattr(compare, "evaluate_runs", fake)
    monkeypatch.setattr(compare, "run_dataset", lambda runs: "s4")
    doc = compare.comparison(["r0", "r1"], "test", [compare.parse_setting("clean")], which="best")
    assert doc["metrics"][-2:] == ["F_boundary", "JF_boundary"] and doc["checkpoint"] == "best"
    stat = doc["groups"][0]["settings"]["clean"]["F_boundary"]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(0.3) and stat["std"] == pytest.approx(0.2 / 2**0.5)
