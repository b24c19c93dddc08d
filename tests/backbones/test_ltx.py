"""The LTX-Video adapter and its video codec against diffusers' own modules, called the way LTXPipeline calls them."""

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.ltx import TEXT_TOKENS, LTXBackbone, pack, unpack
from avlink.backbones.protocol import Backbone, TextCond
from avlink.codecs.ltx_vae import LTXVideoCodec
from avlink.config import DiTConfig, FusionConfig, ModelConfig, PretrainedConfig
from avlink.errors import UserError
from avlink.fusion.linked import AVLink
from avlink.sample import initial_noise, sample_backbone
from avlink.seq import AudioGeometry, ClipGeometry, VideoGeometry
from tiny_ltx import LATENT, TINY_LTX, tiny_ltx_folder, tiny_ltx_geometry

from helpers import randomize_backbone

TEXT_DIM = TINY_LTX["caption_channels"]
ROPE_SCALE = (8 / 25, 32, 32)  # LTXPipeline's rope_interpolation_scale at frame_rate 25 through an 8 x 32 VAE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_ltx_folder(tmp_path_factory.mktemp("ltx"))


@pytest.fixture(scope="module")
def adapter(folder):
    return LTXBackbone(PretrainedConfig(kind="ltx", folder=str(folder)), tiny_ltx_geometry()).eval()


