"""Published generators linked end to end (Wan 2.x video, Stable Audio Open audio, tiny random instances in
their diffusers folders): the checkpoint folder, loading, V2A and A2V through the CLI, fusion training through the
CLI, the link learning alignment, and parameter counts of the full-size architectures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile
import torch

from avlink.backbones.stable_audio import StableAudioBackbone
from avlink.backbones.wan import WanBackbone
from avlink.checkpoint import save_link
from avlink.cli import main
from avlink.codecs.oobleck import OobleckCodec
from avlink.codecs.wan_vae import WanVideoCodec
from avlink.config import PretrainedConfig, get_preset
from avlink.data.media import probe, read_audio, write_audio, write_video
from avlink.errors import UserError
from avlink.fusion.linked import fusion_points
from avlink.params import parameter_table
from avlink.system import build_model, checkpoint_files, load_system
from pretrained_link import DURATION, tiny_pretrained_config, tiny_pretrained_folders
from tiny_stable_audio import tiny_stable_audio_geometry
from tiny_wan import tiny_wan_geometry

FAST = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="module")
def ckpt(root):
    """A checkpoint folder of the tiny pretrained link with Fusion Blocks that are not the identity."""
    model = build_model(tiny_pretrained_config(root))
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    folder = root / "ckpt"
    save_link(folder, model)
    return folder


def test_the_checkpoint_holds_the_fusion_blocks_and_names_each_generators_folder(ckpt, root):
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "fusion.safetensors"]
    config = json.loads((ckpt / "config.json").read_text())
    wan, sao = tiny_pretrained_folders(root)
    assert (config["video"]["kind"], config["video"]["folder"]) == ("wan", str(wan))
    assert (config["audio"]["kind"], config["audio"]["folder"]) == ("stable-audio", str(sao))
    system = load_system(ckpt, vocoder=None)
    assert checkpoint_files(system.cfg) == ("config.json", "fusion.safetensors")
    assert isinstance(system.model.video, WanBackbone) and isinstance(system.model.audio, StableAudioBackbone)
    assert isinstance(system.codecs["video"], WanVideoCodec) and isinstance(system.codecs["audio"], OobleckCodec)
    # the generators' weights are the folders' own, not initial ones
    from safetensors.torch import load_file

    saved = load_file(next((wan / "transformer").glob("*.safetensors")))
    name, tensor = next(iter(saved.items()))
    torch.testing.assert_close(system.model.video.module.state_dict()[name], tensor, rtol=0, atol=0)
    # each stream prompts through its own generator's text encoder, padded to its pipeline's length
    text_v, text_a = system.text("a dog barks", "video"), system.text("a dog barks", "audio")
    assert text_v.tokens.shape[-1] == system.model.video.text_dim
    assert text_a.tokens.shape[-1] == system.model.audio.text_dim


def test_a_missing_generator_folder_is_one_line_naming_what_to_download(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["video"]["folder"] = str(tmp_path / "nowhere")
    moved = tmp_path / "ckpt"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps(config))
    (moved / "fusion.safetensors").write_bytes((ckpt / "fusion.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"nowhere: no such folder; download Wan-AI/Wan2\.1-T2V"):
        load_system(moved, vocoder=None)


def test_v2a_and_a2v_run_end_to_end_through_the_cli(ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    video = tmp_path / "in.mp4"
    write_video(video, rng.integers(0, 256, (20, 24, 20, 3), dtype=np.uint8), 10.0)  # 2 s at 10 fps: 4 windows
    (tmp_path / "out").mkdir()
    assert main(["v2a", str(video), "--ckpt", str(ckpt), "-o", str(tmp_path / "out" / "v.wav"), *FAST]) == 0
    wav = tmp_path / "out" / "v.wav"
    samples, rate = soundfile.read(wav)
    assert rate == 8000 and abs(len(samples) / rate - 2.0) < 0.01 and np.isfinite(samples).all()
    assert np.abs(samples).max() > 0  # the decoded sound, not silence

    sound = tmp_path / "in.wav"
    t = np.arange(16000) / 8000
    write_audio(sound, (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 0.25 < 0.05)).astype(np.float32), 8000)
    assert main(["a2v", str(sound), "--ckpt", str(ckpt), "-o", str(tmp_path / "out" / "a.mp4"), *FAST]) == 0
    info = probe(tmp_path / "out" / "a.mp4")
    assert abs(info.duration - 2.0) < 0.1 and info.fps == 16
    audio = read_audio(tmp_path / "out" / "a.mp4", 8000)
    assert audio.samples.shape[0] > 0
    # A causal video codec has no overlap frames: the A2V default (guided) falls back to replace; asked for, guided
    # is refused in one line.
    out = tmp_path / "out" / "g.mp4"
    capsys.readouterr()
    assert main(["a2v", str(sound), "--ckpt", str(ckpt), "-o", str(out), "--continuation", "guided", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("avlink a2v: --continuation guided: this checkpoint's video codec")
    assert not out.exists()


def test_fusion_points_map_the_paper_blocks_onto_wan_and_stable_audio_depths():
    """8 Fusion Blocks between Wan 2.1 1.3B (30 blocks) and Stable Audio Open (24 blocks): every point inside
    both stacks, strictly increasing, the last after each final block."""
    points = fusion_points(get_preset("wan-sao").fusion, 24, 30)
    audio, video = zip(*points, strict=True)
    assert len(points) == 8 and list(audio) == sorted(set(audio)) and list(video) == sorted(set(video))
    assert points[-1] == (24, 30) and all(a > 0 and v > 0 for a, v in points)


def test_full_size_architectures_count_their_parameters_on_the_meta_device(capsys):
    table = parameter_table(get_preset("wan-sao"))
    video, audio = table["video backbone"]["params"], table["audio backbone"]["params"]
    fusion = table["fusion v2a (8 blocks)"]["params"]
    assert table["video backbone"]["trainable"] == 0 and table["audio backbone"]["trainable"] == 0
    assert 1.2e9 < video < 1.6e9  # Wan2.1-T2V-1.3B's transformer
    assert 0.9e9 < audio < 1.3e9  # stable-audio-open-1.0's DiT and its duration conditioners
    assert 1e8 < fusion < 3e8  # the paper's 8 blocks at width 768, between 1536-wide streams
    assert main(["params", "--preset", "wan-sao"]) == 0
    assert "video backbone" in capsys.readouterr().out


def test_a_streams_kind_set_on_the_command_line_starts_its_settings_afresh():
    cfg = get_preset("tiny").override(**{"video.kind": "wan", "video.folder": "/weights/wan"})
    assert cfg.video == PretrainedConfig(kind="wan", folder="/weights/wan")
    assert cfg.audio.kind == "dit"


def event_pairs(cfg, n: int, seed: int):
    """n (audio latent, video latent) pairs whose sound follows the picture: one latent frame of each video is
    bright, and the audio tokens of that frame's time are high, the rest low. Returns (audio, video, events)."""
    g = torch.Generator().manual_seed(seed)
    c, frames, h, w = cfg.clip.video_shape
    tokens, dim = cfg.clip.latent_shape
    events = torch.randint(frames, (n,), generator=g)
    video = torch.randn(n, c, frames, h, w, generator=g) * 0.1
    video[torch.arange(n), :, events] += 1.0
    times = torch.arange(tokens) / cfg.clip.audio.eta  # each audio token's start, seconds
    stride, fps = cfg.clip.video.codec_stride[0], cfg.clip.video.fps
    starts = torch.tensor([0.0] + [(1 + stride * (k - 1)) / fps for k in range(1, frames)] + [float("inf")])
    inside = (times[None] >= starts[events][:, None]) & (times[None] < starts[events + 1][:, None])  # (n, Ta)
    audio = torch.where(inside[:, :, None], 0.8, -0.8).expand(n, tokens, dim).clone()
    return audio + 0.05 * torch.randn(audio.shape, generator=g), video, events


