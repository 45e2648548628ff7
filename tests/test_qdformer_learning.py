"""QDFormer tiny learns the synthetic AVSS task by listening (the `tests/test_learning.py` harness for ICF, applied to
QDFormer): on 64 synthetic AVSS clips with semantic towers (QDFormer does not read them; the shards are ICF's), J over
the classes present on the training clips beats the visible-objects oracle and the same model fed other clips'
audio. Slow (towers + 300 steps): ``pytest -m slow tests/test_qdformer_learning.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.demo import evaluate_run
from icf.towers.train import TowersConfig, train_towers
from icf.train.run import RunSpec
from icf.train.trainer import train

CLIPS, SIZE, SEED, STEPS, TOWER_EPOCHS = 64, 64, 0, 300, 4


@pytest.mark.slow
def test_tiny_qdformer_beats_visual_oracle_and_shuffled_audio(tmp_path: Path) -> None:
    root, work = tmp_path / "AVSS", tmp_path / "work"
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--layout", "avss", "--out", str(root), "--clips", str(CLIPS), "--size", str(SIZE),
                              "--seed", str(SEED)])
    assert res.exit_code == 0, res.output
    towers = train_towers(TowersConfig("avss", str(root.resolve()), epochs=TOWER_EPOCHS, seed=SEED), work)
    res = runner.invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(work),
                              "--encoders", str(towers.spec_path), "--image-size", str(SIZE), "--executor", "local"])
    assert res.exit_code == 0, res.output
    run = train(RunSpec(dataset="avss", preset="tiny", method="qdformer", work=work, out=tmp_path / "run", max_steps=STEPS,
                        seed=SEED))
    rows = evaluate_run(run, CLIPS, SEED, SIZE, split="train")
    model = rows["ICF tiny"]["J_present"]  # evaluate_run's row names; the run is QDFormer's
    shuffled = rows["ICF tiny, shuffled audio"]["J_present"]
    oracle = rows["every visible object (oracle)"]["J_present"]
    print(f"\nJ_present: QDFormer {model:.3f}, shuffled audio {shuffled:.3f}, visible-objects oracle {oracle:.3f}")
    assert model > oracle + 0.02
    assert model > shuffled + 0.1
