import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avlink import pipeline as pipeline_module
from avlink.codecs import audio as audio_codec
from avlink.config import PRESETS
from avlink.data import media
from avlink.errors import UserError
from avlink.pipeline import (
    FADE_SHARE,
    Pipeline,
    Window,
    bf16_matmul,
    check_precision,
    cross_fade,
    frame_windows,
    plan_windows,
    sampling_precision,
    window_hop,
)
from avlink.rank import Ranking
from avlink.sample import Known, sample_backbone, sample_link
from avlink.system import load_system

from helpers import random_checkpoint, tiny_link


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return Pipeline.load(folder, vocoder="griffinlim")


def test_windows_cover_the_input_with_overlap():
    windows = plan_windows(40, 16, 144, 58, 6.0, 22050 / 256 / 4)
    assert windows[0].frame == 0 and windows[-1].frame + 16 == 40
    assert windows[-1].token + 58 == 144
    for a, b in zip(windows, windows[1:], strict=False):
        assert 0 < b.frame - a.frame <= 12  # at least a quarter overlap
    assert plan_windows(10, 16, 50, 58, 6.0, 21.5) == plan_windows(16, 16, 58, 58, 6.0, 21.5)[:1]


def test_known_part_is_reproduced_exactly():
    model = tiny_link()
    shape = (1, *model.cfg.clip.latent_shape)
    values = torch.randn(shape)
    mask = torch.zeros(1, shape[1], 1, dtype=torch.bool)
    mask[:, :5] = True
    for method in ("euler", "heun"):
        x = sample_backbone(model.audio, shape, steps=4, method=method, known=Known(values, mask))
        assert torch.allclose(x[:, :5], values[:, :5], atol=1e-5)
        assert not torch.allclose(x[:, 5:], values[:, 5:])


def test_video_to_audio_any_length(pipe):
    for frames in (4, pipe.clip.num_frames, 2 * pipe.clip.num_frames + 3):
        video = np.random.default_rng(0).integers(0, 255, (frames, *pipe.size, 3), dtype=np.uint8)
        wave = pipe.video_to_audio(video, steps=2)
        assert wave.shape == (round(frames / pipe.fps * pipe.sample_rate),) and wave.dtype == np.float32
        assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0


def test_baseline_ignores_the_video(pipe):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 255, (pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8) for _ in range(2))
    assert np.array_equal(pipe.video_to_audio(a, steps=2, fusion=False), pipe.video_to_audio(b, steps=2, fusion=False))
    assert not np.array_equal(pipe.video_to_audio(a, steps=2), pipe.video_to_audio(b, steps=2))


def test_long_audio_windows_continue_each_other(pipe):
    seconds = 2.5 * pipe.clip_seconds
    wave = np.random.default_rng(2).standard_normal(round(seconds * pipe.sample_rate)).astype(np.float32) * 0.1
    frames = pipe.audio_to_video(wave, steps=2, prompt="a drum is hit")
    assert frames.shape == (round(seconds * pipe.fps), *pipe.size, 3) and frames.dtype == np.uint8


# --- long inputs as they decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_windows_of_a_stream_are_those_of_the_whole(preset):
    """frame_windows cuts, from frames as they come, the windows plan_windows places over the whole input, with
    the same frames and audio tokens; each is cut as soon as the frame after it has come (no later)."""
    clip = PRESETS[preset].clip
    fps, eta, win, win_tokens = clip.video.fps, clip.audio.eta, clip.num_frames, clip.num_audio_tokens
    hop = window_hop(win, fps, eta)
    fake = SimpleNamespace(clip=clip, fps=fps)
    for total in range(1, 5 * win):
        taken = []

        def source(total, taken):
            for index in range(total):
                taken.append(index)
                yield np.full((1, 1, 1), index)

        got = []
        for w in frame_windows(source(total, taken), win, hop):
            assert len(taken) == (w.frame + win + 1 if w.total is None else total)
            got.append(Pipeline._window_start(fake, w))
            assert got[-1].frame == w.frame
            assert w.frames[:, 0, 0, 0].tolist() == [min(w.frame + i, total - 1) for i in range(win)]
        used = max(total, win)
        plan = plan_windows(used, win, max(clip.audio.num_tokens(used / fps), win_tokens), win_tokens, fps, eta)
        assert got == plan, total


