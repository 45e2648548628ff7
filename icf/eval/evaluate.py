"""Evaluation of a predictor on a split of the shards, with the robustness settings (paper supplement; QDFormer Fig. 7).

A predictor maps a Batch to per-frame predictions ``(B, T, H, W)``: foreground probabilities for S4/MS3,
class ids for AVSS (``ICF.predict`` does this; so do the baselines). Clips are read in shard order in
batches of 4, and each clip's CSV position (``batch["order"]``) goes to the metrics, which regroup the
clips into the official test loader's batches of 4 in CSV order (the ``official`` F and J depend on that
grouping) without buffering frames. Shards without ``order`` (shard stage v1) fall back to shard order.

With a negative (:class:`Negative`, :mod:`icf.augment.negatives`) every clip's audio is replaced by silence,
ambient noise or off-screen sound and the false-positive rates are measured instead
(:class:`icf.eval.metrics.FalsePositiveMetrics`); :func:`evaluate_negatives` adds the clean run and the
combined score ``HM`` per setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from icf.data.shards import ShardSet, ShardStream, make_loader
from icf.eval.metrics import OFFICIAL_CLIPS_PER_BATCH, FalsePositiveMetrics, make_metrics, negative_score, positive_j
from icf.augment.negatives import Negative
from icf.eval.robustness import AudioRotation, frame_mix, noisy_batch

Predictor = Callable[[dict[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class Perturbation:
    """Robustness settings: background noise (dB SNR), frame-mix fraction, clip-shuffled audio."""

    snr_db: float | None = None
    frame_mix: float | None = None
    shuffle_audio: bool = False
    seed: int = 0

    def describe(self) -> str:
        parts = [f"snr {self.snr_db:g} dB" if self.snr_db is not None else "", f"frame-mix {self.frame_mix:g}" if self.frame_mix else "",
                 "shuffled audio" if self.shuffle_audio else ""]
        return ", ".join(p for p in parts if p) or "clean"


def batches(shards: ShardSet, split: str, image_size: int, limit: int | None = None, workers: int = 0) -> Iterator[dict[str, Any]]:
    """The clips of ``split`` in shard order, batches of 4."""
    stream = ShardStream(shards, split, OFFICIAL_CLIPS_PER_BATCH, image_size, train=False, limit=limit)
    yield from make_loader(stream, workers)


def perturbed(stream: Iterator[dict[str, Any]], p: Perturbation) -> Iterator[dict[str, Any]]:
    """Apply the audio shuffle, then noise, then frame mixing to every batch (seeded by ``p.seed``)."""
    gen = torch.Generator().manual_seed(p.seed)
    rotate = AudioRotation() if p.shuffle_audio else None
    for batch in stream:
        if rotate is not None:
            batch = rotate(batch)
        if p.snr_db is not None:
            batch = noisy_batch(batch, p.snr_db, gen)
        if p.frame_mix:
            batch = frame_mix(batch, p.frame_mix, gen)
        yield batch


@torch.no_grad()
def evaluate(
    predict: Predictor,
    shards: ShardSet,
    split: str,
    image_size: int,
    f_mode: str = "official",
    perturbation: Perturbation = Perturbation(),
    limit: int | None = None,
    device: torch.device | str = "cpu",
    negative: Negative | None = None,
    avss_padding: str = "real",
) -> dict[str, Any]:
    """Metrics of ``predict`` on ``split`` (see :mod:`icf.eval.metrics` for the keys); with ``negative``,
    ``FPR_frame``, ``FPR_pixel``, ``n_frames`` and ``skipped`` (clips given no negative) instead.
    ``avss_padding="official"`` scores AVSS clips padded to 10 frames as the official test does."""
    if negative is None:
        metrics = make_metrics(shards.dataset, shards.num_classes, f_mode, avss_padding)
    else:
        metrics = FalsePositiveMetrics(binary=shards.dataset != "avss")
    seen = kept = 0
    for batch in perturbed(batches(shards, split, image_size, limit), perturbation):
        seen += len(batch["uid"])
        if negative is not None:
            batch = negative(batch)
        kept += len(batch["uid"])
        if not batch["uid"]:
            continue
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        pred = predict(moved).cpu()
        metrics.update(pred, batch["masks"], batch["gt"] & batch["valid"], order=batch.get("order"), real=batch["valid"])
    if negative is not None:
        return {**metrics.compute(), "skipped": seen - kept, "split": split, "setting": negative.kind}
    return {**metrics.compute(), "split": split, "setting": perturbation.describe()}


def evaluate_negatives(
    predict: Predictor,
    shards: ShardSet,
    split: str,
    image_size: int,
    negatives: list[Negative],
    f_mode: str = "official",
    limit: int | None = None,
    device: torch.device | str = "cpu",
    avss_padding: str = "real",
) -> dict[str, dict[str, Any]]:
    """``{"clean": metrics, kind: FPRs + HM, ...}``: the clean split once, then each negative setting,
    its ``HM`` combining the clean J on positives with its ``FPR_frame`` (:func:`negative_score`)."""
    clean = evaluate(predict, shards, split, image_size, f_mode, limit=limit, device=device, avss_padding=avss_padding)
    rows = {"clean": clean}
    for neg in negatives:
        r = evaluate(predict, shards, split, image_size, f_mode, limit=limit, device=device, negative=neg)
        rows[neg.kind] = {**r, "HM": negative_score(positive_j(clean), r["FPR_frame"])}
    return rows


def model_predictor(model: torch.nn.Module) -> Predictor:
    """``model.predict`` in eval mode."""
    model.eval()
    return lambda batch: model.predict(batch)


def validate(model: torch.nn.Module, shards: ShardSet, split: str, image_size: int, device: torch.device) -> dict[str, Any]:
    """The trainer's validation (`icf.train.select.Validator`): ``icf eval``'s clean, official-protocol metrics of
    ``model`` on ``split``; the model is left in eval mode (the next training step switches it back)."""
    return evaluate(model_predictor(model), shards, split, image_size, device=device)
