"""DDESeg (`icf.model.ddeseg`, `icf.methods.ddeseg`): retrieval, Eq. 5–12 numerics and identities in both
variants, DEM properties, the staged backbone, frame independence, the Eq. 18 loss, the dataset-level hard
metrics, and the method end to end on synthetic S4 and AVSS shards (train, eval, refusals)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf
from typer.testing import CliRunner

from icf import methods
from icf.cli import app
from icf.clitools import UserError
from icf.config import preset
from icf.eval.metrics import DatasetHardMetrics
from icf.methods.base import Resources
from icf.methods.ddeseg import DDESegOptions
from icf.model.backbone import Backbone
from icf.model.ddeseg import DDESeg, Derivation, Discrimination, Elimination, Fusion, ddeseg_loss, first_stride, retrieve
from icf.model.memory import BankMismatch, SemanticMemory
from icf.model.staged import StagedBackbone
from icf.data.shards import ShardSet
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.trainer import build_configs, train

D = 8


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def set_identity(module: torch.nn.Module, *names: str) -> None:
    with torch.no_grad():
        for name in names:
            lin = getattr(module, name)
            lin.weight.copy_(torch.eye(lin.weight.shape[0]))
            lin.bias.zero_()


# ----------------------------------------------------------------------------- retrieval (step 2)


def test_retrieval_orders_by_euclidean_distance_and_finds_a_mixtures_classes() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, D, generator=g)
    fa = mu[2:3] + 0.01 * torch.randn(1, D, generator=g)
    idx = retrieve(fa, mu, 4)
    assert idx[0, 0] == 2
    assert idx[0].tolist() == np.argsort(np.linalg.norm(mu.numpy() - fa.numpy(), axis=1))[:4].tolist()
    ortho = 3.0 * torch.eye(D)[:5]  # orthogonal, equal-norm centres
    mix = (ortho[1] + ortho[3])[None] / 2
    assert set(retrieve(mix, ortho, 2)[0].tolist()) == {1, 3}
    assert retrieve(mix, ortho, 9).shape == (1, 5)  # K_eff = min(K, C)


# ----------------------------------------------------------------------------- Eq. 5–12


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_derivation_equations_5_to_8(variant: str) -> None:
    g = torch.Generator().manual_seed(1)
    fa, mu = torch.randn(3, D, generator=g), torch.randn(3, 4, D, generator=g)
    der = Derivation(D, variant)
    set_identity(der, "w_e", "w_o")
    torch.nn.init.zeros_(der.w_f.weight)  # uniform weights 1/K
    f, m = fa.double().numpy()[:, None], mu.double().numpy()
    inner = np.tanh(f + gelu(m - f) / 4)
    expected = f + inner if variant == "paper" else (1 + inner) * f
    np.testing.assert_allclose(der(fa, mu).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        der.w_o.weight.zero_()
    assert torch.allclose(der(fa, mu), fa[:, None].expand(-1, 4, -1))  # W_o1 = 0 → a ≡ F_a


def test_paper_derivation_moves_less_than_one_and_discrimination_keeps_the_sign() -> None:
    g = torch.Generator().manual_seed(2)
    fa, mu, reps = 3 * torch.randn(5, D, generator=g), torch.randn(5, 3, D, generator=g), torch.randn(5, 3, 4, D, generator=g)
    a = Derivation(D, "paper")(fa, mu)
    assert (a - fa[:, None]).abs().max() < 1  # Eq. 8 with tanh
    disc = Discrimination(D, "paper")
    ratio = disc(a, reps) / a
    assert ((ratio > 0) & (ratio < 2)).all()  # Eq. 12: â = a ⊙ (1 + Δ), Δ ∈ (−1, 1)
    with torch.no_grad():
        disc.w_o.weight.zero_()
        disc.w_o.bias.zero_()
    assert torch.equal(disc(a, reps), a)  # W_o2 = 0 → â ≡ a


def test_discrimination_equations_9_to_12_with_uniform_weights() -> None:
    g = torch.Generator().manual_seed(3)
    a, reps = torch.randn(2, 3, D, generator=g), torch.randn(2, 3, 4, D, generator=g)
    for variant in ("paper", "code"):
        disc = Discrimination(D, variant)
        set_identity(disc, "w_d", "w_o")
        torch.nn.init.zeros_(disc.w_f.weight)  # W_f2 = 0 → w_ij = 1/M
        an, xn = a.double().numpy(), reps.double().numpy()
        e = gelu(xn - an[:, :, None])  # Eq. 9
        if variant == "paper":
            expected = an * (1 + np.tanh(e.mean(2)))  # Eq. 10–12 with ê = mean_j e_ij
        else:
            expected = ((1 + np.tanh(an[:, :, None] + e / 4)) * an[:, :, None]).sum(2)
        np.testing.assert_allclose(disc(a, reps).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- DEM (Eq. 13–17) and fusion


def test_dem_assignment_scores_and_zero_scores_leave_the_map_unchanged() -> None:
    g = torch.Generator().manual_seed(4)
    tokens, pixels = torch.randn(2, 3, 16, generator=g), torch.randn(2, 20, 16, generator=g)
    torch.manual_seed(0)
    dem = Elimination(16, k_v=3, heads=2, tau=1.0, scheme="gs", centres="oc", variant="paper").eval()
    o = dem.assignment(pixels)
    assert torch.allclose(o.sum(-1), torch.ones(2, 20))
    assert torch.equal(o, dem.assignment(pixels))  # eval: no Gumbel noise
    assert torch.allclose(o, (pixels @ dem.centres.t()).softmax(-1))
    dem.train()
    torch.manual_seed(0)
    noisy = dem.assignment(pixels)
    torch.manual_seed(0)
    assert torch.equal(noisy, dem.assignment(pixels)) and not torch.allclose(noisy, o)  # stochastic, seeded
    dem.tau = 0.01
    sharp = dem.eval().assignment(pixels).max(-1).values
    assert sharp.mean() > 0.95 and sharp.mean() > o.max(-1).values.mean()  # near one-hot
    dem.tau = 1.0
    s = dem(tokens, pixels)
    assert s.shape == (2, 3) and ((s > 0) & (s < 1)).all()
    with torch.no_grad():
        dem.score.bias.fill_(-1e4)
    s = dem(tokens, pixels)
    v = torch.randn(2, 16, 4, 5, generator=g)
    assert torch.equal(Fusion(16, 2)(v, s[..., None] * tokens), v)  # S = 0 → fusion returns V exactly
    code = Elimination(16, 3, 2, 1.0, "gs", "oTv", "code").eval()
    assert torch.allclose(code(tokens, pixels).sum(-1), torch.ones(2))  # code: softmax over K


def test_code_variant_dem_takes_the_official_initial_forms() -> None:
    torch.manual_seed(0)
    paper, code = (Elimination(64, 50, 2, 1.0, "gs", "oc", v) for v in ("paper", "code"))
    assert paper.mca.q.bias is not None and code.mca.q.bias is None and code.mca.k.bias is None  # official qkv_bias=False
    std = {v: float(m.centres.detach().std()) for v, m in (("paper", paper), ("code", code))}
    assert abs(std["code"] - 1.0) < 0.05 and abs(std["paper"] - 1 / 8) < 0.01  # N(0, 1) vs N(0, 1)/√C


# ----------------------------------------------------------------------------- staged backbone


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]}),
    ("pvt_v2_b0", {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]}),
])
def test_staged_backbone_with_identity_hook_equals_the_plain_backbone(name: str, kwargs: dict) -> None:
    plain, staged = Backbone(name, None, kwargs).eval(), StagedBackbone(name, None, kwargs).eval()
    plain.layout = torch.contiguous_format  # the staged backbone runs NCHW: in the same layout, the same bits
    plain.to(memory_format=torch.contiguous_format)
    state = {re.sub(r"^stages_(\d)", r"stages.\1", k): v for k, v in plain.body.state_dict().items()}
    staged.body.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    calls: list[tuple[int, int]] = []

    def hook(l: int, j: int, m: torch.Tensor) -> torch.Tensor:
        calls.append((l, j))
        return m

    for a, b in zip(plain(x), staged(x, hook)):
        assert torch.equal(a, b)
    assert calls == [(l, 0) for l in range(4)]
    assert staged.channels == plain.channels


# ----------------------------------------------------------------------------- the model


def memory(c: int = 5, m: int = 4, d: int = D, seed: int = 0) -> SemanticMemory:
    g = torch.Generator().manual_seed(seed)
    return SemanticMemory(torch.randn(c, d, generator=g), torch.randn(c, m, d, generator=g), torch.arange(c), "clap_latent")


def tiny_model(dataset: str = "avss", variant: str = "paper", ablate: frozenset[str] = frozenset(), **opts) -> DDESeg:
    spec = RunSpec(dataset=dataset, preset="tiny", work=Path("."), out=Path("."), method="ddeseg", ablate=ablate,
                   overrides=[f"method.variant={variant}", "model.image_size=32",
                              *(f"method.{k}={json.dumps(v)}" for k, v in opts.items())])
    cfg, _ = build_configs(spec)
    torch.manual_seed(0)
    return DDESeg(cfg, methods.validate(cfg), memory())


def batch(b: int = 2, t: int = 3, valid: list[int] | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    v = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(valid or [t] * b):
        v[i, :n] = True
    return {"frames": torch.randn(b, t, 3, 32, 32, generator=g), "clap_latent": torch.randn(b, t, D, generator=g),
            "valid": v, "gt": v.clone(), "masks": torch.randint(0, 3, (b, t, 32, 32), generator=g)}


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_frames_are_independent_and_padding_gets_zero_logits(variant: str) -> None:
    model = tiny_model(variant=variant).eval()
    x = batch(valid=[3, 2])
    with torch.no_grad():
        ref = model(x)["logits"]
        assert ref.shape == (2, 3, 71, 32, 32) and ref[1, 2].abs().max() == 0
        for key in ("frames", "clap_latent"):
            y = {**x, key: x[key].clone()}
            y[key][0, 1] += 1.0
            out = model(y)["logits"]
            changed = (out - ref).flatten(2).abs().amax(-1) > 0
            assert changed.tolist() == [[False, True, False], [False, False, False]], key


@pytest.mark.parametrize("variant, ablate", [("paper", frozenset()), ("code", frozenset()), ("paper", frozenset({"deri"})),
                                             ("paper", frozenset({"disc"})), ("paper", frozenset({"dem"}))])
def test_variants_and_ablations_train(variant: str, ablate: frozenset[str]) -> None:
    model = tiny_model(variant=variant, ablate=ablate).train()
    x = batch()
    out = model(x)
    parts = model.loss(out, x)
    parts["total"].backward()
    assert torch.isfinite(parts["total"]) and set(parts) >= {"bce", "dice", "iou", "total"}
    grads = [p.grad for p in model.derivation.parameters()]
    assert all(g is None for g in grads) if "deri" in ablate else any(g is not None and g.abs().sum() > 0 for g in grads)
    disc_used = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discrimination.parameters())
    assert disc_used == (not ablate & {"deri", "disc"})
    # the DEM diagnostic is logged (a score in (0, 1), S ≡ 1 when DEM is ablated) and carries no gradient
    score = float(parts["dem_score"])
    assert score == 1.0 if "dem" in ablate else 0.0 < score < 1.0
    assert not parts["dem_score"].requires_grad


def test_paper_pvt_fuses_before_every_block_and_code_once_per_stage() -> None:
    pvt = {"embed_dims": [16, 32, 48, 64], "depths": [2, 1, 1, 1], "num_heads": [1, 2, 3, 4]}
    paper = tiny_model(dataset="s4", variant="paper")
    assert [len(f) for f in paper.fuse] == [1, 1, 1, 1]  # resnet: once after each stage
    spec = RunSpec(dataset="s4", preset="tiny", work=Path("."), out=Path("."), method="ddeseg",
                   overrides=["model.backbone=pvt_v2_b0", f"model.backbone_kwargs={json.dumps(pvt).replace(':', '=')}",
                              "model.image_size=32"])
    cfg, _ = build_configs(spec)
    assert [len(f) for f in DDESeg(cfg, methods.validate(cfg), memory()).fuse] == [2, 1, 1, 1]
    code = DDESegOptions(variant="code", embed=32, tokens=3, visual_centres=3, heads=2)
    assert [len(f) for f in DDESeg(cfg, code, memory()).fuse] == [1, 1, 1, 1]
    out = DDESeg(cfg, methods.validate(cfg), memory()).eval()(batch())["logits"]
    assert out.shape == (2, 3, 1, 32, 32)


def test_a_checkpoint_of_another_bank_is_refused() -> None:
    trained = SemanticMemory(torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.arange(2), "clap_latent", digest="a" * 64)
    same = SemanticMemory(torch.ones(2, 4), torch.ones(2, 3, 4), torch.arange(2), "clap_latent", digest="a" * 64)
    same.load_state_dict(trained.state_dict())
    assert torch.equal(same.centers, trained.centers)  # the buffers travel with the checkpoint
    other = SemanticMemory(torch.ones(2, 4), torch.ones(2, 3, 4), torch.arange(2), "clap_latent", digest="b" * 64)
    with pytest.raises(BankMismatch, match="another audio bank|trained with audio bank"):
        other.load_state_dict(trained.state_dict())


# ----------------------------------------------------------------------------- Eq. 18


def test_loss_weights_perfect_prediction_and_hand_examples() -> None:
    target = torch.tensor([[[0, 1], [1, 1]]])
    gt = valid = torch.ones(1, 1, dtype=torch.bool)
    perfect = (40 * target.float() - 20)[None, :, None]  # (1, 1, 1, 2, 2)
    parts = ddeseg_loss(perfect, target[None], gt, valid, binary=True)
    assert parts["dice"] < 1e-6 and parts["iou"] < 1e-6
    logits = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]]])[None]
    parts = ddeseg_loss(logits, target[None], gt, valid, binary=True)
    p = 1 / (1 + np.exp(-logits.numpy()[0, 0, 0].astype(np.float64)))
    y = target.numpy()[0].astype(np.float64)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    inter, tot = (p * y).sum(), p.sum() + y.sum()  # binary: the foreground channel alone (official -nc 1)
    dice = 1 - (2 * inter + 1e-5) / (tot + 1e-5)
    iou = 1 - (inter + 1e-5) / (tot - inter + 1e-5)
    for k, v in (("bce", bce), ("dice", dice), ("iou", iou), ("total", 5 * bce + 5 * dice + 2 * iou)):
        assert abs(float(parts[k]) - v) < 1e-5, k
    # 3 classes, softmax CE, one-hot with background
    three = torch.tensor([[[0, 2], [1, 1]]])
    z = torch.randn(1, 1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    parts = ddeseg_loss(z, three[None], gt, valid, binary=False)
    zn = z.double().numpy()[0, 0]
    sm = np.exp(zn) / np.exp(zn).sum(0)
    oh = np.stack([(three.numpy()[0] == c).astype(float) for c in range(3)])
    ce = -np.mean(np.log((sm * oh).sum(0)))
    inter, tot = (sm * oh).sum((1, 2)), sm.sum((1, 2)) + oh.sum((1, 2))
    expected = 5 * ce + 5 * np.mean(1 - (2 * inter + 1e-5) / (tot + 1e-5)) + 2 * np.mean(1 - (inter + 1e-5) / (tot - inter + 1e-5))
    assert abs(float(parts["total"]) - expected) < 1e-5


def test_binary_dice_and_iou_see_only_the_foreground_channel() -> None:
    """An all-background target: with a background channel, Dice would be ≈ 0.5 for a confident "all background"
    prediction's foreground half plus its background half; with the foreground channel alone it is 0 (no foreground
    on either side, smoothed), and a uniform p gives 1 − s/(Σp + s)."""
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    gt = valid = torch.ones(1, 1, dtype=torch.bool)
    silent = ddeseg_loss(torch.full((1, 1, 1, 4, 4), -30.0), empty, gt, valid, binary=True)
    assert float(silent["dice"]) < 1e-3 and float(silent["iou"]) < 1e-3
    logits = torch.full((1, 1, 1, 4, 4), 2.0, requires_grad=True)
    loud = ddeseg_loss(logits, empty, gt, valid, binary=True)
    dice, iou = float(loud["dice"].detach()), float(loud["iou"].detach())
    p = 1 / (1 + np.exp(-2.0))
    assert abs(dice - (1 - 1e-5 / (16 * p + 1e-5))) < 1e-6 and abs(iou - (1 - 1e-5 / (16 * p + 1e-5))) < 1e-6
    two_channel = 0.5 * (1 - (2 * 16 * (1 - p) + 1e-5) / (16 * (1 - p) + 16 + 1e-5)) + 0.5 * dice
    assert abs(dice - two_channel) > 0.1  # the old [bg, fg] mean is a different number
    (loud["dice"] + loud["iou"]).backward()
    assert (logits.grad > 0).all()  # pushes the foreground logit down everywhere


# ----------------------------------------------------------------------------- DDESeg's metric protocol


def test_dataset_hard_metrics_match_a_hand_confusion_matrix() -> None:
    masks = torch.tensor([[[[0, 0], [1, 1]], [[0, 0], [0, 0]]]])  # (1, 2, 2, 2); class 2 never in GT
    pred = torch.tensor([[[[0, 1], [1, 1]], [[0, 0], [0, 0]]]])
    gt = torch.ones(1, 2, dtype=torch.bool)
    m = DatasetHardMetrics(3)
    m.update(pred, masks, gt)
    r = m.compute()
    # class 0: TP 5, FP 0, FN 1; class 1: TP 2, FP 1, FN 0; class 2: union 0 → excluded
    j = (5 / 6 + 2 / 3) / 2
    f0 = 1.3 * 5 / (1.3 * 5 + 0.3 * 1 + 0)
    f1 = 1.3 * 2 / (1.3 * 2 + 0 + 1)
    assert abs(r["J_dh"] - j) < 1e-12 and abs(r["F_dh"] - (f0 + f1) / 2) < 1e-12
    binary = DatasetHardMetrics(2)
    binary.update(torch.tensor([[[[0.2, 0.7], [0.9, 0.6]]]]), torch.tensor([[[[0, 0], [1, 1]]]]), torch.ones(1, 1, dtype=torch.bool))
    assert abs(binary.compute()["J_dh"] - (1 / 2 + 2 / 3) / 2) < 1e-12  # background included


# ----------------------------------------------------------------------------- end to end on synthetic shards


def _work(tmp: Path, dataset: str) -> Path:
    runner = CliRunner()
    root, work = tmp / dataset.upper(), tmp / "work"
    res = runner.invoke(app, ["synth", "--layout", dataset, "--out", str(root), "--clips", "8", "--size", "32", "--seed", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["stage", "all", "--dataset", dataset, "--root", str(root), "--work", str(work), "--encoders",
                              "tiny", "--image-size", "32", "--executor", "local", "--bank-clusters", "2", "--bank-per-cluster", "2"])
    assert res.exit_code == 0, res.output
    return work


@pytest.fixture(scope="module", params=["s4", "avss"])
def shards(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _work(tmp_path_factory.mktemp(f"dd-{request.param}"), request.param)


def test_trains_two_steps_and_evaluates_with_both_protocols(shards: tuple[str, Path], tmp_path: Path) -> None:
    dataset, work = shards
    run = train(RunSpec(dataset=dataset, preset="tiny", work=work, out=tmp_path / "run", method="ddeseg", max_steps=2,
                        overrides=["model.image_size=32"]))
    assert json.loads((run / "run.json").read_text())["method"] == "ddeseg"
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert {"J", "F", "JF", "FDR", "J_dh", "F_dh", "JF_dh", "n_frames"} <= set(result)
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "val", "--snr-db", "10"])
    assert res.exit_code != 0 and "noisy waveforms" in res.output and "ddeseg" in res.output
    res = CliRunner().invoke(app, ["compare", str(run), "--split", "val", "--snr-db", "10"])
    assert res.exit_code != 0 and "noisy waveforms" in res.output


def test_shards_without_an_audio_bank_are_refused_naming_the_stage(shards: tuple[str, Path], tmp_path: Path) -> None:
    dataset, work = shards
    index = work / dataset / "shards.json"
    doc = json.loads(index.read_text())
    try:
        index.write_text(json.dumps({**doc, "audio_bank": None}))
        with pytest.raises(UserError, match=r"needs audio_bank.*`icf stage bank --dataset"):
            train(RunSpec(dataset=dataset, preset="tiny", work=work, out=tmp_path / "run", method="ddeseg", max_steps=1))
        legacy = {k: v for k, v in doc.items() if k not in ("members", "audio_bank")}
        index.write_text(json.dumps(legacy))  # an older shards.json: the fixed member set, no clap_latent
        with pytest.raises(UserError, match=r"needs audio_bank, clap_latent.*icf stage bank / extract"):
            train(RunSpec(dataset=dataset, preset="tiny", work=work, out=tmp_path / "run2", method="ddeseg", max_steps=1))
    finally:
        index.write_text(json.dumps(doc))


@pytest.mark.parametrize("dataset", ["s4", "ms3", "avss"])
@pytest.mark.parametrize("name", ["paper-pvt", "paper-r50"])
def test_paper_presets_resolve_to_the_official_recipe(dataset: str, name: str) -> None:
    model, t = build_configs(RunSpec(dataset=dataset, preset=name, work=Path("."), out=Path("."), method="ddeseg"))
    assert model.backbone == ("pvt_v2_b5" if name == "paper-pvt" else "resnet50") and model.image_size == 224
    assert model.backbone_kwargs == {"drop_path_rate": 0.1}
    assert (t.lr, t.weight_decay, t.decay_norms, t.backbone_lr_mult) == (1e-4, 0.05, False, 1.0)
    assert (t.schedule, t.min_lr_ratio, t.epochs, t.warmup_epochs, t.warmup_steps) == ("cosine", 0.4, 150, 2, 0)
    assert (t.batch_size, t.batch_unit, t.augment, t.grad_clip, t.amp) == (50, "gt_frames", "ddeseg", 0.0, False)
    options = methods.validate(model)
    assert options == DDESegOptions(variant="code", memory="avss")
    assert first_stride(options, model.backbone) == (2 if name == "paper-pvt" else 4)  # the official PVT's stem
    paper, _ = build_configs(RunSpec(dataset=dataset, preset=name, work=Path("."), out=Path("."), method="ddeseg",
                                     overrides=["method.variant=paper"]))
    assert first_stride(methods.validate(paper), paper.backbone) == 4  # the paper's forms stay an option
    tiny, tiny_train = build_configs(RunSpec(dataset=dataset, preset="tiny", work=Path("."), out=Path("."), method="ddeseg"))
    assert methods.validate(tiny) == DDESegOptions(embed=32, tokens=3, visual_centres=3, heads=2)
    assert (tiny_train.batch_unit, tiny_train.augment, tiny_train.warmup_epochs) == ("clips", "none", 0)


def test_presets_refuse_unknown_components_and_a_bank_of_another_source() -> None:
    with pytest.raises(UserError, match="deri, dem, disc|'dem', 'deri', 'disc'"):
        build_configs(RunSpec(dataset="s4", preset="tiny", work=Path("."), out=Path("."), method="ddeseg", ablate=frozenset({"mit"})))
    with pytest.raises(ValueError, match="bank is built from clap_latent"):
        methods.get("ddeseg").build(preset("tiny", "s4")[0], DDESegOptions(source="clap"), _bank_resources())


def test_code_variant_runs_the_pvt_at_stride_two_and_predicts_at_stride_two() -> None:
    pvt = {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]}
    spec = RunSpec(dataset="s4", preset="tiny", work=Path("."), out=Path("."), method="ddeseg",
                   overrides=["model.backbone=pvt_v2_b0", f"model.backbone_kwargs={json.dumps(pvt).replace(':', '=')}",
                              "model.image_size=32", "method.variant=code"])
    cfg, _ = build_configs(spec)
    torch.manual_seed(0)
    code = DDESeg(cfg, methods.validate(cfg), memory()).eval()
    paper = DDESeg(cfg, dataclasses.replace(methods.validate(cfg), variant="paper"), memory()).eval()
    x = torch.randn(2, 3, 32, 32)
    assert [m.shape[-1] for m in code.backbone(x)] == [16, 8, 4, 2]  # strides 2, 4, 8, 16 (official FAVSBackbone)
    assert [m.shape[-1] for m in paper.backbone(x)] == [8, 4, 2, 1]  # timm's strides 4, 8, 16, 32
    assert code.backbone.body.patch_embed.proj.stride == (2, 2)
    with torch.no_grad():
        assert code.head(code.backbone(x)).shape == (2, 1, 16, 16)  # the head predicts at stride 2
        assert code(batch())["logits"].shape == (2, 3, 1, 32, 32)  # upsampled to the frame
    forced = DDESeg(cfg, dataclasses.replace(methods.validate(cfg), first_stride=4), memory())
    assert forced.backbone.body.patch_embed.proj.stride == (4, 4)  # method.first_stride overrides the variant
    with pytest.raises(ValueError, match="first_stride=2 needs a pvt_v2 backbone"):
        StagedBackbone("resnet18", None, {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]}, first_stride=2)
    with pytest.raises(ValueError, match="method ddeseg: first_stride must be one of 2, 4, got 3"):
        methods.get("ddeseg").parse_options({"first_stride": 3})


@pytest.mark.parametrize(("options", "message"), [
    ({"variant": "other"}, "method ddeseg: variant must be one of paper, code, got 'other'"),
    ({"dem_scheme": "xx"}, "method ddeseg: dem_scheme must be one of none, fc, ca, sk, gs, got 'xx'"),
    ({"dem_centres": "vo"}, "method ddeseg: dem_centres must be one of oc, oTv, got 'vo'"),
    ({"tokens": 0}, "method ddeseg: tokens must be at least 1, got 0"),
    ({"heads": -2}, "method ddeseg: heads must be at least 1, got -2"),
    ({"embed": 2.5}, "method ddeseg: embed must be an integer, got 2.5"),
    ({"visual_centres": True}, "method ddeseg: visual_centres must be an integer, got True"),
    ({"tau": 0.0}, "method ddeseg: tau must be positive, got 0.0"),
    ({"tau": float("nan")}, "method ddeseg: tau must be positive, got nan"),
])
def test_bad_options_give_one_clear_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        methods.get("ddeseg").parse_options(options)


def _bank_resources() -> Resources:
    import tempfile

    from icf.pipeline.store import npz_bytes

    path = Path(tempfile.mkdtemp()) / "audio_bank.npz"
    path.write_bytes(npz_bytes({"centers": np.zeros((2, 4), np.float32), "reps": np.zeros((2, 2, 4), np.float32),
                                "class_ids": np.arange(2), "source": np.array("clap_latent")}))
    return Resources(audio_bank=path)


# ----------------------------------------------------------------------------- the official recipe's data path (S4)


@pytest.fixture(scope="module")
def s4_and_avss(tmp_path_factory) -> Path:
    """One WORK with synthetic AVSS and S4 staged with the same tiny encoders (S4 with its own bank)."""
    tmp = tmp_path_factory.mktemp("dd-both")
    runner = CliRunner()
    for dataset in ("avss", "s4"):
        res = runner.invoke(app, ["synth", "--layout", dataset, "--out", str(tmp / dataset), "--clips", "10", "--size",
                                  "32", "--seed", "0"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["stage", "all", "--dataset", dataset, "--root", str(tmp / dataset), "--work",
                                  str(tmp / "work"), "--encoders", "tiny", "--image-size", "32", "--executor", "local",
                                  "--bank-clusters", "2", "--bank-per-cluster", "2"])
        assert res.exit_code == 0, res.output
    return tmp / "work"


RECIPE = ["model.image_size=32", "train.batch_unit=gt_frames", "train.batch_size=2", "train.augment=ddeseg",
          "train.warmup_epochs=1", "train.grad_clip=0"]


def test_s4_steps_see_the_asked_gt_frames_warm_up_by_epochs_and_resume_exactly(s4_and_avss: Path, tmp_path: Path) -> None:
    from icf.data.frame_stream import FrameStream
    from icf.data.shards import ShardStream

    work = s4_and_avss
    shards = ShardSet.load(work / "s4")
    clips = ShardStream(shards, "train", 2, 32, train=True)
    frames = FrameStream(shards, "train", 2, 32, train=True)
    assert frames.num_samples() == clips.num_samples() >= 4  # S4 train: GT on frame 1 only, one per clip
    b = next(iter(frames))
    assert int(b["gt"].sum()) == 2 and b["frames"].shape[:2] == (2, 1)  # 2 supervised frames, not 2 clips × 1
    assert int(next(iter(clips))["gt"].sum()) == 2 and next(iter(clips))["frames"].shape[1] == 5

    def spec(out: str, steps: int) -> RunSpec:
        return RunSpec(dataset="s4", preset="tiny", work=work, out=tmp_path / out, method="ddeseg", epochs=2,
                       max_steps=steps, seed=5, overrides=RECIPE)

    full = train(spec("full", 4))
    train(spec("part", 2))
    train(spec("part", 4), resume=True)
    a, b_ = ([{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run)] for run in (full, tmp_path / "part"))
    assert [r["step"] for r in b_] == [1, 2, 3, 4]
    for ra, rb in zip(a, b_):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (ra["step"], key)
    per_epoch = frames.num_samples() // 2
    assert a[0]["lr"] == pytest.approx(3e-3 / per_epoch) and a[1]["lr"] == pytest.approx(3e-3 * 2 / per_epoch)
    assert a[0]["grad_norm"] == 0.0  # grad_clip 0: no clipping, no norm computed


def test_the_avss_memory_is_required_when_asked_and_taken_when_borrowed(s4_and_avss: Path, tmp_path: Path) -> None:
    work = s4_and_avss
    spec = RunSpec(dataset="s4", preset="tiny", work=work, out=tmp_path / "run", method="ddeseg", max_steps=1,
                   overrides=["model.image_size=32", "method.memory=avss"])
    with pytest.raises(UserError, match=r"method.memory=avss.*is not the AVSS bank.*--bank-from avss.*method.memory=shards"):
        train(spec)
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run folder is written
    runner = CliRunner()
    for args in (["stage", "bank", "--dataset", "s4", "--work", str(work), "--bank-from", "avss"],
                 ["stage", "shard", "--dataset", "s4", "--work", str(work)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    s4, avss = (SemanticMemory.load(ShardSet.load(work / d).audio_bank) for d in ("s4", "avss"))
    assert s4.digest == avss.digest and torch.equal(s4.centers, avss.centers)
    run = train(spec)
    assert json.loads((run / "run.json").read_text())["model"]["options"]["memory"] == "avss"