@pytest.mark.parametrize("preset", list(PRESETS))
def test_window_audio_starts_within_a_token_of_its_video_and_says_by_how_much(preset):
    """Every window's audio starts less than a token from its first frame (under half a token before the last),
    its offset is that difference in seconds, and the windows reach the input's last frame and last token."""
    clip = PRESETS[preset].clip
    fps, eta, win, win_tokens = clip.video.fps, clip.audio.eta, clip.num_frames, clip.num_audio_tokens
    for total in range(win, 10 * win):
        tokens = max(clip.audio.num_tokens(total / fps), win_tokens)
        windows = plan_windows(total, win, tokens, win_tokens, fps, eta)
        for i, w in enumerate(windows):
            assert w.offset == pytest.approx(w.token / eta - w.frame / fps, abs=1e-12)
            assert abs(w.offset) * eta < (0.5 + 1e-9 if i < len(windows) - 1 else 1.0), (total, w)
        assert windows[-1].frame + win == total and windows[-1].token + win_tokens >= tokens


def spy_on_sampling(monkeypatch):
    calls = []
    real = pipeline_module.sample_link

    def spy(model, task, x_cond, **kwargs):
        calls.append(SimpleNamespace(x_cond=x_cond, **kwargs))
        return real(model, task, x_cond, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_link", spy)
    return calls


def test_each_a2v_window_conditions_on_its_own_clip_encoded_alone(pipe, monkeypatch):
    """A2V encodes each window's audio as training encodes a clip: that window's samples alone (silence past the
    end), not a slice of one pass over the whole wave; each window samples its own noise stream and tells the
    Fusion Blocks where its audio starts."""
    calls = spy_on_sampling(monkeypatch)
    clip, audio = pipe.clip, pipe.clip.audio
    wave = (0.3 * np.sin(np.arange(round(2.3 * pipe.clip_seconds * pipe.sample_rate)) * 0.02)).astype(np.float32)
    pipe.audio_to_video(wave, steps=1)
    frames = round(wave.shape[0] / pipe.sample_rate * pipe.fps)
    windows = plan_windows(frames, clip.num_frames, audio.num_tokens(frames / pipe.fps), clip.num_audio_tokens,
                           pipe.fps, audio.eta)
    assert len(calls) == len(windows) >= 3 and windows[-1].offset != 0
    for i, (call, w) in enumerate(zip(calls, windows, strict=True)):
        first = w.token * audio.hop_length * audio.latent_downsample
        alone = np.zeros(clip.num_samples, np.float32)
        part = wave[first:first + clip.num_samples]
        alone[:part.shape[0]] = part
        torch.testing.assert_close(call.x_cond, pipe.system.encode("audio", alone, clip.num_audio_tokens))
        assert call.window == i and call.seed == 0 and call.audio_start == w.offset


def test_each_v2a_window_tells_where_its_audio_starts(pipe, monkeypatch):
    calls = spy_on_sampling(monkeypatch)
    total = 2 * pipe.clip.num_frames + 3
    pipe.video_to_audio(np.zeros((total, *pipe.size, 3), np.uint8), steps=1, seed=4)
    clip = pipe.clip
    windows = plan_windows(total, clip.num_frames, clip.audio.num_tokens(total / pipe.fps), clip.num_audio_tokens,
                           pipe.fps, clip.audio.eta)
    assert [(c.window, c.seed, c.audio_start) for c in calls] == [(i, 4, w.offset) for i, w in enumerate(windows)]
    assert windows[-1].offset != 0


def test_guidance_without_a_prompt_is_not_run(pipe, monkeypatch):
    """Guidance compares the prompt with the null text: with no prompt there is nothing to compare, so a scale
    above 1 costs no second evaluation per step and gives the unguided sample."""
    from avlink.fusion.linked import AVLink

    batches = []
    forward = AVLink.forward

    def counting(self, x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(AVLink, "forward", counting)
    frames = np.random.default_rng(1).integers(0, 255, (pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
    plain = pipe.video_to_audio(frames, steps=2)
    assert batches == [1, 1]
    guided = pipe.video_to_audio(frames, steps=2, cfg_scale=3.0)
    assert batches == [1, 1, 1, 1] and np.array_equal(plain, guided)
    wave = (0.1 * np.random.default_rng(2).standard_normal(pipe.sample_rate)).astype(np.float32)
    video = pipe.audio_to_video(wave, steps=2, cfg_scale=3.0)
    assert batches == [1] * 6 and np.array_equal(video, pipe.audio_to_video(wave, steps=2))


def test_a_long_video_is_generated_holding_a_window_of_frames(pipe, monkeypatch):
    """V2A of frames as they come holds at most a window and a hop of them at any time (each frame of the source
    is a new array; those alive are counted at every window), whatever the input's length."""
    import weakref

    made, peak = [], []
    win, total = pipe.clip.num_frames, 6 * pipe.clip.num_frames
    hop = window_hop(win, pipe.fps, pipe.clip.audio.eta)

    def source():
        rng = np.random.default_rng(0)
        for _ in range(total):
            frame = rng.integers(0, 255, (*pipe.size, 3), dtype=np.uint8)
            made.append(weakref.ref(frame))
            yield frame

    sample = pipeline_module.sample_link

    def counting(*args, **kwargs):
        peak.append(sum(ref() is not None for ref in made))
        return sample(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_link", counting)
    wave = pipe.video_to_audio(source(), steps=1)
    assert wave.shape == (round(total / pipe.fps * pipe.sample_rate),)
    assert len(peak) == len(plan_windows(total, win, 1000, 1, pipe.fps, pipe.clip.audio.eta)) > 5
    assert max(peak) <= win + hop + 1, peak


def test_a_streamed_video_gives_the_sound_of_the_whole_read(pipe, tmp_path):
    frames = np.random.default_rng(3).integers(0, 255, (2 * pipe.clip.num_frames + 5, *pipe.size, 3), np.uint8)
    media.write_video(tmp_path / "in.mp4", frames, pipe.fps)
    whole = pipe.read_video(tmp_path / "in.mp4")
    assert whole.shape == frames.shape
    assert np.array_equal(pipe.video_to_audio(pipe.stream_video(tmp_path / "in.mp4"), steps=1),
                          pipe.video_to_audio(whole, steps=1))


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="missing config.json"):
        Pipeline.load(tmp_path)


def test_frames_are_upscaled_while_written_to_even_sizes(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 1), dtype=np.uint8)
    frames = grey.repeat(3, axis=-1)  # no colour: yuv420p's shared chroma cannot blur the block edges
    media.write_video(tmp_path / "big.mp4", frames, 6.0, scale=3, crf=0)
    info = media.probe(tmp_path / "big.mp4")
    assert (info.height, info.width) == (16, 22)
    big = media.read_video(tmp_path / "big.mp4", 6.0).frames
    # nearest neighbour: each source pixel a 3x3 block of its value (up to the yuv round trip at crf 0)
    assert np.abs(big[0, :15, :21].astype(int) - frames[0].repeat(3, 0).repeat(3, 1)).max() <= 3


class FrameVocoder(torch.nn.Module):
    """A stand-in vocoder with no context of its own: each mel frame's mean, held for a hop of samples."""

    def __init__(self, hop: int):
        super().__init__()
        self.hop = hop

    def forward(self, mel):
        return mel.mean(1).repeat_interleave(self.hop, dim=-1)


class LocalVAE:
    """A stand-in VAE whose every output frame depends on its own input frame alone (the real one's GroupNorms
    take statistics over the whole sequence): chunked and one-pass runs must then agree."""

    def __init__(self, vae):
        self.ds, self.n_mels, self.dim = vae.downsample, vae.n_mels, vae.latent_dim

    def decode(self, z):  # (1, T, D) -> (1, n_mels, T * ds)
        return torch.tanh(z.mean(-1))[:, None, :].repeat_interleave(self.ds, -1).expand(-1, self.n_mels, -1)

    def encode(self, mel):  # (1, n_mels, F) -> .mean (1, F / ds, D)
        pooled = mel.mean(1).unflatten(-1, (-1, self.ds)).mean(-1)
        return SimpleNamespace(mean=pooled[..., None].expand(-1, -1, self.dim))

    def scale_latent(self, z):
        return z

    unscale_latent = scale_latent


@pytest.mark.parametrize("vocoder", ["frames", "hifigan"])
def test_the_codec_window_by_window_matches_one_pass_for_a_local_codec(tmp_path, monkeypatch, vocoder):
    """The audio codec runs one window of tokens at a time (memory follows the window); with a codec whose
    outputs are local, the seams do not show: the margin covers the STFT's and HiFi-GAN's context."""
    system = load_system(random_checkpoint(tmp_path / "ckpt"), vocoder="griffinlim" if vocoder == "frames"
                         else "hifigan")
    hop, window = system.clip.audio.hop_length, system.clip.num_audio_tokens
    codec = system.codec("audio")
    codec.vae = LocalVAE(codec.vae)
    if vocoder == "frames":
        codec.vocoder = FrameVocoder(hop)
    tokens = 3 * window + 5
    latent = torch.randn(1, tokens, system.clip.audio.latent_dim, generator=torch.Generator().manual_seed(0))
    wave = (0.5 * np.sin(np.arange(tokens * 4 * hop) * 0.01)).astype(np.float32)
    with torch.no_grad():
        chunked = system.decode("audio", latent)[0], system.encode("audio", wave, tokens)
        chunks = audio_codec.codec_chunks
        monkeypatch.setattr(audio_codec, "codec_chunks", lambda n, size, margin=None: chunks(n, n, margin))
        whole = system.decode("audio", latent)[0], system.encode("audio", wave, tokens)
    assert len(list(chunks(tokens, window))) == 4
    assert whole[0].shape == chunked[0].shape == (tokens * 4 * hop,)
    # float32 arithmetic in another order; HiFi-GAN's context beyond the margin is negligible, not nothing
    atol = 1e-5 if vocoder == "frames" else 1e-3 * np.abs(whole[0]).max()
    assert np.abs(whole[0]).max() > 0.01  # not silence (decode clips to [-1, 1])
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=atol)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-5)


def test_one_window_is_decoded_in_one_pass(tmp_path):
    system = load_system(random_checkpoint(tmp_path / "ckpt"), vocoder="griffinlim")
    codec = system.codec("audio")
    latent = torch.randn(1, system.clip.num_audio_tokens, system.clip.audio.latent_dim)
    with torch.no_grad():
        expected = np.clip(codec.vocoder(codec.vae.decode(codec.vae.unscale_latent(latent)))[0].numpy(), -1, 1)
        assert np.array_equal(system.decode("audio", latent)[0], expected)


# --- precision ----------------------------------------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not bf16_matmul("cpu"), reason="this CPU has no bf16 matrix instructions")


def test_default_precision_is_fp32(pipe):
    assert pipe.precision == "fp32"
    assert isinstance(sampling_precision("fp32", "cpu"), contextlib.nullcontext)


@needs_bf16
def test_bf16_sampling_is_close_to_fp32_and_returns_fp32():
    """The network runs in bf16 (its products are bf16 under autocast) while the sample stays fp32."""
    model = tiny_link()
    video = torch.rand(1, *model.cfg.clip.video_shape) * 2 - 1
    out = {}
    for precision in ("fp32", "bf16"):
        with sampling_precision(precision, "cpu"):
            out[precision] = sample_link(model, "v2a", video, steps=4, seed=5)
            product = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        assert product.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert out["bf16"].dtype == torch.float32 and out["bf16"].shape == out["fp32"].shape
    diff = (out["bf16"] - out["fp32"]).abs().max().item()
    assert 0 < diff < 0.05 * out["fp32"].abs().max().item(), f"bf16 vs fp32 max difference {diff}"


@needs_bf16
def test_pipeline_in_bf16_matches_fp32_loosely(pipe, tmp_path):
    bf16 = Pipeline(pipe.system, precision="bf16")
    wave = np.random.default_rng(3).standard_normal(round(pipe.clip_seconds * pipe.sample_rate))
    wave = (0.1 * wave).astype(np.float32)
    a, b = pipe.audio_to_video(wave, steps=3), bf16.audio_to_video(wave, steps=3)
    assert a.shape == b.shape and b.dtype == np.uint8
    gap = np.abs(a.astype(int) - b.astype(int))
    assert gap.max() > 0 and gap.mean() < 2.0, f"bf16 frames differ by {gap.mean():.2f} levels on average"
    frames = np.random.default_rng(4).integers(0, 255, (pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
    sound = bf16.video_to_audio(frames, steps=3)
    assert sound.dtype == np.float32 and sound.shape == pipe.video_to_audio(frames, steps=3).shape


def test_bf16_refused_in_one_line_without_bf16_matmul(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx2": True})
    assert not bf16_matmul("cpu")
    with pytest.raises(UserError, match="--precision bf16: this CPU has no bf16 matrix instructions"):
        Pipeline.load(tmp_path, precision="bf16")  # refused before the (missing) checkpoint is looked at
    with pytest.raises(UserError, match="choose fp32 or bf16"):
        check_precision("fp16", "cpu")
    check_precision("fp32", "cpu")


def test_frames_enter_and_leave_the_video_flow_through_its_scaling(tmp_path, monkeypatch):
    """V2A conditions on the video codec's encoding of the frames; A2V turns the flow's video back with it."""
    import avlink.pipeline as pipeline_module

    pipe = Pipeline.load(random_checkpoint(tmp_path, **{"clip.video.shift": -0.5, "clip.video.scale": 0.25}),
                         vocoder="griffinlim")
    geometry = pipe.clip.video
    frames = np.random.default_rng(0).integers(0, 256, (pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
    seen = {}
    real = pipeline_module.sample_link

    def spy(model, task, x_cond, **kwargs):
        seen[task] = x_cond
        return real(model, task, x_cond, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample_link", spy)
    pipe.video_to_audio(frames, steps=1)
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert torch.allclose(seen["v2a"][0], (pixels + 0.5) / 0.25)

    def constant(model, task, x_cond, **kwargs):  # the flow's video: 1.0 everywhere -> pixel -0.25 -> 96
        return torch.ones(1, 3, pipe.clip.num_frames, *pipe.size)

    monkeypatch.setattr(pipeline_module, "sample_link", constant)
    out = pipe.audio_to_video(np.zeros(pipe.sample_rate, np.float32), steps=1)
    assert geometry.shift == -0.5 and (out == round((1.0 * 0.25 - 0.5 + 1) * 127.5)).all()


@pytest.fixture(scope="module")
def fast_pipe(tmp_path_factory):
    from helpers import add_fast_set

    folder = random_checkpoint(tmp_path_factory.mktemp("ckpt-fast"))
    add_fast_set(folder)
    return Pipeline.load(folder, vocoder="griffinlim")


def count_calls(monkeypatch, backbone, names=("embed", "run_blocks")):
    """How often each of a backbone's methods runs (an instance attribute shadows the class's method)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(backbone, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(backbone, name, counted, raising=False)
    return counts


def test_fast_v2a_samples_the_static_set_in_fewer_steps_with_the_video_stream_once_per_window(fast_pipe, monkeypatch):
    from avlink.pipeline import FAST_STEPS

    assert fast_pipe.has_fast and FAST_STEPS == 8
    frames = np.random.default_rng(3).integers(0, 255, (2 * fast_pipe.clip.num_frames, *fast_pipe.size, 3),
                                               dtype=np.uint8)
    windows = len(plan_windows(frames.shape[0], fast_pipe.clip.num_frames,
                               fast_pipe.clip.audio.num_tokens(frames.shape[0] / fast_pipe.fps),
                               fast_pipe.clip.num_audio_tokens, fast_pipe.fps, fast_pipe.clip.audio.eta))
    assert windows > 1
    calls = spy_on_sampling(monkeypatch)
    video = count_calls(monkeypatch, fast_pipe.model.video)
    audio = count_calls(monkeypatch, fast_pipe.model.audio, ("embed",))
    fast = fast_pipe.video_to_audio(frames, fast=True)
    assert len(calls) == windows and all(c.steps == FAST_STEPS for c in calls)
    assert audio["embed"] == windows * FAST_STEPS  # one network evaluation per step: unguided by default
    points = len(fast_pipe.system.fast_link().points)
    # The video stream: embedded once per window, its blocks run up to each fusion point once per window.
    assert video == {"embed": windows, "run_blocks": windows * (1 + points)}
    # The full set runs the video stream's blocks at every step.
    video.update(embed=0, run_blocks=0)
    audio["embed"] = 0
    full = fast_pipe.video_to_audio(frames, steps=FAST_STEPS, link_scale=1.0)  # unguided, as the fast set
    assert audio["embed"] == windows * FAST_STEPS and video["run_blocks"] > windows * FAST_STEPS
    assert np.isfinite(fast).all() and not np.array_equal(fast, full)
    fast_pipe.video_to_audio(frames[: fast_pipe.clip.num_frames], fast=True, steps=3)
    assert calls[-1].steps == 3  # --steps still rules


def test_fast_needs_the_fast_set_and_fusion(pipe, fast_pipe):
    frames = np.zeros((pipe.clip.num_frames, *pipe.size, 3), np.uint8)
    assert not pipe.has_fast
    with pytest.raises(UserError, match=r"fusion-fast\.safetensors: not found"):
        pipe.video_to_audio(frames, fast=True, steps=1)
    with pytest.raises(UserError, match="--no-fusion"):
        fast_pipe.video_to_audio(frames, fast=True, fusion=False, steps=1)


# --- best-of-N -----------------------------------------------------------------------------------------------


def spy_on_ranking(monkeypatch, scores=None):
    """Record every call of the ranker; `scores(window)` replaces its scores where given."""
    calls = []
    real = pipeline_module.sync_scores

    def spy(*args, **kwargs):
        calls.append(SimpleNamespace(args=args, kwargs=kwargs))
        return real(*args, **kwargs) if scores is None else scores(len(calls) - 1)

    monkeypatch.setattr(pipeline_module, "sync_scores", spy)
    return calls


def test_one_candidate_is_generation_without_best_of_n(pipe, monkeypatch):
    calls = spy_on_ranking(monkeypatch)
    frames = np.random.default_rng(3).integers(0, 255, (pipe.clip.num_frames + 3, *pipe.size, 3), dtype=np.uint8)
    wave = (0.1 * np.random.default_rng(4).standard_normal(pipe.sample_rate)).astype(np.float32)
    ranking = []
    assert np.array_equal(pipe.video_to_audio(frames, steps=2, candidates=1, ranking=ranking),
                          pipe.video_to_audio(frames, steps=2))
    assert np.array_equal(pipe.audio_to_video(wave, steps=2, candidates=1, ranking=ranking),
                          pipe.audio_to_video(wave, steps=2))
    assert calls == [] and ranking == [], "one candidate is not ranked"


def test_v2a_keeps_the_best_candidate_and_records_every_score(pipe, monkeypatch):
    """Three candidates sampled as one batch; the ranker gets the window's frames and the three decoded sounds, and
    nothing else; the output is the candidate it scored best, and every score is recorded."""
    calls = spy_on_ranking(monkeypatch, scores=lambda window: [0.1, 0.9, 0.3])
    batches = spy_on_sampling(monkeypatch)
    frames = np.random.default_rng(5).integers(0, 255, (pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
    ranking = []
    wave = pipe.video_to_audio(frames, steps=2, candidates=3, ranking=ranking)
    assert [b.x_cond.shape[0] for b in batches] == [3] and batches[0].rows == "candidates"
    assert ranking == [Ranking(0, (0.1, 0.9, 0.3), 1)]
    (call,) = calls
    task, conditioning, candidates, fps, rate, audio_start, scorer = call.args
    assert call.kwargs == {} and (task, fps, rate, audio_start) == ("v2a", pipe.fps, pipe.sample_rate, 0.0)
    assert scorer is None, "a folder without sync.safetensors ranks by AV-Align"
    assert np.array_equal(conditioning, frames) and len(candidates) == 3
    n = wave.shape[0]
    gaps = [np.abs(wave - c[:n]).max() for c in candidates]
    assert gaps[1] < 1e-4 < min(gaps[0], gaps[2]), f"the output is not the kept candidate: {gaps}"


def test_each_window_continues_from_the_kept_candidate(pipe, monkeypatch):
    """Windowed continuation pins a window's overlap to what the window before kept, not to its candidate 0."""
    calls = spy_on_ranking(monkeypatch, scores=lambda window: [0.0, 0.0, 1.0])
    sampled = []  # (the known part as the window was given it, its candidates)
    real = pipeline_module.sample_link

    def spy(*args, known=None, **kwargs):
        given = None if known is None else Known(known.values.clone(), known.mask.clone())  # views of the output
        sampled.append((given, real(*args, known=known, **kwargs)))
        return sampled[-1][1]

    monkeypatch.setattr(pipeline_module, "sample_link", spy)
    total = 2 * pipe.clip.num_frames
    pipe.video_to_audio(np.random.default_rng(6).integers(0, 255, (total, *pipe.size, 3), dtype=np.uint8),
                        steps=2, candidates=3)
    clip = pipe.clip
    windows = plan_windows(total, clip.num_frames, clip.audio.num_tokens(total / pipe.fps), clip.num_audio_tokens,
                           pipe.fps, clip.audio.eta)
    assert len(calls) == len(sampled) == len(windows) >= 2
    (known, _), (_, before) = sampled[1], sampled[0]
    overlap = clip.num_audio_tokens - windows[1].token
    n = int(known.mask.sum())  # V2A pins the overlap's first part (FADE_SHARE)
    assert n == overlap - int(overlap * FADE_SHARE) > 0 and bool(known.mask[0, :n].all())
    pinned = known.values[0, :n]
    torch.testing.assert_close(pinned, before[2, windows[1].token:windows[1].token + n].float())
    assert not torch.allclose(pinned, before[0, windows[1].token:windows[1].token + n].float())


def test_cross_fade_blends_the_span_from_one_window_to_the_next():
    before, after = torch.zeros(1, 8, 2), torch.ones(1, 8, 2)
    out = cross_fade(before, after, 2, 5)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1, 1]))
    torch.testing.assert_close(cross_fade(before, after, 0, 0), after)


def test_v2a_windows_meet_in_a_cross_fade_of_their_latents(pipe, monkeypatch):
    """The second window pins the first part of its overlap; over the rest the decoded latent blends the first
    window's tokens into the second's, and after the overlap it is the second window's own."""
    made, decoded = [], []
    real_sample, real_decode = pipeline_module.sample_link, pipe.system.decode

    def spy_sample(*args, **kwargs):
        made.append(real_sample(*args, **kwargs).float().clone())
        return made[-1]

    def spy_decode(modality, latent):
        decoded.append(latent.clone())
        return real_decode(modality, latent)

    monkeypatch.setattr(pipeline_module, "sample_link", spy_sample)
    monkeypatch.setattr(pipe.system, "decode", spy_decode)
    total = pipe.clip.num_frames + window_hop(pipe.clip.num_frames, pipe.fps, pipe.clip.audio.eta)  # two windows
    pipe.video_to_audio(np.random.default_rng(3).integers(0, 255, (total, *pipe.size, 3), dtype=np.uint8), steps=2)
    clip = pipe.clip
    windows = plan_windows(total, clip.num_frames, clip.audio.num_tokens(total / pipe.fps), clip.num_audio_tokens,
                           pipe.fps, clip.audio.eta)
    assert len(made) == len(windows) == 2 and len(decoded) == 1
    start, overlap = windows[1].token, clip.num_audio_tokens - windows[1].token
    fade = int(overlap * FADE_SHARE)
    assert fade >= 2
    first, second, latent = made[0][0], made[1][0], decoded[0][0]
    span = slice(start + overlap - fade, start + overlap)
    share = torch.arange(1, fade + 1)[:, None] / (fade + 1)
    torch.testing.assert_close(latent[span], (1 - share) * first[span] + share * second[overlap - fade:overlap])
    torch.testing.assert_close(latent[:start + overlap - fade], first[:start + overlap - fade])
    torch.testing.assert_close(latent[start + overlap:], second[overlap:])
    assert not torch.allclose(first[span], second[overlap - fade:overlap]), "the two windows agree: nothing faded"


def test_a2v_keeps_the_best_candidate_of_each_window(pipe, monkeypatch):
    calls = spy_on_ranking(monkeypatch, scores=lambda window: [0.2, 0.1, 0.7] if window == 0 else [0.5, 0.5, 0.1])
    seconds = 1.5 * pipe.clip_seconds
    wave = (0.1 * np.random.default_rng(7).standard_normal(round(seconds * pipe.sample_rate))).astype(np.float32)
    ranking = []
    frames = pipe.audio_to_video(wave, steps=2, candidates=3, ranking=ranking)
    assert [(r.window, r.kept) for r in ranking] == [(0, 2), (1, 0)]
    first = calls[0].args
    assert first[0] == "a2v" and np.array_equal(first[1], pipe.window_wave(wave, Window(0, 0)))
    candidates = first[2]
    assert len(candidates) == 3 and all(c.shape == (pipe.clip.num_frames, *pipe.size, 3) for c in candidates)
    n = pipe.clip.num_frames - (len(frames) - pipe.clip.num_frames)  # frames of window 0 that window 1 leaves
    head = frames[:n].astype(int)
    gaps = [np.abs(head - c[:n].astype(int)).max() for c in candidates]
    assert gaps[2] <= 1 < min(gaps[0], gaps[1]), f"the output is not the kept candidate: {gaps}"



def test_guided_continuation_changes_only_what_follows_the_first_window(pipe):
    """--continuation guided: the first window has nothing to continue and is the replaced one's; every later
    window keeps its overlap pinned, so the frames up to the first window's end are the same, and the rest is
    steered by the guidance. The defaults: guided at GUIDANCE_WEIGHT for A2V, replace for V2A. A bad pair of
    settings is refused in one line."""
    seconds = 2.5 * pipe.clip_seconds
    wave = np.random.default_rng(4).standard_normal(round(seconds * pipe.sample_rate)).astype(np.float32) * 0.1
    replaced = pipe.audio_to_video(wave, steps=2, continuation="replace")
    guided = pipe.audio_to_video(wave, steps=2, continuation="guided", guidance=50.0)
    first = pipe.clip.num_frames
    assert np.array_equal(guided[:first], replaced[:first])
    assert not np.array_equal(guided[first:], replaced[first:])
    default = pipe.audio_to_video(wave, steps=2)
    assert np.array_equal(default, pipe.audio_to_video(wave, steps=2, continuation="guided",
                                                       guidance=pipeline_module.GUIDANCE_WEIGHT["a2v"]))
    assert not np.array_equal(default, replaced)
    video = np.random.default_rng(5).integers(0, 255, (2 * pipe.clip.num_frames, *pipe.size, 3), dtype=np.uint8)
    assert np.array_equal(pipe.video_to_audio(video, steps=2), pipe.video_to_audio(video, steps=2,
                                                                                   continuation="replace"))
    one = wave[:round(pipe.clip_seconds * pipe.sample_rate)]
    assert np.array_equal(pipe.audio_to_video(one, steps=2), pipe.audio_to_video(one, steps=2, continuation="replace"))
    with pytest.raises(UserError, match="--guidance applies to --continuation guided only"):
        pipe.audio_to_video(one, steps=2, continuation="replace", guidance=1.0)
    with pytest.raises(UserError, match="--guidance must be a positive number, got -1"):
        pipe.video_to_audio(np.zeros((4, *pipe.size, 3), np.uint8), steps=2, continuation="guided", guidance=-1.0)
