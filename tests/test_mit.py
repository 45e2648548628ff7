"""MIT (Eq. 1–5): segment windows, soft prompts through frozen tiny towers, selection, fusion, masking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import icf.encoders as enc
from icf.config import preset
from icf.model.mit import (
    LEVELS,
    ChannelAttention,
    MultiGranularityText,
    fuse_texts,
    placeholder_span,
    select_text,
)

C4 = 24  # channels of the fake stride-32 map


@pytest.fixture(scope="module")
def encoders():
    return enc.load(enc.EncoderSpec.tiny())


def _dims(encoders) -> dict[str, int]:
    dims = {lv: encoders.tower(lv).dim for lv in LEVELS}
    return {**dims, "audio_clip": dims["audio"]}


def _cfg(dataset: str = "s4", **kw):
    return dataclasses.replace(preset("tiny", dataset)[0], d_model=16, num_heads=2, **kw)


def _batch(b: int, t: int, s: int, dims: dict[str, int], valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "valid": torch.ones(b, t, dtype=torch.bool) if valid is None else valid,
        "vclip": torch.randn(b, dims["video"], generator=g),
        "vclip_seg": torch.randn(b, s, dims["segment"], generator=g),
        "clip": torch.randn(b, t, dims["frame"], generator=g),
        "clap": torch.randn(b, t, dims["audio"], generator=g),
        "clap_clip": torch.randn(b, dims["audio"], generator=g),
    }


def _mit(encoders, cfg=None) -> MultiGranularityText:
    cfg = cfg or _cfg()
    towers = {lv: encoders.tower(lv) for lv in LEVELS}
    return MultiGranularityText(cfg, C4, towers, None, _dims(encoders))


class _Identity(torch.nn.Module):
    def forward(self, x, real=None):
        return x


@pytest.mark.parametrize(
    "dataset,n,expected",
    [
        ("s4", 5, [[0, 1, 2], [2, 3, 4]]),  # ⌈5/2⌉ = 3, backward from frame 4; short first window filled
        ("avss", 10, [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]]),  # ⌈10/4⌉ = 3
        ("avss", 5, [[0, 1], [1, 2], [3, 4]]),  # a padded v1 clip: ⌈5/4⌉ = 2 over its own 5 frames
    ],
)
def test_segment_windows_are_backward_ceil_windows(encoders, dataset: str, n: int, expected: list[list[int]]) -> None:
    cfg = _cfg(dataset)
    mit = _mit(encoders, cfg)
    mit.attend["segment"] = _Identity()  # pooled segment feature = mean of its window's frames
    t = cfg.frames
    x = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1).expand(1, t, 16, 2, 2).clone()
    valid = torch.zeros(1, t, dtype=torch.bool)
    valid[:, :n] = True
    feats, real = mit._segments(x, valid)
    assert real.tolist() == [[True] * len(expected)]
    np.testing.assert_allclose(feats[0, :, 0].numpy(), [np.mean(w) for w in expected])


def test_placeholder_span_finds_pseudo_words(encoders) -> None:
    for level in LEVELS:
        tower = encoders.tower(level)
        ids, start = placeholder_span(tower, enc.PROMPT_TEMPLATES[level], 3)
        other, _ = placeholder_span(tower, enc.PROMPT_TEMPLATES[level], 3)
        assert torch.equal(ids, other) and start > 0


def test_gradients_reach_soft_prompts_and_not_towers(encoders) -> None:
    torch.manual_seed(0)
    mit = _mit(encoders)
    dims = _dims(encoders)
    out = mit(_batch(2, 5, 2, dims), torch.randn(10, C4, 2, 2), torch.randn(2, 5, 16))
    assert out["z"].shape == (2, 16) and out["ell_a"].shape == (2, 16)
    out["z"].pow(2).sum().backward()
    for level in LEVELS:
        grad = mit.candidates[level].ctx.grad
        assert grad is not None and grad.abs().sum() > 0, level
    tower_params = list(encoders.clip.model.parameters()) + list(encoders.clap.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tower_params)


def test_frozen_towers_are_not_in_state_dict_or_parameters(encoders) -> None:
    mit = _mit(encoders)
    own = {id(p) for p in mit.parameters()}
    tower_params = list(encoders.clip.model.parameters()) + list(encoders.clap.model.parameters())
    assert not any(id(p) in own for p in tower_params)
    n_state = sum(v.numel() for v in mit.state_dict().values())
    n_tower = sum(p.numel() for p in tower_params)
    assert n_state < n_tower  # the tiny towers alone are bigger than everything MIT saves
    assert not any(k.endswith(".ids") for k in mit.state_dict())  # token ids are rebuilt from the tower


def test_select_text_soft_and_hard() -> None:
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[0.9, 0.2], [0.1, 1.0]])
    hard = select_text(q, cands, tau=1.0, hard=True)
    torch.testing.assert_close(hard, cands[[0, 1]])
    soft = select_text(q, cands, tau=0.01, hard=False)
    torch.testing.assert_close(soft, cands[[0, 1]], atol=1e-3, rtol=0)
    mid = select_text(q, cands, tau=1.0, hard=False)
    assert not torch.allclose(mid, cands[[0, 1]])  # a genuine mixture at τ = 1
    q.requires_grad_(True)
    select_text(q, cands, tau=1.0, hard=True).sum().backward()
    assert q.grad.abs().sum() > 0  # straight-through gradient


def test_fuse_texts_ignores_padding() -> None:
    texts = torch.randn(2, 4, 8)
    real = torch.tensor([[True, True, False, False], [True, True, True, True]])
    w = torch.randn(8)
    out = fuse_texts(texts, real, w)
    garbage = texts.clone()
    garbage[0, 2:] = 1e4
    torch.testing.assert_close(fuse_texts(garbage, real, w), out)
    scores = (texts[0, :2] @ w / 8**0.5).softmax(0)
    torch.testing.assert_close(out[0], scores @ texts[0, :2])


def test_channel_attention_masks_padded_frames() -> None:
    torch.manual_seed(1)
    att = ChannelAttention(4, tau=0.1)
    x = torch.randn(1, 3, 4, 2, 2)
    real = torch.tensor([[True, True, False]])
    y = att(x, real)
    x2 = x.clone()
    x2[:, 2] = 100.0
    torch.testing.assert_close(att(x2, real)[:, :2], y[:, :2])
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_bank_mode_needs_no_towers(encoders) -> None:
    cfg = _cfg(text_mode="bank")
    bank = enc.text_bank(encoders, ["dog", "guitar", "piano"])
    dims = {lv: bank[lv].shape[1] for lv in LEVELS}
    dims["audio_clip"] = dims["audio"]
    mit = MultiGranularityText(cfg, C4, None, bank, dims)
    out = mit(_batch(2, 5, 2, dims), torch.randn(10, C4, 2, 2), torch.randn(2, 5, 16))
    out["z"].sum().backward()
    assert mit.candidates["video"].adapter.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text bank"):
        MultiGranularityText(cfg, C4, None, None, dims)
