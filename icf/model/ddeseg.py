"""DDESeg (Liu et al., CVPR 2025): dynamic derivation and elimination over a per-class audio memory.

Frame-level: only the real frames of a batch are processed (N_f of them), with no temporal modelling; padded
frames get zero logits. Per frame, with F_a ``(N_f, D_a)`` the cached audio feature of its second
(``clap_latent`` by default) and the semantic memory μ ``(C, D_a)``, X ``(C, M, D_a)`` (`icf.model.memory`):

* DDM step 2 (`Derivation`, Eq. 5–8): the K classes whose centres are nearest F_a (`retrieve`) derive K tokens.
* DDM step 3 (`Discrimination`, Eq. 9–12): each token is rescaled by its class's M representatives.
* Stages (`StagedBackbone`, Eq. 1): at stage l the tokens are projected to C_l (`AudioProjection`), scored
  against the stage's visual map by DEM (`Elimination`, Eq. 13–17; not at stage 1 in the paper's chain), and
  fused into the map by sigmoid-gated cross-attention with pixels as queries (`CrossAttention`, §3.3).
* `SegFormerHead` (𝒟 of Eq. 1) decodes the four fused maps at the first stage's stride; the loss is Eq. 18
  (`ddeseg_loss`; S4/MS3 Dice and IoU on the foreground channel alone, as the official code).

``variant="code"`` switches to the official code's forms where they differ from the paper (spec §3.4): row-mean
class centres, per-channel weights in Eq. 6/10, multiplicative Eq. 8, the per-representative Eq. 11–12 summed over
M, a softmax DEM that merges the K tokens into one, DEM at every stage on the projected DDM output, no MCA output
projection, one fusion per stage instead of one before every block, C_v ~ N(0, 1) and no q/k/v biases in DEM's MCA,
the final upsample with ``align_corners=True``, and (PVT) the official backbone's stride-2 first patch embedding:
four stages at strides 2/4/8/16, the head predicting at stride 2 (``method.first_stride``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig
from icf.model.losses import dice_loss, iou_loss
from icf.model.memory import SemanticMemory
from icf.model.segformer_head import SegFormerHead
from icf.model.segmenter import SegModel
from icf.model.staged import StagedBackbone

Batch = Mapping[str, Tensor]
VARIANTS = ("paper", "code")
DEM_SCHEMES = ("none", "fc", "ca", "sk", "gs")  # Table 4 ①–⑤
DEM_CENTRES = ("oc", "oTv")


def retrieve(fa: Tensor, centres: Tensor, k: int) -> Tensor:
    """Step 2's neighbours: indices ``(N, min(k, C))`` of the centres nearest each row of ``fa (N, D)`` in
    Euclidean distance, nearest first (not differentiable)."""
    dist = torch.cdist(fa.float(), centres.float())
    return dist.topk(min(k, centres.shape[0]), dim=1, largest=False).indices


class Derivation(nn.Module):
    """DDM step 2, Eq. 5–8: F_a ``(N, D)`` and its K neighbours' centres μ_i ``(N, K, D)`` → a_i ``(N, K, D)``."""

    def __init__(self, dim: int, variant: str):
        super().__init__()
        self.variant = variant
        self.w_e = nn.Linear(dim, dim)
        self.w_f = nn.Linear(dim, 1 if variant == "paper" else dim, bias=False)
        self.w_o = nn.Linear(dim, dim)

    def forward(self, fa: Tensor, mu: Tensor) -> Tensor:
        f = fa[:, None]
        e = F.gelu(self.w_e(mu - f))  # Eq. 5: e_i = GELU(W_e(μ_i − F_a) + b_e)
        e_hat = self.w_f(e).softmax(dim=1) * e  # Eq. 6: w_i = softmax_i(W_f1 e_i); ê_i = w_i e_i
        delta = torch.tanh(self.w_o(f + e_hat))  # Eq. 7: Δa_i = tanh(W_o1(F_a + ê_i) + b_o1)
        return f + delta if self.variant == "paper" else (1 + delta) * f  # Eq. 8 (code: (1 + Δa_i) ⊙ F_a)


