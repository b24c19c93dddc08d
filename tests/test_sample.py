from contextlib import contextmanager

import numpy as np
import pytest
import torch

from avlink.backbones.protocol import TextCond
from avlink.flow.path import interpolate
from avlink.flow.solvers import solve
from avlink.sample import Known, constrain, generated_shape, sample_backbone, sample_batches, sample_link

from helpers import tiny_batch, tiny_link


def text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, 3, 16, generator=g), torch.ones(b, 3, dtype=torch.bool))


def test_generated_length_covers_the_condition():
    model = tiny_link()
    audio, video = tiny_batch(model.cfg)
    assert generated_shape(model, "v2a", video) == audio.shape
    assert generated_shape(model, "a2v", audio) == video.shape
    # any length: 12 frames at 6 fps = 2 s of audio
    long_video = torch.zeros(1, 3, 12, 16, 16)
    assert generated_shape(model, "v2a", long_video)[1] == model.cfg.clip.audio.num_tokens(2.0)


def test_untrained_link_samples_what_the_backbone_samples():
    """Zero gates: V2A sampling equals T2A sampling from the same noise, step for step."""
    model = tiny_link()
    audio, video = tiny_batch(model.cfg, b=1)
    linked = sample_link(model, "v2a", video, text_gen=text(1), steps=4, seed=7, cfg_scale=2.0)
    alone = sample_backbone(model.audio, tuple(audio.shape), text=text(1), steps=4, seed=7, cfg_scale=2.0)
    torch.testing.assert_close(linked, alone, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_by_seed_and_varies_with_it():
    model = tiny_link()
    _, video = tiny_batch(model.cfg, b=1)
    a = sample_link(model, "v2a", video, steps=3, seed=1)
    b = sample_link(model, "v2a", video, steps=3, seed=1)
    c = sample_link(model, "v2a", video, steps=3, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    audio, _ = tiny_batch(model.cfg, b=1)
    assert sample_link(model, "a2v", audio, steps=2, method="heun").shape == video.shape


# --- the cache against the plain path --------------------------------------------------------------------------


def trained_link(**overrides):
    """A tiny link whose fusion gates are open, so that the conditioning stream reaches the output."""
    model = tiny_link(**overrides)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return model


def some_known(x_shape, seed=0):
    """The first third of the generated sample's time axis fixed (V2A: latent tokens; A2V: frames)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(x_shape, generator=g)
    mask = torch.zeros(x_shape, dtype=torch.bool)
    if len(x_shape) == 3:
        mask[:, : x_shape[1] // 3] = True
    else:
        mask[:, :, : x_shape[2] // 3] = True
    return Known(values, mask)


def condition_and_generated(model, task):
    audio, video = tiny_batch(model.cfg, b=2)
    return (video, audio) if task == "v2a" else (audio, video)


@pytest.mark.parametrize("known", [False, True])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("injection", ["fusion", "static"])
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_cached_sampling_equals_the_plain_path(task, injection, cfg_scale, known):
    model = trained_link(**{"fusion.injection": injection})
    x_cond, x_gen = condition_and_generated(model, task)
    # Prompts of different lengths: guidance pads the shorter one (the null text is one token).
    kwargs = {"text_gen": text(2, seed=1), "text_cond": text(2, seed=2), "steps": 3, "cfg_scale": cfg_scale,
              "seed": 5, "known": some_known(tuple(x_gen.shape)) if known else None}
    fast = sample_link(model, task, x_cond, **kwargs)
    plain = sample_link(model, task, x_cond, cache=False, **kwargs)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    # The conditioning stream and the prompt each change the result, so the comparison covers both.
    assert not torch.allclose(fast, sample_link(model, task, x_cond * 0, **kwargs), atol=1e-3)
    assert not torch.allclose(fast, sample_link(model, task, x_cond, **{**kwargs, "text_gen": text(2, 3)}),
                              atol=1e-3)


@pytest.mark.parametrize("known", [False, True])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_backbone_sampling_equals_the_plain_path(cfg_scale, known):
    model = tiny_link()
    audio, _ = tiny_batch(model.cfg, b=2)
    shape = tuple(audio.shape)
    kwargs = {"text": text(2), "steps": 3, "cfg_scale": cfg_scale, "seed": 2,
              "known": some_known(shape) if known else None}
    fast = sample_backbone(model.audio, shape, **kwargs)
    torch.testing.assert_close(fast, sample_backbone(model.audio, shape, cache=False, **kwargs),
                               atol=1e-5, rtol=1e-5)
    # No prompt: the null text is prepared once instead.
    torch.testing.assert_close(sample_backbone(model.audio, shape, steps=2),
                               sample_backbone(model.audio, shape, steps=2, cache=False), atol=1e-5, rtol=1e-5)


class Calls:
    """Counts forward calls of modules."""

    def __init__(self, modules):
        self.count = 0
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, *_):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("injection", ["fusion", "static"])
def test_the_cache_skips_the_prefix_and_the_text_keys_and_values(injection, cfg_scale):
    """Over a V2A sample of 4 Euler steps: the video stream's first block and every text key/value projection
    run once per sample with the cache, once per step without it."""
    model = trained_link(**{"fusion.injection": injection})
    _, video = tiny_batch(model.cfg, b=1)
    steps, last_video_point = 4, model.points[-1][1]
    kv_layers = [b.cross.kv for b in model.audio.blocks] + [b.cross.kv for b in model.video.blocks]
    counts = {}
    for cache in (True, False):
        first_video, evals, kv = Calls([model.video.blocks[0]]), Calls([model.audio.blocks[0]]), Calls(kv_layers)
        sample_link(model, "v2a", video, text_gen=text(1), steps=steps, cfg_scale=cfg_scale, cache=cache)
        counts[cache] = (first_video.count, evals.count, kv.count)
        for c in (first_video, evals, kv):
            c.remove()
    assert counts[False][1] == counts[True][1] == steps  # one batched network evaluation per Euler step
    assert counts[True][0] == 1 and counts[False][0] == steps
    # Keys and values: every audio block's, and the video blocks' up to the last fusion point.
    per_prompt = model.audio.num_blocks + last_video_point
    prompts = 2 if cfg_scale != 1.0 else 1  # the prompt and the null text, prepared one after the other
    assert counts[True][2] == prompts * model.audio.num_blocks + last_video_point
    assert counts[False][2] == steps * per_prompt  # guidance batches both prompts into one projection


def test_batches_give_each_clip_its_own_noise_and_take_their_prompt_rows():
    """A clip's sample is the same at batch 1 and at batch 3 (its noise is its own, not its batch's), and equals
    sampling that clip alone as clip `index` of the seed."""
    model = tiny_link()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.1)  # open the gates: the link and the generator alone differ
    _, video = tiny_batch(model.cfg, b=3)
    clips, prompts = [video[i:i + 1] for i in range(3)], text(3)
    entered = []

    @contextmanager
    def autocast():
        entered.append(1)
        yield

    got = list(sample_batches(model, "v2a", clips, batch=2, seed=5, text=prompts, autocast=autocast, steps=2))
    assert [start for start, _ in got] == [0, 2] and [x.shape[0] for _, x in got] == [2, 1] and len(entered) == 2
    last = sample_link(model, "v2a", video[2:], text_gen=prompts.rows(2, 1), text_cond=prompts.rows(2, 1), steps=2,
                       seed=5, clip=2)
    torch.testing.assert_close(got[1][1], last)
    by_size = {size: torch.cat([x for _, x in sample_batches(model, "v2a", clips, batch=size, seed=5, text=prompts,
                                                             steps=2)]) for size in (1, 3)}
    torch.testing.assert_close(by_size[1], by_size[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_size[1], torch.cat([x for _, x in got]), atol=1e-5, rtol=1e-5)
    later = list(sample_batches(model, "v2a", clips[1:], batch=1, seed=5, first=1, text=prompts.rows(1, 2), steps=2))
    torch.testing.assert_close(torch.cat([x for _, x in later]), by_size[1][1:], atol=1e-5, rtol=1e-5)
    alone = list(sample_batches(model, "v2a", clips, batch=2, seed=5, text=prompts, alone=True, steps=2))
    shape = generated_shape(model, "v2a", video[:2])
    first = sample_backbone(model.audio, shape, text=prompts.rows(0, 2), steps=2, seed=5)
    torch.testing.assert_close(alone[0][1], first)
    assert not torch.allclose(alone[0][1], got[0][1])
    alone_1 = list(sample_batches(model, "v2a", clips, batch=1, seed=5, text=prompts, alone=True, steps=2))
    torch.testing.assert_close(torch.cat([x for _, x in alone_1[:2]]), first, atol=1e-5, rtol=1e-5)


def test_noise_streams_never_coincide(monkeypatch):
    """Every noise that sampling draws (each clip's conditioning and initial noise, at batch 1 and 3) shares no
    run of values with any other: seeds seed + 1 and seed + start made clip i's conditioning noise clip i + 1's
    initial noise."""
    import avlink.sample as sample_module

    drawn = []
    real = sample_module.initial_noise

    def record(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(sample_module, "initial_noise", record)
    model = tiny_link()
    _, video = tiny_batch(model.cfg, b=3)
    clips = [video[i:i + 1] for i in range(3)]
    list(sample_batches(model, "v2a", clips, batch=1, seed=0, steps=1))
    assert len(drawn) == 6  # per clip: the conditioning noise, then the initial noise
    cond, gen = drawn[0::2], drawn[1::2]
    for i in range(2):
        n = min(cond[i].numel(), gen[i + 1].numel())
        assert not torch.isclose(cond[i].flatten()[:n], gen[i + 1].flatten()[:n]).any()
    rows = [x.flatten()[:64] for x in drawn]
    rows += [real((3, 64), seed, clip=c, window=w, stream=s).flatten(1)[0]
             for seed in (1, 2) for c in (0, 1) for w in (0, 1) for s in ("generated", "conditioning")]
    rows += [x for seed in (1, 2) for c in (0, 1) for w in (0, 1) for s in ("generated", "conditioning")
             for x in real((3, 64), seed, clip=c, window=w, stream=s, rows="candidates")[1:]]  # best-of-N's
    for i, a in enumerate(rows):
        for b in rows[:i]:
            assert not torch.isclose(a, b).all(), "two noise streams coincide"
    assert torch.equal(real((3, 64), 4, clip=2)[1], real((1, 64), 4, clip=3)[0])  # a row is its clip's stream


def test_candidate_zero_is_the_clip_s_own_stream():
    """Best-of-N's candidate 0 is the noise sampled without it, so one candidate changes nothing; the others
    are the clip's candidate streams whatever the clip's place in a batch."""
    from avlink.sample import initial_noise, noise_generator

    for stream in ("generated", "conditioning"):
        candidates = initial_noise((3, 64), 4, clip=2, window=1, stream=stream, rows="candidates")
        assert torch.equal(candidates[0], initial_noise((1, 64), 4, clip=2, window=1, stream=stream)[0])
        expected = noise_generator(4, 2, 1, stream, candidate=2).standard_normal(64, dtype=np.float32)
        assert torch.equal(candidates[2], torch.from_numpy(expected))
    model = tiny_link()
    _, video = tiny_batch(model.cfg, b=1)
    alone = sample_link(model, "v2a", video, steps=2, seed=3, clip=1, window=2)
    three = sample_link(model, "v2a", video.expand(3, -1, -1, -1, -1), steps=2, seed=3, clip=1, window=2,
                        rows="candidates")
    torch.testing.assert_close(three[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(three[1], three[0]) and not torch.allclose(three[2], three[1])



# --- guidance on the conditioning input ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_link_guidance_at_zero_is_the_generator_alone_and_one_is_no_guidance(task, monkeypatch):
    """link_scale 0 keeps only the unconditional branch: the generator alone from the same noise stream, without
    running the linked model."""
    model = trained_link()
    x_cond, x_gen = condition_and_generated(model, task)
    kwargs = {"text_gen": text(2, seed=1), "text_cond": text(2, seed=2), "steps": 3, "seed": 5}
    gen_bb, _ = model.backbones(task)
    alone = sample_backbone(gen_bb, tuple(x_gen.shape), text=kwargs["text_gen"], steps=3, seed=5)
    with monkeypatch.context() as patch:
        patch.setattr(model, "forward", lambda *args: pytest.fail("the linked model ran at link_scale 0"))
        assert torch.equal(sample_link(model, task, x_cond, link_scale=0.0, **kwargs), alone)
    linked = sample_link(model, task, x_cond, **kwargs)
    assert torch.equal(sample_link(model, task, x_cond, link_scale=1.0, **kwargs), linked)
    assert not torch.allclose(linked, alone, atol=1e-3)  # the open gates make the two branches differ


def test_link_guidance_extrapolates_from_the_generator_alone_toward_the_link():
    """One Euler step from noise x0 moves by the velocity: at scale s it is alone + s * (linked - alone)."""
    model = trained_link()
    x_cond, _ = condition_and_generated(model, "v2a")
    one = {scale: sample_link(model, "v2a", x_cond, steps=1, seed=3, link_scale=scale) for scale in (0.0, 1.0, 2.5)}
    torch.testing.assert_close(one[2.5], one[0.0] + 2.5 * (one[1.0] - one[0.0]), atol=1e-5, rtol=1e-5)


# --- continuation: replacement and reconstruction guidance ------------------------------------------------------


def linked_velocity(task):
    """The trained link's velocity for one prepared condition of `task`, and a generated sample's shape source."""
    model = trained_link()
    x_cond, x_gen = condition_and_generated(model, task)
    with torch.no_grad():
        cond = model.prepare(task, x_cond, None, None)

    def velocity(x, t):
        return model(x, t, cond)

    return velocity, x_gen


def test_guided_velocity_is_replacement_where_its_weight_is_zero():
    """At t = 0 (pure noise) the guidance weight w t / (2 (1 - t)) is 0, and a weight of 0 takes the replacement
    path: both give the replaced velocity exactly; a positive weight changes only the unknown part."""
    velocity, x_gen = linked_velocity("v2a")
    known = some_known(tuple(x_gen.shape))
    x0 = torch.randn(x_gen.shape, generator=torch.Generator().manual_seed(3))
    replaced = constrain(velocity, x0, known)
    guided = constrain(velocity, x0, Known(known.values, known.mask, guidance=5.0))
    with torch.no_grad():
        zero = torch.zeros(x0.shape[0])
        torch.testing.assert_close(guided(x0, zero), replaced(x0, zero), atol=0, rtol=0)
        x = interpolate(x0, known.values, torch.full((x0.shape[0],), 0.5))  # known part on its path, the rest too
        half = torch.full((x0.shape[0],), 0.5)
        torch.testing.assert_close(constrain(velocity, x0, Known(known.values, known.mask, 0.0))(x, half),
                                   replaced(x, half), atol=0, rtol=0)
        a, b = guided(x, half), replaced(x, half)
    torch.testing.assert_close(a[known.mask.expand_as(a)], b[known.mask.expand_as(b)], atol=0, rtol=0)
    assert not torch.allclose(a[~known.mask.expand_as(a)], b[~known.mask.expand_as(b)], atol=1e-4)


def test_guidance_acts_until_its_last_flow_time_only():
    """Known.until: after that flow time the guided velocity is the replaced one exactly (no gradient taken);
    up to it, the guidance moves the unknown part."""
    velocity, x_gen = linked_velocity("a2v")
    known = some_known(tuple(x_gen.shape), seed=3)
    x0 = torch.randn(x_gen.shape, generator=torch.Generator().manual_seed(6))
    replaced = constrain(velocity, x0, known)
    guided = constrain(velocity, x0, Known(known.values, known.mask, guidance=5.0, until=0.5))
    unknown = ~known.mask.expand_as(known.values)
    with torch.no_grad():
        for time, moved in ((0.4, True), (0.5, True), (0.6, False), (0.9, False)):
            t = torch.full((x0.shape[0],), time)
            x = interpolate(x0, known.values, t)
            a, b = guided(x, t), replaced(x, t)
            assert not torch.allclose(a[unknown], b[unknown], atol=1e-4) if moved else torch.equal(a, b), time


def test_a_guided_step_lowers_the_known_part_s_reconstruction_error():
    """The guided step moves the unknown part down the gradient of the known part's reconstruction error: for a
    small step the model's clean estimate of the known part ends nearer its values than after the replaced step
    (the known part itself moves the same in both)."""
    velocity, x_gen = linked_velocity("a2v")
    known = some_known(tuple(x_gen.shape), seed=1)
    mask = known.mask.expand_as(known.values)
    x0 = torch.randn(x_gen.shape, generator=torch.Generator().manual_seed(4))
    t, h = torch.full((x0.shape[0],), 0.6), 0.02
    off = 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)) * ~mask  # the rest off its path
    x = interpolate(x0, known.values, t) + off

    def error(x_next):
        t_next = t + h
        x1_hat = x_next + (1 - t_next).reshape(-1, 1, 1, 1, 1) * velocity(x_next, t_next)
        return (x1_hat - known.values)[mask].square().sum()

    with torch.no_grad():
        replaced = x + h * constrain(velocity, x0, known)(x, t)
        guided = x + h * constrain(velocity, x0, Known(known.values, known.mask, guidance=1.0))(x, t)
        torch.testing.assert_close(guided[mask], replaced[mask], atol=0, rtol=0)
        assert error(guided) < error(replaced)


def test_guidance_pulls_the_unknown_part_toward_the_known_one_on_a_toy_flow():
    """Data whose coordinates all share one value c ~ N(0, 1), with its exact velocity field: half the coordinates
    known (c = 2), the other half should end near 2. Replacement alone leaves them short of it (the field sees
    the known half only through x_t, noised); guidance brings them nearer."""
    n = 8

    def velocity(x, t):  # E[x1 | x_t] = c_hat * 1 with c_hat = t s / (t^2 + (1 - t)^2 / n), s = mean(x_t)
        tt = t.reshape(-1, 1)
        s = x.mean(1, keepdim=True)
        c_hat = tt * s / (tt**2 + (1 - tt) ** 2 / n)
        return (c_hat - x) / (1 - tt).clamp(min=1e-3)

    values = torch.full((64, n), 2.0)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[:, : n // 2] = True
    x0 = torch.randn(64, n, generator=torch.Generator().manual_seed(0))
    far = {}
    for w in (0.0, 1.0):
        x = solve(constrain(velocity, x0, Known(values, mask, guidance=w)), x0, steps=32)
        torch.testing.assert_close(x[:, : n // 2], values[:, : n // 2], atol=1e-5, rtol=0)
        far[w] = (x[:, n // 2:] - 2.0).abs().mean().item()
    assert far[1.0] < 0.5 * far[0.0]


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_guided_sampling_holds_the_known_part_exactly(task, method):
    model = trained_link()
    x_cond, x_gen = condition_and_generated(model, task)
    known = some_known(tuple(x_gen.shape), seed=2)
    mask = known.mask.expand_as(known.values)
    plain = sample_link(model, task, x_cond, steps=3, method=method, known=known)
    guided = sample_link(model, task, x_cond, steps=3, method=method,
                         known=Known(known.values, known.mask, guidance=2.0))
    assert torch.isfinite(guided).all()
    torch.testing.assert_close(guided[mask], known.values[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(guided[~mask], plain[~mask], atol=1e-4)
    assert not guided.requires_grad  # the gradient is taken inside each step alone
