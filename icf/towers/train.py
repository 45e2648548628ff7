"""Train the tiny CLIP and CLAP on a dataset's train split; zero-shot accuracy on its val split.

Both towers are the registered tiny configs of :mod:`icf.encoders`, built by the same constructors the
extract stage uses (``ClipEncoder``, ``ClapEncoder``), unfrozen, trained, and saved in the native release
layouts: open_clip's bare ``state_dict`` (``clip.pt``) and laion-clap's ``{"state_dict": {"module.…"}}``
(``clap.pt``). ``encoders.json`` is the EncoderSpec naming both files.

Image tower: object crops (single-label) ↔ the prompts of the CLIP-side levels ("A frame/segment/video of
[X]", one level drawn per step). Audio tower: one-second windows ↔ "An audio of [X]", several positives
when several objects sound (:mod:`icf.towers.loss`). Every step contrasts the batch against the prompts of
the whole object vocabulary, so classes absent from the data are pushed away from every sample.

The audio path is laion-clap's HTS-AT forward split in two: the frozen front end (STFT + log-Mel of the
input repeat-padded to the model's clip length, exactly as ``ClapEncoder.encode_audio`` prepares it) is
computed once per second and cached; the trainable rest (``bn0``, SpecAugment in training, the Swin
features, the projection) runs every step. ``clap_embed`` is that composition, equal to
``ClapEncoder.encode_audio`` in eval mode (tested).

Cached like a stage: ``WORK/<dataset>/towers/<key>/`` with ``stats.json`` written last; the key hashes the
config and the clips' manifest rows, so a rerun with the same inputs is a no-op.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icf.clitools import UserError
from icf.data.adapters import load_samples
from icf.data.datasets import load_info
from icf.encoders import PROMPT_TEMPLATES, TEXT_TOWERS, EncoderSpec, RandomWeightsWarning, prompts
from icf.pipeline.plan import cache_key, digest
from icf.pipeline.store import atomic_write, atomic_write_json, read_json
from icf.towers.examples import Examples, split_examples, towers_vocabulary
from icf.towers.loss import multi_positive_loss

VERSION = "1"
CLIP_LEVELS = tuple(level for level, tower in TEXT_TOWERS.items() if tower in ("clip", "videoclip"))
MAX_LOGIT_SCALE = 100.0
WARMUP = 0.05  # fraction of the steps with a linear learning-rate warm-up (then cosine decay)
SPEC_FILE, STATS_FILE, CLIP_FILE, CLAP_FILE, CONFUSION_FILE = (
    "encoders.json", "stats.json", "clip.pt", "clap.pt", "confusion.png")


@dataclass(frozen=True)
class TowersConfig:
    """What determines a towers run (with the clips' manifest rows, it makes the cache key)."""

    dataset: str
    root: str
    epochs: int = 30
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class TowersResult:
    """A finished (or cached) towers run: its folder, the EncoderSpec JSON and the stats."""

    folder: Path
    spec_path: Path
    stats: dict[str, Any]
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON: cached or not, the folder, the EncoderSpec JSON (`--encoders`), and the stats."""
        return {"cached": self.cached, "folder": str(self.folder), "encoders": str(self.spec_path), **self.stats}

    def summary(self) -> str:
        """One line: zero-shot accuracies on val, steps, time, where the spec is."""
        acc, n = self.stats["accuracy"], self.stats["counts"]
        how = "cached" if self.cached else f"trained {self.stats['seconds']:.0f} s"
        multi = (f", multi-source top-1 in set {acc['multi_source_top1']:.2f} (n={n['multi_source']})"
                 if n["multi_source"] else "")
        failed = f", {len(self.stats['failed'])} clips unreadable (see stats.json)" if self.stats["failed"] else ""
        return (f"towers ({how}): zero-shot on val: objects {acc['objects']:.2f} (n={n['objects']}), "
                f"single-source seconds {acc['single_source']:.2f} (n={n['single_source']}){multi}{failed} → {self.spec_path}")


# ---------------------------------------------------------------------------------------------- towers


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Building towers to *train* them: the random-weights warnings do not apply."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            yield
    finally:
        logging.disable(previous)


def build_towers(seed: int, device: str) -> tuple[Any, Any]:
    """The tiny ``ClipEncoder`` and ``ClapEncoder`` (seeded random init), unfrozen for training."""
    from icf.encoders.clap import ClapEncoder
    from icf.encoders.clip import ClipEncoder

    spec = EncoderSpec.tiny(seed)
    with _quiet_random_init():
        clip = ClipEncoder(spec.clip_model, seed=seed, device=device)
        clap = ClapEncoder(spec.clap_amodel, spec.clap_tmodel, seed=seed, device=device)
    for enc in (clip, clap):
        enc.model.requires_grad_(True)
    branch = clap.model.audio_branch
    branch.spectrogram_extractor.requires_grad_(False)  # the STFT / mel filters stay fixed, as in laion-clap
    branch.logmel_extractor.requires_grad_(False)
    return clip, clap


@torch.no_grad()
def clap_front(clap: Any, wave: torch.Tensor) -> torch.Tensor:
    """Frozen front end: ``(N, samples)`` audio → log-Mel ``(N, 1, frames, mel_bins)`` of the input that
    ``ClapEncoder.encode_audio`` gives HTS-AT (int16 round trip, repeat-padded to the clip length)."""
    from icf.encoders.clap import fit_clip_length, quantize_int16

    branch = clap.model.audio_branch
    x = fit_clip_length(quantize_int16(wave.float()), clap.clip_samples).to(clap.device)
    return branch.logmel_extractor(branch.spectrogram_extractor(x))


def clap_back(clap: Any, logmel: torch.Tensor) -> torch.Tensor:
    """Trainable rest of laion-clap's HTS-AT ``forward`` (non-fusion path) and the audio projection:
    log-Mel ``(N, 1, frames, mel_bins)`` → L2-normalised ``(N, D)``."""
    branch = clap.model.audio_branch
    x = branch.bn0(logmel.transpose(1, 3)).transpose(1, 3)
    if branch.training:
        x = branch.spec_augmenter(x)
    features = branch.forward_features(branch.reshape_wav2img(x))["embedding"]
    return F.normalize(clap.model.audio_projection(features), dim=-1)


def clap_embed(clap: Any, wave: torch.Tensor) -> torch.Tensor:
    """The training code's audio embedding ``(N, samples)`` → ``(N, D)`` (front end + trainable rest)."""
    return clap_back(clap, clap_front(clap, wave))


def clip_text(clip: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip text tower, differentiable: ids ``(K, L)`` → normalised ``(K, D)``."""
    return clip.model.encode_text(tokens, normalize=True)


def clap_text(clap: Any, tokens: torch.Tensor) -> torch.Tensor:
    """laion-clap text tower (``transformer``), differentiable: ids ``(K, L)`` → normalised ``(K, D)``."""
    return F.normalize(clap.model.encode_text(tokens, device=clap.device), dim=-1)


# ---------------------------------------------------------------------------------------------- training


StepLoss = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first WARMUP of ``total`` steps, then cosine decay to 0."""
    warm = max(1, int(WARMUP * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def fit(
    model: torch.nn.Module, step_loss: StepLoss, n: int,
    cfg: TowersConfig, advance: Callable[[float], None],
) -> dict[str, Any]:
    """``cfg.epochs`` shuffled passes over ``n`` examples in batches of ``cfg.batch_size`` (AdamW, warm-up +
    cosine). ``step_loss(indices, generator)`` returns the batch's loss; ``advance(loss)`` after each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses: list[float] = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            loss = step_loss(order[b * cfg.batch_size : (b + 1) * cfg.batch_size], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            advance(losses[-1])
    model.eval()
    return {"steps": len(losses), "planned_steps": total, "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-per_epoch:])) if losses else None}


def clip_step(clip: Any, crops: np.ndarray, labels: np.ndarray, vocabulary: tuple[str, ...]) -> StepLoss:
    """The image tower's batch loss: flipped-at-random crops vs the vocabulary prompts of a random level."""
    tokens = {level: clip.tokenize(prompts(level, vocabulary)) for level in CLIP_LEVELS}
    k = len(vocabulary)

    def step(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = torch.from_numpy(crops[idx.numpy()])
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip] = x[flip].flip(2)
        level = CLIP_LEVELS[int(torch.randint(len(CLIP_LEVELS), (1,), generator=gen))]
        img = clip.model.encode_image(clip.preprocess(x), normalize=True)
        pos = F.one_hot(torch.from_numpy(labels[idx.numpy()]), k).to(clip.device)
        scale = clip.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return multi_positive_loss(img, clip_text(clip, tokens[level]), pos, scale)

    return step


def clap_step(clap: Any, logmel: torch.Tensor, positives: torch.Tensor, vocabulary: tuple[str, ...]) -> StepLoss:
    """The audio tower's batch loss: cached log-Mel seconds vs "An audio of [X]" for the vocabulary;
    ``positives (M, K)`` marks each second's classes."""
    tokens = clap.tokenize(prompts("audio", vocabulary))

    def step(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        emb = clap_back(clap, logmel[idx].to(clap.device).float())
        scale = clap.model.logit_scale_a.exp().clamp(max=MAX_LOGIT_SCALE)
        return multi_positive_loss(emb, clap_text(clap, tokens), positives[idx].to(clap.device), scale)

    return step


def front_features(clap: Any, seconds: np.ndarray, advance: Callable[[int], None], batch: int = 32) -> torch.Tensor:
    """Cached front end of every second: ``(M, 1, frames, mel_bins)`` float16."""
    out = []
    for i in range(0, len(seconds), batch):
        out.append(clap_front(clap, torch.from_numpy(seconds[i : i + batch])).half().cpu())
        advance(len(out[-1]))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def zero_shot(encoders: Any, val: Examples, vocabulary: tuple[str, ...]) -> dict[str, Any]:
    """Zero-shot classification of the val examples through the towers' public encode paths.

    Objects: crop → argmax over "A frame of [X]". Seconds → argmax over "An audio of [X]"; single-source
    seconds count as right when the top class is theirs; multi-source ones report top-1 ∈ their classes
    and whether the top-|S| classes are exactly S. Returns accuracies, counts and the (true, predicted)
    index pairs behind the confusion matrices.
    """
    obj_pred = _argmax_scores(encoders.clip.encode_images(val.crops), encoders.clip.encode_text(prompts("frame", vocabulary)))
    audio_scores = (encoders.clap.encode_audio(val.seconds) @ encoders.clap.encode_text(prompts("audio", vocabulary)).T
                    ).cpu() if len(val.seconds) else torch.zeros(0, len(vocabulary))
    single = [i for i, lab in enumerate(val.second_labels) if len(lab) == 1]
    multi = [i for i, lab in enumerate(val.second_labels) if len(lab) > 1]
    top1 = audio_scores.argmax(1).tolist() if len(audio_scores) else []
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    return {
        "accuracy": {
            "objects": mean(obj_pred == val.crop_labels),
            "single_source": mean([top1[i] == val.second_labels[i][0] for i in single]),
            "multi_source_top1": mean([top1[i] in val.second_labels[i] for i in multi]),
            "multi_source_set": mean([set(audio_scores[i].topk(len(val.second_labels[i])).indices.tolist())
                                      == set(val.second_labels[i]) for i in multi]),
        },
        "counts": {"objects": len(val.crop_labels), "single_source": len(single), "multi_source": len(multi)},
        "pairs": {"objects": [val.crop_labels.tolist(), obj_pred.tolist()],
                  "single_source": [[val.second_labels[i][0] for i in single], [top1[i] for i in single]]},
    }


def _argmax_scores(features: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    return (features @ text.T).argmax(1).cpu().numpy() if len(features) else np.zeros(0, np.int64)


def confusion_png(pairs: dict[str, list[list[int]]], vocabulary: tuple[str, ...], path: Path) -> None:
    """One confusion matrix per task (rows: true class, columns: predicted; classes that occur only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    for ax, (task, (true, pred)) in zip(axes[0], pairs.items()):
        classes = sorted(set(true) | set(pred))
        index = {c: i for i, c in enumerate(classes)}
        m = np.zeros((len(classes), len(classes)), int)
        for t, p in zip(true, pred):
            m[index[t], index[p]] += 1
        ax.imshow(m, cmap="Blues")
        names = [vocabulary[c][:14] for c in classes]
        ax.set_xticks(range(len(classes)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), names, fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > m.max() / 2 else "black")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{task.replace('_', '-')}: accuracy {acc:.2f} (n={m.sum()})", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.suptitle("icf towers: zero-shot on the val split", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- the run


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def input_signature(cfg: TowersConfig, rows: list[dict[str, Any]]) -> str:
    """Digest of the clips' manifest rows and the CSV's size and mtime."""
    csv = Path(cfg.root) / load_info(cfg.dataset).csv.file
    st = csv.stat()
    return digest({"rows": rows, "csv": [st.st_size, st.st_mtime_ns]})


def towers_folder(work: Path, cfg: TowersConfig, signature: str) -> Path:
    """``WORK/<dataset>/towers/<key>``."""
    return work / cfg.dataset / "towers" / cache_key("towers", VERSION, asdict(cfg), {"data": signature})


ProgressHook = Callable[[str, int], Callable[[float | None], None]]


def train_towers(cfg: TowersConfig, work: Path, progress: ProgressHook | None = None, device: str | None = None) -> TowersResult:
    """Train (or find cached) towers for ``cfg``; see the module docstring for what is written.

    ``progress(description, total)`` returns a callback called once per unit of work (with the loss, on
    training steps); None = silent.
    """
    from icf.encoders import load

    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise UserError(f"need --epochs ≥ 1 and a batch size ≥ 2, got {cfg.epochs} and {cfg.batch_size}")
    vocabulary = towers_vocabulary(cfg.dataset)
    samples = {split: load_samples(cfg.dataset, cfg.root, [split]) for split in ("train", "val")}
    folder = towers_folder(work, cfg, input_signature(cfg, [s.to_row() for ss in samples.values() for s in ss]))
    spec_path = folder / SPEC_FILE
    stats = read_json(folder / STATS_FILE)
    if stats is not None and stats.get("key") == folder.name:
        return TowersResult(folder, spec_path, stats, cached=True)
    hook = progress or (lambda _d, _t: lambda _x=None: None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    clip, clap = build_towers(cfg.seed, device)
    examples, failed = {}, []
    for split, ss in samples.items():
        tick = hook(f"{split} clips", len(ss))
        examples[split], bad = split_examples(ss, vocabulary, clip.image_size, clap.sample_rate, on_clip=tick)
        failed += bad
    train = examples["train"]
    if len(train.crop_labels) == 0 or len(train.second_labels) == 0:
        raise UserError(f"{cfg.root}: the train split has no labelled objects/seconds (GT masks with classes)")
    k = len(vocabulary)
    tick = hook("audio front end", len(train.seconds))
    logmel = front_features(clap, train.seconds, lambda n: [tick() for _ in range(n)])
    n_steps = lambda n: cfg.epochs * math.ceil(n / cfg.batch_size)  # noqa: E731
    clip_fit = fit(clip.model, clip_step(clip, train.crops, train.crop_labels, vocabulary), len(train.crop_labels), cfg,
                   hook("CLIP (object crops)", n_steps(len(train.crop_labels))))
    clap_fit = fit(clap.model, clap_step(clap, logmel, torch.from_numpy(train.second_positives(k)), vocabulary),
                   len(train.second_labels), cfg, hook("CLAP (audio seconds)", n_steps(len(train.second_labels))))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / CLIP_FILE, _torch_bytes(clip.model.state_dict()))  # open_clip: a bare state dict
    atomic_write(folder / CLAP_FILE, _torch_bytes(  # laion-clap: DDP-prefixed keys under "state_dict"
        {"state_dict": {f"module.{k_}": v for k_, v in clap.model.state_dict().items()}, "epoch": cfg.epochs}))
    spec = EncoderSpec(clip_model=clip.model_name, clip_weights=str((folder / CLIP_FILE).resolve()),
                       clap_amodel=clap.amodel, clap_tmodel=clap.tmodel,
                       clap_weights=str((folder / CLAP_FILE).resolve()), seed=cfg.seed)
    atomic_write(spec_path, (json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    with _quiet_random_init():
        result = zero_shot(load(spec, device=device), examples["val"], vocabulary)
    confusion_png(result.pop("pairs"), vocabulary, folder / CONFUSION_FILE)
    stats = {
        "key": folder.name, "version": VERSION, "config": asdict(cfg), **result,
        "train": {"objects": len(train.crop_labels), "seconds": len(train.second_labels),
                  "multi_source_seconds": sum(len(lab) > 1 for lab in train.second_labels)},
        "fit": {"clip": clip_fit, "clap": clap_fit}, "failed": failed, "classes": k,
        "prompt_levels": {"clip": list(CLIP_LEVELS), "clap": ["audio"]}, "templates": PROMPT_TEMPLATES,
        "encoders": SPEC_FILE, "confusion": CONFUSION_FILE, "seconds": time.time() - t0,
    }
    atomic_write_json(folder / STATS_FILE, stats)  # written last: the run is done
    return TowersResult(folder, spec_path, stats, cached=False)
