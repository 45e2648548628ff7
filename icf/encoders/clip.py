"""Frozen CLIP (open_clip): per-frame image embeddings and the text tower, incl. soft-prompt input.

``encode_text_embeddings`` runs the text transformer from token *embeddings* instead of ids, so
learnable pseudo-word vectors (CoOp-style soft prompts, MIT's implicit text) can be spliced into a
tokenised template and receive gradients through the frozen tower.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from open_clip.transformer import text_global_pool

from icf.encoders import in_batches

from icf.encoders.spec import (
    TINY_CLIP,
    EncoderWeightsError,
    first_line,
    freeze,
    register_config,
    seeded,
    warn_random,
    weights_file,
)

# A small ViT-B/32-shaped model: fast enough for tests and the demo on 2 CPU cores.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_clip() -> None:
    """Make ``icf-tiny-clip`` a known open_clip model name (idempotent)."""
    register_config(TINY_CLIP, TINY_CLIP_CONFIG, open_clip.list_models, open_clip.add_model_config)


def as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate RGB frames ``(N, H, W, 3)`` uint8 and return them as a tensor."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x


class ClipEncoder:
    """A frozen open_clip model (``model_name`` built-in or ``icf-tiny-clip``).

    Args:
        model_name: open_clip architecture name, e.g. ``ViT-B-32``.
        weights: local checkpoint file (open_clip / OpenAI state dict), or None for seeded random init.
        seed: random-init seed (ignored for the parameters a checkpoint provides).
        device: where the model lives; every returned tensor is on this device.
    """

    def __init__(self, model_name: str, weights: str | None = None, seed: int = 0, device: str = "cpu"):
        register_tiny_clip()
        if model_name not in open_clip.list_models():
            raise EncoderWeightsError(f"CLIP model {model_name!r} is not an open_clip config name")
        pretrained = str(weights_file(weights, f"CLIP {model_name}")) if weights else None
        with seeded(seed):
            try:
                model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
            except (pickle.UnpicklingError, EOFError) as err:
                reason = f"cannot be read as a torch checkpoint ({first_line(err)})"
                raise EncoderWeightsError(f"CLIP weights {pretrained}: {reason}") from err
            except RuntimeError as err:
                reason = f"do not fit {model_name} ({first_line(err)})"
                raise EncoderWeightsError(f"CLIP weights {pretrained}: {reason}") from err
        if not isinstance(model, open_clip.CLIP):
            raise EncoderWeightsError(f"CLIP model {model_name!r}: only built-in CLIP text towers are supported")
        preprocess_cfg = model.visual.preprocess_cfg
        if preprocess_cfg["resize_mode"] not in ("shortest", "squash"):
            mode = preprocess_cfg["resize_mode"]
            raise EncoderWeightsError(f"CLIP {model_name}: resize mode {mode!r} is not supported")
        if weights is None:
            warn_random(f"CLIP {model_name}", seed)
        self.model_name = model_name
        self.device = torch.device(device)
        self.model = freeze(model).to(self.device)
        self._preprocess_cfg = preprocess_cfg
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self.image_size: int = int(preprocess_cfg["size"][0])
        self.dim: int = int(self.model.text_projection.shape[-1])
        self.width: int = int(self.model.token_embedding.embedding_dim)
        self.context_length: int = int(self.model.context_length)

    # ---- image side ----------------------------------------------------------------------------

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames ``(N, H, W, 3)`` → normalised ``(N, 3, S, S)`` float32, S = `image_size`.

        open_clip's evaluation transform (resize the shortest side to S, centre crop; or squash to
        S×S; the model's interpolation and mean/std) on the whole batch. Resampling runs on uint8
        like PIL's, so the result matches open_clip's per-image PIL path to one grey level.
        """
        cfg = self._preprocess_cfg
        x = as_frames(frames).to(self.device).permute(0, 3, 1, 2)
        mode = TF.InterpolationMode(cfg["interpolation"])
        size = [self.image_size] if cfg["resize_mode"] == "shortest" else [self.image_size, self.image_size]
        x = TF.center_crop(TF.resize(x, size, interpolation=mode, antialias=True), [self.image_size, self.image_size])
        return TF.normalize(x.float().div_(255.0), list(cfg["mean"]), list(cfg["std"]))

    @torch.no_grad()
    def encode_preprocessed(self, x: torch.Tensor) -> torch.Tensor:
        """`preprocess` output ``(N, 3, S, S)`` → L2-normalised ``(N, D)`` float32, in ONE forward pass.

        The batched entry point: frames of many clips (each preprocessed at its own size) are
        concatenated and embedded together; the caller picks N (the extract stage's ``--batch-frames``).
        """
        return self.model.encode_image(x.to(self.device), normalize=True)

    def encode_images(self, frames: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 frames ``(N, H, W, 3)`` → L2-normalised image embeddings ``(N, D)`` float32."""
        x = as_frames(frames)
        return in_batches(lambda chunk: self.encode_preprocessed(self.preprocess(chunk)), x, batch_size, self.dim,
                          self.device)

    # ---- text side -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → token ids ``(N, L)`` int64 (SOT … EOT, zero padded, L = `context_length`)."""
        return self._tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → L2-normalised text embeddings ``(N, D)``."""
        return self.model.encode_text(self.tokenize(texts), normalize=True)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, L)`` → input embeddings ``(N, L, W)`` (the frozen lookup table)."""
        return self.model.token_embedding(ids.to(self.device))

    def encode_text_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Text tower from input embeddings: ``(N, L, W)`` + their ids ``(N, L)`` → normalised ``(N, D)``.

        Same computation as ``encode_text`` after the token lookup: add positional embeddings, causal
        transformer, ``ln_final``, pool at the EOT position found in ``ids``, project. Differentiable
        w.r.t. ``embeds``; positions whose embedding was replaced by a soft prompt keep any id that is
        not the EOT id (the EOT token must stay the largest id, as in CLIP's tokenizer).
        """
        m = self.model
        length = embeds.shape[1]
        x = embeds + m.positional_embedding[:length]
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.ln_final(m.transformer(x, attn_mask=mask))
        x = text_global_pool(x, ids.to(x.device), m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1)
