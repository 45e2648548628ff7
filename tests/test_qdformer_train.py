"""QDFormer through the trainer and the commands: ``icf train --method qdformer`` on S4 (``icf synth`` + ``icf stage
all``) and AVSS shards, exact resume, and ``icf eval`` / ``predict`` / ``compare`` on its runs unchanged; plus the fast
CI learning gate (overfit 4 clips)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.clitools import UserError
from icf.eval.evaluate import evaluate, model_predictor
from icf.train.logs import read_metrics
from icf.train.run import RunSpec, load_trained
from icf.train.trainer import train
from test_train import FAST

METRIC_KEYS = {"J", "F", "JF", "FDR", "n_frames", "J_present", "F_present"}


@pytest.fixture(scope="module")
def avss(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    work = tmp_path_factory.mktemp("qd-avss")
    avss_shards(work, n_train=6, n_val=3)  # 3 steps per epoch at batch 2
    return work


def _spec(work: Path, out: str, max_steps: int, dataset: str = "avss", **kw) -> RunSpec:
    return RunSpec(dataset=dataset, preset="tiny", method="qdformer", work=work, out=work / "runs" / out, epochs=3,
                   max_steps=max_steps, overrides=FAST, seed=7, **kw)


def _eval(run: Path, *extra: str) -> dict:
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def test_train_eval_predict_compare_on_avss(avss: Path, tmp_path: Path) -> None:
    run = train(_spec(avss, "a", 2))
    doc = json.loads((run / "run.json").read_text())
    assert doc["method"] == doc["model"]["method"] == "qdformer"
    assert doc["model"]["options"]["num_tokens"] == 3 and doc["model"]["dec_layers"] == 3  # the method's tiny preset
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert {"total", "segm", "quant", "cls", "mask", "dice", "l1", "giou", "perplexity"} <= records[0].keys()
    assert METRIC_KEYS <= _eval(run).keys()
    assert _eval(run, "--snr-db", "0")["setting"] == "snr 0 dB"
    res = CliRunner().invoke(app, ["predict", "--run", str(run), "--out", str(tmp_path / "viz"), "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "viz").glob("*.png"))) == 1
    ablated = train(_spec(avss, "noquant", 2, ablate=frozenset({"quant"})))
    assert "quant" not in read_metrics(ablated)[0]
    res = CliRunner().invoke(app, ["compare", str(run), str(ablated), "--split", "val", "--snr-db", "10", "--json"])
    assert res.exit_code == 0, res.output
    assert "qdformer" in res.output and "quant" in res.output


def test_resume_reproduces_the_uninterrupted_run(avss: Path) -> None:
    full = train(_spec(avss, "full", 4))
    train(_spec(avss, "part", 2))
    part = train(_spec(avss, "part", 4), resume=True)  # crosses the epoch boundary after step 3
    a = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(full)]
    b = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(part)]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (ra["step"], key)


def test_foreign_ablation_and_unknown_option_are_refused(avss: Path) -> None:
    with pytest.raises(UserError, match="quant"):
        train(_spec(avss, "bad", 1, ablate=frozenset({"mit"})))
    with pytest.raises(UserError, match="unknown option"):
        train(RunSpec(dataset="avss", preset="tiny", method="qdformer", work=avss, out=avss / "runs" / "bad2",
                      overrides=["method.nope=1"]))


def test_train_and_eval_on_s4(tmp_path: Path) -> None:
    runner = CliRunner()
    root, work = tmp_path / "S4", tmp_path / "work"
    res = runner.invoke(app, ["synth", "--layout", "s4", "--out", str(root), "--clips", "12", "--size", "32", "--seed", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["stage", "all", "--dataset", "s4", "--root", str(root), "--work", str(work), "--encoders", "tiny",
                              "--image-size", "32", "--executor", "local"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--method", "qdformer", "--dataset", "s4", "--preset", "tiny", "--work", str(work),
                              "--out", str(work / "runs" / "s4"), "--max-steps", "2", "--set", "train.batch_size=2",
                              "--set", "model.image_size=32"])
    assert res.exit_code == 0, res.output
    run = work / "runs" / "s4"
    assert json.loads((run / "run.json").read_text())["method"] == "qdformer"
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "test", "--json"])
    assert res.exit_code == 0, res.output
    assert {"J", "F", "JF", "FDR", "n_frames"} <= json.loads(res.output.strip().splitlines()[-1]).keys()


# ---- fast learning gate ---------------------------------------------------------------------------------

GATE_STEPS = 300  # calibrated: 150 steps reach J_present 0.23 (duplicate tokens still share the class score), 300 reach 0.71


def test_overfits_four_clips(tmp_path: Path, avss_shards) -> None:
    """300 steps on 4 AVSS clips (one coloured square each, audio offset by the label): the total loss falls by
    half or more and J over the classes present on those clips exceeds 0.5."""
    avss_shards(tmp_path, n_train=4, n_val=1, size=32, seed=1)
    run = train(RunSpec(dataset="avss", preset="tiny", method="qdformer", work=tmp_path, out=tmp_path / "run",
                        epochs=GATE_STEPS // 2, max_steps=GATE_STEPS, overrides=FAST + ["train.schedule=constant"], seed=0))
    losses = [r["total"] for r in read_metrics(run)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    model, shards, _, cfg, _ = load_trained(run)
    j = evaluate(model_predictor(model), shards, "train", cfg.image_size)["J_present"]
    print(f"\nloss {first:.3f} → {last:.3f}, train J_present {j:.3f}")
    assert last <= 0.5 * first
    assert j > 0.5


# ---- slow learning check ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ICF_SLOW"), reason="slow (≈ 12 min on 2 idle cores): set ICF_SLOW=1")
def test_tiny_qdformer_beats_visual_oracle_and_shuffled_audio(tmp_path: Path) -> None:
    """On 64 synthetic AVSS clips (as the ICF and DDESeg checks), train J_present beats the visible-objects oracle
    by 0.02 and the same model fed other clips' audio by 0.1. Set prediction learns slowly: 1800 steps (measured:
    0.552 vs shuffled 0.317 vs oracle 0.441 with 2 torch threads, 12 min; 0.615 vs 0.378 with one thread; at 600
    steps 0.145 vs 0.127)."""
    from icf.demo import epochs_for_steps
    from learning import assert_listens, staged

    steps = 1800
    work = staged(tmp_path)
    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", method="qdformer", max_steps=steps,
                        epochs=epochs_for_steps(work, steps), seed=0))
    assert_listens(run, "QDFormer")
