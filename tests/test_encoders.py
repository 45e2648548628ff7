"""icf.encoders: offline construction, seeded random init, weights files, text towers, window rule."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip.transform
import pytest
import torch
from PIL import Image

from icf.clitools import UserError
from icf.encoders import PROMPT_TEMPLATES, EncoderSpec, class_phrase, load, prompt_slots, prompts, text_bank
from icf.encoders.clap import ClapEncoder, fit_clip_length
from icf.encoders.clip import ClipEncoder
from icf.encoders.spec import EncoderWeightsError, RandomWeightsWarning
from icf.encoders.vggish import VGGish
from icf.encoders.videoclip import VideoClipEncoder, segment_window, segment_windows

pytestmark = [
    pytest.mark.filterwarnings("ignore::icf.encoders.spec.RandomWeightsWarning"),
    pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),  # inside laion-clap's HTS-AT
]

TINY = EncoderSpec.tiny()
NARROW_VGGISH = {"channels": ((4,), (8,), (8, 8), (16, 16)), "hidden": 32, "embed_dim": 8}


@pytest.fixture(scope="module")
def clip() -> ClipEncoder:
    return ClipEncoder(TINY.clip_model, seed=0)


@pytest.fixture(scope="module")
def clap() -> ClapEncoder:
    return ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, seed=0)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """A local RoBERTa folder: 1-layer config (hidden 768, as laion-clap's projection expects) and a
    byte-level BPE tokenizer with one token per printable ASCII byte and no merges."""
    from transformers import RobertaConfig

    folder = tmp_path_factory.mktemp("roberta")
    chars = [chr(c) for c in range(33, 127)] + ["\u0120"]  # "Ġ" is the byte-level space
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *chars, "<mask>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    RobertaConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
        intermediate_size=64, max_position_embeddings=80,
    ).save_pretrained(folder)
    return folder


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def random_frames(n: int, h: int = 72, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def random_audio(n: int, seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((n, int(48000 * seconds)))).astype(np.float32)


# ---- EncoderSpec ---------------------------------------------------------------------------------


def test_spec_json_round_trip_and_flags():
    spec = EncoderSpec(clip_weights="/w/clip.pt", clap_weights="/w/clap.pt", clap_text_dir="/w/roberta", seed=7)
    assert EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert EncoderSpec.from_json(spec.to_json()) == spec
    assert not spec.is_random and spec.weights_summary() == {"clip": "/w/clip.pt", "clap": "/w/clap.pt"}
    assert TINY.is_random and TINY.weights_summary() == {"clip": "random", "clap": "random"}
    assert EncoderSpec().clap_tmodel == "roberta" and TINY.clap_tmodel == "transformer"


@pytest.mark.parametrize("bad", [{"clip_modle": "ViT-B-32"}, {"seed": "0"}, {"clip_weights": 3}, {"seed": True}])
def test_spec_rejects_bad_dicts(bad):
    with pytest.raises(UserError, match="encoder spec"):
        EncoderSpec.from_dict(bad)


# ---- seeded random init --------------------------------------------------------------------------


def test_random_init_is_seeded_and_loud(clip, clap):
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        again = ClipEncoder(TINY.clip_model, seed=0)
    assert params_equal(clip.model, again.model)
    assert not params_equal(clip.model, ClipEncoder(TINY.clip_model, seed=1).model)
    assert params_equal(clap.model, ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, seed=0).model)
    assert not params_equal(clap.model, ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, seed=1).model)


def test_building_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipEncoder(TINY.clip_model, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_towers_are_frozen(clip, clap):
    for model in (clip.model, clap.model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


# ---- CLIP ----------------------------------------------------------------------------------------


def test_clip_preprocess_matches_open_clip_pil_transform(clip):
    frames = random_frames(3, 72, 96)
    ours = clip.preprocess(frames)
    assert ours.shape == (3, 3, clip.image_size, clip.image_size) and ours.dtype == torch.float32
    cfg = open_clip.transform.PreprocessCfg(**clip.model.visual.preprocess_cfg)
    pil_transform = open_clip.transform.image_transform_v2(cfg, is_train=False)
    reference = torch.stack([pil_transform(Image.fromarray(f)) for f in frames])
    # both resample in uint8; rounding may differ by one grey level (1/255/std ≈ 0.015 after normalising)
    assert (ours - reference).abs().max() < 0.016
    assert (ours - reference).abs().mean() < 1e-3


def test_clip_image_embeddings_shape_and_norm(clip):
    emb = clip.encode_images(random_frames(5), batch_size=2)
    assert emb.shape == (5, clip.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(emb[:2], clip.encode_images(random_frames(5)[:2]), atol=1e-5)  # batching is invisible
    with pytest.raises(ValueError, match="uint8"):
        clip.encode_images(random_frames(2).astype(np.float32))


def test_clip_text_from_embeddings_equals_encode_text(clip):
    texts = ["A frame of dog.", "A video of male speech, man speaking."]
    ids = clip.tokenize(texts)
    assert ids.shape == (2, clip.context_length) and ids.dtype == torch.int64
    reference = clip.model.encode_text(ids, normalize=True)
    embeds = clip.token_embedding(ids)
    assert embeds.shape == (2, clip.context_length, clip.width)
    assert torch.allclose(clip.encode_text_embeddings(embeds, ids), reference, atol=1e-6)
    assert torch.allclose(clip.encode_text(texts), reference, atol=1e-6)


def test_clip_soft_prompts_get_gradients_tower_does_not(clip):
    ids = clip.tokenize(["A frame of X."])
    base = clip.token_embedding(ids)
    soft = torch.zeros(1, clip.width, requires_grad=True)
    spliced = torch.cat([base[:, :4], (base[:, 4] + soft)[:, None], base[:, 5:]], dim=1)  # position 4 = "x"
    out = clip.encode_text_embeddings(spliced, ids)
    out[0, 0].backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())
    nudge = torch.zeros_like(spliced)
    nudge[:, 4] = 1.0
    moved = clip.encode_text_embeddings(spliced.detach() + nudge, ids)
    assert not torch.allclose(moved, out.detach())  # the spliced vector really reaches the output


def test_clip_weights_round_trip(clip, tmp_path):
    other = ClipEncoder(TINY.clip_model, seed=3)
    path = tmp_path / "clip.pt"
    torch.save(other.model.state_dict(), path)
    loaded = ClipEncoder(TINY.clip_model, weights=str(path), seed=0)
    assert params_equal(loaded.model, other.model)
    frames = random_frames(2)
    assert torch.allclose(loaded.encode_images(frames), other.encode_images(frames), atol=1e-6)


def test_clip_weight_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(EncoderWeightsError, match=f"{missing}: does not exist"):
        ClipEncoder(TINY.clip_model, weights=str(missing))
    with pytest.raises(EncoderWeightsError, match="is a directory"):
        ClipEncoder(TINY.clip_model, weights=str(tmp_path))
    wrong = tmp_path / "vggish.pt"
    torch.save(VGGish(**NARROW_VGGISH).state_dict(), wrong)
    with pytest.raises(EncoderWeightsError, match="vggish.pt: do not fit icf-tiny-clip"):
        ClipEncoder(TINY.clip_model, weights=str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="garbage.pt: cannot be read"):
        ClipEncoder(TINY.clip_model, weights=str(garbage))
    with pytest.raises(EncoderWeightsError, match="not an open_clip config"):
        ClipEncoder("ViT-Nope-1")


# ---- VideoCLIP substitute and the segment-window rule ---------------------------------------------


@pytest.mark.parametrize(
    ("n_frames", "window", "expected"),
    [
        (5, 3, [[0, 1, 2], [2, 3, 4]]),
        (10, 3, [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]]),
        (5, 2, [[0, 1], [1, 2], [3, 4]]),
        (10, 5, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
        (5, 5, [[0, 1, 2, 3, 4]]),
        (1, 1, [[0]]),
    ],
)
def test_segment_windows_examples(n_frames, window, expected):
    assert segment_windows(n_frames, window) == expected


@pytest.mark.parametrize("n_frames", range(1, 13))
@pytest.mark.parametrize("divisor", [2, 4])
def test_segment_windows_properties(n_frames, divisor):
    window = segment_window(n_frames, divisor)
    assert window == math.ceil(n_frames / divisor)
    windows = segment_windows(n_frames, window)
    assert len(windows) == math.ceil(n_frames / window)
    assert all(w == list(range(w[0], w[0] + window)) for w in windows)  # exactly `window` consecutive frames
    assert windows[-1][-1] == n_frames - 1 and windows[0][0] == 0
    # sliding backward from the last frame: all windows but the first tile the end of the clip
    later = [i for w in windows[1:] for i in w]
    assert later == list(range(n_frames - len(later), n_frames))
    assert set(windows[0]) | set(later) == set(range(n_frames))


def test_segment_windows_rejects_impossible_windows():
    for n_frames, window in [(3, 4), (5, 0)]:
        with pytest.raises(ValueError):
            segment_windows(n_frames, window)


def test_videoclip_pooling_matches_float64_reference(clip):
    video = VideoClipEncoder(clip)
    frame_emb = clip.encode_images(random_frames(5))
    ref = frame_emb.double().numpy()

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    np.testing.assert_allclose(video.encode_video(frame_emb).numpy(), unit(ref.mean(0)), atol=1e-6)
    segments = video.encode_segments(frame_emb, window=3)
    assert segments.shape == (2, clip.dim)
    np.testing.assert_allclose(segments.numpy(), unit(np.stack([ref[0:3].mean(0), ref[2:5].mean(0)])), atol=1e-6)
    ids = video.tokenize(["A video of dog."])
    assert torch.equal(video.encode_text(["A video of dog."]), clip.encode_text(["A video of dog."]))
    embeds = video.token_embedding(ids)
    assert torch.equal(embeds, clip.token_embedding(ids))
    assert torch.equal(video.encode_text_embeddings(embeds, ids), clip.encode_text_embeddings(embeds, ids))


# ---- CLAP ----------------------------------------------------------------------------------------


def test_fit_clip_length_repeat_pads_and_cuts():
    wave = torch.arange(1.0, 4.0)[None]  # (1, 3)
    assert fit_clip_length(wave, 10).tolist() == [[1, 2, 3, 1, 2, 3, 1, 2, 3, 0]]
    assert fit_clip_length(torch.arange(12.0)[None], 10).tolist() == [list(range(10))]


def test_clap_audio_embeddings(clap):
    assert clap.sample_rate == 48000
    chunks = random_audio(3, 1.0)
    emb = clap.encode_audio(chunks, batch_size=2)
    assert emb.shape == (3, clap.dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # a 1 s chunk is repeat-padded to the model's 10 s, so it equals the chunk tiled ten times
    assert torch.allclose(emb[:1], clap.encode_audio(np.tile(chunks[:1], (1, 10))), atol=1e-5)
    whole = clap.encode_audio(random_audio(2, 5.0))
    assert whole.shape == (2, clap.dim)
    with pytest.raises(ValueError, match="samples"):
        clap.encode_audio(np.zeros(48000, dtype=np.float32))


def test_clap_text_from_embeddings_equals_encode_text(clap):
    texts = ["An audio of dog barking.", "An audio of baby laughter."]
    ids = clap.tokenize(texts)
    assert ids.shape == (2, clap.context_length)
    reference = clap.encode_text(texts)
    embeds = clap.token_embedding(ids).clone().requires_grad_(True)
    out = clap.encode_text_embeddings(embeds, ids)
    assert torch.allclose(out, reference, atol=1e-6)
    out.sum().backward()
    assert embeds.grad.abs().sum() > 0 and all(p.grad is None for p in clap.model.parameters())


def test_clap_roberta_from_local_folder(roberta_dir, tmp_path):
    """RoBERTa text tower built offline; LAION checkpoint layout ('state_dict', 'module.', old position_ids)."""
    enc = ClapEncoder(TINY.clap_amodel, "roberta", text_dir=str(roberta_dir), seed=4)
    texts = ["An audio of dog.", "An audio of male speech, man speaking."]
    ids = enc.tokenize(texts)
    assert ids.shape == (2, enc.context_length) and enc.pad_id == 1
    assert torch.allclose(enc.encode_text_embeddings(enc.token_embedding(ids), ids), enc.encode_text(texts), atol=1e-5)

    state = {f"module.{k}": v for k, v in enc.model.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # transformers < 4.31 saved it
    path = tmp_path / "630k-audioset-best.pt"
    torch.save({"epoch": 45, "name": "laion", "best": np.float64(0.5), "state_dict": state}, path)
    loaded = ClapEncoder(TINY.clap_amodel, "roberta", weights=str(path), text_dir=str(roberta_dir), seed=0)
    assert params_equal(loaded.model, enc.model)
    assert torch.allclose(loaded.encode_text(texts), enc.encode_text(texts), atol=1e-6)


def test_clap_roberta_needs_a_complete_local_folder(tmp_path):
    # with a checkpoint; without one, a random roberta falls back to 'transformer' (test_reliability.py)
    with pytest.raises(EncoderWeightsError, match="clap_text_dir"):
        ClapEncoder(TINY.clap_amodel, "roberta", weights=str(tmp_path / "clap.pt"))
    with pytest.raises(EncoderWeightsError, match="missing"):
        ClapEncoder(TINY.clap_amodel, "roberta", text_dir=str(tmp_path))


def test_clap_weights_round_trip_laion_layout(clap, tmp_path):
    other = ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, seed=9)
    path = tmp_path / "clap.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in other.model.state_dict().items()}}, path)
    loaded = ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, weights=str(path), seed=0)
    assert params_equal(loaded.model, other.model) and not params_equal(loaded.model, clap.model)
    audio = random_audio(2, 1.0)
    assert torch.allclose(loaded.encode_audio(audio), other.encode_audio(audio), atol=1e-6)


def test_clap_weight_errors(tmp_path):
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, weights=str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="cannot be read"):
        ClapEncoder(TINY.clap_amodel, TINY.clap_tmodel, weights=str(garbage))
    with pytest.raises(EncoderWeightsError, match="not supported offline"):
        ClapEncoder(TINY.clap_amodel, "bert")


def test_clap_pann_audio_branch():
    """laion-clap's Cnn6 takes a bare waveform tensor, unlike HTS-AT; both paths must work."""
    enc = ClapEncoder("PANN-6", "transformer", seed=0)
    emb = enc.encode_audio(random_audio(1, 1.0))
    assert emb.shape == (1, enc.dim) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_clap_real_htsat_tiny_builds_offline():
    enc = ClapEncoder("HTSAT-tiny", "transformer", seed=0)
    assert enc.encode_audio(random_audio(1, 1.0)).shape == (1, 512)


# ---- VGGish --------------------------------------------------------------------------------------

# the torchvggish state-dict layout (vggish-10086976.pth)
VGGISH_LAYOUT = {
    "features.0.weight": (64, 1, 3, 3), "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3), "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3), "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3), "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3), "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3), "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288), "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096), "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096), "embeddings.4.bias": (128,),
}


