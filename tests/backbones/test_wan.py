"""The Wan 2.x adapter and its video codec against diffusers' own modules, called the way WanPipeline calls them."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.protocol import Backbone, TextCond
from avlink.backbones.wan import TEXT_TOKENS, WanBackbone
from avlink.codecs.wan_vae import WanVideoCodec
from avlink.config import DiTConfig, FusionConfig, ModelConfig, PretrainedConfig
from avlink.errors import UserError
from avlink.fusion.linked import AVLink
from avlink.sample import initial_noise, sample_backbone
from avlink.seq import AudioGeometry, ClipGeometry
from tiny_wan import TINY_WAN, tiny_wan_folder, tiny_wan_geometry

from helpers import randomize_backbone

TEXT_DIM = TINY_WAN["text_dim"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_wan_folder(tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def adapter(folder):
    return WanBackbone(PretrainedConfig(kind="wan", folder=str(folder)), tiny_wan_geometry()).eval()


def prompt(b, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter first prompt: its padding must count as WanPipeline's zeros
    return TextCond(torch.randn(b, length, TEXT_DIM, generator=g), mask)


def pipeline_context(text):
    """WanPipeline's prompt_embeds: each prompt's real states, then zeros to 512 tokens."""
    states = torch.where(text.mask[..., None], text.tokens, 0.0)
    return torch.nn.functional.pad(states, (0, 0, 0, TEXT_TOKENS - states.shape[1]))


def latent(b=2, frames=3, seed=1):
    return torch.randn(b, 4, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_loaded_adapter_equals_the_module_of_the_folder(folder, adapter):
    direct = WanTransformer3DModel.from_pretrained(folder / "transformer", use_safetensors=True)
    ours = adapter.module.state_dict()
    assert set(ours) == set(direct.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in direct.state_dict().items())
    assert isinstance(adapter, Backbone)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_velocity_is_minus_the_modules_prediction_at_sigma_one_minus_t(adapter, with_prompt):
    x, t = latent(), torch.tensor([0.25, 0.8])
    text = prompt(2) if with_prompt else None
    with torch.no_grad():
        ours = adapter(x, t, text)
        context = pipeline_context(text) if with_prompt else torch.zeros(2, TEXT_TOKENS, TEXT_DIM)
        theirs = adapter.module(x, timestep=(1 - t) * 1000, encoder_hidden_states=context).sample
    assert ours.shape == x.shape
    assert (ours + theirs).abs().max().item() <= 1e-6
    assert theirs.abs().max().item() > 0.1  # a prediction that is not zero, so the check means something


def test_null_text_is_the_all_zero_context_of_any_length(adapter):
    """One zero token and WanPipeline's 512 zero tokens give the same keys everywhere: the same velocity."""
    x, t = latent(), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        null = adapter(x, t, None)
        zeros = adapter.module(x, timestep=(1 - t) * 1000, encoder_hidden_states=torch.zeros(2, 1, TEXT_DIM)).sample
    assert (null + zeros).abs().max().item() <= 1e-6


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
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_token_times_and_eta_follow_the_causal_vae(adapter):
    """Latent frame 0 is pixel frame 0 alone; latent frame k >= 1 starts at pixel frame 1 + 4 (k - 1)."""
    times = adapter.token_times((4, 2, 3), torch.device("cpu"))
    assert times.dtype == torch.float64 and times.shape == (24,)
    assert times[::6].tolist() == [0.0, 1 / 16, 5 / 16, 9 / 16]
    assert torch.equal(times[:6], torch.zeros(6))  # every token of a frame shares its time
    assert adapter.eta == 4.0
    state = adapter.embed(latent(frames=4), torch.tensor([0.5, 0.5]))
    assert torch.equal(state.times, adapter.token_times(state.grid, torch.device("cpu")))


