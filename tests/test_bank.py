"""The bank stage (DDESeg's semantic memory, Eq. 2–4): k-means and representatives against brute force,
the train-split-only and single-label rules, padding, determinism, the per-second label rules of each
dataset, and MS3's ``--bank-from``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import KMeans

from icf.clitools import UserError
from icf.data.sample import Sample
from icf.pipeline.stage import FinishContext
from icf.pipeline.store import atomic_write_json, write_outputs
from icf.model.memory import MS3_REFUSAL
from icf.stages.bank import AUDIO_BANK, BankStage, build_bank, kmeans, second_labels


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes × two well-separated 2-D Gaussian blobs (10 and 7 points each)."""
    rng = np.random.default_rng(seed)
    x, y = [], []
    for c in range(3):
        for j, n in enumerate((10, 7)):
            centre = np.array([10.0 * c, 10.0 * j])
            x.append(centre + 0.3 * rng.standard_normal((n, 2)))
            y += [c] * n
    return np.concatenate(x).astype(np.float32), np.array(y)


def brute_force_reps(x: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """For each centroid, in order: its cluster's m members nearest to it (explicit loops)."""
    assign = [min(range(len(centroids)), key=lambda j: float(np.sum((p - centroids[j]) ** 2))) for p in x]
    rows = []
    for j, c in enumerate(centroids):
        members = [p for p, a in zip(x, assign) if a == j]
        members.sort(key=lambda p: float(np.sum((p - c) ** 2)))
        rows += members[:m]
    return np.array(rows)


def test_bank_equals_brute_force_and_class_means() -> None:
    x, y = blobs()
    bank = build_bank(x, y, k=2, m=3, seed=0)
    assert bank["class_ids"].tolist() == [0, 1, 2] and bank["reps"].shape == (3, 6, 2)
    assert bank["counts"].tolist() == [17, 17, 17]
    for c in range(3):
        xc = x[y == c].astype(np.float64)
        np.testing.assert_allclose(bank["centers"][c], xc.mean(0), rtol=1e-6)  # Eq. 2
        centroids, _ = kmeans(torch.from_numpy(xc), 2, seed=0)  # Eq. 3, the stage's seeded k-means
        reference = KMeans(2, n_init=10, random_state=0).fit(xc).cluster_centers_
        np.testing.assert_allclose(sorted(centroids.numpy().tolist()), sorted(reference.tolist()), atol=1e-6)
        np.testing.assert_allclose(bank["reps"][c], brute_force_reps(xc, centroids.numpy(), 3), rtol=1e-6)  # Eq. 4


def test_unlabelled_seconds_do_not_change_the_bank_and_small_classes_are_padded() -> None:
    x, y = blobs()
    bank = build_bank(x, y, k=2, m=3, seed=0)
    noise = np.random.default_rng(1).standard_normal((20, 2)).astype(np.float32) * 50
    more = build_bank(np.concatenate([x, noise]), np.concatenate([y, np.full(20, -1)]), k=2, m=3, seed=0)
    assert all(np.array_equal(bank[k], more[k]) for k in bank)
    tiny = build_bank(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], np.float32), np.array([4, 4, 7]), k=2, m=3, seed=0)
    assert tiny["reps"].shape == (2, 6, 2)  # n_4 = 2 points, n_7 = 1 < k: still M = k·m rows
    np.testing.assert_array_equal(tiny["reps"][1], np.tile([[5.0, 5.0]], (6, 1)))
    assert {tuple(r) for r in tiny["reps"][0]} == {(0.0, 0.0), (1.0, 0.0)}


# ----------------------------------------------------------------------------- the stage's finish


def _sample(uid: str, split: str, dataset: str = "avss", classes: tuple[str, ...] = ("dog",),
            masks: tuple[str, ...] = ("", "", ""), gt: tuple[bool, ...] = (False, False, False)) -> Sample:
    n = len(masks)
    return Sample(uid=uid, dataset=dataset, split=split, subset="v2" if dataset == "avss" else dataset,
                  frame_paths=("f",) * n, mask_paths=masks, gt_frames=gt, audio_path="a.wav", classes=classes, n_frames=n)


