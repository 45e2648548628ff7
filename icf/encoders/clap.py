"""Frozen CLAP (laion-clap), built offline: audio embeddings at 48 kHz and the text tower.

laion-clap's ``CLAP_Module`` fetches ``roberta-base`` from the hub when it is constructed, so the
model is built with ``laion_clap.clap_module.create_model`` instead. Two of its builders are swapped
while the model is constructed:

* ``RobertaModel.from_pretrained('roberta-base')`` → ``RobertaModel(config)`` from a local folder
  (``text_dir``); the LAION checkpoint then supplies the RoBERTa weights.
* ``create_htsat_model`` → an HTS-AT of custom size, only for the tiny registered config.

Note: ``import laion_clap`` appends its package folder to ``sys.path``, so laion-clap's modules are
also importable (as a second copy) as top-level ``clap_module``; this module uses the
``laion_clap.clap_module`` copy throughout and patches that one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # laion-clap imports a deprecated timm path
    warnings.simplefilter("ignore", FutureWarning)
    from laion_clap.clap_module import factory as clap_factory
    from laion_clap.clap_module import model as clap_model
    from laion_clap.clap_module.htsat import HTSAT_Swin_Transformer
    from laion_clap.clap_module.tokenizer import tokenize as clip_bpe_tokenize

from icf.encoders import in_batches
from icf.encoders.spec import (
    TINY_CLAP,
    EncoderWeightsError,
    freeze,
    load_strict,
    read_checkpoint,
    register_config,
    seeded,
    warn_random,
)

# Tiny HTS-AT (Swin widths 16→128, one block per stage) with a tiny CLIP-style text transformer.
TINY_CLAP_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4], "window_size": 8}
TINY_CLAP_CONFIG = {
    "embed_dim": TINY_CLAP_SWIN["embed_dim"] * 2 ** (len(TINY_CLAP_SWIN["depths"]) - 1),
    "joint_embed_shape": 64,
    "audio_cfg": {
        "audio_length": 1024, "clip_samples": 480000, "mel_bins": 64, "sample_rate": 48000, "window_size": 1024,
        "hop_size": 480, "fmin": 50, "fmax": 14000, "class_num": 527, "model_type": "HTSAT", "model_name": "tiny",
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_SWIN_SIZES = {TINY_CLAP: TINY_CLAP_SWIN}
TEXT_MODELS = ("transformer", "roberta")
# laion-clap's Cnn6/Cnn10 take the waveform tensor; its HTS-AT and Cnn14 take {"waveform": tensor}.
_TENSOR_INPUT_PANNS = ("Cnn6", "Cnn10")


def register_tiny_clap() -> None:
    """Make ``icf-tiny-htsat`` a known laion-clap model name (idempotent)."""
    register_config(TINY_CLAP, TINY_CLAP_CONFIG, clap_factory.list_models, clap_factory.add_model_config)


class _LocalRoberta:
    """Stands in for ``transformers.RobertaModel`` while CLAP is built: the architecture from a local folder."""

    def __init__(self, text_dir: Path):
        self.text_dir = text_dir

    def from_pretrained(self, _name: str):
        from transformers import RobertaConfig, RobertaModel

        return RobertaModel(RobertaConfig.from_pretrained(self.text_dir))


def _sized_htsat(sizes: dict, audio_cfg, enable_fusion: bool = False, fusion_type: str = "None"):
    """laion-clap's HTS-AT (256×256 spectrogram image, 4×4 patches) with custom Swin sizes."""
    return HTSAT_Swin_Transformer(
        spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=audio_cfg.class_num, config=audio_cfg,
        enable_fusion=enable_fusion, fusion_type=fusion_type, **sizes,
    )


def offline_text_model(tmodel: str, text_dir: str | Path | None, weights: str | None) -> str:
    """The text tower that can be built here: a random-init ``roberta`` without a local RoBERTa folder
    (the newcomer's case: no weights, no flags, no network) becomes laion-clap's own ``transformer``,
    which needs no files; a LAION checkpoint still needs its RoBERTa folder (``--clap-text-dir``)."""
    if tmodel != "roberta" or text_dir is not None or weights is not None:
        return tmodel
    message = ("CLAP text tower: no --clap-text-dir, so laion-clap's 'transformer' text tower (random weights) "
               "stands in for RoBERTa; pass --clap-text-dir with a LAION checkpoint to use RoBERTa")
    logging.getLogger("icf.encoders").warning(message)
    warnings.warn(message, stacklevel=3)
    return "transformer"


