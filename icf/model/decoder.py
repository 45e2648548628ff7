"""Bidirectional query decoder and mask head (paper Fig. 2 "bi-directional query learning [5, 13]").

Queries per frame = ``num_queries`` learnable queries + ``num_audio_queries`` audio-conditioned queries
(the frame's audio feature plus a learnable embedding each; supplement note 4: bidirectional queries keep
features from dispersing when audio alone is the query). Each layer (Mask2Former's round robin over the
three pixel levels, coarse to fine):

1. queries attend to the level's pixel tokens (cross-attention),
2. queries self-attend over all queries of all real frames of the clip (temporal context; padded frames are
   masked out as keys),
3. FFN,
4. the level's pixel tokens attend to the queries (the reverse direction), so audio reaches the pixels.

An optional ``text_hook`` runs on the queries before each layer (the segmenter's zero-gated text
cross-attention, `icf.model.segmenter.TextCrossAttention`).

Mask head: per-query mask embeddings e_q dotted with the per-pixel embedding give query masks; output
channel k pools them with a softmax over queries of a per-query score s_{q,k}: logit_k(x) = Σ_q
softmax_q(s_{·,k})·(e_q·f(x)). K = 1 (S4/MS3, a sigmoid mask) or 71 (AVSS, class logits), no matching needed.
With ``pixel_classifier`` (default) a 1×1 linear classifier on the same audio-conditioned per-pixel embedding is
added: logit_k(x) += w_k·f(x) + b_k. Decision (measured): with 71 AVSS channels each being a convex mix of a
handful of query masks, training from scratch sits in the all-background minimum (synthetic AVSS, tiny preset,
200 steps: J_present 0.107 = background only); with the pixel term the same run reaches 0.48. The pixels have
attended to the audio queries in every decoder layer, so the direct term still segments what sounds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class DecoderLayer(nn.Module):
    """One bidirectional layer (module docstring); pre-norm residual blocks.

    Args:
        temporal: self-attention over all queries of the clip's real frames (default); False: only among the
            frame's own queries (``clips`` and ``pad`` are then ignored).
        reverse: the pixel ← query step 4 (default); False: the layer leaves the pixels unchanged (not built).
    Other decoders (QDFormer's audio-semantic and mask decoders, `icf.model.qdformer`) are stacks of such layers.
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, temporal: bool = True, reverse: bool = True):
        super().__init__()
        self.temporal, self.reverse = temporal, reverse
        self.q_norm1, self.q_norm2, self.q_norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        if reverse:  # registration order as before the flags (parameter order, so ICF runs stay bit-identical)
            self.p_norm = nn.LayerNorm(dim)
        self.query_to_pixel = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        if reverse:
            self.pixel_to_query = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))

    def forward(self, queries: Tensor, query_pos: Tensor, pixels: Tensor, pixel_pos: Tensor, clips: int, pad: Tensor | None,
                pixel_pad: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """queries ``(B·T, N, d)``, pixels ``(B·T, S, d)``, pad ``(B, T·N)`` True = padded frame (temporal only),
        pixel_pad ``(B·T, S)`` True = a pixel token no query may attend to → updated both."""
        q = self.q_norm1(queries)
        queries = queries + self.query_to_pixel(q + query_pos, pixels + pixel_pos, pixels, key_padding_mask=pixel_pad,
                                                need_weights=False)[0]
        bt, n, d = queries.shape
        q = self.q_norm2(queries)
        if self.temporal:
            q, qp = q.reshape(clips, -1, d), query_pos.reshape(clips, -1, d)
            queries = queries + self.self_attn(q + qp, q + qp, q, key_padding_mask=pad, need_weights=False)[0].reshape(bt, n, d)
        else:
            queries = queries + self.self_attn(q + query_pos, q + query_pos, q, need_weights=False)[0]
        queries = queries + self.ffn(self.q_norm3(queries))
        if self.reverse:
            p = self.p_norm(pixels)
            pixels = pixels + self.pixel_to_query(p + pixel_pos, queries + query_pos, queries, need_weights=False)[0]
        return queries, pixels


class QueryDecoder(nn.Module):
    """Audio-conditioned bidirectional decoder over the pixel decoder's levels."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, num_queries: int, num_audio_queries: int, dropout: float):
        super().__init__()
        self.num_audio = num_audio_queries
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.audio_embed = nn.Parameter(torch.randn(num_audio_queries, dim) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(num_queries + num_audio_queries, dim) * 0.02)
        self.audio_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, levels: list[Tensor], level_pos: list[Tensor], audio: Tensor, valid: Tensor,
                text_hook: Callable[[int, Tensor], Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            levels: pixel maps ``(B·T, d, h_l, w_l)``, fine → coarse.
            level_pos: position encodings ``(h_l·w_l, d)`` per level.
            audio: A ``(B, T, d)``.
            valid: ``(B, T)`` True on real frames.
            text_hook: ``(layer index, queries) -> queries`` run before each layer (the segmenter's text hook).
        Returns: queries ``(B·T, N, d)`` (the last ``num_audio_queries`` are the audio queries) and the updated levels.
        """
        b, t, d = audio.shape
        audio_q = self.audio_in(audio).reshape(b * t, 1, d) + self.audio_embed  # (BT, Na, d)
        queries = torch.cat([self.queries.expand(b * t, -1, -1), audio_q], dim=1)
        query_pos = self.query_pos.expand(b * t, -1, -1)
        pad = (~valid)[:, :, None].expand(b, t, queries.shape[1]).reshape(b, -1)
        tokens = [lv.flatten(2).transpose(1, 2) for lv in levels]
        order = list(range(len(levels)))[::-1]  # coarse → fine, round robin
        for i, layer in enumerate(self.layers):
            lv = order[i % len(order)]
            if text_hook is not None:
                queries = text_hook(i, queries)
            queries, tokens[lv] = layer(queries, query_pos, tokens[lv], level_pos[lv][None], b, pad)
        updated = [tk.transpose(1, 2).reshape(lv.shape) for tk, lv in zip(tokens, levels)]
        return self.norm(queries), updated


class MaskHead(nn.Module):
    """Query embeddings · per-pixel embedding → K output channels (module docstring)."""

    def __init__(self, dim: int, num_classes: int, pixel_classifier: bool = True):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.score = nn.Linear(dim, num_classes)
        self.pixel = nn.Conv2d(dim, num_classes, 1) if pixel_classifier else None

    def forward(self, queries: Tensor, pixels: Tensor) -> Tensor:
        """queries ``(N, Q, d)``, pixels ``(N, d, h, w)`` → logits ``(N, K, h, w)``."""
        masks = torch.einsum("nqd,ndhw->nqhw", self.embed(queries), pixels)
        pool = self.score(queries).softmax(dim=1)  # (N, Q, K): each channel's weights over queries
        logits = torch.einsum("nqk,nqhw->nkhw", pool, masks)
        return logits if self.pixel is None else logits + self.pixel(pixels)
