"""The system layer: one model factory, one checkpoint loader, the codecs the config names."""

import json

import numpy as np
import pytest
import torch

from avlink.backbones import BACKBONES, build_backbone
from avlink.checkpoint import load_config
from avlink.config import BACKBONE_CONFIGS
from avlink.pipeline import DEFAULT_CHECKPOINT
from avlink.system import CODECS, build_model, load_system, make_codecs
from avlink.weights import WeightsError

from helpers import random_checkpoint, tiny_config


def test_the_config_names_each_streams_backbone_kind_and_codec():
    cfg = tiny_config()
    assert (cfg.audio.kind, cfg.video.kind) == ("dit", "dit")
    assert (cfg.clip.audio.codec, cfg.clip.video.codec) == ("mel-vae", "pixels")
    assert set(BACKBONES) == set(BACKBONE_CONFIGS) and {cfg.clip.audio.codec, cfg.clip.video.codec} <= set(CODECS)
    model = build_model(cfg)
    assert isinstance(model.audio, BACKBONES["dit"]["audio"]) and isinstance(model.video, BACKBONES["dit"]["video"])


def test_a_config_written_before_kinds_existed_loads_as_dit(tmp_path):
    """A config.json that names no kinds or codecs (as checkpoints written before adapters existed) keeps loading,
    as our DiTs with our codecs, to the same config as the one that names them."""
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in ("kind", "codec", "codec_stride", "codec_channels")}

    old = strip(config)
    assert '"kind"' not in json.dumps(old) and '"codec"' not in json.dumps(old)
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = load_config(tmp_path / "config.json")
    assert cfg.audio.kind == "dit" and cfg.video.kind == "dit" and cfg.clip.video.codec == "pixels"
    assert cfg == load_config(DEFAULT_CHECKPOINT / "config.json")


def test_an_unknown_backbone_kind_or_codec_is_refused_in_one_line(tmp_path):
    folder = random_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["video"]["kind"] = "sora"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config.json: not an avlink model config \(unknown backbone kind 'sora'"):
        load_config(folder / "config.json")
    with pytest.raises(ValueError, match="no audio backbone of kind 'nope'"):
        build_backbone("audio", tiny_config().audio.__class__(kind="nope"), tiny_config().clip.audio)
    clip = tiny_config(**{"clip.video.codec": "latent"}).clip
    with pytest.raises(ValueError, match="unknown codec 'latent'"):
        make_codecs(clip, None)


def test_system_encodes_and_decodes_media(tmp_path):
    system = load_system(random_checkpoint(tmp_path / "ckpt"), vocoder="griffinlim")
    clip = system.clip
    frames = np.random.default_rng(0).integers(0, 256, (clip.num_frames, clip.video.height, clip.video.width, 3),
                                               dtype=np.uint8)
    x = system.encode("video", frames)
    assert x.shape == (1, 3, clip.num_frames, clip.video.height, clip.video.width) and x.dtype == torch.float32
    assert np.array_equal(system.decode("video", x)[0], frames)  # pixels: lossless at uint8
    wave = (0.3 * np.sin(np.arange(clip.num_samples) * 0.05)).astype(np.float32)
    latent = system.encode("audio", wave, clip.num_audio_tokens)
    assert latent.shape == (1, clip.num_audio_tokens, clip.audio.latent_dim)
    batch = system.encode("audio", np.stack([wave, wave]), clip.num_audio_tokens)
    torch.testing.assert_close(batch[1:], latent, rtol=0, atol=1e-5)  # a batch encodes each item alike
    sound = system.decode("audio", latent)
    assert sound.shape == (1, clip.num_audio_tokens * clip.audio.hop_length * clip.audio.latent_downsample)
    assert sound.dtype == np.float32 and np.abs(sound).max() <= 1.0


def test_no_prompt_is_the_learned_null_text(tmp_path):
    system = load_system(random_checkpoint(tmp_path / "ckpt"), vocoder=None)
    for prompt in (None, "", [""]):
        text = system.text(prompt, "video")
        assert torch.equal(text.tokens, system.model.video.null_text_cond(1).tokens)
    mixed = system.text(["a dog barks", " "], "audio")  # a batch where one row has no prompt
    alone = system.text("a dog barks", "audio")
    n = alone.tokens.shape[1]
    assert torch.equal(mixed.tokens[0, :n], alone.tokens[0]) and mixed.mask[0].sum() == n
    assert torch.equal(mixed.tokens[1, :1], system.model.audio.null_text_cond(1).tokens[0])
    assert mixed.mask[1].tolist() == [True] + [False] * (mixed.mask.shape[1] - 1)
    with pytest.raises(ValueError, match="without a vocoder"):
        system.decode("audio", torch.zeros(1, 4, system.clip.audio.latent_dim))


# --- the fast V2A set ---------------------------------------------------------------------------------------


def test_the_fast_set_links_the_same_generators_without_reinjection(tmp_path):
    from avlink.checkpoint import FAST_FUSION

    from helpers import add_fast_set

    folder = random_checkpoint(tmp_path / "ckpt")
    saved = add_fast_set(folder)
    system = load_system(folder, vocoder=None)
    fast = system.fast_link()
    assert fast.cfg.fusion.injection == "static" and system.model.cfg.fusion.injection == "fusion"
    assert fast.audio is system.model.audio and fast.video is system.model.video  # not loaded twice
    assert fast.has_task("v2a") and not fast.has_task("a2v")
    for key, value in saved.items():
        assert torch.equal(fast.fusion.state_dict()[key], value), key
    assert system.fast_link() is fast  # loaded once
    # The full set's file in its place is refused in one line naming it: it holds the reinjected outputs.
    (folder / FAST_FUSION).write_bytes((folder / "fusion.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"fusion-fast\.safetensors: tensors do not match"):
        load_system(folder, vocoder=None).fast_link()


def test_a_folder_without_the_fast_set_says_how_to_make_it_in_one_line(tmp_path):
    from avlink.errors import UserError

    folder = random_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UserError) as err:
        load_system(folder, vocoder=None).fast_link()
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{folder / 'fusion-fast.safetensors'}: not found")
    assert "avlink recipe --fusion-only" in text and "model.fusion.injection=static" in text


def test_the_fast_sets_overrides_come_from_its_file(tmp_path):
    """The overrides recorded in the file build the model; a file without them (an export copied in) is the
    no-reinjection set; overrides beyond the fusion settings are refused."""
    from safetensors.torch import load_file, save_file

    from avlink.checkpoint import FAST_FUSION, FAST_OVERRIDES, fast_overrides

    from helpers import add_fast_set

    folder = random_checkpoint(tmp_path / "ckpt")
    add_fast_set(folder)
    path = folder / FAST_FUSION
    assert fast_overrides(path) == FAST_OVERRIDES
    state = load_file(str(path))
    save_file(state, str(path), metadata={"part": "fusion"})
    assert fast_overrides(path) == FAST_OVERRIDES
    assert load_system(folder, vocoder=None).fast_link().cfg.fusion.injection == "static"
    save_file(state, str(path), metadata={"model_overrides": json.dumps({"audio.depth": 2})})
    with pytest.raises(WeightsError, match="fusion-fast.safetensors: its model_overrides metadata"):
        fast_overrides(path)