def _finish_ctx(root: Path, units: dict[int, tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]],
                dataset: str = "avss") -> FinishContext:
    """A bank stage folder holding the given unit outputs, and an extract finish marker naming the encoders."""
    stage_dir, extract_dir = root / dataset / "bank" / "key", root / dataset / "extract" / "ekey"
    stage_dir.mkdir(parents=True, exist_ok=True)
    extract_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(extract_dir / "finish.json", {"result": {"encoders": {"clap_amodel": "tiny"}}})
    for uid_, (split, rows) in units.items():
        write_outputs(stage_dir / f"unit-{uid_:05d}.out.parquet", {u: {"feat": f, "labels": l} for u, f, l in rows})
    return FinishContext(dataset=dataset, dataset_dir=root / dataset, stage_dir=stage_dir, cache_key="key",
                         upstream_dirs={"extract": extract_dir},
                         units={u: (split, tuple(r[0] for r in rows)) for u, (split, rows) in units.items()})


def _rows(seed: int, n: int, labels: list[int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"c{seed}-{i}", rng.standard_normal((5, 4)).astype(np.float32), np.array(labels[i % len(labels)] * np.ones(5, np.int64)))
            for i in range(n)]


def test_finish_uses_the_train_split_only_and_gives_the_same_bytes(tmp_path: Path) -> None:
    stage = BankStage(BankStage.Config(bank_clusters=2, bank_per_cluster=2))
    train = (0, ("train", _rows(0, 6, [1, 2])))
    ctx = _finish_ctx(tmp_path / "a", dict([train]))
    result = stage.finish(ctx)
    assert result["audio_bank"] == AUDIO_BANK and result["classes"] == 2
    first = (ctx.stage_dir / AUDIO_BANK).read_bytes()
    with_val = _finish_ctx(tmp_path / "b", dict([train, (1, ("val", _rows(9, 6, [1, 3])))]))
    stage.finish(with_val)
    assert (with_val.stage_dir / AUDIO_BANK).read_bytes() == first  # val seconds (and their class 3) are not in it
    stage.finish(ctx)
    assert (ctx.stage_dir / AUDIO_BANK).read_bytes() == first  # same seed, same bytes
    with np.load(ctx.stage_dir / AUDIO_BANK) as npz:
        assert npz["class_ids"].tolist() == [1, 2] and str(npz["source"]) == "clap_latent"
        assert json.loads(str(npz["encoders"])) == {"clap_amodel": "tiny"}


def test_ms3_refuses_without_bank_from_and_borrows_with_it(tmp_path: Path) -> None:
    ms3 = _finish_ctx(tmp_path, {0: ("train", _rows(0, 2, [-1]))}, dataset="ms3")
    assert BankStage().finish(ms3) == {"audio_bank": None, "refused": MS3_REFUSAL}
    borrow = BankStage(BankStage.Config(bank_from="s4"))
    with pytest.raises(UserError, match="no bank stage has run there"):
        borrow.finish(ms3)
    s4 = _finish_ctx(tmp_path, {0: ("train", _rows(1, 4, [3]))}, dataset="s4")
    BankStage().finish(s4)
    atomic_write_json(tmp_path / "s4" / "bank" / "current.json", {"cache_key": "key"})
    result = borrow.finish(ms3)
    assert result["from"] == "s4"
    assert (ms3.stage_dir / AUDIO_BANK).read_bytes() == (s4.stage_dir / AUDIO_BANK).read_bytes()
    with pytest.raises(UserError, match="built from clap_latent, not clap"):
        BankStage(BankStage.Config(bank_from="s4", bank_source="clap")).finish(ms3)
    atomic_write_json(ms3.upstream_dirs["extract"] / "finish.json", {"result": {"encoders": {"clap_amodel": "other"}}})
    with pytest.raises(UserError, match="other encoders"):
        borrow.finish(ms3)


# ----------------------------------------------------------------------------- per-second labels


def _mask(path: Path, ids: list[int]) -> str:
    m = np.zeros((4, 4), np.uint8)
    for i, c in enumerate(ids):
        m[i, :] = c
    Image.fromarray(m, "L").save(path)
    return str(path)


