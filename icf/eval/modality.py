"""Does it listen? The Shapley value of audio and of vision for a run's J (``icf compare --setting modality``).

Following BalanceMM's modality contribution for classification, the two modalities are the players of a
cooperative game whose value v(S) is the run's J (or another metric of `icf.eval.evaluate`) on the split when
only the modalities in S are real and the others are replaced by an uninformative input. With two players the
Shapley values are

    φ_audio  = ½[(v(A,V) − v(V)) + (v(A) − v(∅))],
    φ_vision = ½[(v(A,V) − v(A)) + (v(V) − v(∅))],

and φ_audio + φ_vision = v(A,V) − v(∅) (efficiency). A model that ignores the audio has φ_audio = 0 exactly;
one that segments whatever is visible has φ_vision ≈ its whole J. `shapley` computes the values for any number
of players by the exact subset sum.

What "absent" means (decisions):

* **audio** — digital silence, through the project's own front ends (`icf.augment.negatives.AudioFrontEnd`, the
  ``silence`` negative's audio): every key of `icf.data.shard_format.AUDIO_KEYS` in the batch (``mel``,
  ``clap``, ``clap_clip``, ``clap_latent``) becomes what the mel and extract stages would have cached for a
  silent clip of that length; a key no front end makes is refused. The target is unchanged (unlike the
  negative, whose target is empty): v(V) asks how much J the frames alone earn.
* **vision** — a blank frame: every real frame becomes the uniform image of the ImageNet mean colour
  (:data:`BLANK_RGB`, 8-bit), i.e. ≈ 0 after the loader's normalisation, the usual "mean input" baseline. Every
  frame-derived input of :data:`VISION_KEYS` changes with it: ``frames`` (that image, normalised as the
  loader does) and the cached CLIP embeddings ``clip`` / ``vclip`` / ``vclip_seg``, **recomputed** for the blank
  image with the CLIP tower of the shards' own encoder spec (the frozen tower the extract stage used, loaded
  from its local weights), pooled as the extract stage pools them (every frame identical: the video and
  segment embeddings are the frame embedding). A per-split mean frame was not used: it keeps the scene layout
  of the split and its embeddings would come from no real clip. Padding frames and segments stay zero.

Each v(S) is a full `icf.eval.evaluate.evaluate` pass with the predictor reading the modified batch and the
metrics reading the true target, so v(A,V) is the clean number ``icf eval`` prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import torch

from icf.data.shard_format import ARRAYS, AUDIO_KEYS

if TYPE_CHECKING:
    from icf.augment.negatives import NegativeAudio
    from icf.data.shards import ShardSet
    from icf.eval.evaluate import Predictor

PLAYERS = ("audio", "vision")
VISION_KEYS = ("frames", "clip", "vclip", "vclip_seg")  # every frame-derived model input of a Batch
BLANK_RGB = (124, 116, 104)  # round(255 · ImageNet mean): the blank frame's colour


def shapley(value: Callable[[frozenset[str]], float], players: Sequence[str] = PLAYERS) -> dict[str, float]:
    """Exact Shapley values φ_i = Σ_{S ⊆ N∖{i}} |S|!(n − |S| − 1)!/n! · (v(S ∪ {i}) − v(S)) of the game ``value``
    (called once per coalition)."""
    n = len(players)
    cache: dict[frozenset[str], float] = {}

    def v(s: frozenset[str]) -> float:
        if s not in cache:
            cache[s] = float(value(s))
        return cache[s]

    phi = {}
    for p in players:
        others = [q for q in players if q != p]
        phi[p] = sum(math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) * (v(frozenset(s) | {p}) - v(frozenset(s)))
                     for k in range(n) for s in combinations(others, k))
    return phi


@dataclass(frozen=True)
class BlankFrame:
    """The blank frame in every form a Batch holds it: ``pixel`` ``(3,)`` (normalised as the loader does) and
    its unit CLIP embedding ``clip`` ``(Dc,)`` (also the video / segment embedding of an all-blank clip)."""

    pixel: torch.Tensor
    clip: torch.Tensor

    @classmethod
    def for_shards(cls, shards: ShardSet, device: torch.device | str = "cpu") -> BlankFrame:
        """:data:`BLANK_RGB` through the loader's normalisation and the shards' CLIP tower (extract-stage recipe:
        the tower's preprocessing, its embedding L2-normalised, stored as float16)."""
        import numpy as np

        from icf.data.shards import IMAGENET_MEAN, IMAGENET_STD
        from icf.encoders import EncoderSpec
        from icf.methods.icf import frozen_towers

        rgb = torch.tensor(BLANK_RGB, dtype=torch.float32)
        pixel = (rgb / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        image = np.broadcast_to(np.array(BLANK_RGB, dtype=np.uint8), (1, 64, 64, 3)).copy()  # uniform: any size
        clip = frozen_towers(EncoderSpec.from_dict(shards.encoders), str(device)).clip
        emb = torch.nn.functional.normalize(clip.encode_images(image).float().cpu(), dim=-1)[0]
        return cls(pixel, emb.half().float())  # stored as float16, read back as float32


def blank_vision(batch: dict[str, Any], blank: BlankFrame) -> dict[str, Any]:
    """A copy of ``batch`` whose real frames are the blank frame in every :data:`VISION_KEYS` key present
    (padding frames and padding segments stay zero); the target is unchanged."""
    valid = batch["valid"]
    out: dict[str, Any] = {}
    frames = batch["frames"].clone()
    frames[valid] = blank.pixel.to(frames)[:, None, None]
    out["frames"] = frames
    if "clip" in batch:
        clip = batch["clip"].clone()
        clip[valid] = blank.clip.to(clip)
        out["clip"] = clip
    if "vclip" in batch:
        out["vclip"] = blank.clip.to(batch["vclip"]).expand_as(batch["vclip"]).clone()
    if "vclip_seg" in batch:
        seg = batch["vclip_seg"]
        real = seg.abs().sum(-1) > 0  # the loader pads segments with zero rows; a stored embedding is a unit vector
        out["vclip_seg"] = torch.where(real[..., None], blank.clip.to(seg), seg)
    return {**batch, **out}


def silent_audio(batch: dict[str, Any], source: NegativeAudio) -> dict[str, Any]:
    """A copy of ``batch`` whose clips hear digital silence in every audio key (the front ends' silence,
    `icf.augment.negatives.with_audio`); the target is unchanged."""
    from icf.augment.negatives import with_audio

    n_frames = batch["valid"].sum(1).tolist()
    return with_audio(batch, {i: source.audio("silence", uid, int(n)) for i, (uid, n) in enumerate(zip(batch["uid"], n_frames))})


def coalition_predictor(predict: Predictor, real: frozenset[str], silence: NegativeAudio | None,
                        blank: BlankFrame | None) -> Predictor:
    """``predict`` on batches where the modalities not in ``real`` are absent (module docstring)."""

    def run(batch: dict[str, Any]) -> torch.Tensor:
        if "audio" not in real:
            batch = silent_audio(batch, silence)
        if "vision" not in real:
            batch = blank_vision(batch, blank)
        return predict(batch)

    return run


def modality_scores(predict: Predictor, shards: ShardSet, split: str, image_size: int, device: torch.device | str = "cpu",
                    metric: str = "J", f_mode: str = "official", limit: int | None = None) -> dict[str, Any]:
    """The clean metrics of ``predict`` on ``split`` plus ``phi_audio``, ``phi_vision`` (Shapley values of
    ``metric``) and the coalition values ``v_audio_vision``, ``v_audio``, ``v_vision``, ``v_none``."""
    from icf.augment.negatives import NegativeAudio, front_end_for
    from icf.eval.evaluate import evaluate

    silence = NegativeAudio(front_end_for(shards, device))
    blank = BlankFrame.for_shards(shards, device)
    results: dict[frozenset[str], dict[str, Any]] = {}

    def value(real: frozenset[str]) -> float:
        results[real] = evaluate(coalition_predictor(predict, real, silence, blank), shards, split, image_size, f_mode,
                                 limit=limit, device=device)
        return float(results[real][metric])

    phi = shapley(value)
    names = {frozenset(PLAYERS): "v_audio_vision", frozenset({"audio"}): "v_audio", frozenset({"vision"}): "v_vision",
             frozenset(): "v_none"}
    clean = results[frozenset(PLAYERS)]
    return {**clean, "setting": f"modality Shapley ({metric})", "metric": metric,
            **{f"phi_{p}": phi[p] for p in PLAYERS}, **{names[s]: float(r[metric]) for s, r in results.items()}}


def check_keys() -> None:
    """Every array a shard holds is audio or vision input for this setting (or the target): a new input key
    must be added to :data:`AUDIO_KEYS` or :data:`VISION_KEYS` before the scores can be trusted."""
    unknown = set(ARRAYS) - set(AUDIO_KEYS) - set(VISION_KEYS)
    if unknown:
        raise ValueError(f"modality scores: batch keys {sorted(unknown)} are neither audio nor vision inputs")


def modality_eval(metric: str = "J", f_mode: str = "official") -> Callable[..., dict[str, Any]]:
    """The compare setting (`icf.eval.compare.RunEval`): `modality_scores` of one run."""
    check_keys()

    def run(predict: Predictor, shards: ShardSet, split: str, image_size: int, device: torch.device) -> dict[str, Any]:
        return modality_scores(predict, shards, split, image_size, device, metric, f_mode)

    return run
