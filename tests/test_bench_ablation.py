"""bench/ablation.py's tables from a comparison document (no training): the paired-by-seed deltas against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_bench

SETTINGS = ["clean", "snr 0 dB"]


@pytest.fixture(scope="module")
def ablation():
    return load_bench("ablation")


def _doc(scores: dict[str, dict[int, list[float]]]) -> dict:
    """A comparison document as `icf.eval.compare.comparison` writes it: ``scores[row][seed]`` = J_present per
    setting; groups list their runs in an arbitrary seed order, as compare does."""
    runs, groups = [], []
    for row, by_seed in scores.items():
        seeds = sorted(by_seed, reverse=True)
        paths = [f"/w/runs/{row}-s{s}" for s in seeds]
        for path, seed in zip(paths, seeds):
            runs.append({"run": path, "seed": seed,
                         "results": {lab: {"J_present": v} for lab, v in zip(SETTINGS, by_seed[seed])}})
        groups.append({"name": row, "runs": paths, "seeds": seeds, "settings": {}})
    return {"settings": SETTINGS, "runs": runs, "groups": groups}


def test_paired_deltas_match_numpy_on_the_shared_seeds(ablation):
    rng = np.random.default_rng(0)
    scores = {row: {s: list(rng.uniform(0.3, 0.7, len(SETTINGS))) for s in seeds}
              for row, seeds in {"baseline": [0, 1, 2, 3], "full": [0, 1, 2, 3], "MIT": [1, 3, 5]}.items()}
    deltas = ablation.paired(_doc(scores), ["baseline", "full", "MIT", "CDCL"], "baseline")
    assert list(deltas) == ["full", "MIT"]  # the reference and rows with no runs are left out
    for row, seeds in (("full", [0, 1, 2, 3]), ("MIT", [1, 3])):  # MIT's seed 5 has no baseline to pair with
        for i, setting in enumerate(SETTINGS):
            diff = np.array([scores[row][s][i] - scores["baseline"][s][i] for s in seeds], dtype=np.float64)
            got = deltas[row][setting]
            assert got["n"] == len(seeds)
            assert got["mean"] == pytest.approx(diff.mean(), abs=1e-12)
            assert got["std"] == pytest.approx(diff.std(ddof=1), abs=1e-12)
            assert got["above"] == int((diff > 0).sum())


def test_paired_markdown_prints_sign_spread_and_seed_count(ablation):
    scores = {"baseline": {0: [0.50, 0.30], 1: [0.40, 0.20]}, "full": {0: [0.52, 0.25], 1: [0.46, 0.10]}}
    text = ablation.paired_markdown(_doc(scores), ["baseline", "full"], "baseline")
    row = next(line for line in text.splitlines() if line.startswith("| full"))
    # clean: +2 and +6 → +4.00 ± 2.83, above on both; 0 dB: −5 and −10 → −7.50 ± 3.54, above on none.
    assert row == "| full | 2 | +4.00 ± 2.83 (2/2) | -7.50 ± 3.54 (0/2) |"
    one = {row: {0: scores[row][0]} for row in scores}  # one seed: no spread to print
    assert "| full | 1 | +2.00 (1/1) | -5.00 (0/1) |" in ablation.paired_markdown(_doc(one), ["baseline", "full"], "baseline")


def test_no_reference_row_no_paired_table(ablation):
    doc = _doc({"full": {0: [0.5, 0.3]}})
    assert ablation.paired(doc, ["full"], "baseline") == {}
    assert ablation.paired_markdown(doc, ["full"], "baseline") == ""