def test_vggish_has_the_torchvggish_layout():
    model = VGGish()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == VGGISH_LAYOUT
    out = model(torch.randn(2, 1, 96, 64))
    assert out.shape == (2, 128) and (out >= 0).all()


def test_vggish_flattens_in_time_freq_channel_order():
    model = VGGish(**NARROW_VGGISH).eval()
    mel = torch.randn(2, 1, 96, 64)
    feats = model.features(mel)  # (N, C, 6, 4)
    n, c, t, f = feats.shape
    flat = torch.empty(n, t * f * c)
    for ti in range(t):
        for fi in range(f):
            for ci in range(c):
                flat[:, (ti * f + fi) * c + ci] = feats[:, ci, ti, fi]
    assert torch.allclose(model(mel), model.embeddings(flat), atol=1e-6)
    with pytest.raises(ValueError, match="96, 64"):
        model(torch.randn(2, 96, 64))


def test_vggish_weights_round_trip_and_errors(tmp_path):
    source = VGGish(**NARROW_VGGISH).eval()
    path = tmp_path / "vggish-10086976.pth"
    torch.save(source.state_dict(), path)
    loaded = VGGish(weights=path, **NARROW_VGGISH).eval()
    assert params_equal(loaded, source)
    mel = torch.randn(3, 1, 96, 64)
    assert torch.allclose(loaded(mel), source(mel))

    renamed = tmp_path / "renamed.pth"
    torch.save({k.replace("embeddings", "fc"): v for k, v in source.state_dict().items()}, renamed)
    with pytest.raises(EncoderWeightsError, match=r"renamed\.pth.*missing 6 keys.*unexpected 6 keys"):
        VGGish(weights=renamed, **NARROW_VGGISH)
    with pytest.raises(EncoderWeightsError, match="wrong shape"):
        VGGish(weights=path, channels=((4,), (8,), (8, 8), (16, 32)), hidden=32, embed_dim=8)
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        VGGish(weights=tmp_path / "missing.pth")


