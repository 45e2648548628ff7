"""Stage ``bank``: DDESeg's per-class semantic audio memory (Liu et al., CVPR 2025, §3.1 step 1; Eq. 2–4).

Per clip (``process_one``, every split, cached per unit like any stage): the audio feature of each second
``feat (T, D_a)`` float32 from the chosen source (``--bank-source``: the extract stage's ``clap_latent``, the
HTS-AT embedding before projection, or its projected ``clap``) and the second's single label ``labels (T,)``
int64, −1 when the second does not have exactly one label (:func:`second_labels`):

* AVSS: the non-zero class ids of GT frame t; an empty GT frame is {0} (silence or off-screen: the background
  row, unless ``--bank-background false``); a frame without GT (AVSS v1s train frames 2–5) takes the clip's
  ``classes`` when it names exactly one class.
* S4: the clip's category for every second.
* MS3: its CSV names no classes, so every second is −1 and ``finish`` borrows the bank of ``--bank-from``.

``finish`` builds ``audio_bank.npz`` from the **train split only** (:func:`build_bank`): per class c with
n_c single-label seconds, the centre μ^c = their mean (Eq. 2); k_c = min(k, n_c) clusters by seeded k-means
(k-means++ initialisation, 50 Lloyd steps; Eq. 3); from each cluster the m members nearest its centroid
(Eq. 4). A cluster with fewer than m members repeats its member nearest the centroid; a class with fewer than
k clusters repeats its member nearest μ^c **[decision]**, so every class has M = k·m rows. Rows are ordered
by class id. The npz holds ``class_ids (C,)``, ``centers (C, D_a)``, ``reps (C, M, D_a)``, ``counts (C,)``
(n_c), ``source``, ``upstream`` (the extract key) and ``encoders`` (the encoder spec JSON); the ``shard``
stage ships it as ``shards/audio_bank.npz`` and names it in ``shards.json``.

MS3: ``--bank-from s4|avss`` copies that dataset's latest bank (its bank stage must have run with the same
source and the same encoder spec). That bank's cache key is part of this stage's key (`borrowed_keys`), so
rebuilding it (other ``--bank-clusters``, a new extract) makes this stage and ``shard`` stale and ``icf stage
all`` copy it again; without it no bank is written and ``finish`` records why, so DDESeg on
MS3 refuses to train with a line naming the flag.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icf.clitools import UserError
from icf.data.io import read_mask
from icf.data.datasets import load_info
from icf.data.sample import Sample
from icf.model.memory import MS3_REFUSAL, SOURCES
from icf.pipeline.ledger import Workspace
from icf.pipeline.stage import FinishContext, Stage, option
from icf.pipeline.store import Output, atomic_write, npz_bytes, read_json, read_outputs

AUDIO_BANK = "audio_bank.npz"
LLOYD_STEPS = 50
NO_LABEL = -1


def second_labels(sample: Sample, background: bool) -> np.ndarray:
    """The single label of each second ``(T,)`` int64 (class id, or −1 when not exactly one), module docstring."""
    labels = np.full(sample.n_frames, NO_LABEL, dtype=np.int64)
    if sample.dataset == "ms3":
        return labels
    info = load_info(sample.dataset)
    try:
        clip_ids = sorted({info.class_id(c) for c in sample.classes})
    except KeyError as err:
        raise ValueError(f"{sample.uid}: {err.args[0]}") from None
    single = clip_ids[0] if len(clip_ids) == 1 else NO_LABEL
    if sample.dataset == "s4":
        labels[:] = single
        return labels
    for t, (has_gt, path) in enumerate(zip(sample.gt_frames, sample.mask_paths)):
        if not has_gt:
            labels[t] = single
            continue
        ids = np.unique(read_mask(path, sample.dataset))
        ids = ids[ids != 0]
        if len(ids) == 1:
            labels[t] = int(ids[0])
        elif len(ids) == 0 and background:
            labels[t] = 0
    return labels


def kmeans(x: torch.Tensor, k: int, seed: int, steps: int = LLOYD_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (Eq. 3): k-means++ initialisation, then ``steps`` Lloyd iterations.

    Args:
        x: ``(n, D)`` float64 points, n ≥ k ≥ 1.
    Returns:
        centroids ``(k, D)`` and the final assignment ``(n,)`` (nearest centroid; an empty cluster keeps its
        previous centroid).
    """
    gen = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(len(x), (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(1).values
        idx = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)) if d2.sum() > 0 else int(torch.randint(len(x), (1,), generator=gen))
        centres.append(x[idx])
    c = torch.stack(centres).clone()
    for _ in range(steps):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c, torch.cdist(x, c).argmin(1)