def test_fusion_training_between_the_two_learns_which_video_goes_with_which_sound(root):
    """The check that showed our own DiTs' link learns, on the published architectures: after training V2A Fusion
    Blocks on matched pairs, the held-out loss of matched pairs falls below that of mismatched pairs (each sound
    with a video whose event is elsewhere), from equal at init (zero-initialised blocks ignore the video)."""
    cfg = tiny_pretrained_config(root)
    # Latents are drawn here, so the tiny audio VAE's rate need not hold. At its 1000 tokens per second a clip has
    # 562 audio tokens against 3 video tokens, and the blocks' joint attention did not find the video in 300 steps
    # (held-out matched and mismatched within 1%); at 125 per second (70 tokens) matched fell below 0.4x
    # mismatched within 300 steps for each of 3 initial seeds.
    cfg = replace(cfg, clip=replace(cfg.clip, audio=replace(cfg.clip.audio, hop_length=64)))
    torch.manual_seed(0)
    model = build_model(cfg, tasks=("v2a",))
    audio, video, events = event_pairs(cfg, 16, seed=1)
    others = video[torch.tensor([int(torch.nonzero(events != e)[0]) for e in events])]

    def held_out(v):
        with torch.no_grad():
            return model.loss("v2a", audio, v, generator=torch.Generator().manual_seed(7)).item()

    before = held_out(video), held_out(others)
    assert before[0] == pytest.approx(before[1], abs=1e-6)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for step in range(300):
        a, v, _ = event_pairs(cfg, 8, seed=100 + step)
        loss = model.loss("v2a", a, v)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    matched, shuffled = held_out(video), held_out(others)
    print(f"held-out loss: matched {matched:.4f}, mismatched {shuffled:.4f} (both {before[0]:.4f} at init)")
    assert matched < 0.5 * shuffled