# ---- load() and text banks -----------------------------------------------------------------------


def test_class_phrases_and_prompts():
    assert class_phrase("baby_laughter") == "baby laughter"
    assert class_phrase("race-car__engine") == "race car engine"
    assert prompts("audio", ["male_speech"]) == ["An audio of male speech."]
    assert set(PROMPT_TEMPLATES) == {"video", "segment", "frame", "audio"}


def test_load_and_text_bank():
    encoders = load(TINY)
    assert isinstance(encoders.videoclip, VideoClipEncoder) and encoders.videoclip.clip is encoders.clip
    assert load(TINY).clip is not encoders.clip  # nothing cached between calls
    names = ["dog", "baby_laughter", "race-car"]
    bank = text_bank(encoders, names)
    assert set(bank) == set(PROMPT_TEMPLATES)
    dims = {"video": encoders.clip.dim, "segment": encoders.clip.dim, "frame": encoders.clip.dim}
    dims["audio"] = encoders.clap.dim
    for level, emb in bank.items():
        assert emb.shape == (3, dims[level]) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    frame = encoders.clip.encode_text(["A frame of baby laughter."])[0].numpy()
    np.testing.assert_allclose(bank["frame"][1], frame, atol=1e-6)
    audio = encoders.clap.encode_text(["An audio of race car."])[0].numpy()
    np.testing.assert_allclose(bank["audio"][2], audio, atol=1e-6)
    assert not np.allclose(bank["video"], bank["frame"])  # the templates differ, so do the prompts


