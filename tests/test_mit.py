"""MIT (Eq. 1–5): channel context (video / segment / frame), conditional prompts through frozen tiny towers,
Eq. 3's matching objective, Eq. 4 fusion (per clip and per frame), masking."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import icf.encoders as enc
from icf.config import preset
from icf.model.mit import (
    LEVELS,
    ChannelAttention,
    ChannelContext,
    MultiGranularityText,
    fuse_texts,
    matching_loss,
    placeholder_span,
)

D = 16


@pytest.fixture(scope="module")
def encoders():
    return enc.load(enc.EncoderSpec.tiny())


def _dims(encoders) -> dict[str, int]:
    dims = {lv: encoders.tower(lv).dim for lv in LEVELS}
    return {**dims, "audio_clip": dims["audio"]}


def _cfg(dataset: str = "s4", **kw):
    return dataclasses.replace(preset("tiny", dataset)[0], d_model=D, num_heads=2, **kw)


def _batch(b: int, t: int, s: int, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vclip": torch.randn(b, dims["video"], generator=g),
        "vclip_seg": torch.randn(b, s, dims["segment"], generator=g),
        "clip": torch.randn(b, t, dims["frame"], generator=g),
        "clap": torch.randn(b, t, dims["audio"], generator=g),
        "clap_clip": torch.randn(b, dims["audio"], generator=g),
    }


def _mit(encoders, cfg=None) -> MultiGranularityText:
    cfg = cfg or _cfg()
    return MultiGranularityText(cfg, {lv: encoders.tower(lv) for lv in LEVELS}, None, _dims(encoders))


def _granular(cfg, b: int, valid: torch.Tensor | None = None, seed: int = 1):
    t = cfg.frames
    valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid
    ctx = ChannelContext(D, cfg.mit_tau, cfg.segment_div)
    torch.manual_seed(seed)
    _, granular = ctx(torch.randn(b * t, D, 2, 2), valid)
    return granular


# ---- Eq. 1-2: the channel context ----------------------------------------------------------------


def _ref_update(att: ChannelAttention, x: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """Eq. 1–2 the slow way, float64: tokens = the G·C channels, features = the L pixels."""
    w = att.qkv.weight.detach().double().numpy()[:, :, 0]
    bias = att.qkv.bias.detach().double().numpy()
    g, c, length = x.shape
    qkv = np.einsum("oc,gcl->gol", w, x) + bias[None, :, None]
    q, k, v = (qkv[:, i * c : (i + 1) * c].reshape(g * c, length) for i in range(3))
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / att.tau
    if real is not None:
        logits[:, ~np.repeat(real, c)] = -np.inf
    a = np.exp(logits - logits.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    return (a @ v).reshape(g, c, length)


def test_channel_attention_matches_slow_reference_and_masks_padding() -> None:
    torch.manual_seed(1)
    att = ChannelAttention(4, tau=0.1)
    x = torch.randn(1, 3, 4, 5)
    real = torch.tensor([[True, True, False]])
    y = att(x, real)
    ref = x[0].double().numpy() + _ref_update(att, x[0].double().numpy(), real[0].numpy())
    np.testing.assert_allclose(y[0].detach().double().numpy(), ref, rtol=1e-5, atol=1e-5)
    x2 = x.clone()
    x2[:, 2] = 100.0  # a padded frame is no key: real frames do not see it
    torch.testing.assert_close(att(x2, real)[:, :2], y[:, :2])


@pytest.mark.parametrize(
    "dataset,n,expected",
    [
        ("s4", 5, [[0, 1, 2], [2, 3, 4]]),  # ⌈5/2⌉ = 3, backward from frame 4; short first window filled
        ("avss", 10, [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]]),  # ⌈10/4⌉ = 3
        ("avss", 5, [[0, 1], [1, 2], [3, 4]]),  # a padded v1 clip: ⌈5/4⌉ = 2 over its own 5 frames
    ],
)
def test_segment_windows_are_backward_ceil_windows(dataset: str, n: int, expected: list[list[int]]) -> None:
    cfg = _cfg(dataset)
    ctx = ChannelContext(D, cfg.mit_tau, cfg.segment_div)
    ctx.attend["segment"].update = lambda x, real=None: torch.zeros_like(x)  # pooled = mean of the window's frames
    t = cfg.frames
    x = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1).expand(1, t, D, 4).clone()
    valid = torch.zeros(1, t, dtype=torch.bool)
    valid[:, :n] = True
    _, segment, real, cover = ctx._segments(x, valid)
    assert real.tolist() == [[True] * len(expected)]
    np.testing.assert_allclose(segment[0, :, 0].numpy(), [np.mean(w) for w in expected])
    assert [torch.nonzero(row).flatten().tolist() for row in cover[0]] == expected


def test_segment_update_is_the_mean_over_the_windows_holding_a_frame() -> None:
    cfg = _cfg("avss")
    torch.manual_seed(2)
    ctx = ChannelContext(D, cfg.mit_tau, cfg.segment_div)
    x = torch.randn(1, 10, D, 4)
    valid = torch.ones(1, 10, dtype=torch.bool)
    out = ctx._segments(x, valid)[0]
    windows = [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    xs = x[0].double().numpy()
    total, hits = np.zeros_like(xs), np.zeros(10)
    for win in windows:
        total[win] += _ref_update(ctx.attend["segment"], xs[win], None)
        hits[win] += 1
    np.testing.assert_allclose(out[0].detach().double().numpy(), xs + total / hits[:, None, None], rtol=1e-5, atol=1e-5)


def test_context_ignores_padded_frames_and_changes_the_map() -> None:
    cfg = _cfg("avss")
    torch.manual_seed(3)
    ctx = ChannelContext(D, cfg.mit_tau, cfg.segment_div)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 5:] = False
    x = torch.randn(20, D, 2, 2)
    y, g = ctx(x, valid)
    x2 = x.clone()
    x2[5:10] = 50.0  # clip 0's padding
    y2, g2 = ctx(x2, valid)
    torch.testing.assert_close(y2[:5], y[:5])
    torch.testing.assert_close(g2.video[0], g.video[0])
    assert g.segment.shape == (2, 4, D) and g.segment_real[0].sum() == 3 and g.frame.shape == (2, 10, D)
    assert not torch.allclose(y, x)


# ---- Eq. 3: implicit text ------------------------------------------------------------------------


def test_placeholder_span_cuts_padding_without_changing_the_text(encoders) -> None:
    for level in LEVELS:
        tower = encoders.tower(level)
        ids, start = placeholder_span(tower, enc.PROMPT_TEMPLATES[level], 3)
        full = tower.tokenize([enc.PROMPT_TEMPLATES[level].format("x x x")])
        assert start > 0 and ids.shape[1] < full.shape[1]
        with torch.no_grad():
            a = tower.encode_text_embeddings(tower.token_embedding(full), full)
            b = tower.encode_text_embeddings(tower.token_embedding(ids), ids)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_texts_differ_between_clips_and_gradients_reach_prompts_not_towers(encoders) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    mit = _mit(encoders, cfg)
    for lv in LEVELS:  # a mapping network that has trained a little
        torch.nn.init.normal_(mit.texts[lv].meta[-1].weight, std=0.5)
    dims = _dims(encoders)
    out = mit(_batch(3, 5, 2, dims), _granular(cfg, 3), torch.randn(3, 5, D))
    assert out.z.shape == (3, D) and out.z_frames.shape == (3, 5, D) and out.ell_a.shape == (3, D)
    z = torch.nn.functional.normalize(out.z, dim=-1)
    assert (z @ z.T)[~torch.eye(3, dtype=torch.bool)].max() < 0.999  # per-clip text, not one constant vector
    (out.z.pow(2).sum() + out.loss).backward()
    for level in LEVELS:
        assert mit.texts[level].ctx.grad.abs().sum() > 0, level
        assert mit.texts[level].meta[-1].weight.grad.abs().sum() > 0, level
    tower_params = list(encoders.clip.model.parameters()) + list(encoders.clap.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tower_params)


def test_matching_loss_penalises_a_constant_text() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 8, generator=g)
    constant = torch.randn(1, 8, generator=g).expand(6, 8)
    # the query→text half is log B exactly for a constant text (every clip's text is equally everyone's)
    assert matching_loss(q, constant, 0.07) >= 0.5 * math.log(6) - 1e-6
    own = torch.eye(6, 8)  # each clip's text points at its own query only
    assert matching_loss(own, own + 0.01 * torch.randn(6, 8, generator=g), 0.07) < 1e-3


def test_frozen_towers_are_not_in_state_dict_or_parameters(encoders) -> None:
    mit = _mit(encoders)
    own = {id(p) for p in mit.parameters()}
    tower_params = list(encoders.clip.model.parameters()) + list(encoders.clap.model.parameters())
    assert not any(id(p) in own for p in tower_params)
    assert not any(k.endswith(".ids") for k in mit.state_dict())  # token ids are rebuilt from the tower


# ---- Eq. 4: fusion -------------------------------------------------------------------------------


def test_fuse_texts_per_clip_and_per_frame_ignore_what_the_mask_excludes() -> None:
    texts = torch.randn(2, 4, 8)
    real = torch.tensor([[True, True, False, False], [True, True, True, True]])
    w = torch.randn(8)
    out = fuse_texts(texts, real, w)
    garbage = texts.clone()
    garbage[0, 2:] = 1e4
    torch.testing.assert_close(fuse_texts(garbage, real, w), out)
    scores = (texts[0, :2] @ w / 8**0.5).softmax(0)
    torch.testing.assert_close(out[0], scores @ texts[0, :2])
    cover = torch.tensor([[[True, False, True, False], [True, True, False, False]]] * 2)  # (B, T=2, N)
    per_frame = fuse_texts(texts, cover, w)
    for b in range(2):
        for t in range(2):
            sel = cover[b, t]
            torch.testing.assert_close(per_frame[b, t], (texts[b, sel] @ w / 8**0.5).softmax(0) @ texts[b, sel])


def test_bank_mode_needs_no_towers(encoders) -> None:
    cfg = _cfg(text_mode="bank")
    bank = enc.text_bank(encoders, ["dog", "guitar", "piano"])
    dims = {lv: bank[lv].shape[1] for lv in LEVELS}
    dims["audio_clip"] = dims["audio"]
    mit = MultiGranularityText(cfg, None, bank, dims)
    out = mit(_batch(2, 5, 2, dims), _granular(cfg, 2), torch.randn(2, 5, D))
    (out.z.sum() + out.loss).backward()
    assert mit.texts["video"].adapter.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text bank"):
        MultiGranularityText(cfg, None, None, dims)