def test_fusion_trains_through_the_cli_on_a_config_naming_the_folders_then_generates(root, tmp_path):
    """`avlink train fusion --config link.yaml` where the YAML names each stream's kind and folder and the clip
    geometry: the data is prepared at that geometry (waves kept for the audio codec), the export holds the config
    and the Fusion Blocks, and `avlink v2a --ckpt` runs on it."""
    import yaml

    from avlink.data.syncbench import synth

    wan, sao = tiny_pretrained_folders(root)
    synth(tmp_path / "sb", n=4, seed=0, split="train", preset="tiny")
    audio, video = tiny_stable_audio_geometry(), tiny_wan_geometry()
    model = {"video.kind": "wan", "video.folder": str(wan), "audio.kind": "stable-audio", "audio.folder": str(sao),
             "clip.duration": DURATION, "fusion.dim": 32, "fusion.heads": 2, "fusion.num_blocks": 2,
             **{f"clip.video.{k}": list(v) if isinstance(v, tuple) else v for k, v in vars(video).items()},
             **{f"clip.audio.{k}": v for k, v in vars(audio).items()}}
    config = tmp_path / "link.yaml"
    config.write_text(yaml.safe_dump({"model": model}, sort_keys=False))
    out = tmp_path / "run"
    data = f"syncbench:{tmp_path}/sb:train"
    assert main(["train", "fusion", "--task", "v2a", "--config", str(config), "--data", data, "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    assert manifest["geometry"]["video"]["codec"] == "wan-vae" and manifest["geometry"]["audio"]["sample_rate"] == 8000
    export = out / "export"
    assert {p.name for p in export.iterdir()} >= {"config.json", "fusion.safetensors", "fusion.card.json"}
    card = json.loads((export / "fusion.card.json").read_text())
    assert card["captions"] == {"prompt_free": 0.5, "generated_dropout": 0.1}
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.random.default_rng(1).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8), 16.0)
    (tmp_path / "gen").mkdir()
    assert main(["v2a", str(clip), "--ckpt", str(export), "-o", str(tmp_path / "gen" / "clip.wav"), *FAST]) == 0
    assert soundfile.info(tmp_path / "gen" / "clip.wav").samplerate == 8000
