"""Released AVSBench TPAVI checkpoints → icf (`icf.methods.tpavi.OFFICIAL_KEYS`, ``icf import``).

Official-layout files are built from icf's own model through the inverse of the key table; their non-backbone key
names and shapes are held to ``tests/data/avsbench_tpavi_keys.json``, recorded from the official
``Pred_endecoder(channel=256, tpavi_stages=[0, 1, 2, 3]).state_dict()`` (no third-party code in the repository).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from test_model import make_batch, tiny
from typer.testing import CliRunner

import icf.encoders as enc
from icf.cli import app
from icf.encoders.vggish import VGGish
from icf.methods.tpavi import OFFICIAL_KEYS, official_options
from icf.model.backbone import Backbone
from icf.model.tpavi import TPAVISegmenter
from icf.train import checkpoint
from icf.train.run import load_trained

RECORDED = json.loads((Path(__file__).parent / "data" / "avsbench_tpavi_keys.json").read_text())
UNUSED = {"resnet.layer3_2.0.conv1.weight": (8, 8, 1, 1), "resnet.layer4_2.2.bn3.running_var": (8,),
          "path4.resConfUnit1.conv1.weight": (48, 48, 3, 3)}  # the official file's never-run tensors


def _icf_state(model: TPAVISegmenter) -> dict[str, torch.Tensor]:
    """The model's trainable state without the audio encoder (the official file holds no audio: VGGish is its own
    file, frozen)."""
    return {k: v for k, v in checkpoint.trainable_state(model).items() if not k.startswith("audio.")}


def _official(model: TPAVISegmenter) -> dict[str, torch.Tensor]:
    return {**OFFICIAL_KEYS.to_official(_icf_state(model)), **{k: torch.randn(s) for k, s in UNUSED.items()}}


# ---- the key table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["s4", "avss"])
def test_official_layout_round_trips(dataset: str) -> None:
    torch.manual_seed(0)
    model = TPAVISegmenter(tiny(dataset))
    own = _icf_state(model)
    official = _official(model)
    assert official["tpavi_b4.theta.weight"].shape == (24, 48, 1, 1, 1)  # Conv3d 1×1×1
    assert official["tpavi_b1.phi.weight"].shape == (24, 48, 1, 1, 1)
    assert official["resnet.layer3_1.0.conv1.weight"].shape == own["backbone.body.layer3.0.conv1.weight"].shape
    assert ("tpavi_b1.align_channel.bias" in official) == (dataset != "avss")
    assert official_options(official) == {"tpavi_stages": [0, 1, 2, 3], "audio_path": "official", "window": 5}
    back, dropped = OFFICIAL_KEYS.to_icf(official, own)
    assert sorted(dropped) == sorted(UNUSED)
    assert back.keys() == own.keys()
    for key, value in own.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("dataset", ["s4", "avss"])
def test_keys_and_shapes_match_the_recorded_official_model(dataset: str) -> None:
    """d = 256 and a 128-wide raw audio embedding, as the official model: every non-backbone official key and
    shape (the neck's input widths are the backbone's, so only its other dimensions are compared)."""
    cfg = tiny(dataset, d_model=256, num_heads=8, audio_channels=(16, 32, 128))
    model = TPAVISegmenter(cfg)
    ours = {k: list(v.shape) for k, v in OFFICIAL_KEYS.to_official(_icf_state(model)).items() if not k.startswith("resnet.")}
    recorded = RECORDED[dataset]
    unused = {k for k in recorded if k.startswith("path4.resConfUnit1.")}
    assert unused and set(ours) == set(recorded) - unused
    for key, shape in ours.items():
        want = recorded[key]
        assert (shape[:1] + shape[2:] if ".conv2d_list." in key else shape) == \
            (want[:1] + want[2:] if ".conv2d_list." in key else want), key
    assert all(OFFICIAL_KEYS.icf_key(k)[0] is None for k in unused)


def test_pvt_rows_agree_with_timms_own_converter() -> None:
    """The PVT-v2 rows rename pvt_v2_b5.pth keys as timm's pvt_v2 checkpoint filter does (timm's ``stages.N`` is
    ``stages_N`` in features_only mode)."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    body = {f"backbone.{k}": v for k, v in Backbone("pvt_v2_b0").state_dict().items()}
    official = OFFICIAL_KEYS.to_official(body)
    assert "encoder_backbone.block3.1.mlp.dwconv.dwconv.weight" in official and "encoder_backbone.patch_embed2.proj.weight" in official
    timm_keys = checkpoint_filter_fn({k.removeprefix("encoder_backbone."): v for k, v in official.items()}, None)
    assert sorted(f"backbone.body.{k}" for k in timm_keys) == sorted(k.replace("stages_", "stages.") for k in body)


