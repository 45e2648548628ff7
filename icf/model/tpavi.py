"""The official AVSBench baseline (Zhou et al., ECCV 2022, "Audio-Visual Segmentation"): TPAVI as a `Segmenter`.

Read from the public code OpenNLPLab/AVSBench (``avs_scripts/avs_s4/model/TPAVI.py``,
``avs_scripts/avs_ms3/model/{ResNet,PVT}_AVSModel.py``, ``avs_scripts/avss/model/PVT_AVSModel.py``,
``avs_scripts/{avs_s4,avs_ms3,avss}/loss.py`` and ``train.sh``); written anew, not copied.

frames ``(B, T, 3, H, W)`` → timm backbone (resnet50 / pvt_v2_b5; the tiny preset's narrow ResNet) → four maps at
strides 4–32 → **neck**: per stage, the sum of four 3×3 convolutions with dilations 3, 6, 12, 18 to d channels
(`DilatedSum`, the official ``Classifier_Module``; the official code uses it for the ResNet *and* the PVT model, so
both do here) → **TPAVI** at the stages in ``stages`` (0-based, default all four; `TPAVI`) with the audio of each
frame, over windows of ``window`` consecutive frames → the stage-4 map is ``Encoded.visual`` with the context hook
applied (TPAVI has no channel context of its own; ICF installs one) → the text hook on the stage-4 tokens
(``text_points = 1``) → **decoder**: RefineNet-style fusion blocks from stage 4 down to stage 1 (`FusionBlock`),
each upsampling ×2, then the output convolutions (d → d/2, ×2, d/2 → d/8, ReLU, 1×1 → K) at H×W. K = 1 (S4/MS3)
or 71 (AVSS).

**Audio path** (``audio_path``). ``"official"`` (default): the `AudioEncoder` without its projection gives the raw
embedding (VGGish's 128-d, as AVSBench feeds it; the tiny preset's CNN width) and each TPAVI block's ``align``
maps it to d (official ``align_channel = nn.Linear(128, C)``, without bias on AVSS as in the official AVSS copy).
``Encoded.audio`` (ICF's A ``(B, T, d)``) is then the deepest TPAVI block's aligned audio (the block at the
context hook's stage when stage 4 has one), so this path needs at least one TPAVI stage. ``"projected"``: the
project's d-wide A (body + linear + LayerNorm) feeds every block's ``align`` and is ``Encoded.audio`` (the form
icf used before; one audio feature for TPAVI and ICF; ``align`` has a bias on every subset).

**Temporal window** (``window``, default 5 on every subset). The official ``pre_reshape_for_tpavi`` reshapes the
frames to ``(-1, 5, C, H, W)``, so TPAVI attends within consecutive windows of 5 frames: the whole clip on S4/MS3
(T = 5), the two halves of a 10-frame AVSS clip. ``window ≥ T`` attends across the whole clip.

**Padding.** AVSS clips shorter than T = 10 (the 5-frame v1 clips) are padded at the end to 10 frames. With the
official window of 5 the padded frames form their own window, so in the official code they never reach a real
frame's attention (it zeroes their features and masks their outputs). Here padded positions are excluded from
every window's sum and N counts the window's real positions, so padded frames change no real frame for *any*
window; with window 5 on AVSBench's clips this is exactly the official computation.

CDCL's features (supplement note 3): ``vis_feat`` is the per-frame mean of the last fusion map (before the output
convolutions), ``aud_feat`` the per-frame ``Encoded.audio``; both L2-normalised.

Deviations from the official code (also in the report to the lead):

* **Output widths.** The official head is 256 → 128 → 32 at d = 256; here d → d/2 → d/8 (the same at d = 256).
* **Residual units as the official code runs them.** Its ``ResidualConvUnit`` applies an *in-place* ReLU to its
  input, so the skip it adds is relu(x), and the stage maps the AVM loss later reads have been relu'd too; both
  are written explicitly here (`ResidualUnit`, ``avm_visual``).
* **1×1×1 convolutions as 1×1 / linear maps.** θ, g and W_z are the official Conv3d 1×1×1 (the same numbers as a
  Conv2d 1×1 per frame) and φ, applied to audio broadcast over (h, w), a linear map per frame; the official
  checkpoint's tensors are reshaped on import (`icf.methods.tpavi.OFFICIAL_KEYS`).
* The official "vv" self-attention variant (``tpavi_vv_flag``), the unused ``upsample*`` layers, B2_ResNet's
  never-run second branch (``layer3_2``, ``layer4_2``) and the stage-4 fusion block's unused first residual unit
  are not built.

Losses (``loss``): ``"official"`` — S4: BCE on the annotated frames (the official S4 loss on its one annotated
frame; the S4 ``train.sh`` does not enable the AVM term); MS3: BCE + λ_1·L_AVM with λ_1 = 0.5 (ms3 ``train.sh``:
``--masked_av_flag --masked_av_stages 0 1 2 3 --lambda_1 0.5 --kl_flag``); AVSS: cross-entropy over the annotated
real frames + 0.5·L_AVM. L_AVM (``A_MaskedV_SimmLoss`` with ``kl_flag``, no feature normalisation): per TPAVI
stage, KL(softmax(a_t) ‖ softmax(v̄_t)) between the stage's aligned audio a_t and the stage map pooled under the
predicted mask, v̄_t = mean_hw(v ⊙ m_t) — m_t = sigmoid(avgpool(logits)) for MS3, avgpool(argmax ≠ background)
for AVSS —, summed over channels, summed over frames (MS3, ``reduction='sum'``) or averaged over annotated frames
(AVSS), averaged over stages. ``"eq18"`` — the project's Eq. 18 (`icf.model.losses.segmentation_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig
from icf.model.audio import AudioEncoder
from icf.model.backbone import Backbone
from icf.model.segmenter import Batch, Encoded, Segmenter, TextTokens, foreground_probability, frame_features

STAGES = (0, 1, 2, 3)
DILATIONS = (3, 6, 12, 18)
LOSSES = ("official", "eq18")
AUDIO_PATHS = ("official", "projected")
WINDOW = 5  # official pre_reshape_for_tpavi: reshape(-1, 5, C, H, W)
BACKGROUND = 0  # AVSS class id of background (manifests/avss.toml)
# dataset → (λ_1 of the AVM term, how its per-frame KL is reduced over frames), from the official train.sh / loss.py
OFFICIAL_AVM = {"s4": (0.0, "mean"), "ms3": (0.5, "sum"), "avss": (0.5, "mean")}


class DilatedSum(nn.Module):
    """The official neck (``Classifier_Module``): Σ_k Conv3×3_{dilation r_k}(x), r = 3, 6, 12, 18, C_in → d.
    Weights ~ N(0, 0.01) as in the official code. ``(N, C_in, h, w)`` → ``(N, d, h, w)``."""

    def __init__(self, c_in: int, c_out: int, dilations: tuple[int, ...] = DILATIONS):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=r, dilation=r) for r in dilations)
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return sum(conv(x) for conv in self.convs)


class TPAVI(nn.Module):
    """Temporal pixel-wise audio-visual interaction (AVSBench ``TPAVIModule``, ``mode='dot'``, 3-D non-local).

    With x the stage map over the (t, h, w) positions of one window of ``window`` consecutive frames and a_t the
    audio of frame t aligned to d:

        f_ij = θ(x_i)·φ(a_{t(j)}),   y_i = (1/N) Σ_j f_ij g(x_j),   z = LN(x + BN(W_z y))

    (θ, g: 1×1 convs d → d/2; φ: the 1×1×1 conv on the audio broadcast over (h, w), i.e. a linear map per frame;
    W_z: 1×1 conv d/2 → d then BatchNorm initialised to 0, so the block starts as LN(x)). j runs over the real
    frames' positions of i's window and N counts them (module docstring, "Padding"). Because φ(a) is constant
    over (h, w), y_i = θ(x_i)ᵀ M_k with M_k = (1/N) Σ_{t ∈ window k} φ(a_t) (Σ_{hw} g(x_{t,hw}))ᵀ, a d/2 × d/2
    matrix per window: the same numbers without the (w·h·w)² affinity matrix.

    Args:
        channels: d. audio_dim: width of the audio ``align`` reads. window: frames per attention window.
        align_bias: whether ``align`` has a bias (the official AVSS copy has none).
    """

    def __init__(self, channels: int, audio_dim: int, window: int = WINDOW, align_bias: bool = True):
        super().__init__()
        inner = max(channels // 2, 1)
        self.window = window
        self.align = nn.Linear(audio_dim, channels, bias=align_bias)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Linear(channels, inner)
        self.w_z = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.w_z[1].weight)
        nn.init.zeros_(self.w_z[1].bias)
        self.norm = nn.LayerNorm(channels)

    def attention(self, x: Tensor, audio: Tensor, valid: Tensor) -> Tensor:
        """y ``(B·T, d/2, h, w)`` of the class docstring; x ``(B·T, d, h, w)``, aligned audio ``(B, T, d)``, valid ``(B, T)``.

        The T frames are cut into K = ⌈T / window⌉ windows (the last one completed with padded frames)."""
        b, t = valid.shape
        theta, g = self.theta(x), self.g(x)
        c, h, w = theta.shape[1:]
        real = valid.to(x.dtype)
        k = -(-t // self.window)

        def windows(v: Tensor) -> Tensor:  # (B, T, C) → (B, K, window, C), the missing frames zero
            return F.pad(v, (0, 0, 0, k * self.window - t)).view(b, k, self.window, v.shape[-1])

        g_sum = g.view(b, t, c, h * w).sum(-1) * real[..., None]  # (B, T, d/2): Σ_hw g over real frames
        n = (windows(real[..., None]).sum((2, 3)) * (h * w)).clamp_min(1.0)  # (B, K) real positions per window
        m = torch.einsum("bkwc,bkwe->bkce", windows(self.phi(audio)), windows(g_sum)) / n[..., None, None]
        m = m.repeat_interleave(self.window, 1)[:, :t]  # (B, T, d/2, d/2): each frame's window matrix
        y = torch.einsum("btchw,btce->btehw", theta.view(b, t, c, h, w), m)
        return y.reshape(b * t, c, h, w)

    def forward(self, x: Tensor, audio: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """x ``(B·T, d, h, w)``, audio ``(B, T, d_a)``, valid ``(B, T)`` → (z ``(B·T, d, h, w)``, aligned audio ``(B, T, d)``)."""
        aligned = self.align(audio)
        z = x + self.w_z(self.attention(x, aligned, valid))
        return self.norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), aligned


class ResidualUnit(nn.Module):
    """relu(x) + Conv3×3(ReLU(Conv3×3(relu(x)))) — the official ``ResidualConvUnit`` as it runs (its in-place ReLU
    turns the skip into relu(x); module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FusionBlock(nn.Module):
    """The official ``FeatureFusionBlock``: (x [+ RCU₁(skip)]) → RCU₂ → bilinear upsampling (align_corners) to ``size``.
    The stage-4 block has no skip (its RCU₁ is never used in the official code, so it is not built)."""

    def __init__(self, channels: int, with_skip: bool = True):
        super().__init__()
        self.skip = ResidualUnit(channels) if with_skip else None
        self.out = ResidualUnit(channels)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if self.skip is not None and skip is not None:
            x = x + self.skip(skip)
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=True)