class Discrimination(nn.Module):
    """DDM step 3, Eq. 9–12: a_i ``(N, K, D)`` and its class's representatives X ``(N, K, M, D)`` → â_i ``(N, K, D)``."""

    def __init__(self, dim: int, variant: str):
        super().__init__()
        self.variant = variant
        self.w_d = nn.Linear(dim, dim)
        self.w_f = nn.Linear(dim, 1 if variant == "paper" else dim, bias=False)
        self.w_o = nn.Linear(dim, dim)

    def forward(self, a: Tensor, reps: Tensor) -> Tensor:
        ai = a[:, :, None]
        e = F.gelu(self.w_d(reps - ai))  # Eq. 9: e_ij = GELU(W_d(x_j − a_i) + b_d)
        w = self.w_f(e).softmax(dim=2)  # Eq. 10: w_ij = softmax_j(W_f2 e_ij)
        if self.variant == "paper":
            delta = torch.tanh(self.w_o((w * e).sum(2)))  # Eq. 10–11: Δ_i = tanh(W_o2 Σ_j w_ij e_ij + b_o2)
            return a * (1 + delta)  # Eq. 12: â_i = a_i ⊙ (1 + Δ_i)
        delta = torch.tanh(self.w_o(ai + w * e))  # code: Δ_j = tanh(W(a + w_j ⊙ e_j))
        return ((1 + delta) * ai).sum(2)  # code: â = Σ_j (1 + Δ_j) ⊙ a