def prompt(b, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter first prompt: its padding is masked, whatever states it holds
    return TextCond(torch.randn(b, length, TEXT_DIM, generator=g), mask)


def pipeline_prompt(text, seed=5):
    """LTXPipeline's prompt_embeds and mask: padded to 128 tokens of (here random) padding states, masked."""
    missing = TEXT_TOKENS - text.tokens.shape[1]
    pad = torch.randn(text.tokens.shape[0], missing, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return torch.cat([text.tokens, pad], 1), torch.nn.functional.pad(text.mask, (0, missing), value=False)


def latent(b=2, frames=3, seed=1):
    return torch.randn(b, LATENT, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


def pipeline_call(module, x, timestep, states, mask):
    """The transformer as LTXPipeline's denoising loop calls it, on (B, C, F, H, W) latents."""
    _, _, frames, height, width = x.shape
    out = module(hidden_states=LTXPipeline._pack_latents(x, 1, 1), encoder_hidden_states=states, timestep=timestep,
                 encoder_attention_mask=mask, num_frames=frames, height=height, width=width,
                 rope_interpolation_scale=ROPE_SCALE, return_dict=False)[0]
    return LTXPipeline._unpack_latents(out, frames, height, width, 1, 1)


def test_loaded_adapter_equals_the_module_of_the_folder(folder, adapter):
    direct = LTXVideoTransformer3DModel.from_pretrained(folder / "transformer", use_safetensors=True)
    ours = adapter.module.state_dict()
    assert set(ours) == set(direct.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in direct.state_dict().items())
    assert isinstance(adapter, Backbone)


@pytest.mark.parametrize(("p", "pt"), [(1, 1), (2, 1), (2, 2)])
def test_packing_is_ltx_pipelines(p, pt):
    x = torch.randn(2, 3, 4, 6, 4)
    tokens = pack(x, p, pt)
    assert torch.equal(tokens, LTXPipeline._pack_latents(x, p, pt))
    grid = (4 // pt, 6 // p, 4 // p)
    assert torch.equal(unpack(tokens, grid, p, pt), LTXPipeline._unpack_latents(tokens, *grid, p, pt))
    assert torch.equal(unpack(tokens, grid, p, pt), x)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_velocity_is_minus_the_modules_prediction_at_sigma_one_minus_t(adapter, with_prompt):
    x, t = latent(), torch.tensor([0.25, 0.8])
    text = prompt(2) if with_prompt else None
    with torch.no_grad():
        ours = adapter(x, t, text)
        states, mask = pipeline_prompt(text) if with_prompt else (torch.zeros(2, 1, TEXT_DIM), torch.ones(2, 1))
        theirs = pipeline_call(adapter.module, x, (1 - t) * 1000, states, mask)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert (ours + theirs).abs().max().item() <= 1e-6
    assert theirs.abs().max().item() > 0.1  # a prediction that is not zero, so the check means something


def test_the_mask_counts_and_an_empty_prompt_is_the_null_text(adapter):
    x, t, text = latent(), torch.tensor([0.5, 0.5]), prompt(2)
    with torch.no_grad():
        masked = adapter(x, t, text)
        unmasked = adapter(x, t, TextCond(text.tokens, torch.ones_like(text.mask)))
        empty = adapter(x, t, TextCond(text.tokens, torch.zeros_like(text.mask)))
        null = adapter(x, t, None)
    assert (masked[0] - unmasked[0]).abs().max().item() > 1e-3  # the first prompt's padding was masked out
    assert torch.equal(masked[1], unmasked[1])
    assert (empty - null).abs().max().item() <= 1e-6


def test_split_blocks_equal_one_pass(adapter):
    x, t, text = latent(), torch.tensor([0.3, 0.6]), prompt(2)
    with torch.no_grad():
        state = adapter.embed(x, t, text)
        whole = adapter.head(adapter.run_blocks(state, 0, adapter.num_blocks))
        for k in range(adapter.num_blocks + 1):
            split = adapter.run_blocks(adapter.run_blocks(state, 0, k), k, adapter.num_blocks)
            assert torch.equal(adapter.head(split), whole), k


def test_activation_checkpointing_gives_the_same_gradient(adapter):
    x, t, text = latent(), torch.tensor([0.3, 0.6]), prompt(2)
    grads = []
    for recompute in (False, True):
        adapter.activation_checkpointing = recompute
        state = adapter.embed(x, t, text)
        state = state.with_x(state.x.detach().requires_grad_())
        adapter.head(adapter.run_blocks(state, 0, adapter.num_blocks)).square().sum().backward()
        grads.append(state.x.grad)
    adapter.activation_checkpointing = False
    assert grads[0].abs().max().item() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_token_times_and_eta_follow_the_causal_vae(adapter):
    """Latent frame 0 is pixel frame 0 alone; latent frame k >= 1 starts at pixel frame 1 + 8 (k - 1)."""
    times = adapter.token_times((4, 2, 3), torch.device("cpu"))
    assert times.dtype == torch.float64 and times.shape == (24,)
    assert times[::6].tolist() == [0.0, 1 / 25, 9 / 25, 17 / 25]
    assert torch.equal(times[:6], torch.zeros(6))  # every token of a frame shares its time
    assert adapter.eta == 25 / 8
    state = adapter.embed(latent(frames=4), torch.tensor([0.5, 0.5]))
    assert torch.equal(state.times, adapter.token_times(state.grid, torch.device("cpu")))
    assert state.angles[0].shape == (1, 16, adapter.hidden_dim)  # RoPE once per geometry, not per sample


def test_untrained_link_reproduces_each_generator(adapter):
    """Zero-initialised Fusion Blocks: A2V gives LTX's own velocity, V2A (LTX conditioning) the audio DiT alone."""
    geometry = AudioGeometry(sample_rate=8000, hop_length=100, latent_downsample=1, latent_dim=4, n_fft=128,
                             win_length=128, n_mels=8)
    audio = AudioDiT(DiTConfig(dim=32, depth=2, heads=2, text_dim=8), geometry)
    randomize_backbone(audio)
    for blocks in (1, 2, 3):
        clip = ClipGeometry(duration=17 / 25, audio=geometry, video=adapter.geometry)
        cfg = ModelConfig(name="ltx-test", clip=clip, audio=audio.cfg, video=adapter.cfg,
                          fusion=FusionConfig(dim=32, heads=2, num_blocks=blocks))
        model = AVLink(cfg, audio, adapter)
        assert clip.num_frames == 17 and clip.video_shape == (LATENT, 3, 2, 2)
        video = latent()
        sound = torch.randn(2, clip.num_audio_tokens, 4, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([0.2, 0.7])
        text_v = prompt(2)
        text_a = TextCond(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
        with torch.no_grad():
            a2v = model(video, t, model.prepare("a2v", sound, text_gen=text_v, text_cond=text_a))
            v2a = model(sound, t, model.prepare("v2a", video, text_gen=text_a, text_cond=text_v))
            assert (a2v - adapter(video, t, text_v)).abs().max().item() <= 1e-6, blocks
            assert (v2a - audio(sound, t, text_a)).abs().max().item() <= 1e-6, blocks


def test_euler_sampling_matches_diffusers_flow_matching_euler(adapter):
    """Our Euler over t = 0 .. 1 and FlowMatchEulerDiscreteScheduler over sigma = 1 - t (shift 1) stepping the
    packed latents as LTXPipeline does: on the same noise they end within 1e-4."""
    steps, shape, text = 6, (2, LATENT, 3, 2, 2), prompt(2)
    with torch.no_grad():
        ours = sample_backbone(adapter, shape, text=text, steps=steps, seed=3)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        sched.set_timesteps(sigmas=(1 - ts[:-1]).tolist())  # the scheduler appends its final sigma 0 itself
        assert torch.allclose(sched.sigmas.double(), 1 - ts, atol=1e-6)
        x = LTXPipeline._pack_latents(initial_noise(shape, 3))
        states, mask = pipeline_prompt(text)
        for timestep in sched.timesteps:
            out = adapter.module(hidden_states=x, encoder_hidden_states=states, timestep=timestep.expand(2),
                                 encoder_attention_mask=mask, num_frames=3, height=2, width=2,
                                 rope_interpolation_scale=ROPE_SCALE).sample
            x = sched.step(out, timestep, x).prev_sample
    torch.testing.assert_close(ours, LTXPipeline._unpack_latents(x, 3, 2, 2), atol=1e-4, rtol=1e-4)


# -- the video codec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timestep_conditioning", [False, True])
def test_ltx_codec_encodes_1_plus_8k_frames_to_normalised_latents_and_back(tmp_path, timestep_conditioning):
    folder = tiny_ltx_folder(tmp_path, timestep_conditioning=timestep_conditioning)
    codec = LTXVideoCodec.load(folder, tiny_ltx_geometry())
    pixels = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (1, LATENT, 3, 2, 2) and z.dtype == torch.float32
    vae = AutoencoderKLLTXVideo.from_pretrained(folder / "vae", use_safetensors=True)
    assert vae.config.scaling_factor == 0.5 and vae.latents_std[0].item() == 0.5  # statistics that count
    stats = (vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    expected = LTXPipeline._normalize_latents(vae.encode(pixels).latent_dist.mean, *stats)
    torch.testing.assert_close(z, expected)
    out = codec.decode(z)
    assert out.shape == (1, 3, 17, 64, 64) and out.min() >= -1 and out.max() <= 1
    timestep = torch.zeros(1) if timestep_conditioning else None  # LTXPipeline's default decode_timestep 0.0
    with torch.no_grad():
        theirs = vae.decode(LTXPipeline._denormalize_latents(z, *stats), timestep).sample.clamp(-1, 1)
    torch.testing.assert_close(out, theirs)
    with pytest.raises(AssertionError, match="1 \\+ 8 k frames"):
        codec.encode(pixels[:, :, :16])


def test_ltx_codec_refuses_another_geometry(folder):
    other = VideoGeometry(fps=25.0, height=64, width=64, patch=(1, 32, 32), codec="ltx-vae", codec_stride=(4, 32),
                          codec_channels=LATENT)
    with pytest.raises(UserError, match=r"codec_stride \(4, 32\) and codec_channels 8 do not match this LTX VAE's "
                                        r"\(8, 32\) and 8"):
        LTXVideoCodec.load(folder, other)


def test_missing_or_pickled_folder_is_refused(tmp_path, folder):
    cfg = PretrainedConfig(kind="ltx", folder=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere: no such folder; download Lightricks/LTX-Video \(huggingface"):
        LTXBackbone(cfg, tiny_ltx_geometry())
    pickled = tmp_path / "pickled"
    (pickled / "transformer").mkdir(parents=True)
    (pickled / "transformer" / "config.json").write_text((folder / "transformer" / "config.json").read_text())
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"transformer: no \.safetensors weights \(pickled \.bin files are never"):
        LTXBackbone(PretrainedConfig(kind="ltx", folder=str(pickled)), tiny_ltx_geometry())
    with pytest.raises(UserError, match=r"vae: no config\.json"):
        LTXVideoCodec.load(pickled, tiny_ltx_geometry())


def test_published_architecture_has_the_published_size():
    """LTX-Video 0.9's transformer: 1,923,385,472 parameters built from its config on the meta device (the
    release's checkpoint is named "ltx-video-2b-v0.9": "2B" rounds it)."""
    geometry = VideoGeometry(fps=25.0, height=512, width=768, patch=(1, 32, 32), codec="ltx-vae", codec_stride=(8, 32),
                             codec_channels=128)
    with torch.device("meta"):
        ltx = LTXBackbone(PretrainedConfig(kind="ltx", architecture="LTX-Video-0.9"), geometry)
    count = sum(p.numel() for p in ltx.parameters())
    print("LTX-Video-0.9", count, ltx.hidden_dim, ltx.num_blocks)
    assert count == 1_923_385_472
    assert (ltx.hidden_dim, ltx.num_blocks, ltx.text_dim) == (2048, 28, 4096)


# --- linked through the system: registered kind, codec from the folder, the CLI -----------------------------


def test_ltx_links_with_stable_audio_through_the_checkpoint_folder_and_the_cli(tmp_path):
    """The registered kind end to end: a checkpoint folder naming an LTX folder (codec and text encoder read from
    it) and a Stable Audio Open folder, then `avlink v2a` and `avlink a2v` on files."""
    import numpy as np
    import soundfile

    from avlink.checkpoint import save_link
    from avlink.cli import main
    from avlink.data.media import probe, write_audio, write_video
    from avlink.system import build_model
    from tiny_stable_audio import tiny_stable_audio_folder, tiny_stable_audio_geometry
    from tiny_text import tiny_text_encoder

    ltx, sao = tiny_ltx_folder(tmp_path / "ltx"), tiny_stable_audio_folder(tmp_path / "sao")
    tiny_text_encoder(ltx, "t5", dim=TEXT_DIM)
    tiny_text_encoder(sao, "t5", dim=16)
    cfg = ModelConfig(name="tiny-ltx", clip=ClipGeometry(duration=9 / 25, audio=tiny_stable_audio_geometry(),
                                                          video=tiny_ltx_geometry()),
                      audio=PretrainedConfig(kind="stable-audio", folder=str(sao)),
                      video=PretrainedConfig(kind="ltx", folder=str(ltx)),
                      fusion=FusionConfig(dim=32, heads=2, num_blocks=2))
    model = build_model(cfg)
    assert isinstance(model.video, LTXBackbone)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    save_link(tmp_path / "ckpt", model)

    rng = np.random.default_rng(0)
    write_video(tmp_path / "in.mp4", rng.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8), 25.0)
    fast = ["--ckpt", str(tmp_path / "ckpt"), "--steps", "2", "--seed", "1"]
    assert main(["v2a", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "v.wav"), *fast]) == 0
    samples, rate = soundfile.read(tmp_path / "v.wav")
    assert rate == 8000 and abs(len(samples) / rate - 9 / 25) < 0.01 and np.abs(samples).max() > 0

    t = np.arange(2880) / 8000
    write_audio(tmp_path / "in.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    assert main(["a2v", str(tmp_path / "in.wav"), "-o", str(tmp_path / "a.mp4"), *fast]) == 0
    info = probe(tmp_path / "a.mp4")
    assert info.fps == 25 and abs(info.duration - 9 / 25) < 0.05


def test_the_ltx_sao_preset_counts_ltx_video_09s_parameters_on_the_meta_device():
    from avlink.config import get_preset
    from avlink.params import parameter_table

    table = parameter_table(get_preset("ltx-sao"))
    assert table["video backbone"]["trainable"] == 0
    assert 1.8e9 < table["video backbone"]["params"] < 2.1e9  # LTX-Video 0.9's 28-block transformer
