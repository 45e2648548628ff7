"""``icf score`` on hand-made AVSBench trees: mirror rule, same numbers as the metric code, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from icf.cli import app
from icf.eval.metrics import BinaryMetrics, SemanticMetrics
from icf.eval.score import score_predictions

H, W = 6, 8


def _png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def _s4_tree(tmp: Path, n_test: int = 5) -> tuple[Path, Path, list[np.ndarray], list[np.ndarray]]:
    """An S4 root with one train clip and ``n_test`` test clips (GT masks only), plus predictions."""
    root, pred = tmp / "Single-source", tmp / "pred"
    rng = np.random.default_rng(0)
    rows = ["name,start,category,split", "-trainclip,0,dog_barking,train"]
    gts, probs = [], []
    for c in range(n_test):
        name = f"-clip{c}"  # ids may start with '-'
        rows.append(f"{name},0,helicopter,test")
        for n in range(1, 6):
            gt = (rng.random((H, W)) < 0.3).astype(np.uint8)
            if c == 1 and n == 2:
                gt[:] = 0  # an empty-GT frame
            p = np.clip(gt * 0.6 + rng.random((H, W)) * 0.5, 0, 1)
            q = np.round(p * 255).astype(np.uint8)
            rel = f"s4_data/gt_masks/test/helicopter/{name}/{name}_{n}.png"
            _png(root / rel, gt * 255)
            _png(pred / rel, q)
            gts.append(gt)
            probs.append(q.astype(np.float32) / 255)
    (root / "s4_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root, pred, gts, probs


@pytest.mark.parametrize("mode", ["official", "dataset"])
def test_s4_score_equals_the_metric_code(tmp_path: Path, mode: str) -> None:
    root, pred, gts, probs = _s4_tree(tmp_path)
    r = score_predictions("s4", root, pred, "test", f_mode=mode)
    ref = BinaryMetrics(f_mode=mode)
    ref.update(
        torch.from_numpy(np.stack(probs)).view(5, 5, H, W),
        torch.from_numpy(np.stack(gts)).long().view(5, 5, H, W),
        torch.ones(5, 5, dtype=torch.bool),
    )
    expected = ref.compute()
    for key in ("J", "F", "JF", "FDR", "n_frames", "F_boundary", "JF_boundary"):
        assert r[key] == pytest.approx(expected[key], abs=1e-12), key
    assert r["n_clips"] == 5 and 0.3 < r["J"] < 1.0


def test_perfect_s4_predictions_score_one(tmp_path: Path) -> None:
    root, pred, gts, _ = _s4_tree(tmp_path, n_test=2)
    for path in pred.rglob("*.png"):
        rel = path.relative_to(pred)
        _png(path, np.asarray(Image.open(root / rel)))  # the GT itself, 0/255
    r = score_predictions("s4", root, pred, "test")
    # every non-empty frame is exact at every threshold > 0 → F = 1; J = 1 (up to the 1e-7 eps)
    assert r["F"] == pytest.approx(1.0) and r["J"] == pytest.approx(1.0, abs=1e-6) and r["FDR"] == 0.0


def _avss_tree(tmp: Path) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    root, pred = tmp / "AVSS", tmp / "pred"
    rows = [
        "vid,uid,s_min,s_sec,a_obj,split,label",
        "aaa,aaa_0_5000,0,0,dog,test,v1s",
        "bbb,bbb_0_10000,0,0,guitar_man,test,v2",
        "ccc,ccc_0_5000,0,0,cat,train,v1s",
    ]
    rng = np.random.default_rng(1)
    frames = []
    for uid, label, t, classes in (("aaa_0_5000", "v1s", 5, (0, 17)), ("bbb_0_10000", "v2", 10, (0, 28, 41))):
        for i in range(t):
            gt = rng.choice(classes, size=(H, W))
            p = np.where(rng.random((H, W)) < 0.7, gt, rng.integers(0, 71, size=(H, W)))
            rel = f"{label}/{uid}/labels_semantic/{i}.png"
            _png(root / rel, gt)
            _png(pred / rel, p)
            frames.append((p, gt))
    (root / "metadata.csv").write_text("\n".join(rows))
    return root, pred, frames


def test_avss_score_equals_the_metric_code(tmp_path: Path) -> None:
    root, pred, frames = _avss_tree(tmp_path)
    r = score_predictions("avss", root, pred, "test")
    ref = SemanticMetrics(71)
    for p, g in frames:
        ref.update(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None].long(), torch.ones(1, 1, dtype=torch.bool))
    expected = ref.compute()
    for key in ("J", "F", "J_present", "F_present", "FDR", "n_frames"):
        assert r[key] == pytest.approx(expected[key], abs=1e-12), key
    assert r["n_frames"] == 15 and r["present_classes"] == [0, 17, 28, 41]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["score", *args])
    return result.exit_code, result.output


def test_cli_json_and_errors(tmp_path: Path) -> None:
    root, pred, _, _ = _s4_tree(tmp_path, n_test=2)
    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred), "--json", "--f-mode", "dataset")
    assert code == 0, output
    payload = json.loads(output)
    assert {"J", "F", "JF", "FDR", "n_frames"} <= payload.keys() and payload["f_mode"] == "dataset"

    missing = pred / "s4_data/gt_masks/test/helicopter/-clip1/-clip1_3.png"
    missing.unlink()
    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred))
    assert code == 2 and "1 prediction file(s) missing" in output and "-clip1_3.png" in output
    assert "Traceback" not in output

    _png(missing, np.zeros((H, W, 3), np.uint8), mode="RGB")
    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred))
    assert code == 2 and "-clip1_3.png" in output and "mode RGB" in output

    _png(missing, np.zeros((H + 1, W), np.uint8))
    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred))
    assert code == 2 and "use --resize" in output
    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred), "--resize")
    assert code == 0, output

    code, output = _cli("--dataset", "s4", "--root", str(root), "--pred", str(pred), "--f-mode", "best")
    assert code == 2 and "--f-mode" in output


def test_avss_official_padding_in_score(tmp_path: Path) -> None:
    """``--avss-padding official``: the 5-frame v1s clip gets 5 all-background frames, the 10-frame v2 clip none; the
    numbers are those of the metric fed the literally padded clip; S4/MS3 refuse the switch; JSON names protocols."""
    root, pred, frames = _avss_tree(tmp_path)
    r = score_predictions("avss", root, pred, "test", avss_padding="official")
    ref = SemanticMetrics(71)
    zeros = np.zeros((H, W), dtype=np.int64)
    for p, g in frames + [(zeros, zeros)] * 5:
        ref.update(torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None].long(), torch.ones(1, 1, dtype=torch.bool))
    expected = ref.compute()
    for key in ("J", "F", "J_present", "F_present"):
        assert r[key] == pytest.approx(expected[key], abs=1e-12), key
    assert r["n_padded"] == 5 and r["n_frames"] == 15
    assert r["J"] != pytest.approx(score_predictions("avss", root, pred, "test")["J"])

    code, output = _cli("--dataset", "avss", "--root", str(root), "--pred", str(pred), "--avss-padding", "official", "--json")
    assert code == 0, output
    payload = json.loads(output)
    assert payload["n_padded"] == 5 and "official avss/test.py" in payload["protocols"]["J"]
    assert {k for k, v in payload.items() if isinstance(v, float)} <= payload["protocols"].keys()
    s4_root, s4_pred, _, _ = _s4_tree(tmp_path / "s4", n_test=1)
    code, output = _cli("--dataset", "s4", "--root", str(s4_root), "--pred", str(s4_pred), "--avss-padding", "official")
    assert code == 2 and "applies to AVSS only" in output
    code, output = _cli("--dataset", "s4", "--root", str(s4_root), "--pred", str(s4_pred), "--json")
    assert code == 0 and "DAVIS" in json.loads(output)["protocols"]["F_boundary"]