def test_missing_extra_and_misshaped_tensors_are_refused_by_name() -> None:
    torch.manual_seed(1)
    model = TPAVISegmenter(tiny("s4"))
    own, official = _icf_state(model), _official(model)
    cases = [
        ({k: v for k, v in official.items() if k != "tpavi_b2.g.weight"}, r"'tpavi_b2\.g\.weight' is missing"),
        ({**official, "epoch_state.step": torch.zeros(1)}, r"'epoch_state\.step' fits no known official key"),
        ({**official, "tpavi_b5.theta.weight": torch.zeros(24, 48, 1, 1, 1)}, r"'tpavi_b5\.theta\.weight' .* does not exist"),
        ({**official, "tpavi_b1.align_channel.weight": torch.zeros(48, 128)}, r"'tpavi_b1\.align_channel\.weight' has shape \[48, 128\]"),
        ({**official, "tpavi_b3.W_z.0.weight": torch.zeros(48, 24, 1, 1, 2)}, r"'tpavi_b3\.W_z\.0\.weight' has shape"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            OFFICIAL_KEYS.to_icf(state, own)
    # an S4 file (align_channel with bias) does not fit the AVSS model (the official AVSS align has none)
    with pytest.raises(ValueError, match=r"'tpavi_b1\.align_channel\.bias' .* does not exist"):
        OFFICIAL_KEYS.to_icf(official, _icf_state(TPAVISegmenter(tiny("avss"))))
    # the projected audio path has a projection the official file lacks
    projected = _icf_state(TPAVISegmenter(tiny("s4"), audio_path="projected")) | {"audio.proj.0.weight": torch.zeros(48, 48)}
    with pytest.raises(ValueError, match=r"audio\.proj\.0\.weight"):
        OFFICIAL_KEYS.to_icf(official, projected)


def test_released_file_layouts_are_read_as_the_official_code_saves_them(tmp_path: Path) -> None:
    """A raw state dict, ``{"state_dict": …}``, DataParallel's ``module.`` prefixes; anything else named."""
    from icf.clitools import UserError
    from icf.encoders.spec import read_checkpoint

    sd = {"tpavi_b1.theta.weight": torch.ones(2, 4, 1, 1, 1), "output_conv.4.bias": torch.zeros(1)}
    for i, content in enumerate((sd, {"state_dict": sd, "epoch": 3}, {f"module.{k}": v for k, v in sd.items()})):
        torch.save(content, tmp_path / f"{i}.pth")
        got = read_checkpoint(tmp_path / f"{i}.pth", "tpavi checkpoint")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
    torch.save({**sd, "best_miou": 0.7}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="key 'best_miou' holds a float, not a tensor"):
        read_checkpoint(tmp_path / "bad.pth", "tpavi checkpoint")


# ---- icf import, end to end ---------------------------------------------------------------------------


NARROW_VGGISH = {"channels": ((4,), (4,), (8, 8), (8, 8)), "hidden": 16}  # VGGish's layout at test size, 128-d out


@pytest.fixture
def released(tmp_path: Path, avss_shards, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Staged AVSS shards, a (narrow) VGGish weights file, and a trained-looking AVSS TPAVI model saved as the
    official train.py saves it (``torch.save(model.module.state_dict())``, here with a ``module.`` prefix)."""
    monkeypatch.setattr("icf.model.audio.VGGish", functools.partial(VGGish, **NARROW_VGGISH))
    work = tmp_path / "work"
    avss_shards(work, n_train=2, n_val=3)
    torch.manual_seed(2)
    vggish = tmp_path / "vggish-10086976.pth"
    torch.save(VGGish(**NARROW_VGGISH).state_dict(), vggish)
    cfg = tiny("avss", audio_encoder="vggish", audio_weights=str(vggish))
    source = TPAVISegmenter(cfg)
    with torch.no_grad():
        for block in source.tpavi.values():
            block.w_z[1].weight.uniform_(0.5, 1.5)  # as after training: the audio reaches the masks
    path = tmp_path / "AVSS_resnet_miou_best.pth"
    torch.save({f"module.{k}": v for k, v in _official(source).items()}, path)
    return {"work": work, "vggish": vggish, "file": path, "source": source.eval(), "cfg": cfg}


def _import(released: dict, out: Path, *extra: str) -> object:
    args = ["import", "--method", "tpavi", "--dataset", "avss", "--checkpoint", str(released["file"]), "--preset", "tiny",
            "--audio-weights", str(released["vggish"]), "--set", "model.audio_encoder=vggish", "--work",
            str(released["work"]), "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def test_import_then_eval_and_predict_run_unchanged(released: dict, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tpavi-official-avss"
    res = _import(released, run)
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(run)
    doc = json.loads((run / "run.json").read_text())
    assert doc["method"] == "tpavi" and doc["preset"] == "tiny" and doc["dataset"] == "avss"
    assert doc["shards"] == str((released["work"] / "avss" / "shards.json").resolve())
    assert doc["model"]["options"] == {"tpavi_stages": [0, 1, 2, 3], "audio_path": "official", "window": 5}
    assert doc["model"]["num_classes"] == 71 and doc["model"]["audio_weights"] == str(released["vggish"].resolve())
    assert doc["imported"]["from"] == "AVSS_resnet_miou_best.pth" and len(doc["imported"]["sha256"]) == 64
    # the imported run predicts exactly what the released model does
    model, _, loaded, _, _ = load_trained(run, torch.device("cpu"))
    assert loaded["loaded"] == {"checkpoint": "checkpoint.pt", "step": 0}
    batch = make_batch(released["cfg"], enc.load(enc.EncoderSpec.tiny()), b=2, n_real=[5, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], released["source"](batch)["logits"], rtol=0, atol=0)
    for extra, key in (((), "J"), (("--snr-db", "0"), "J"), (("--negative", "silence"), "silence")):
        ev = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", *extra])
        assert ev.exit_code == 0, ev.output
        metrics = json.loads(ev.output.strip().splitlines()[-1])
        assert key in metrics, metrics
        if not extra:
            assert metrics["n_frames"] == 10 + 5 + 10 and 0.0 <= metrics["J"] <= 1.0  # the user's staged val clips
    pred = CliRunner().invoke(app, ["predict", "--run", str(run), "--out", str(tmp_path / "panels"), "--limit", "1"])
    assert pred.exit_code == 0, pred.output
    # an imported run holds weights only: resuming it is one line, not a traceback
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "1"])
    assert resumed.exit_code == 2 and "cannot be resumed" in resumed.output and "Traceback" not in resumed.output
    # a second import into the same run folder is refused, the run untouched
    again = _import(released, run)
    assert again.exit_code == 2 and "already a run folder" in again.output


class Opaque:
    """Not a tensor: unpickling it would run code."""


@pytest.mark.parametrize("content, match", [
    (lambda sd: {**sd, "epoch": 7}, "key 'epoch' holds a int"),
    (lambda sd: {**sd, "optimizer_state.step": torch.zeros(1)}, "'optimizer_state.step' fits no known official key"),
    (lambda sd: {k: v for k, v in sd.items() if k != "output_conv.4.bias"}, "'output_conv.4.bias' is missing"),
    (lambda sd: {"model": Opaque()}, "cannot be read as a torch checkpoint"),
])
def test_import_refuses_a_file_that_does_not_fit_in_one_line(released: dict, tmp_path: Path, content, match: str) -> None:
    official = {k.removeprefix("module."): v for k, v in torch.load(released["file"], weights_only=True).items()}
    torch.save(content(official), released["file"])
    out = tmp_path / "refused"
    res = _import(released, out)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and match in res.output and len(res.output.strip().splitlines()) == 1
    assert not (out / "run.json").exists() and not (out / "checkpoint.pt").exists()


def test_import_options_and_backbone_choice(released: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["import", "--method", "qdformer", "--dataset", "avss", "--checkpoint",
                                   str(released["file"]), "--backbone", "resnet50", "--work", str(released["work"])])
    assert res.exit_code == 2 and "cannot import released checkpoints" in res.output and "tpavi" in res.output
    res = CliRunner().invoke(app, ["import", "--method", "tpavi", "--dataset", "avss", "--checkpoint",
                                   str(released["file"]), "--backbone", "pvt_v2_b5", "--preset", "paper-r50"])
    assert res.exit_code == 2 and "--backbone pvt_v2_b5 is preset paper-pvt" in res.output
    res = _import(released, tmp_path / "one-stage", "--set", "method.tpavi_stages=[3]")
    assert res.exit_code == 2 and "'tpavi_b1.align_channel.weight' (icf tpavi.0.align.weight) does not exist" in res.output
    res = CliRunner().invoke(app, ["import", "--method", "tpavi", "--dataset", "avss", "--checkpoint",
                                   str(released["file"]), "--backbone", "resnet50", "--work", str(released["work"]),
                                   "--out", str(tmp_path / "no-vggish")])
    assert res.exit_code == 2 and "--audio-weights is required" in res.output
