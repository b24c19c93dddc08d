"""The video upsampler (upsampler.py): geometry, its building blocks, and that it learns."""

import math

import pytest
import torch

from avlink.config import get_preset
from avlink.flow.path import flow_matching_errors
from avlink.upsampler import (
    Upsampler,
    audio_envelope,
    noised_condition,
    pack,
    silence,
    unpack,
    upsample_linear,
    upsample_nearest,
)

from helpers import tiny_config

SMALL = {"upsampler.dim": 16, "upsampler.depth": 2}


def test_presets_output_geometry():
    tiny, paper = get_preset("tiny"), get_preset("paper")
    out = tiny.upsampler.output(tiny.clip.video)
    assert (out.width, out.height, out.fps) == (64, 64, 24.0)
    out = paper.upsampler.output(paper.clip.video)
    assert (out.width, out.height, out.fps) == (512, 288, 24.0)
    assert get_preset("small").upsampler.output(get_preset("small").clip.video).width == 512


def test_output_shape_and_zero_init():
    cfg = tiny_config(**SMALL)
    model = Upsampler(cfg.upsampler, cfg.clip.video)
    low = torch.rand(2, 3, 6, 16, 16) * 2 - 1
    x = torch.randn(2, 3, 24, 64, 64)
    v = model(x, torch.rand(2), low, torch.ones(2), silence(2, 24))
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # the output projection starts at zero
    with pytest.raises(AssertionError, match="does not fit"):
        model(torch.randn(2, 3, 24, 32, 32), torch.rand(2), low, torch.ones(2))


def test_pack_unpack_inverse_and_locality():
    x = torch.randn(2, 3, 8, 12, 16)
    packed = pack(x, (4, 4))
    assert packed.shape == (2, 3 * 64, 2, 3, 4)
    assert torch.equal(unpack(packed, (4, 4), 3), x)
    # one packed position holds exactly the 4x4x4 block over it
    assert torch.equal(packed[0, :, 1, 2, 3].sort().values, x[0, :, 4:8, 8:12, 12:16].flatten().sort().values)


