"""The Stable Audio Open adapter against diffusers' own modules, called the way StableAudioPipeline calls them."""

from dataclasses import replace

import pytest
import torch
from diffusers import EDMEulerScheduler
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from avlink.backbones.protocol import Backbone, TextCond
from avlink.backbones.stable_audio import PROMPT_TOKENS, StableAudioBackbone
from avlink.backbones.video_dit import VideoDiT
from avlink.codecs.oobleck import OobleckCodec
from avlink.config import DiTConfig, FusionConfig, ModelConfig, PretrainedConfig
from avlink.errors import UserError
from avlink.fusion.linked import AVLink
from avlink.sample import initial_noise, sample_backbone
from avlink.seq import AudioGeometry, ClipGeometry, VideoGeometry
from tiny_stable_audio import (
    TINY_SA,
    TINY_SA_PROJECTION,
    tiny_stable_audio_folder,
    tiny_stable_audio_geometry,
    tiny_stable_audio_parts,
)

from helpers import randomize_backbone

TEXT_DIM = TINY_SA_PROJECTION["text_encoder_dim"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_stable_audio_folder(tmp_path_factory.mktemp("stable-audio"))


@pytest.fixture(scope="module")
def adapter(folder):
    return StableAudioBackbone(PretrainedConfig(kind="stable-audio", folder=str(folder)),
                               tiny_stable_audio_geometry()).eval()


def prompt(b, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a shorter first prompt: its padding must not count
    return TextCond(torch.randn(b, length, TEXT_DIM, generator=g), mask)


def pipeline_conditions(adapter, text, seconds):
    """encode_prompt + encode_duration + the rotary embedding of StableAudioPipeline, for one batch; text None:
    its unconditional branch (zeros_like of the whole context, durations kept in the global state)."""
    projection, b = adapter.projection, 2
    out = projection(start_seconds=torch.zeros(b), end_seconds=torch.full((b,), seconds))
    first, last = out.seconds_start_hidden_states, out.seconds_end_hidden_states
    if text is None:
        states = torch.zeros(b, PROMPT_TOKENS, TINY_SA_PROJECTION["conditioning_dim"])
    else:  # the tokenizer pads to max_length; the pipeline masks after the projection
        tokens = torch.nn.functional.pad(text.tokens, (0, 0, 0, PROMPT_TOKENS - text.tokens.shape[1]))
        mask = torch.nn.functional.pad(text.mask, (0, PROMPT_TOKENS - text.mask.shape[1]))
        states = projection(text_hidden_states=tokens).text_hidden_states * mask[..., None]
    context = torch.cat([states, first, last], dim=1)
    if text is None:
        context = torch.zeros_like(context)
    return context, torch.cat([first, last], dim=2)


def reference_call(adapter, x_in, timestep, context, global_states):
    """The raw module, as the pipeline's denoising loop calls it: (B, Ta, C) in and out."""
    n = x_in.shape[1]
    rope = get_1d_rotary_pos_embed(TINY_SA["attention_head_dim"] // 2, n + 1, use_real=True,
                                   repeat_interleave_real=False)
    out = adapter.transformer(x_in.transpose(1, 2), timestep, encoder_hidden_states=context,
                              global_hidden_states=global_states, rotary_embedding=rope).sample
    return out.transpose(1, 2)


def edm_scheduler():
    """Stable Audio's preconditioning (sigma_data 1, v-prediction); EDMEulerScheduler's precondition_* are the
    ones CosineDPMSolverMultistepScheduler copies (that one needs torchsde, not installed)."""
    return EDMEulerScheduler(sigma_data=1.0, prediction_type="v_prediction")


def cosine_timestep(sigma):
    """CosineDPMSolverMultistepScheduler.precondition_noise: atan(sigma) / pi * 2."""
    return sigma.atan() / torch.pi * 2


def test_loaded_adapter_equals_the_modules_built_directly(adapter):
    assert isinstance(adapter, Backbone)
    parts = tiny_stable_audio_parts()
    for mine, theirs in ((adapter.transformer, parts["transformer"]), (adapter.projection, parts["projection_model"])):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert adapter.hidden_dim == 16 and adapter.num_blocks == 3 and adapter.text_dim == TEXT_DIM
    assert adapter.eta == 1000.0
    torch.testing.assert_close(adapter.token_times((4,), torch.device("cpu")),
                               torch.tensor([0.0, 0.001, 0.002, 0.003], dtype=torch.float64))


@pytest.mark.parametrize("with_prompt", [True, False])
def test_velocity_is_the_converted_v_prediction_of_the_module(adapter, with_prompt):
    """x_t = t x1 + (1 - t) x0 is t * x_ve with sigma = (1 - t) / t; the scheduler's preconditioning gives x1_hat,
    noise_hat = (x_ve - x1_hat) / sigma, and our velocity is x1_hat - noise_hat."""
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(2, 10, 4, generator=g), torch.tensor([0.3, 0.8])
    text = prompt(2) if with_prompt else None
    with torch.no_grad():
        v = adapter(x_t, t, text)
        context, global_states = pipeline_conditions(adapter, text, 10 / 1000)
        sched, t64 = edm_scheduler(), t.double()[:, None, None]
        sigma = (1 - t64) / t64
        x_ve = x_t.double() / t64
        model_in = sched.precondition_inputs(x_ve, sigma).float()
        out = reference_call(adapter, model_in, cosine_timestep(sigma.flatten()).float(), context, global_states)
        x1 = sched.precondition_outputs(x_ve, out.double(), sigma)
        expected = x1 - (x_ve - x1) / sigma
    assert v.dtype == x_t.dtype
    torch.testing.assert_close(v, expected.float(), atol=1e-6, rtol=1e-6)


def test_both_ends_of_the_path_are_finite(adapter):
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        assert torch.isfinite(adapter(x, torch.tensor([0.0, 1.0]), prompt(2))).all()


def test_null_text_is_the_pipelines_unconditional_branch(adapter):
    """The pipeline's unconditional context is 130 zero tokens, the null text one zero state: their keys are all
    alike (zero), so is every value, and the cross-attention output is zero for either count. The same zero
    tokens beside the two duration tokens would not be alike: the count of zero keys weighs in the softmax."""
    x, t = torch.randn(2, 8, 4), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        v_null = adapter(x, t, adapter.null_text_cond(2))
        torch.testing.assert_close(adapter(x, t, None), v_null)
        context, _ = pipeline_conditions(adapter, None, 8 / 1000)  # (B, 130, C) zeros
        state = adapter.embed(x, t, None)
        proj = adapter.transformer.cross_attention_proj

        def velocity_with(context):
            return adapter.head(adapter.run_blocks(replace(state, text=proj(context)), 0, adapter.num_blocks))

        torch.testing.assert_close(velocity_with(context), v_null, atol=1e-6, rtol=1e-6)
        # One zero token and L zero tokens beside the durations: different keys -> different outputs.
        durations = torch.randn(2, 2, context.shape[2])
        outs = [velocity_with(torch.cat([torch.zeros(2, n, context.shape[2]), durations], 1))
                for n in (1, PROMPT_TOKENS)]
        assert not torch.allclose(*outs, atol=1e-4)


def test_split_blocks_equal_one_pass(adapter):
    x, t, text = torch.randn(2, 7, 4), torch.tensor([0.2, 0.9]), prompt(2)
    with torch.no_grad():
        whole = adapter.run_blocks(adapter.embed(x, t, text), 0, adapter.num_blocks)
        assert whole.x.shape == (2, 7, adapter.hidden_dim) and whole.extra["prefix"].shape == (2, 1, 16)
        for k in range(adapter.num_blocks + 1):
            state = adapter.run_blocks(adapter.embed(x, t, text), 0, k)
            state = adapter.run_blocks(state, k, adapter.num_blocks)
            torch.testing.assert_close(state.x, whole.x, atol=0, rtol=0)
            torch.testing.assert_close(adapter.head(state), adapter.head(whole), atol=0, rtol=0)


def test_activation_checkpointing_gives_the_same_gradient(adapter):
    x, t = torch.randn(1, 5, 4, requires_grad=True), torch.tensor([0.5])
    grads = []
    for flag in (False, True):
        adapter.activation_checkpointing = flag
        x.grad = None
        adapter(x, t, prompt(1)).square().sum().backward()
        grads.append(x.grad.clone())
    adapter.activation_checkpointing = False
    torch.testing.assert_close(*grads)


def linked(folder, adapter):
    clip = ClipGeometry(duration=2 / 6, audio=tiny_stable_audio_geometry(),
                        video=VideoGeometry(fps=6, height=8, width=8, patch=(1, 4, 4)))
    video_cfg = DiTConfig(dim=32, depth=2, heads=2, text_dim=16)
    cfg = ModelConfig(name="sa-link", clip=clip, audio=PretrainedConfig(kind="stable-audio", folder=str(folder)),
                      video=video_cfg, fusion=FusionConfig(dim=16, heads=2, num_blocks=2))
    video = VideoDiT(video_cfg, clip.video)
    randomize_backbone(video)
    return AVLink(cfg, adapter, video), clip


def test_untrained_link_reproduces_each_generator(folder, adapter):
    model, clip = linked(folder, adapter)
    g = torch.Generator().manual_seed(2)
    audio = torch.randn(2, clip.num_audio_tokens, 4, generator=g)
    video = torch.randn(2, *clip.video_shape, generator=g)
    t = torch.tensor([0.3, 0.6])
    text_a, text_v = prompt(2), TextCond(torch.randn(2, 3, 16, generator=g), torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        cond = model.prepare("v2a", video, text_a, text_v)
        torch.testing.assert_close(model(audio, t, cond), adapter(audio, t, text_a), atol=1e-6, rtol=1e-6)
        cond = model.prepare("a2v", audio, text_v, None)  # the adapter conditions with no prompt
        torch.testing.assert_close(model(video, t, cond), model.video(video, t, text_v), atol=1e-6, rtol=1e-6)


def test_euler_sampling_matches_diffusers_euler_on_the_same_noise(adapter):
    """Our Euler on the straight path and the EDM Euler step in sigma are both exact for a constant x1
    prediction (DDIM), and x_t = t * x_ve, so from the same point they take the same step. Our grid starts at
    t = 0, sigma = inf, which no sigma schedule holds: both runs share our first step (0 -> 1 / steps), then the
    scheduler runs from sigma = (1 - t) / t of our grid down to sigma 0 (t = 1)."""
    steps, shape, text = 6, (2, 9, 4), prompt(2)
    with torch.no_grad():
        ours = sample_backbone(adapter, shape, text=text, steps=steps, seed=3)
        x0 = initial_noise(shape, 3)
        t1 = 1 / steps
        x = x0 + t1 * adapter(x0, torch.zeros(2), text)
        ts = torch.arange(1, steps, dtype=torch.float64) / steps
        sched = edm_scheduler()
        sched.set_timesteps(steps - 1)
        sched.sigmas = torch.cat([(1 - ts) / ts, torch.zeros(1, dtype=torch.float64)]).float()
        sched.set_begin_index(0)
        context, global_states = pipeline_conditions(adapter, text, 9 / 1000)
        sample = x / t1  # x_ve
        for i in range(steps - 1):
            sigma = sched.sigmas[i]
            model_in = sched.scale_model_input(sample, sched.timesteps[i])
            timestep = cosine_timestep(sigma).expand(2)
            out = reference_call(adapter, model_in, timestep, context, global_states)
            sample = sched.step(out, sched.timesteps[i], sample).prev_sample
    torch.testing.assert_close(ours, sample, atol=1e-4, rtol=1e-4)


# -- the Oobleck codec -----------------------------------------------------------------------------------------
def test_oobleck_codec_shapes(folder):
    clip = ClipGeometry(duration=0.01, audio=tiny_stable_audio_geometry())
    codec = OobleckCodec.load(folder, clip)
    assert codec.samples_per_token == 8
    wave = torch.rand(2, 80) * 2 - 1
    latent = codec.encode(wave)
    assert latent.shape == (2, 10, 4) and latent.dtype == torch.float32
    torch.testing.assert_close(codec.encode(wave), latent)  # the posterior mean: deterministic
    padded = codec.encode(wave, tokens=12)
    assert padded.shape == (2, 12, 4)
    assert codec.encode(wave, tokens=4).shape == (2, 4, 4)
    out = codec.decode(padded)
    assert out.shape == (2, 96) and out.dtype == torch.float32


def test_oobleck_codec_refuses_another_geometry(folder):
    clip = ClipGeometry(duration=0.01, audio=AudioGeometry(sample_rate=16000, hop_length=8, latent_downsample=1,
                                                           latent_dim=4, codec="oobleck"))
    with pytest.raises(UserError, match="rate 16000.*rate 8000") as err:
        OobleckCodec.load(folder, clip)
    assert "\n" not in str(err.value)


# -- folders and the published architecture -------------------------------------------------------------------
def test_missing_or_pickled_folder_is_refused(tmp_path):
    geometry = tiny_stable_audio_geometry()
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=f"{missing}.*stabilityai/stable-audio-open-1.0"):
        StableAudioBackbone(PretrainedConfig(kind="stable-audio", folder=str(missing)), geometry)
    pickled = tmp_path / "pickled"
    (pickled / "transformer").mkdir(parents=True)
    (pickled / "transformer" / "config.json").write_text("{}")
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=f"{pickled}.*no .safetensors.*stabilityai/stable-audio-open-1.0"):
        StableAudioBackbone(PretrainedConfig(kind="stable-audio", folder=str(pickled)), geometry)


def test_published_architecture_has_the_published_size():
    geometry = AudioGeometry(sample_rate=44100, hop_length=2048, latent_downsample=1, latent_dim=64, codec="oobleck")
    with torch.device("meta"):
        backbone = StableAudioBackbone(PretrainedConfig(kind="stable-audio"), geometry)
    count = sum(p.numel() for p in backbone.transformer.parameters())
    print(f"stable-audio-open-1.0 DiT: {count} parameters")
    # The Stable Audio Open paper (arXiv 2407.14358, Sec. 2) and the model card: a 1057M-parameter DiT.
    assert count == 1_056_939_136
    assert backbone.hidden_dim == 1536 and backbone.num_blocks == 24 and backbone.text_dim == 768
    assert abs(backbone.eta - 44100 / 2048) < 1e-12