class AudioProjection(nn.Sequential):
    """Tokens ``(N, K, D_a)`` → ``(N, K, C_l)``: Linear(D_a → r·D_a), GELU, Linear(→ C_l), xavier-initialised
    [code: pre_modules.aud_Mlp]."""

    def __init__(self, dim: int, out: int, ratio: int):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, out))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``(N, Q, C)`` over keys/values ``(N, L, C)`` → ``(N, Q, C)``.

    ``gate="softmax"``: the usual softmax over the keys (DEM's MCA, Eq. 15); ``gate="sigmoid"``: each
    query-key weight is σ(q·k/√d_h) on its own (the fusion of §3.3, [code: av_malign.Cross_modal_interaction]).
    ``qkv_bias=False`` and no output projection make zero values give a zero output exactly. Linear weights
    start truncated-normal with std 0.02 and biases at 0, as the official code's, so the fused audio starts
    small beside the visual map.
    """

    def __init__(self, dim: int, heads: int, gate: str, qkv_bias: bool, out_proj: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.gate = heads, gate
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if out_proj else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        n, q_len, c = queries.shape
        h = self.heads

        def split(x: Tensor) -> Tensor:
            return x.view(n, -1, h, c // h).transpose(1, 2)  # (N, h, L, d_h)

        q, k, v = split(self.q(queries)), split(self.k(keys)), split(self.v(keys))
        logits = q @ k.transpose(-1, -2) / math.sqrt(c // h)
        weights = logits.softmax(-1) if self.gate == "softmax" else logits.sigmoid()
        return self.proj((weights @ v).transpose(1, 2).reshape(n, q_len, c))


class Fusion(nn.Module):
    """§3.3: V′ = V + Σ_k σ(q(V)·k(Â′_k)/√d_h)·v(Â′_k) per head; map ``(N, C, h, w)``, tokens ``(N, K, C)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = CrossAttention(dim, heads, gate="sigmoid", qkv_bias=False, out_proj=False)

    def forward(self, v: Tensor, tokens: Tensor) -> Tensor:
        n, c, h, w = v.shape
        pixels = v.flatten(2).transpose(1, 2)
        return v + self.attn(pixels, tokens).transpose(1, 2).reshape(n, c, h, w)


class Elimination(nn.Module):
    """DEM, Eq. 13–17: tokens ``(N, K, C)`` and the stage's pixels ``(N, HW, C)`` → scores S ``(N, K)``.

    ``scheme`` (Table 4): ``none`` S ≡ 1 (code variant: uniform 1/K); ``fc`` σ(FC(Â)); ``ca`` MCA on the raw pixels;
    ``sk`` soft k-means centres without Gumbel noise; ``gs`` with Gumbel noise in training (default). ``centres``:
    ``oc`` C̃_v = O C_v per pixel (Eq. 14), ``oTv`` the soft k-means update (Oᵀ V)/(Oᵀ 1) per centre.
    """

    def __init__(self, dim: int, k_v: int, heads: int, tau: float, scheme: str, centres: str, variant: str):
        super().__init__()
        self.tau, self.scheme, self.centres_mode, self.variant = tau, scheme, centres, variant
        paper = variant == "paper"  # code: C_v ~ N(0, 1), an MCA without q/k/v biases [code: av_malign.py]
        self.centres = nn.Parameter(torch.randn(k_v, dim) / (math.sqrt(dim) if paper else 1.0))  # C_v
        self.mca = CrossAttention(dim, heads, gate="softmax", qkv_bias=paper, out_proj=paper)
        self.score = nn.Linear(dim, 1)

    def assignment(self, pixels: Tensor) -> Tensor:
        """Eq. 13: O = softmax((V C_vᵀ + g)/τ) over the K_v centres ``(N, HW, K_v)``; g ~ Gumbel(0, 1) only for
        ``gs`` in training (torch's global RNG)."""
        logits = pixels @ self.centres.t()
        if self.scheme == "gs" and self.training:
            u = torch.rand_like(logits).clamp(1e-10, 1 - 1e-10)
            logits = logits - torch.log(-torch.log(u))
        return (logits / self.tau).softmax(-1)

    def visual_centres(self, pixels: Tensor) -> Tensor:
        """Eq. 14: C̃_v = O C_v ``(N, HW, C)`` (``oTv``: (Oᵀ V)/(Oᵀ 1) ``(N, K_v, C)``)."""
        o = self.assignment(pixels)
        if self.centres_mode == "oc":
            return o @ self.centres
        return (o.transpose(1, 2) @ pixels) / o.sum(1)[..., None].clamp_min(1e-6)

    def forward(self, tokens: Tensor, pixels: Tensor) -> Tensor:
        if self.scheme == "none":
            ones = tokens.new_ones(tokens.shape[:2])
            return ones if self.variant == "paper" else ones / tokens.shape[1]
        if self.scheme == "fc":
            f_av = tokens
        elif self.scheme == "ca":
            f_av = self.mca(tokens, pixels)
        else:
            f_av = self.mca(tokens, self.visual_centres(pixels))  # Eq. 15: F_av = MCA(Â, C̃_v)
        logits = self.score(f_av)[..., 0]
        return logits.sigmoid() if self.variant == "paper" else logits.softmax(-1)  # Eq. 16 (code: softmax over K)


def iou_dice_targets(picked: Tensor, target: Tensor, binary: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Logits ``(N, K, H, W)`` and class ids ``(N, H, W)`` → (CE or BCE, probabilities, targets) for Dice and IoU.

    Binary tasks (K = 1): sigmoid BCE, and the single foreground channel ``(N, 1, H, W)`` against the 0/1 mask,
    as the official code's ``num_classes == 1`` branch [code: util_tools/losses.py]; no background channel.
    AVSS: softmax CE, and the K softmax channels against the one-hot target, background included."""
    if binary:
        target_f = target.to(picked.dtype)
        ce = F.binary_cross_entropy_with_logits(picked[:, 0], target_f)
        return ce, picked[:, :1].sigmoid(), target_f[:, None]
    ce = F.cross_entropy(picked, target)
    onehot = F.one_hot(target, picked.shape[1]).permute(0, 3, 1, 2).to(picked.dtype)
    return ce, picked.softmax(1), onehot


def ddeseg_loss(logits: Tensor, masks: Tensor, gt: Tensor, valid: Tensor, binary: bool,
                weights: tuple[float, float, float] = (5.0, 5.0, 2.0), smooth: float = 1e-5) -> dict[str, Tensor]:
    """Eq. 18: λ_ce·L_bce + λ_dice·L_dice + λ_iou·L_iou on the frames with GT (weights 5 / 5 / 2).

    BCE (binary) or softmax CE (AVSS); Dice and soft IoU (UnitBox) per frame and channel (binary: the foreground
    channel alone; AVSS: one-hot with the background), ``smooth`` 1e-5, mean over frames and channels
    [code: util_tools/losses.py].
    Returns ``total``, ``seg`` (= total), ``bce``, ``dice``, ``iou``.
    """
    keep = gt & valid
    if not bool(keep.any()):
        zero = logits.sum() * 0.0
        return {"total": zero, "seg": zero, "bce": zero, "dice": zero, "iou": zero}
    ce, prob, onehot = iou_dice_targets(logits[keep], masks[keep], binary)
    parts = {"bce": ce, "dice": dice_loss(prob, onehot, smooth).mean(), "iou": iou_loss(prob, onehot, smooth).mean()}
    total = weights[0] * parts["bce"] + weights[1] * parts["dice"] + weights[2] * parts["iou"]
    return {"total": total, "seg": total, **parts}


def first_stride(options: Any, backbone: str) -> int:
    """The backbone's first stride: ``method.first_stride`` when set, else 2 for ``variant=code`` on a PVT (the
    official FAVSBackbone's stride-2 first patch embedding [code: favs_backbone.py]) and timm's 4 otherwise."""
    if options.first_stride is not None:
        return int(options.first_stride)
    return 2 if options.variant == "code" and backbone.startswith("pvt_v2") else 4


class DDESeg(SegModel):
    """The model (module docstring). ``options`` is `icf.methods.ddeseg.DDESegOptions`."""

    def __init__(self, cfg: ModelConfig, options: Any, memory: SemanticMemory):
        super().__init__()
        self.cfg, self.opts, self.memory = cfg, options, memory
        variant = options.variant
        self.backbone = StagedBackbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_kwargs,
                                       first_stride(options, cfg.backbone))
        d = memory.dim
        self.derive_on = "deri" not in cfg.ablate
        self.discriminate_on = self.derive_on and "disc" not in cfg.ablate
        self.derivation = Derivation(d, variant)
        self.discrimination = Discrimination(d, variant)
        scheme = "none" if "dem" in cfg.ablate else options.dem_scheme
        channels = self.backbone.channels
        self.project = nn.ModuleList(AudioProjection(d, c, options.mlp_ratio) for c in channels)
        self.eliminate = nn.ModuleList(
            Elimination(c, options.visual_centres, options.heads, options.tau, scheme, options.dem_centres, variant)
            for c in channels)
        fusions = [self.backbone.points(l) if variant == "paper" else 1 for l in range(len(channels))]
        self.fuse = nn.ModuleList(nn.ModuleList(Fusion(c, options.heads) for _ in range(n)) for c, n in zip(channels, fusions))
        self.head = SegFormerHead(channels, options.embed, cfg.num_classes, options.dropout)

    def derive(self, fa: Tensor) -> Tensor:
        """Φ_D of Eq. 1: F_a ``(N, D_a)`` → Â^(1) ``(N, K, D_a)`` (``--ablate deri``: the single token F_a)."""
        if not self.derive_on:
            return fa[:, None]
        centres = self.memory.class_centres(self.opts.variant)
        idx = retrieve(fa, centres, self.opts.tokens)
        a = self.derivation(fa, centres[idx])
        return self.discrimination(a, self.memory.reps[idx]) if self.discriminate_on else a

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        valid = batch["valid"]
        frames = batch["frames"][valid]
        fa = batch[self.opts.source][valid].float()
        state = {"audio": self.derive(fa)}  # the token state Â (N_f, K, D_a), chained across stages (paper)
        scores: list[Tensor] = []

        def hook(l: int, j: int, x: Tensor) -> Tensor:
            if j == 0:
                state["tokens"] = self._stage_tokens(l, x, state, scores)
            if j < len(self.fuse[l]):
                x = self.fuse[l][j](x, state["tokens"])
            return x

        maps = self.backbone(frames, hook)
        low = self.head(maps)
        code = self.opts.variant == "code"  # the official final upsample has align_corners=True [code: DDESeg.py]
        full = F.interpolate(low, size=frames.shape[-2:], mode="bilinear", align_corners=code)
        b, t = valid.shape
        logits = full.new_zeros(b, t, *full.shape[1:])
        logits[valid] = full
        out = {"logits": logits}
        if self.training:
            out["dem_scores"] = torch.stack([s.mean() for s in scores]) if scores else logits.new_zeros(0)
        return out

    def _stage_tokens(self, l: int, x: Tensor, state: dict[str, Tensor], scores: list[Tensor]) -> Tensor:
        """The tokens fused into stage ``l`` ``(N, K or 1, C_l)`` from the stage's map ``x (N, C_l, h, w)``:
        Φ_E of Eq. 1 (paper: S_l ⊙ projected state, S_1 ≡ 1, state ← S_l ⊙ state; code: softmax-weighted sum)."""
        tokens = self.project[l](state["audio"])
        if self.opts.variant == "paper" and l == 0:
            return tokens
        s = self.eliminate[l](tokens, x.flatten(2).transpose(1, 2))  # Eq. 13–16
        scores.append(s)
        if self.opts.variant == "code":
            return (s[..., None] * tokens).sum(1, keepdim=True)
        state["audio"] = s[..., None] * state["audio"]  # Eq. 17: Â ← S ⊙ Â
        return s[..., None] * tokens

    def loss(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 18 (`ddeseg_loss`), weights from the options; plus the diagnostic ``dem_score`` (mean DEM score S over
        stages and tokens, Eq. 16; it stays near 1 or 0 when elimination keeps or drops every token)."""
        o = self.opts
        parts = ddeseg_loss(out["logits"], batch["masks"], batch["gt"], batch["valid"], self.cfg.binary,
                            (o.w_ce, o.w_dice, o.w_iou))
        if out.get("dem_scores") is not None and out["dem_scores"].numel():
            parts["dem_score"] = out["dem_scores"].mean().detach()
        return parts

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())