def test_untrained_link_reproduces_each_generator(adapter):
    """Zero-initialised Fusion Blocks: A2V gives Wan's own velocity, V2A (Wan conditioning) the audio DiT alone."""
    geometry = AudioGeometry(sample_rate=8000, hop_length=100, latent_downsample=1, latent_dim=4, n_fft=128,
                             win_length=128, n_mels=8)
    audio = AudioDiT(DiTConfig(dim=32, depth=2, heads=2, text_dim=8), geometry)
    randomize_backbone(audio)
    for blocks in (1, 2, 3):
        cfg = ModelConfig(name="wan-test", clip=ClipGeometry(duration=9 / 16, audio=geometry, video=adapter.geometry),
                          audio=audio.cfg, video=adapter.cfg, fusion=FusionConfig(dim=32, heads=2, num_blocks=blocks))
        model = AVLink(cfg, audio, adapter)
        video, sound = latent(), torch.randn(2, 45, 4, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([0.2, 0.7])
        text_v = prompt(2)
        text_a = TextCond(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
        with torch.no_grad():
            a2v = model(video, t, model.prepare("a2v", sound, text_gen=text_v, text_cond=text_a))
            v2a = model(sound, t, model.prepare("v2a", video, text_gen=text_a, text_cond=text_v))
            assert (a2v - adapter(video, t, text_v)).abs().max().item() <= 1e-6, blocks
            assert (v2a - audio(sound, t, text_a)).abs().max().item() <= 1e-6, blocks


def test_euler_sampling_matches_diffusers_flow_matching_euler(adapter):
    """Our Euler over t = 0 .. 1 and FlowMatchEulerDiscreteScheduler over sigma = 1 - t (shift 1) step the same
    straight path: on the same noise they end within 1e-4."""
    steps, shape, text = 6, (2, 4, 3, 2, 2), prompt(2)
    with torch.no_grad():
        ours = sample_backbone(adapter, shape, text=text, steps=steps, seed=3)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        sched.set_timesteps(sigmas=(1 - ts[:-1]).tolist())  # the scheduler appends its final sigma 0 itself
        assert torch.allclose(sched.sigmas.double(), 1 - ts, atol=1e-6)
        x = initial_noise(shape, 3)
        context = pipeline_context(text)
        for timestep in sched.timesteps:
            out = adapter.module(x, timestep=timestep.expand(2), encoder_hidden_states=context).sample
            x = sched.step(out, timestep, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


# -- the video codec ---------------------------------------------------------------------------------------------
def test_wan_codec_encodes_1_plus_4k_frames_to_normalised_latents_and_back(folder):
    from diffusers import AutoencoderKLWan

    codec = WanVideoCodec.load(folder, tiny_wan_geometry())
    pixels = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (1, 4, 3, 2, 2) and z.dtype == torch.float32
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", use_safetensors=True)
    mean = vae.encode(pixels).latent_dist.mean
    config = vae.config
    expected = (mean - torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)) / torch.tensor(
        config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, expected)
    out = codec.decode(z)
    assert out.shape == (1, 3, 9, 16, 16) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(AssertionError, match="1 \\+ 4 k frames"):
        codec.encode(pixels[:, :, :8])


def test_wan_codec_refuses_another_geometry(folder):
    other = tiny_wan_geometry().__class__(fps=16.0, height=16, width=16, patch=(1, 16, 16), codec="wan-vae",
                                          codec_stride=(4, 8), codec_channels=16)
    with pytest.raises(UserError, match=r"codec_channels 16 do not match this Wan VAE's \(4, 8\) and 4"):
        WanVideoCodec.load(folder, other)


def test_missing_or_pickled_folder_is_refused(tmp_path, folder):
    cfg = PretrainedConfig(kind="wan", folder=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere: no such folder; download Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers"):
        WanBackbone(cfg, tiny_wan_geometry())
    pickled = tmp_path / "pickled"
    (pickled / "transformer").mkdir(parents=True)
    (pickled / "transformer" / "config.json").write_text((folder / "transformer" / "config.json").read_text())
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"transformer: no \.safetensors weights \(pickled \.bin files are never"):
        WanBackbone(PretrainedConfig(kind="wan", folder=str(pickled)), tiny_wan_geometry())


def test_published_architectures_have_the_published_sizes():
    """Wan2.1-T2V-1.3B's transformer: 1,418,996,800 parameters built from its config on the meta device (the
    model card's "1.3B" rounds it; the 14B's is 14.29e9)."""
    geometry = tiny_wan_geometry().__class__(fps=16.0, height=480, width=832, patch=(1, 16, 16), codec="wan-vae",
                                             codec_stride=(4, 8), codec_channels=16)
    counts = {}
    for name in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"):
        with torch.device("meta"):
            wan = WanBackbone(PretrainedConfig(kind="wan", architecture=name), geometry)
        counts[name] = sum(p.numel() for p in wan.parameters())
        print(name, counts[name], wan.hidden_dim, wan.num_blocks)
    assert counts["Wan2.1-T2V-1.3B"] == 1_418_996_800
    assert 13.5e9 < counts["Wan2.1-T2V-14B"] < 14.5e9