def nearest(x: torch.Tensor, centre: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` rows of ``x (n, D)`` nearest ``centre (D,)`` (ties by index), repeating the nearest when n < m."""
    order = torch.argsort((x - centre).norm(dim=1), stable=True)
    picked = x[order[:m]]
    return torch.cat([picked, picked[:1].expand(m - len(picked), -1)]) if len(picked) < m else picked


def class_rows(x: torch.Tensor, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's centre μ^c (Eq. 2) and its k·m representatives (Eq. 3–4): ``(D,)``, ``(k·m, D)``."""
    mu = x.mean(0)
    kc = min(k, len(x))
    centroids, assign = kmeans(x, kc, seed)
    rows = []
    for j in range(kc):
        members = x[assign == j]
        rows.append(nearest(members, centroids[j], m) if len(members) else nearest(x, centroids[j], m))
    if kc < k:
        rows.append(nearest(x, mu, 1).expand((k - kc) * m, -1))
    return mu, torch.cat(rows)


def build_bank(feats: np.ndarray, labels: np.ndarray, k: int, m: int, seed: int) -> dict[str, np.ndarray]:
    """The semantic memory of ``feats (N, D)`` with single labels ``labels (N,)`` (−1 rows ignored).

    Returns ``class_ids (C,)`` ascending, ``centers (C, D)``, ``reps (C, k·m, D)`` float32, ``counts (C,)``.
    Every class is clustered with the same ``seed``, so the bank depends only on its inputs.
    """
    keep = labels >= 0
    x, y = torch.from_numpy(feats[keep].astype(np.float64)), labels[keep]
    ids = np.unique(y)
    if len(ids) == 0:
        raise UserError("no train second has exactly one label: the audio bank would be empty")
    centers, reps, counts = [], [], []
    for c in ids:
        mu, rows = class_rows(x[torch.from_numpy(y == c)], k, m, seed)
        centers.append(mu)
        reps.append(rows)
        counts.append(int((y == c).sum()))
    return {"class_ids": ids.astype(np.int64), "centers": torch.stack(centers).float().numpy(),
            "reps": torch.stack(reps).float().numpy(), "counts": np.array(counts, dtype=np.int64)}


class BankStage(Stage):
    """DDESeg's per-class semantic audio memory from the train split (audio_bank.npz)."""

    name = "bank"
    version = "1"
    needs = ("extract",)

    @dataclass(frozen=True)
    class Config:
        bank_source: str = option("clap_latent", "Audio feature of the bank: clap_latent (HTS-AT before projection) | clap.")
        bank_clusters: int = option(5, "k: k-means clusters per class (Eq. 3).")
        bank_per_cluster: int = option(4, "m: members kept per cluster, nearest its centroid (Eq. 4).")
        bank_seed: int = option(0, "Seed of the k-means++ initialisation.")
        bank_background: bool = option(True, "Give empty GT frames (AVSS) the background row 0.")
        bank_from: str | None = option(None, "MS3: copy the bank of this dataset (s4 | avss) in the same WORK.")

        def __post_init__(self) -> None:
            """``ValueError`` naming the flag for a setting that cannot give a bank."""
            if self.bank_source not in SOURCES:
                raise ValueError(f"--bank-source must be one of {', '.join(SOURCES)}, got {self.bank_source!r}")
            for name in ("bank_clusters", "bank_per_cluster"):
                if getattr(self, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
            if self.bank_from not in (None, "s4", "avss"):
                raise ValueError(f"--bank-from must be s4 or avss, got {self.bank_from!r}")

    def borrowed_keys(self, work: Path) -> dict[str, str | None]:
        """With ``--bank-from X``: ``{"X/bank": X's latest bank key}`` (None before X's bank ran), so that a
        rebuilt bank of X changes this stage's key and the copy is refreshed (and ``shard`` after it)."""
        if self.cfg.bank_from is None:
            return {}
        return {f"{self.cfg.bank_from}/{self.name}": Workspace(work, self.cfg.bank_from).current_key(self.name)}

    def refusal(self, dataset: str) -> str | None:
        """A dataset cannot borrow its own bank."""
        if self.cfg.bank_from == dataset:
            return (f"--bank-from {dataset}: {dataset} cannot borrow its own bank (--bank-from names another dataset "
                    "of the same --work whose bank to copy, e.g. for MS3, which names no classes)")
        return None

    def process_one(self, s: Sample, upstream: Mapping[str, Mapping[str, Output]]) -> dict[str, Output]:
        """``feat (T, D_a)`` float32 and ``labels (T,)`` int64 of one clip (raises ``ValueError`` naming the file)."""
        feat = np.asarray(upstream["extract"][self.cfg.bank_source], dtype=np.float32)
        if feat.shape[0] != s.n_frames:
            raise ValueError(f"{s.uid}: {self.cfg.bank_source} has {feat.shape[0]} rows for {s.n_frames} frames")
        return {"feat": feat, "labels": second_labels(s, self.cfg.bank_background)}

    @classmethod
    def finish_problem(cls, dataset_dir: Path, cache_key: str) -> str | None:
        """The bank ``finish`` wrote is gone."""
        marker = dataset_dir / cls.name / cache_key / "finish.json"
        try:
            result = read_json(marker)["result"]
        except (UserError, KeyError, TypeError):
            return f"{marker}: missing or malformed"
        path = dataset_dir / cls.name / cache_key / AUDIO_BANK
        return f"{path}: missing file" if result.get("audio_bank") and not path.is_file() else None

    def finish(self, ctx: FinishContext) -> dict[str, Any]:
        """Build (or, with ``--bank-from``, copy) ``audio_bank.npz`` into this stage's folder."""
        encoders = read_json(ctx.upstream_dirs["extract"] / "finish.json")["result"]["encoders"]
        if self.cfg.bank_from is not None:
            return self._borrow(ctx, encoders)
        if ctx.dataset == "ms3":
            return {"audio_bank": None, "refused": MS3_REFUSAL}
        feats, labels = [], []
        for unit_id, (split, _) in sorted(ctx.units.items()):
            if split != "train":
                continue
            for _, out in sorted(read_outputs(ctx.stage_dir / f"unit-{unit_id:05d}.out.parquet").items()):
                feats.append(out["feat"])
                labels.append(out["labels"])
        if not feats:
            raise UserError(f"{ctx.dataset}: no train clip reached the bank stage; the audio bank needs the train split")
        bank = build_bank(np.concatenate(feats), np.concatenate(labels), self.cfg.bank_clusters,
                          self.cfg.bank_per_cluster, self.cfg.bank_seed)
        meta = {"source": np.array(self.cfg.bank_source), "upstream": np.array(ctx.upstream_dirs["extract"].name),
                "encoders": np.array(json.dumps(encoders, sort_keys=True))}
        atomic_write(ctx.stage_dir / AUDIO_BANK, npz_bytes({**bank, **meta}))
        return {"audio_bank": AUDIO_BANK, "classes": len(bank["class_ids"]), "rows": int(bank["reps"].shape[1]),
                "source": self.cfg.bank_source}

    def _borrow(self, ctx: FinishContext, encoders: dict[str, Any]) -> dict[str, Any]:
        """Copy ``--bank-from``'s latest bank after checking its source and encoder spec equal this dataset's."""
        lender = Workspace(ctx.dataset_dir.parent, self.cfg.bank_from)
        key = lender.current_key(self.name)
        if key is None:
            raise UserError(f"--bank-from {self.cfg.bank_from}: no bank stage has run there; run "
                            f"`icf stage all --dataset {self.cfg.bank_from}` first")
        path = lender.root / self.name / key / AUDIO_BANK
        if not path.is_file():
            raise UserError(f"--bank-from {self.cfg.bank_from}: {path} is missing; run `icf stage bank --dataset {self.cfg.bank_from}`")
        with np.load(path) as npz:
            source, theirs = str(npz["source"]), json.loads(str(npz["encoders"]))
        if source != self.cfg.bank_source:
            raise UserError(f"--bank-from {self.cfg.bank_from}: its bank is built from {source}, not {self.cfg.bank_source}")
        if theirs != encoders:
            raise UserError(f"--bank-from {self.cfg.bank_from}: its bank comes from other encoders than this "
                            f"dataset's extract stage (run both with the same --encoders)")
        atomic_write(ctx.stage_dir / AUDIO_BANK, path.read_bytes())
        return {"audio_bank": AUDIO_BANK, "from": self.cfg.bank_from, "from_key": key, "source": source}
