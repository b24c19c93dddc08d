from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from avlink.backbones.protocol import PreparedText, TextCond
from avlink.flow.guidance import classifier_free_guidance
from avlink.fusion.block import Alignment
from avlink.fusion.linked import AVLink, after_video_block, fusion_points

from helpers import tiny_batch, tiny_link

INJECTIONS = ["fusion", "static", "cross_attention", "direct", "text_concat"]
IDENTITY_AT_INIT = ["fusion", "static", "cross_attention", "direct"]  # text_concat adds keys: documented


def text(b, seed=0, length=4):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, length, 16, generator=g), torch.ones(b, length, dtype=torch.bool))


def generated_and_condition(model, task, seed=0):
    audio, video = tiny_batch(model.cfg, seed=seed)
    return (audio, video) if task == "v2a" else (video, audio)


@pytest.mark.parametrize("injection", IDENTITY_AT_INIT)
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_untrained_link_gives_exactly_the_frozen_backbone_velocity(task, injection):
    model = tiny_link(**{"fusion.injection": injection})
    x_gen, x_cond = generated_and_condition(model, task)
    t = torch.rand(2)
    txt = text(2)
    cond = model.prepare(task, x_cond, text_gen=txt, text_cond=text(2, seed=1))
    gen_bb, _ = model.backbones(task)
    with torch.no_grad():
        assert torch.equal(model(x_gen, t, cond), gen_bb(x_gen, t, txt))


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_optimizer_step_changes_only_the_fusion_blocks(task):
    model = tiny_link()
    frozen_before = {k: v.clone() for k, v in {**model.audio.state_dict(), **model.video.state_dict()}.items()}
    fusion_before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    audio, video = tiny_batch(model.cfg)
    model.train()
    assert not model.audio.training and not model.video.training
    for _ in range(2):  # the second step moves the weights behind the zero gates too
        opt.zero_grad()
        model.loss(task, audio, video, text(2), text(2, seed=1)).backward()
        opt.step()
    for bb in (model.audio, model.video):
        assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    frozen_after = {**model.audio.state_dict(), **model.video.state_dict()}
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    fusion_after = model.fusion.state_dict()
    changed = [k for k in fusion_before if not torch.equal(fusion_before[k], fusion_after[k])]
    assert any(k.startswith(task) for k in changed)
    other = "a2v" if task == "v2a" else "v2a"
    assert not any(k.startswith(other) for k in changed), "the other task's parameters must not move"
    # A trained link is no longer the backbone alone.
    x_gen, x_cond = generated_and_condition(model, task)
    cond = model.prepare(task, x_cond)
    gen_bb, _ = model.backbones(task)
    with torch.no_grad():
        assert not torch.allclose(model(x_gen, torch.rand(2), cond), gen_bb(x_gen, torch.rand(2)))


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_every_ablation_runs_forward_and_backward(task, injection):
    model = tiny_link(**{"fusion.injection": injection})
    audio, video = tiny_batch(model.cfg)
    loss = model.loss(task, audio, video, text(2), None)
    loss.backward()
    grads = [p.grad for p in model.fusion_set(task).parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("option", [{"fusion.shared": True}, {"fusion.t_cond_mode": "uniform"},
                                    {"fusion.placement": "after", "fusion.after_block": 2}])
def test_options_run(option):
    model = tiny_link(**option)
    audio, video = tiny_batch(model.cfg)
    for task in ("v2a", "a2v"):
        model.loss(task, audio, video).backward()
    if option.get("fusion.shared"):
        assert list(model.fusion.keys()) == ["joint"]


def test_fusion_points_interleaved_and_after():
    model = tiny_link()  # audio depth 4, video depth 6, 2 fusion blocks
    assert model.points == [(2, 3), (4, 6)]
    cfg = model.cfg.fusion

    assert fusion_points(replace(cfg, num_blocks=3), 24, 24) == [(8, 8), (16, 16), (24, 24)]
    assert fusion_points(replace(cfg, num_blocks=8), 24, 24)[0] == (3, 3)
    assert fusion_points(replace(cfg, placement="after", after_block=11), 24, 24) == [(11, 11)] * 2
    assert fusion_points(replace(cfg, placement="after", after_block=3), 4, 6) == [(2, 3)] * 2
    with pytest.raises(ValueError):
        fusion_points(replace(cfg, placement="after", after_block=7), 4, 6)


def test_after_block_rows_name_the_papers_24_blocks_and_map_to_any_depth():
    """Table 2's "After Block-1 / 11 / 22" count the paper's 24 video blocks (after_depth 24); a backbone of
    another depth takes the same place, rounded, after at least one block and before its last."""
    cfg = replace(tiny_link().cfg.fusion, placement="after", after_depth=24)
    mapped = {depth: [after_video_block(replace(cfg, after_block=k), depth) for k in (0, 1, 11, 22, 24)]
              for depth in (6, 12, 24)}
    assert mapped == {6: [0, 1, 3, 5, 6], 12: [0, 1, 6, 11, 12], 24: [0, 1, 11, 22, 24]}
    # The points follow: the tiny preset's 6 + 6 blocks and the paper preset's 24 + 24.
    assert fusion_points(replace(cfg, after_block=22), 6, 6) == [(5, 5)] * 2
    assert fusion_points(replace(cfg, after_block=11), 4, 6) == [(2, 3)] * 2
    assert fusion_points(replace(cfg, after_block=22), 24, 24) == [(22, 22)] * 2
    assert after_video_block(replace(cfg, after_block=3, after_depth=0), 6) == 3  # 0: the backbone's own count
    with pytest.raises(ValueError, match="0..24 blocks"):
        fusion_points(replace(cfg, after_block=25), 6, 6)


def test_finetune_trains_the_generated_backbone_and_leaves_the_conditioning_one():
    """"w/FT": the generated stream's generator trains with the fusion set; the conditioning one stays frozen."""
    from avlink.system import build_model

    from helpers import randomize_backbone

    model = build_model(tiny_link().cfg.override(**{"fusion.injection": "direct", "fusion.finetune": True}),
                        tasks=("v2a",))
    randomize_backbone(model.audio)
    randomize_backbone(model.video, 1)
    assert model.finetuned == ("audio",)
    audio_before = {k: v.clone() for k, v in model.audio.state_dict().items()}
    video_before = {k: v.clone() for k, v in model.video.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    audio, video = tiny_batch(model.cfg)
    for _ in range(2):
        opt.zero_grad()
        model.loss("v2a", audio, video, text(2), text(2, seed=1)).backward()
        opt.step()
    assert all(torch.equal(v, video_before[k]) for k, v in model.video.state_dict().items())
    assert all(p.grad is None for p in model.video.parameters())
    changed = [k for k, v in model.audio.state_dict().items() if not torch.equal(v, audio_before[k])]
    assert any(k.startswith("blocks.") for k in changed) and any(k.startswith("final.") for k in changed)


@pytest.mark.parametrize("placement", [{}, {"fusion.placement": "after", "fusion.after_block": 2}])
def test_fusion_runs_where_the_points_say(placement):
    """Record the order in which backbone blocks and fusion blocks run in one V2A forward."""
    model = tiny_link(**placement)
    events = []
    for name, bb in (("a", model.audio), ("v", model.video)):
        for i, block in enumerate(bb.blocks):
            block.register_forward_hook(lambda *_, n=name, i=i: events.append(f"{n}{i}"))
    for i, block in enumerate(model.fusion["v2a"].blocks):
        block.register_forward_hook(lambda *_, i=i: events.append(f"F{i}"))
    audio, video = tiny_batch(model.cfg)
    cond = model.prepare("v2a", video)
    events.clear()  # the conditioning stream before the first point ran once, in prepare
    with torch.no_grad():
        model(audio, torch.rand(2), cond)
    for k, (pa, pv) in enumerate(model.points):
        at = events.index(f"F{k}")
        audio_before = [e for e in events[:at] if e.startswith("a")]
        assert audio_before == [f"a{i}" for i in range(pa)]
        # video blocks up to the point ran before it (in prepare or in this forward), none after it
        assert not any(e.startswith("v") and int(e[1:]) >= pv for e in events[:at])
    # the conditioning stream never runs past the last fusion point, and its head never runs
    assert not any(e.startswith("v") and int(e[1:]) >= model.points[-1][1] for e in events)


def plain_velocity(model, task, x, t, x_cond_noised, t_cond, text_gen=None, text_cond=None, audio_start=0.0):
    """Reference: both streams from their embeddings at every call, no caching, fusion at every point."""
    gen_bb, cond_bb = model.backbones(task)
    fset = model.fusion_set(task)
    gen = gen_bb.embed(x, t, text_gen)
    con = cond_bb.embed(x_cond_noised, t_cond, text_cond)
    a, v = (gen, con) if task == "v2a" else (con, gen)
    align = Alignment.build(a.times + audio_start, v.times, model.audio.eta, model.video.eta, model.cfg.fusion)
    c = fset.conditioning(a.t, v.t)
    at_a = at_v = 0
    for block, (pa, pv) in zip(fset.blocks, model.points, strict=True):
        a, v = model.audio.run_blocks(a, at_a, pa), model.video.run_blocks(v, at_v, pv)
        at_a, at_v = pa, pv
        xa, xv = block(a.x, v.x, c, align)
        a, v = a.with_x(xa), v.with_x(xv)
    gen = a if task == "v2a" else v
    return gen_bb.head(gen_bb.run_blocks(gen, at_a if task == "v2a" else at_v, gen_bb.num_blocks))


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_prepared_condition_equals_the_plain_path(task):
    model = tiny_link()
    with torch.no_grad():  # give the untrained gates values so fusion does something
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x_gen, x_cond = generated_and_condition(model, task)
    g = torch.Generator().manual_seed(3)
    cond = model.prepare(task, x_cond, text_gen=text(2), generator=g)
    t = torch.rand(2)
    with torch.no_grad():
        fast = model(x_gen, t, cond)
        plain = plain_velocity(model, task, x_gen, t, cond.x_cond, cond.t_cond, text(2))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, model.backbones(task)[0](x_gen, t, text(2)), atol=1e-4)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_the_fusion_blocks_see_the_audio_where_it_starts(task, cache, monkeypatch):
    """A window's audio may start a fraction of a token off its first frame (pipeline.plan_windows): the
    alignment of the Fusion Blocks takes the audio tokens at their times plus that offset, the video's as they are."""
    model = tiny_link()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x_gen, x_cond = generated_and_condition(model, task)
    seen = []
    build = Alignment.build

    def record(times_a, times_v, *args):
        seen.append((times_a, times_v))
        return build(times_a, times_v, *args)

    monkeypatch.setattr(Alignment, "build", record)
    start = -0.4 / model.audio.eta  # 0.4 token before the first frame
    t = torch.rand(2)
    velocity = {}
    for offset in (0.0, start):
        cond = model.prepare(task, x_cond, generator=torch.Generator().manual_seed(3), cache=cache,
                             audio_start=offset)
        with torch.no_grad():
            velocity[offset] = model(x_gen, t, cond)
    audio, video = (x_gen, x_cond) if task == "v2a" else (x_cond, x_gen)
    times_a = model.audio.token_times((audio.shape[1],), torch.device("cpu"))
    times_v = model.video.token_times(model.video.tokenize(video)[1], torch.device("cpu"))
    torch.testing.assert_close(seen[-1][0], times_a + start, rtol=0, atol=1e-12)
    torch.testing.assert_close(seen[-1][1], times_v, rtol=0, atol=0)
    torch.testing.assert_close(seen[0][0], times_a, rtol=0, atol=0)
    with torch.no_grad():
        plain = plain_velocity(model, task, x_gen, t, cond.x_cond, cond.t_cond, audio_start=start)
    torch.testing.assert_close(velocity[start], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(velocity[start], velocity[0.0], atol=1e-6)


def test_conditioning_is_noised_once_to_the_fixed_time():
    model = tiny_link()
    audio, video = tiny_batch(model.cfg)
    noise = torch.randn_like(video)
    cond = model.prepare("v2a", video, noise=noise)
    assert torch.allclose(cond.t_cond, torch.full((2,), 0.96))
    torch.testing.assert_close(cond.x_cond, 0.96 * video + 0.04 * noise)
    assert torch.allclose(model.prepare("a2v", audio).t_cond, torch.full((2,), 0.8))


@pytest.mark.parametrize("cache", [True, False])
def test_batched_guidance_equals_two_forwards_through_the_link(cache):
    model = tiny_link()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    audio, video = tiny_batch(model.cfg)
    t = torch.rand(2)
    with torch.no_grad():
        cond = model.prepare("v2a", video, text_gen=text(2), text_cond=text(2, seed=1), cache=cache)
        uncond = model.with_gen_text(cond, model.audio.null_text_cond(2))
        assert isinstance(uncond.text_gen, PreparedText) == cache
        batched = classifier_free_guidance(model, 3.0, {"cond": cond}, {"cond": uncond})(audio, t)
        twice = classifier_free_guidance(model, 3.0, {"cond": cond}, {"cond": uncond}, batched=False)(audio, t)
    torch.testing.assert_close(batched, twice, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", ["fusion", "static", "text_concat"])
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_prepared_condition_equals_the_uncached_condition(task, injection):
    """One velocity from a cached condition (prefix, text keys and values) and from the plain one."""
    model = tiny_link(**{"fusion.injection": injection})
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x_gen, x_cond = generated_and_condition(model, task)
    t, noise = torch.rand(2), torch.randn_like(x_cond)
    with torch.no_grad():
        cached = model.prepare(task, x_cond, text(2), text(2, seed=1, length=6), noise=noise)
        plain = model.prepare(task, x_cond, text(2), text(2, seed=1, length=6), noise=noise, cache=False)
        assert cached.cached and not plain.cached and plain.cond_state is None
        assert isinstance(cached.text_gen, PreparedText) and cached.cond_state.text_kv is not None
        torch.testing.assert_close(model(x_gen, t, cached), model(x_gen, t, plain), atol=1e-5, rtol=1e-5)


def test_training_keeps_the_text_path_in_its_forward():
    """With gradients recorded, prepare caches the frozen prefix as before but no text keys and values."""
    model = tiny_link()
    audio, video = tiny_batch(model.cfg)
    txt = text(2)
    cond = model.prepare("v2a", video, text_gen=txt, text_cond=text(2, seed=1))
    assert cond.text_gen is txt and cond.cond_state.text_kv is None
    projections = []
    handle = model.audio.text_proj.register_forward_hook(lambda *_: projections.append(torch.is_grad_enabled()))
    model.loss("v2a", audio, video, txt).backward()
    handle.remove()
    assert projections == [True]  # the generated stream's prompt, projected inside the training forward


class ProtocolOnly(nn.Module):
    """An adapter offering just the Backbone protocol (no text cache), as another generator's would."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.hidden_dim, self.num_blocks, self.eta = inner.hidden_dim, inner.num_blocks, inner.eta

    def embed(self, x_t, t, text=None):
        assert not isinstance(text, PreparedText), "this backbone prepares no text"
        return self.inner.embed(x_t, t, text)

    def run_blocks(self, state, start, stop):
        return self.inner.run_blocks(state, start, stop)

    def head(self, state):
        return self.inner.head(state)


def test_a_backbone_without_a_text_cache_still_links():
    reference = tiny_link()
    with torch.no_grad():
        for p in reference.fusion.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = AVLink(reference.cfg, ProtocolOnly(reference.audio), ProtocolOnly(reference.video))
    model.fusion.load_state_dict(reference.fusion.state_dict())
    audio, video = tiny_batch(model.cfg)
    t, noise = torch.rand(2), torch.randn_like(video)
    with torch.no_grad():
        cond = model.prepare("v2a", video, text(2), text(2, seed=1), noise=noise)
        assert isinstance(cond.text_gen, TextCond) and cond.cached
        expected = reference(audio, t, reference.prepare("v2a", video, text(2), text(2, seed=1), noise=noise))
        torch.testing.assert_close(model(audio, t, cond), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_every_weight_of_a_task_set_gets_a_gradient(task, injection):
    """A weight that no loss reaches is not built: it would be dead in the parameter count, and DDP stops at
    the second step over it (the conditioning stream's output at the last fusion point, or at every point
    without reinjection; flow-time embedders where no block is modulated)."""
    model = tiny_link(**{"fusion.injection": injection})
    audio, video = tiny_batch(model.cfg)
    model.loss(task, audio, video, text(2), text(2, seed=1)).backward()
    missing = [name for name, p in model.fusion_set(task).named_parameters() if p.grad is None]
    assert not missing, f"{task} {injection}: no gradient for {missing}"


@pytest.mark.parametrize("injection", INJECTIONS)
def test_a_shared_set_uses_part_of_itself_per_direction(injection):
    """Joint training reads one direction per step: each leaves some weights without a gradient (so DDP must
    look for unused ones, train/distributed.py), and the two together reach them all."""
    model = tiny_link(**{"fusion.injection": injection, "fusion.shared": True})
    audio, video = tiny_batch(model.cfg)
    reached = {}
    for task in ("v2a", "a2v"):
        model.zero_grad(set_to_none=True)
        model.loss(task, audio, video, text(2), text(2, seed=1)).backward()
        reached[task] = {name for name, p in model.fusion.named_parameters() if p.grad is not None}
    every = {name for name, _ in model.fusion.named_parameters()}
    assert reached["v2a"] < every and reached["a2v"] < every and reached["v2a"] | reached["a2v"] == every


def older_layout(model: AVLink, task: str) -> dict[str, torch.Tensor]:
    """A task's set as it was saved when every stream had an output and every set its flow-time embedders:
    what a set generating both streams holds, with random values."""
    from avlink.fusion.linked import FusionSet
    from avlink.nn.layers import TimestepEmbedder

    fcfg = model.cfg.fusion
    full = FusionSet(fcfg, model.audio.hidden_dim, model.video.hidden_dim, ("a", "v"))
    state = dict(full.state_dict())
    if fcfg.injection in ("direct", "text_concat"):  # directions stay per task; the embedders were there
        state = dict(model.fusion_set(task).state_dict())
        for stream in ("a", "v"):
            state.update({f"t_embed_{stream}.{k}": v for k, v in TimestepEmbedder(fcfg.dim).state_dict().items()})
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()}


@pytest.mark.parametrize("injection", INJECTIONS)
def test_checkpoints_holding_the_unread_weights_still_load(injection):
    """Strictly, and to the same velocity: the weights dropped on loading never reached one."""
    model = tiny_link(**{"fusion.injection": injection})
    old = older_layout(model, "v2a")
    fset = model.fusion_set("v2a")
    assert set(old) > set(fset.state_dict())  # the old layout had more
    fset.load_state_dict(old)
    for name, value in fset.state_dict().items():
        assert torch.equal(value, old[name][: value.shape[0]]), name  # modulation: its first chunks
    if injection in ("fusion", "static", "cross_attention"):
        reference = tiny_link(**{"fusion.injection": injection, "fusion.shared": True})
        reference.fusion["joint"].load_state_dict(old)
        audio, video = tiny_batch(model.cfg)
        t, noise = torch.rand(2), torch.randn_like(video)
        with torch.no_grad():
            ours = model(audio, t, model.prepare("v2a", video, noise=noise))
            theirs = reference(audio, t, reference.prepare("v2a", video, noise=noise))
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_the_shipped_checkpoint_loads():
    from safetensors.torch import load_file

    from avlink.system import load_link

    folder = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
    model = load_link(folder)  # strict
    stored = load_file(str(folder / "fusion.safetensors"))
    for name, value in model.fusion.state_dict().items():
        assert torch.equal(value, stored[name][: value.shape[0]]), name


def test_the_shipped_second_stage_scorer_and_classifiers_load():
    from avlink.eval.classifiers import UPSAMPLED_FILE, load_classifiers
    from avlink.pipeline import Pipeline

    folder = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
    pipe = Pipeline.load(folder, vocoder=None)
    assert pipe.upsampler is not None and pipe.upsampler.cfg.audio  # strict: its FiLM layers are in the file
    assert pipe.system.sync is not None  # best-of-N ranks by the learned scorer
    model, _ = load_classifiers(folder / UPSAMPLED_FILE)
    assert model.cfg.video_scale == pipe.upsampler.cfg.scale and model.audio is None