def test_linear_upsampling_keeps_base_frames_at_their_times():
    low = torch.rand(1, 3, 5, 4, 4)
    up = upsample_linear(low, (4, 2))
    assert up.shape == (1, 3, 20, 8, 8)
    # frame 4j is base frame j (bilinear in space only); a constant frame stays constant
    space = upsample_linear(low[:, :, :1], (1, 2))[:, :, 0]
    assert torch.allclose(up[:, :, 0], space, atol=1e-6)
    flat = torch.full((1, 3, 3, 4, 4), 0.25)
    assert torch.allclose(upsample_linear(flat, (4, 4)), torch.full((1, 3, 12, 16, 16), 0.25))
    # halfway between two frames: their mean
    ramp = torch.zeros(1, 1, 2, 1, 1)
    ramp[:, :, 1] = 1
    assert upsample_linear(ramp, (4, 1))[0, 0, :, 0, 0].tolist() == [0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
    assert upsample_nearest(ramp, (4, 1))[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_audio_envelope_rises_at_the_first_frame_after_the_onset():
    sr, fps = 8000, 24.0

    def sound_from(onset: float) -> torch.Tensor:
        wave = torch.zeros(1, sr)
        start = int(onset * sr)
        wave[0, start:] = 0.5 * torch.sin(torch.arange(sr - start) * 0.3)
        return wave

    env = audio_envelope(sound_from(0.49), sr, fps, 24)  # between frame 11 (0.458 s) and frame 12 (0.5 s)
    assert env.shape == (1, 2, 24)
    level, rise = env[0]
    assert level[0] == pytest.approx(-1.0) and level[-1] == pytest.approx(math.log10(0.5 / math.sqrt(2)) / 2 + 1,
                                                                          abs=0.02)
    assert int(rise.argmax()) == 12  # the first frame that can show what made the sound
    assert int(audio_envelope(sound_from(0.51), sr, fps, 24)[0, 1].argmax()) == 13
    assert torch.equal(silence(1, 24)[0, 0], torch.full((24,), -1.0))


def test_training_steps_reduce_the_loss_on_one_batch():
    torch.manual_seed(0)
    cfg = tiny_config(**SMALL)
    model = Upsampler(cfg.upsampler, cfg.clip.video)
    low = torch.rand(4, 3, 2, 4, 4) * 2 - 1
    high = upsample_nearest(low, (4, 4))
    env = silence(4, 8)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(high.shape, generator=g)
    t = torch.full((4,), 0.5)
    cond_t = torch.ones(4)
    cond = noised_condition(low, cond_t)
    assert torch.equal(cond, low)  # cond_t 1: the base frames as they are

    def loss():
        return flow_matching_errors(lambda x, tt: model(x, tt, cond, cond_t, env), high, t, x0).mean()

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * first.item()


def test_the_objective_trains_on_a_trivial_batch():
    """UpsamplerObjective (crop, conditioning noise, the interpolated start): steps on one batch lower its loss,
    measured with the same random draws before and after."""
    from avlink.train.objectives import UpsamplerObjective

    torch.manual_seed(0)
    cfg = tiny_config(**SMALL, **{"upsampler.crop": (2, 4, 4)})
    objective = UpsamplerObjective(Upsampler(cfg.upsampler, cfg.clip.video))
    low = torch.randint(0, 256, (4, 3, 8, 8, 3), dtype=torch.uint8)
    batch = {"low": low, "high": low.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3),
             "envelope": silence(4, 12)}

    def measured() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return sum(objective.loss(batch).loss.item() for _ in range(4))

    before = measured()
    opt = torch.optim.Adam(objective.trainable.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        objective.loss(batch).loss.backward()
        opt.step()
    assert measured() < 0.8 * before


def _box(frames: torch.Tensor, ss: int) -> torch.Tensor:
    b, c, t, h, w = frames.shape
    pooled = torch.nn.functional.avg_pool2d(frames.transpose(1, 2).reshape(-1, c, h, w), ss)
    return pooled.reshape(b, t, c, h // ss, w // ss).transpose(1, 2)


def test_shifted_phase_shows_a_share_of_clips_early_or_late():
    """Training's base frames of a chosen clip become its output frames s (1 <= |s| <= phase_shift) output frames
    from their own times, box-filtered to the base size, plus whatever the decoded base frames differ by from
    that filter; phase_share 0 leaves every clip as it is."""
    from dataclasses import replace

    from avlink.train.objectives import shifted_phase

    cfg = replace(get_preset("tiny").upsampler, phase_share=1.0, phase_shift=2)
    high = torch.rand(8, 3, 24, 8, 8) * 2 - 1
    low = _box(high[:, :, ::4], 4)
    torch.manual_seed(0)
    moved = shifted_phase(low, high, cfg)
    seen = set()
    for i in range(8):
        shifts = [s for s in (-2, -1, 1, 2)
                  if torch.allclose(moved[i], _box(high[i:i + 1, :, (torch.arange(6) * 4 + s).clamp(0, 23)], 4)[0],
                                    atol=1e-6)]
        assert len(shifts) == 1, f"clip {i}: not one shift of its output frames"
        seen.add(shifts[0])
    assert len(seen) > 1
    offset = low + 0.01  # the decoded frames' own difference from the filter is kept
    torch.manual_seed(0)
    torch.testing.assert_close(shifted_phase(offset, high, cfg), (moved + 0.01).clamp(-1, 1))
    assert torch.equal(shifted_phase(low, high, replace(cfg, phase_share=0.0)), low)


def test_the_objective_drops_the_sound_for_its_share_of_clips():
    from avlink.train.objectives import UpsamplerObjective

    low = torch.randint(0, 256, (4, 3, 8, 8, 3), dtype=torch.uint8)
    batch = {"low": low, "high": low.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3),
             "envelope": torch.rand(4, 2, 12)}
    for share, expected in ((1.0, silence(4, 12)), (0.0, batch["envelope"])):
        cfg = tiny_config(**SMALL, **{"upsampler.crop": (3, 8, 8), "upsampler.audio_dropout": share})
        _, _, env = UpsamplerObjective(Upsampler(cfg.upsampler, cfg.clip.video)).crop(batch)
        assert torch.equal(env, expected)


def test_sampling_guides_on_the_sound():
    """One Euler step from the interpolated frames moves by v(silence) + s (v(sound) - v(silence)): scale 2 is
    twice the step with the sound less the step with silence, scale 1 the sound alone; no sound means no
    guidance, whatever the scale, and the config's audio_guidance is the default."""
    from avlink.sample import sample_upsampler

    torch.manual_seed(0)
    cfg = tiny_config(**SMALL)
    model = Upsampler(cfg.upsampler, cfg.clip.video).eval()
    torch.nn.init.normal_(model.proj_out.weight, std=0.1)
    for block in model.blocks:
        torch.nn.init.normal_(block.env.weight, std=0.3)
    low = torch.rand(1, 3, 2, 4, 4) * 2 - 1
    env = torch.rand(1, 2, 8) * 2 - 1

    def up(envelope, scale):
        with torch.no_grad():
            return sample_upsampler(model, low, envelope, steps=1, cond_scale=scale)

    heard, silent = up(env, 1.0), up(silence(1, 8), 1.0)
    assert not torch.allclose(heard, silent, atol=1e-4)
    torch.testing.assert_close(up(env, 2.0), 2 * heard - silent, atol=1e-5, rtol=0)
    torch.testing.assert_close(up(None, 3.0), silent, atol=0, rtol=0)
    default = cfg.upsampler.audio_guidance
    torch.testing.assert_close(up(env, None), silent + default * (heard - silent), atol=1e-5, rtol=0)


def test_packing_offsets_and_cycle_spinning():
    """An offset puts the base frames that many output frames into the packing's blocks (the clip padded in front
    by its first frame, behind by its last, and cut back): in a net that does not reach across blocks, a change
    of one output frame of x_t moves the output frames of its block, which offset 1 starts one frame earlier;
    with no offset the velocity is the mean over the config's spin offsets."""
    from dataclasses import replace

    from avlink.upsampler import pad_time, spin_offsets

    assert spin_offsets(4, 4) == [0, 1, 2, 3] and spin_offsets(4, 2) == [0, 2] and spin_offsets(4, 1) == [0]
    with pytest.raises(AssertionError, match="must divide"):
        spin_offsets(4, 3)
    with pytest.raises(ValueError, match="must divide the time scale 4"):
        replace(get_preset("tiny").upsampler, spin=3)
    z = torch.arange(3.0).reshape(1, 1, 3, 1, 1)
    assert pad_time(z, 2, 1).flatten().tolist() == [0, 0, 0, 1, 2, 2]

    torch.manual_seed(0)
    cfg = tiny_config(**{**SMALL, "upsampler.depth": 1})
    model = Upsampler(replace(cfg.upsampler, spin=2), cfg.clip.video).eval()
    torch.nn.init.normal_(model.proj_out.weight, std=0.1)
    block = model.blocks[0]  # made blind across blocks: no reach in time, no statistics over the clip
    torch.nn.init.normal_(block.ada.linear.bias, std=0.5)  # the block's gate open
    block.conv1 = torch.nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1))
    block.conv2 = torch.nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1))
    block.norm1 = block.norm2 = model.norm_out = torch.nn.Identity()
    low, env = torch.rand(1, 3, 4, 4, 4) * 2 - 1, torch.rand(1, 2, 16)
    x, t, ct = torch.randn(1, 3, 16, 16, 16), torch.rand(1), torch.ones(1)
    with torch.no_grad():
        v = {o: model(x, t, low, ct, env, o) for o in range(4)}
        changed = x.clone()
        changed[:, :, 5] += 1.0  # output frame 5: in block 1 (frames 4-7) at offset 0, (3-6) at offset 1
        for o, block in ((0, range(4, 8)), (1, range(3, 7))):
            moved = (model(changed, t, low, ct, env, o) - v[o]).abs().flatten(3).amax(-1)[0].amax(0)
            assert set(torch.nonzero(moved > 1e-6).flatten().tolist()) == set(block)
        torch.testing.assert_close(model(x, t, low, ct, env), (v[0] + v[2]) / 2)

