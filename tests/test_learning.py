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

from icf.towers.train import TowersConfig, train_towers
from icf.train.run import RunSpec
from icf.train.trainer import train
from learning import assert_listens, stage, synth

CLIPS, SIZE, SEED, STEPS, TOWER_EPOCHS = 64, 64, 0, 200, 4


def test_tiny_icf_beats_visual_oracle_and_shuffled_audio(tmp_path: Path) -> None:
    root, work = synth(tmp_path, CLIPS, SIZE, SEED), tmp_path / "work"
    towers = train_towers(TowersConfig("avss", str(root.resolve()), epochs=TOWER_EPOCHS, seed=SEED), work)
    stage(root, work, SIZE, encoders=str(towers.spec_path), extra=())
    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", max_steps=STEPS, seed=SEED))
    print(f"\n{towers.summary()}")
    assert_listens(run, "ICF", CLIPS, SEED, SIZE)