@pytest.mark.parametrize("level", ["frame", "audio"])
def test_prompt_slots_splice_into_the_template(level, clip, clap, roberta_dir):
    towers = [clip] if level == "frame" else [clap, ClapEncoder(TINY.clap_amodel, "roberta", text_dir=str(roberta_dir))]
    for tower in towers:
        ids, slots = prompt_slots(tower, level, n_slots=3)
        assert ids.shape == (1, tower.context_length) and len(slots) == 3
        assert (slots.diff() > 0).all() and (ids[0, slots] == ids[0, slots[0]]).all()  # one placeholder id each
        # a pseudo-word equal to the embedding of a real word "Z" reproduces the prompt "… of Z."
        one_ids, one_slot = prompt_slots(tower, level, n_slots=1)
        z_prompt = prompts(level, ["Z"])[0]
        z_ids = tower.tokenize([z_prompt])
        assert ((z_ids != one_ids).nonzero()[:, 1] == one_slot).all()
        embeds = tower.token_embedding(one_ids)
        embeds[:, one_slot] = tower.token_embedding(z_ids[:, one_slot])
        assert torch.allclose(tower.encode_text_embeddings(embeds, one_ids), tower.encode_text([z_prompt]), atol=1e-5)


def test_register_config_leaves_no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a model config writes its JSON to a temporary folder that is gone afterwards (one per process
    used to pile up in /tmp), while the library keeps the config across later rescans."""
    import tempfile

    import open_clip

    from icf.encoders.clip import TINY_CLIP_CONFIG
    from icf.encoders.spec import register_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    register_config("icf-test-registered", TINY_CLIP_CONFIG, open_clip.list_models, open_clip.add_model_config)
    register_config("icf-test-registered-2", TINY_CLIP_CONFIG, open_clip.list_models, open_clip.add_model_config)
    assert list(tmp_path.iterdir()) == []
    assert {"icf-test-registered", "icf-test-registered-2"} <= set(open_clip.list_models())
    assert open_clip.get_model_config("icf-test-registered") == TINY_CLIP_CONFIG
