"""Shared setup of the learning checks (ICF, QDFormer, DDESeg): a synthetic AVSS tree staged like `icf demo`
stages it, and the "does it listen" comparison on the clips the model trained on."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from icf.cli import app

CLIPS, SIZE, SEED = 64, 64, 0
BANK = ("--bank-clusters", "2", "--bank-per-cluster", "2")


def synth(tmp: Path, clips: int = CLIPS, size: int = SIZE, seed: int = SEED) -> Path:
    """``icf synth --layout avss`` → the tree's root ``tmp/AVSS``."""
    root = tmp / "AVSS"
    res = CliRunner().invoke(app, ["synth", "--layout", "avss", "--out", str(root), "--clips", str(clips), "--size",
                                   str(size), "--seed", str(seed)])
    assert res.exit_code == 0, res.output
    return root


def stage(root: Path, work: Path, size: int = SIZE, encoders: str = "tiny", extra: tuple[str, ...] = BANK) -> Path:
    """``icf stage all --dataset avss`` of ``root`` into ``work`` (local executor) → ``work``."""
    res = CliRunner().invoke(app, ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(work),
                                   "--encoders", encoders, "--image-size", str(size), "--executor", "local", *extra])
    assert res.exit_code == 0, res.output
    return work


def staged(tmp: Path, clips: int = CLIPS, size: int = SIZE, seed: int = SEED) -> Path:
    """`synth` + `stage` with the tiny random encoders → WORK."""
    return stage(synth(tmp, clips, size, seed), tmp / "work", size)


def assert_listens(run: Path, name: str, clips: int = CLIPS, seed: int = SEED, size: int = SIZE) -> None:
    """Train J over the classes present beats (a) the oracle that segments every visible object with its true class
    (it ignores the audio) by 0.02 and (b) the same model fed other clips' audio by 0.1 — (b) rules out memorising
    clips by their look."""
    from icf.demo import evaluate_run

    model, shuffled, oracle = (r["J_present"] for r in evaluate_run(run, clips, seed, size, split="train").values())
    print(f"\nJ_present: {name} {model:.3f}, shuffled audio {shuffled:.3f}, visible-objects oracle {oracle:.3f}")
    assert model > oracle + 0.02
    assert model > shuffled + 0.1