def test_second_labels_follow_the_dataset_rules(tmp_path: Path) -> None:
    one, empty, two = _mask(tmp_path / "a.png", [5]), _mask(tmp_path / "b.png", []), _mask(tmp_path / "c.png", [5, 9])
    avss = _sample("u", "train", masks=(one, empty, two, ""), gt=(True, True, True, False), classes=("cat",))
    cat = second_labels(avss, background=True)[3]
    assert second_labels(avss, background=True).tolist() == [5, 0, -1, cat] and cat > 0
    assert second_labels(avss, background=False).tolist() == [5, -1, -1, cat]
    two_classes = _sample("v", "train", masks=(one, ""), gt=(True, False), classes=("cat", "dog"))
    assert second_labels(two_classes, background=True).tolist() == [5, -1]  # v1s frame without GT, two classes
    s4 = _sample("s", "train", dataset="s4", classes=("dog_barking",), masks=("",) * 5, gt=(False,) * 5)
    from icf.data.datasets import load_info

    assert second_labels(s4, True).tolist() == [load_info("s4").class_id("dog_barking")] * 5
    ms3 = _sample("m", "train", dataset="ms3", classes=(), masks=("",) * 5, gt=(False,) * 5)
    assert second_labels(ms3, True).tolist() == [-1] * 5


def test_bank_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--bank-source"):
        BankStage.Config(bank_source="vggishh")
    with pytest.raises(ValueError, match="--bank-clusters"):
        BankStage.Config(bank_clusters=0)
    with pytest.raises(ValueError, match="--bank-from"):
        BankStage.Config(bank_from="ms3")


# ----------------------------------------------------------------------------- a borrowed bank goes stale


def test_a_rebuilt_lender_bank_makes_the_borrowed_copy_stale_and_stage_all_refreshes_it(tmp_path: Path) -> None:
    """MS3 with ``--bank-from s4``: rebuilding S4's bank with other ``--bank-clusters`` shows MS3's bank and shard
    stages stale in ``icf status``; ``stage all`` then ships S4's new bank in MS3's shards."""
    import os

    from rich.console import Console

    from icf.data.synth import synthesize
    from icf.pipeline.engine import RunOptions
    from icf.pipeline.ledger import Workspace
    from icf.stages.extract import ExtractStage
    from icf.stages.index import run_index
    from icf.workflow.run import pipeline_stages, run_pipeline
    from icf.workflow.status import dataset_status

    quiet, opts = Console(file=open(os.devnull, "w")), RunOptions(executor="local", progress=False)

    def stage_all(dataset: str, **bank: object) -> dict[str, str]:
        ws = Workspace(tmp_path / "work", dataset)
        root = tmp_path / dataset
        if not root.exists():
            synthesize(dataset, root, clips=6, seed=1, size=32)
        configs = {"extract": ExtractStage.Config(encoders="tiny"), "bank": BankStage.Config(**bank)}
        run_pipeline(ws, pipeline_stages(configs), opts, quiet, index=lambda: run_index(ws, root, None, 3))
        return states(dataset)

    def states(dataset: str) -> dict[str, str]:
        return {e["stage"]: e["state"] for e in dataset_status(Workspace(tmp_path / "work", dataset))}

    def shipped(dataset: str) -> bytes:
        return (tmp_path / "work" / dataset / "shards" / AUDIO_BANK).read_bytes()

    assert set(stage_all("s4", bank_clusters=2, bank_per_cluster=1).values()) == {"done"}
    assert set(stage_all("ms3", bank_from="s4").values()) == {"done"}
    old = shipped("ms3")
    assert old == shipped("s4")
    assert set(stage_all("s4", bank_clusters=1, bank_per_cluster=1).values()) == {"done"}  # S4's bank rebuilt
    assert shipped("s4") != old
    after = states("ms3")
    assert after["bank"] == "stale" and after["shard"] == "stale"  # the copy is out of date, and what ships it
    assert after["extract"] == "done"
    assert set(stage_all("ms3", bank_from="s4").values()) == {"done"}
    assert shipped("ms3") == shipped("s4")