class OutputHead(nn.Module):
    """The official ``output_conv``: Conv3×3 d → d/2, bilinear ×2 (to the frame size), Conv3×3 → d/8, ReLU, 1×1 → K."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        mid, low = max(channels // 2, 1), max(channels // 8, 1)
        self.conv1 = nn.Conv2d(channels, mid, 3, padding=1)
        self.conv2 = nn.Conv2d(mid, low, 3, padding=1)
        self.cls = nn.Conv2d(low, classes, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(self.conv1(x), size=size, mode="bilinear", align_corners=False)
        return self.cls(F.relu(self.conv2(x)))


class TPAVISegmenter(Segmenter):
    """The AVSBench TPAVI model as a `Segmenter` (module docstring).

    Args:
        cfg: model configuration (backbone, audio encoder, d = ``d_model``, K = ``num_classes``).
        stages: 0-based stages that get a TPAVI block (official ``--tpavi_stages 0 1 2 3``).
        loss: ``"official"`` (per-dataset AVSBench objective) or ``"eq18"`` (the project's Eq. 18).
        avm_weight: λ_1 of the AVM term; None takes the official value of ``cfg.dataset`` (S4 0, MS3/AVSS 0.5).
        audio_path: ``"official"`` (raw embedding into each block's ``align``) or ``"projected"`` (module docstring).
        window: frames per TPAVI attention window (official 5).
    """

    def __init__(self, cfg: ModelConfig, stages: tuple[int, ...] = STAGES, loss: str = "official",
                 avm_weight: float | None = None, audio_path: str = "official", window: int = WINDOW):
        super().__init__(cfg)
        check_options(stages, loss, audio_path, window)
        d = self.width = cfg.d_model
        self.stages = tuple(sorted(stages))
        self.loss_mode = loss
        self.audio_path = audio_path
        self.avm_weight = OFFICIAL_AVM[cfg.dataset][0] if avm_weight is None else float(avm_weight)
        self.backbone = Backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_kwargs)
        self.neck = nn.ModuleList(DilatedSum(c, d) for c in self.backbone.channels)
        official = audio_path == "official"
        self.audio = AudioEncoder(cfg, project=not official)
        bias = not (official and cfg.dataset == "avss")  # the official AVSS align_channel has no bias
        self.tpavi = nn.ModuleDict({str(i): TPAVI(d, self.audio.width, window, bias) for i in self.stages})
        self.fusion = nn.ModuleList(FusionBlock(d, with_skip=i < STAGES[-1]) for i in STAGES)  # index i fuses stage i
        self.head = OutputHead(d, cfg.num_classes)

    @property
    def text_points(self) -> int:
        return 1

    def encode(self, batch: Batch) -> Encoded:
        """Backbone, neck, TPAVI at ``stages`` and the context hook on the stage-4 map.

        ``state``: ``maps`` (stages 1–3 after TPAVI, ``(B·T, d, h_i, w_i)``) and ``stage_audio`` ``(S, B, T, d)``
        (each TPAVI block's aligned audio, for the AVM term). ``Encoded.audio``: the projected A, or on the
        official audio path the deepest block's aligned audio (module docstring)."""
        frames, valid = batch["frames"], batch["valid"]
        audio = self.audio(batch["mel"])
        maps = [neck(x) for neck, x in zip(self.neck, self.backbone(frames.flatten(0, 1)), strict=True)]
        aligned = []
        for i in self.stages:
            maps[i], a = self.tpavi[str(i)](maps[i], audio, valid)
            aligned.append(a)
        coarse, granular = self.attend(maps[-1], valid)  # the context hook (Eq. 1–2 when ICF installs it)
        stage_audio = torch.stack(aligned) if aligned else audio.new_zeros(0, *audio.shape)
        if self.audio_path == "official":
            audio = aligned[-1]
        return Encoded(coarse, granular, audio, {"maps": maps[:-1], "stage_audio": stage_audio})

    def decode(self, batch: Batch, enc: Encoded, text: TextTokens | None = None) -> dict[str, Tensor]:
        """Text hook on the stage-4 tokens, fusion blocks 4 → 1, output head → ``logits`` ``(B, T, K, H, W)``,
        ``vis_feat`` / ``aud_feat`` ``(B, T, d)``; in training with an AVM weight also ``avm_visual`` / ``avm_audio``
        ``(S, B, T, d)``."""
        frames = batch["frames"]
        b = frames.shape[0]
        coarse = enc.visual
        if text is not None:
            tokens = self.read_text(0, coarse.flatten(2).transpose(1, 2), text)
            coarse = tokens.transpose(1, 2).reshape(coarse.shape)
        maps = [*enc.state["maps"], coarse]
        x = None
        for i in reversed(STAGES):
            size = maps[i - 1].shape[-2:] if i > 0 else tuple(2 * s for s in maps[0].shape[-2:])
            x = self.fusion[i](maps[i], None, size) if x is None else self.fusion[i](x, maps[i], size)
        logits = self.head(x, frames.shape[-2:])
        pool = None
        if self.cfg.cdcl_visual_pool == "mask":  # the foreground probability area-averaged to the fused map's size
            fg = foreground_probability(logits.detach(), self.cfg.binary)
            pool = F.interpolate(fg[:, None], size=x.shape[-2:], mode="area")[:, 0]
        out = {
            "logits": logits.view(b, -1, *logits.shape[1:]),
            "vis_feat": frame_features(x, b, pool),
            "aud_feat": F.normalize(enc.audio, dim=-1),
        }
        if self.training and self.avm_weight > 0 and self.stages:
            out["avm_visual"] = self._masked_stage_features(maps, logits, b)
            out["avm_audio"] = enc.state["stage_audio"]
        return out

    def _masked_stage_features(self, maps: list[Tensor], logits: Tensor, b: int) -> Tensor:
        """v̄ ``(S, B, T, d)``: each TPAVI stage's map (relu'd, as the official code leaves it) pooled under the
        predicted mask resized to the stage (MS3: sigmoid of the pooled logits; AVSS: pooled argmax ≠ background)."""
        fg = logits if self.cfg.binary else (logits.argmax(1, keepdim=True) != BACKGROUND).to(logits.dtype)
        pooled = []
        for i in self.stages:
            v = F.relu(maps[i])
            m = F.adaptive_avg_pool2d(fg, v.shape[-2:])
            m = m.sigmoid() if self.cfg.binary else m
            pooled.append((v * m).mean((-1, -2)).view(b, -1, v.shape[1]))
        return torch.stack(pooled)

    # ---- loss ----------------------------------------------------------------------------------------

    def loss(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``"eq18"``: the project's Eq. 18. ``"official"``: ``seg`` (BCE for S4/MS3, CE for AVSS, on the annotated
        real frames) + λ_1·``avm``; ``total`` = that sum (module docstring)."""
        if self.loss_mode == "eq18":
            return super().loss(out, batch)
        keep = batch["gt"] & batch["valid"]
        logits, masks = out["logits"], batch["masks"]
        if not bool(keep.any()):
            zero = logits.sum() * 0.0
            return {"seg": zero, "total": zero}
        picked, target = logits[keep], masks[keep]
        if self.cfg.binary:
            seg = F.binary_cross_entropy_with_logits(picked[:, 0], target.to(picked.dtype))
        else:
            seg = F.cross_entropy(picked, target)
        parts = {"seg": seg, "bce" if self.cfg.binary else "ce": seg}
        total = seg
        if "avm_visual" in out:
            parts["avm"] = avm_loss(out["avm_visual"], out["avm_audio"], keep, OFFICIAL_AVM[self.cfg.dataset][1])
            total = total + self.avm_weight * parts["avm"]
        parts["total"] = total
        return parts


def avm_loss(visual: Tensor, audio: Tensor, keep: Tensor, reduction: str) -> Tensor:
    """L_AVM: KL(softmax(a) ‖ softmax(v̄)) summed over channels, reduced over the ``keep`` frames (``"sum"`` or
    ``"mean"``) and averaged over the S stages. visual, audio ``(S, B, T, d)``; keep ``(B, T)`` bool."""
    kl = F.kl_div(visual.log_softmax(-1), audio.softmax(-1), reduction="none").sum(-1)  # (S, B, T)
    per_stage = kl[:, keep].sum(-1)
    if reduction == "mean":
        per_stage = per_stage / keep.sum().clamp_min(1)
    return per_stage.mean()


def check_options(stages: tuple[int, ...], loss: str, audio_path: str = "official", window: int = WINDOW) -> None:
    """``ValueError`` for TPAVI stages outside 0–3 or repeated, an unknown loss or audio path, a window that is not a
    positive integer, or the official audio path without a TPAVI stage (it has no audio feature then)."""
    if len(set(stages)) != len(stages) or not set(stages) <= set(STAGES):
        raise ValueError(f"tpavi_stages must be distinct values among {list(STAGES)}, not {list(stages)}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    if audio_path not in AUDIO_PATHS:
        raise ValueError(f"audio_path must be one of {AUDIO_PATHS}, not {audio_path!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer of at least 1 frame, not {window!r}")
    if audio_path == "official" and not stages:
        raise ValueError("audio_path=official reads the audio inside the TPAVI blocks only; with no tpavi_stages "
                         "use audio_path=projected")