def _text_dir(text_dir: str | Path | None, tmodel: str) -> Path | None:
    if tmodel != "roberta":
        return None
    if text_dir is None:
        raise EncoderWeightsError(
            "CLAP text model 'roberta' (the LAION checkpoints' text tower) needs a local RoBERTa folder "
            "(config.json, vocab.json, merges.txt): pass clap_text_dir / --clap-text-dir"
        )
    path = Path(text_dir).expanduser()
    missing = [f for f in ("config.json", "vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing:
        raise EncoderWeightsError(f"CLAP RoBERTa folder {path}: missing {missing}")
    return path


def build_clap_model(amodel: str, tmodel: str, text_dir: Path | None, seed: int) -> tuple[clap_model.CLAP, dict]:
    """Construct laion-clap's ``CLAP`` offline with seeded random init; returns (model, config)."""
    register_tiny_clap()
    if amodel not in clap_factory.list_models():
        raise EncoderWeightsError(f"CLAP audio model {amodel!r} is not a laion-clap config name")
    if tmodel not in TEXT_MODELS:
        raise EncoderWeightsError(f"CLAP text model {tmodel!r} is not supported offline (use one of {TEXT_MODELS})")
    with ExitStack() as stack:
        if text_dir is not None:
            stack.enter_context(mock.patch.object(clap_model, "RobertaModel", _LocalRoberta(text_dir)))
        if amodel in _SWIN_SIZES:
            builder = partial(_sized_htsat, _SWIN_SIZES[amodel])
            stack.enter_context(mock.patch.object(clap_model, "create_htsat_model", builder))
        stack.enter_context(seeded(seed))
        model, cfg = clap_factory.create_model(amodel, tmodel, pretrained="", precision="fp32", device="cpu")
    return model, cfg


def load_clap_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a LAION CLAP checkpoint (``{'state_dict': {'module.…': …}}`` or a bare state dict).

    ``text_branch.embeddings.position_ids`` is dropped when the model has no such key: transformers
    < 4.31 stored it in the state dict, current versions keep it as a non-persistent buffer.
    """
    state = read_checkpoint(path, "CLAP")
    key = "text_branch.embeddings.position_ids"
    if key in state and key not in model.state_dict():
        state = {k: v for k, v in state.items() if k != key}
    load_strict(model, state, path, "CLAP")


def fit_clip_length(wave: torch.Tensor, clip_samples: int) -> torch.Tensor:
    """``(N, S)`` → ``(N, clip_samples)`` as LAION CLAP's inference input.

    Shorter audio is *repeat-padded* (whole copies, then zeros), as laion-clap's ``repeatpad``;
    longer audio keeps its first ``clip_samples`` samples (laion-clap crops at random; a fixed crop
    keeps the cache deterministic).
    """
    n = wave.shape[1]
    if n >= clip_samples:
        return wave[:, :clip_samples]
    repeated = wave.repeat(1, clip_samples // n)
    return F.pad(repeated, (0, clip_samples - repeated.shape[1]))


def quantize_int16(wave: torch.Tensor) -> torch.Tensor:
    """Round-trip through int16 (clip to [-1, 1]), as laion-clap does to float input."""
    return (wave.clamp(-1.0, 1.0) * 32767.0).to(torch.int16).float() / 32767.0


class ClapEncoder:
    """A frozen LAION CLAP.

    Args:
        amodel: laion-clap audio config name (``HTSAT-tiny``, ``HTSAT-base``, ``PANN-14``, …, ``icf-tiny-htsat``).
        tmodel: ``roberta`` (the released LAION checkpoints; needs ``text_dir``) or ``transformer``; a
            ``roberta`` with neither ``text_dir`` nor ``weights`` is built as ``transformer`` (with a warning).
        weights: local CLAP checkpoint, or None for seeded random init.
        seed: random-init seed.
        text_dir: local RoBERTa folder (``config.json``, ``vocab.json``, ``merges.txt``) for ``roberta``.
        device: where the model lives; every returned tensor is on this device.
    """

    def __init__(
        self,
        amodel: str,
        tmodel: str,
        weights: str | None = None,
        seed: int = 0,
        text_dir: str | None = None,
        device: str = "cpu",
    ):
        tmodel = offline_text_model(tmodel, text_dir, weights)
        roberta_dir = _text_dir(text_dir, tmodel)
        model, cfg = build_clap_model(amodel, tmodel, roberta_dir, seed)
        if weights is not None:
            load_clap_weights(model, weights)
        else:
            warn_random(f"CLAP {amodel}/{tmodel}", seed)
        self.amodel, self.tmodel = amodel, tmodel
        self.device = torch.device(device)
        self.model = freeze(model).to(self.device)
        audio = cfg["audio_cfg"]
        self.sample_rate: int = int(audio["sample_rate"])
        self.clip_samples: int = int(audio["clip_samples"])
        self._tensor_input = audio["model_type"] == "PANN" and audio["model_name"] in _TENSOR_INPUT_PANNS
        self.context_length: int = int(cfg["text_cfg"]["context_length"])
        self.dim: int = int(self.model.joint_embed_shape)
        self.latent_dim: int = int(self.model.audio_projection[0].in_features)
        self._roberta_tokenizer = None
        if roberta_dir is not None:
            from transformers import RobertaTokenizer

            self._roberta_tokenizer = RobertaTokenizer.from_pretrained(roberta_dir)
            self.pad_id: int = int(self._roberta_tokenizer.pad_token_id)
        else:
            self.pad_id = 0

    # ---- audio side ----------------------------------------------------------------------------

    def prepare_audio(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mono audio ``(N, samples)`` float32 at `sample_rate` → model input ``(N, clip_samples)`` (on CPU).

        Each row is quantised to int16 and repeat-padded (or cut) to the model's clip length
        (10 s for the LAION configs), exactly as laion-clap prepares in-memory audio.
        """
        x = torch.as_tensor(wave, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"audio must be (N, samples) with samples > 0, got {tuple(x.shape)}")
        return fit_clip_length(quantize_int16(x), self.clip_samples)

    @torch.no_grad()
    def encode_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """`prepare_audio` output ``(N, clip_samples)`` → L2-normalised ``(N, D)``, in ONE forward pass.

        The batched entry point: windows of many clips are stacked and embedded together; the caller
        picks N (the extract stage's ``--batch-windows``).
        """
        return self.encode_prepared_latent(x)[:, : self.dim]

    @torch.no_grad()
    def encode_prepared_latent(self, x: torch.Tensor) -> torch.Tensor:
        """`prepare_audio` output ``(N, clip_samples)`` → ``(N, D + D_h)`` in ONE forward pass: the L2-normalised
        projected embedding (first D columns, `encode_prepared`) and, after it, the audio tower's ``embedding``
        *before* ``audio_projection`` (D_h = `latent_dim`, not normalised; for HTS-AT the average-pooled last
        Swin tokens, DDESeg's ``latent_output``)."""
        x = x.to(self.device)
        inputs = x if self._tensor_input else {"waveform": x}
        features = self.model.encode_audio(inputs, device=self.device)["embedding"]
        return torch.cat([F.normalize(self.model.audio_projection(features), dim=-1), features.float()], dim=1)

    def encode_audio(self, wave: np.ndarray | torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Mono audio ``(N, samples)`` float32 at `sample_rate` → L2-normalised ``(N, D)`` (see `prepare_audio`)."""
        return in_batches(self.encode_prepared, self.prepare_audio(wave), batch_size, self.dim, self.device)

    # ---- text side -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → token ids ``(N, L)`` int64, L = `context_length`, padded with `pad_id`."""
        texts = list(texts)
        if self._roberta_tokenizer is None:
            ids = clip_bpe_tokenize(texts, context_length=self.context_length)
        else:
            ids = self._roberta_tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
            )["input_ids"]
        return ids.to(self.device)

    def _text_input(self, ids: torch.Tensor):
        if self.tmodel == "transformer":
            return ids
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → L2-normalised text embeddings ``(N, D)`` (laion-clap's own text path)."""
        return F.normalize(self.model.encode_text(self._text_input(self.tokenize(texts)), device=self.device), dim=-1)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N, L)`` → input embeddings ``(N, L, W)`` (the frozen lookup table)."""
        if self.tmodel == "transformer":
            return self.model.token_embedding(ids.to(self.device))
        return self.model.text_branch.embeddings.word_embeddings(ids.to(self.device))

    def encode_text_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Text tower from input embeddings ``(N, L, W)`` and their ids ``(N, L)`` → normalised ``(N, D)``.

        ``transformer``: positional embeddings, causal transformer, ``ln_final``, pooling at the EOT
        position (largest id), projection. ``roberta``: ``inputs_embeds`` with the attention mask and
        position ids RoBERTa derives from ``ids``, pooled output, projection. Differentiable w.r.t.
        ``embeds``.
        """
        m = self.model
        ids = ids.to(embeds.device)
        if self.tmodel == "transformer":
            length = embeds.shape[1]
            x = (embeds + m.positional_embedding[:length]).permute(1, 0, 2)  # laion's Transformer is (L, N, W)
            x = m.ln_final(m.text_branch(x, attn_mask=m.attn_mask[:length, :length]).permute(1, 0, 2))
            pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        else:
            embeddings = m.text_branch.embeddings
            positions = embeddings.create_position_ids_from_input_ids(ids, embeddings.padding_idx)
            pooled = m.text_branch(
                inputs_embeds=embeds, attention_mask=(ids != self.pad_id).long(), position_ids=positions
            )["pooler_output"]
        return F.normalize(m.text_projection(pooled), dim=-1)
