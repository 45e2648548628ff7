"""The tiny preset really learns the synthetic AVSS task, and it does so by listening.

A small version of the demo's claim (issue 5 item 6), sized for CI: with semantic towers trained by
``icf towers`` on the same few dozen synthetic AVSS clips, after a short training run the model's J over the
classes present, on the clips it trained on, beats (a) the oracle that segments every visible object with
its true class (it ignores the audio) and (b) the same trained model fed other clips' audio. (b) is what rules
out memorising clips by their look: a model that had done so would not care whose audio it hears. The
validation-split version of this comparison, which needs a few hundred clips and several minutes, is what
`icf demo` prints.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from icf.cli import app
from icf.demo import evaluate_run
from icf.towers.train import TowersConfig, train_towers
from icf.train.run import RunSpec
from icf.train.trainer import train

CLIPS, SIZE, SEED, STEPS, TOWER_EPOCHS = 64, 64, 0, 200, 4


def test_tiny_icf_beats_visual_oracle_and_shuffled_audio(tmp_path: Path) -> None:
    root, work = tmp_path / "AVSS", tmp_path / "work"
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--layout", "avss", "--out", str(root), "--clips", str(CLIPS), "--size", str(SIZE),
                              "--seed", str(SEED)])
    assert res.exit_code == 0, res.output
    towers = train_towers(TowersConfig("avss", str(root.resolve()), epochs=TOWER_EPOCHS, seed=SEED), work)
    res = runner.invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(work),
                              "--encoders", str(towers.spec_path), "--image-size", str(SIZE), "--executor", "local"])
    assert res.exit_code == 0, res.output

    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", max_steps=STEPS, seed=SEED))
    rows = evaluate_run(run, CLIPS, SEED, SIZE, split="train")
    model = rows["icf tiny"]["J_present"]
    shuffled = rows["icf tiny, shuffled audio"]["J_present"]
    oracle = rows["every visible object (oracle)"]["J_present"]
    print(f"\n{towers.summary()}\nJ_present: model {model:.3f}, shuffled audio {shuffled:.3f}, visible-objects oracle {oracle:.3f}")
    assert model > oracle + 0.02
    assert model > shuffled + 0.1
