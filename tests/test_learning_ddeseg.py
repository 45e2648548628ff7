"""DDESeg learns on synthetic AVSS (spec §5 learning checks), with the tiny random-init encoders.

1. The bank premise, first: nearest-centre classification of *val* single-label seconds with the bank's centres
   (built from train only) is at least 3× chance for the tiny audio source. Without it, derivation from the
   memory would have nothing to retrieve.
2. Fast CI gate: the tiny model overfits the 4 train clips of an 8-clip tree (loss falls by half, train
   J_present > 0.5).
3. Slow (``ICF_SLOW=1``): on 64 clips, train J_present beats the visible-objects oracle by 0.02 and the same model
   fed other clips' audio by 0.1, as the ICF check in ``test_learning.py``. Step count calibrated once (tiny
   preset, seed 0, train J_present model / shuffled audio, oracle 0.441): 300 steps 0.26 / 0.21, 400 0.43 / 0.20,
   500 0.55 / 0.20, 600 0.70 / 0.25; the loss is still falling steeply at 300, so the check runs 600 (the spec's
   200–400 is too few for Eq. 18's CE-dominated loss, which first sits at "all background" for ~150 steps).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from icf.pipeline.store import read_json, read_outputs
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.trainer import train
from learning import assert_listens, staged

def val_seconds(work: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The bank stage's val features and single labels, and its bank."""
    key = read_json(work / "avss" / "bank" / "current.json")["cache_key"]
    folder = work / "avss" / "bank" / key
    split = {r["uid"]: r["split"] for r in pq.read_table(work / "avss" / "manifest.parquet").to_pylist()}
    feats, labels = [], []
    for path in sorted(folder.glob("unit-*.out.parquet")):
        for uid, out in read_outputs(path).items():
            if split[uid] == "val":
                feats.append(out["feat"])
                labels.append(out["labels"])
    with np.load(folder / "audio_bank.npz") as npz:
        bank = {k: npz[k] for k in ("class_ids", "centers")}
    return np.concatenate(feats), np.concatenate(labels), bank


def test_bank_premise_nearest_centre_beats_chance_threefold(tmp_path: Path) -> None:
    work = staged(tmp_path, 64, 32)
    x, y, bank = val_seconds(work)
    keep = np.isin(y, bank["class_ids"])  # val seconds of a class the train split has
    x, y = x[keep], y[keep]
    pred = bank["class_ids"][((x[:, None] - bank["centers"][None]) ** 2).sum(-1).argmin(1)]
    accuracy, chance = float((pred == y).mean()), 1.0 / len(bank["class_ids"])
    print(f"\nbank premise (clap_latent, tiny random CLAP): {accuracy:.3f} on {len(y)} val seconds, chance {chance:.3f}")
    assert len(y) >= 20 and accuracy >= 3 * chance


def test_tiny_ddeseg_overfits_four_clips(tmp_path: Path) -> None:
    from icf.eval.evaluate import evaluate, model_predictor
    from icf.train.run import load_trained

    work = staged(tmp_path, 8, 32)  # 4 train clips: one batch
    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", method="ddeseg", max_steps=150,
                        epochs=150, overrides=["model.image_size=32"]))
    losses = [r["total"] for r in read_metrics(run)]
    model, shards, _, cfg, _ = load_trained(run)
    j = evaluate(model_predictor(model), shards, "train", cfg.image_size)["J_present"]
    print(f"\noverfit 4 clips: loss {losses[0]:.2f} → {np.mean(losses[-5:]):.2f}, train J_present {j:.3f}")
    assert np.mean(losses[-5:]) <= 0.5 * losses[0]
    assert j > 0.5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ICF_SLOW"), reason="slow (≈ 6 min on 2 busy cores): set ICF_SLOW=1")
def test_tiny_ddeseg_beats_visual_oracle_and_shuffled_audio(tmp_path: Path) -> None:
    from icf.demo import epochs_for_steps

    steps = 600  # calibrated: module docstring
    work = staged(tmp_path)
    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", method="ddeseg", max_steps=steps,
                        epochs=epochs_for_steps(work, steps), seed=0))
    assert_listens(run, "DDESeg")
