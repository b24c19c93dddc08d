import argparse
import json
import statistics
import tempfile
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from avlink import bench
from avlink.bench import Flops, dit_block, dit_embed, dit_text, link_flops, random_inputs
from avlink.cli import main
from avlink.config import DiTConfig, get_preset
from avlink.fusion.linked import fusion_points
from avlink.params import count
from avlink.sample import generated_shape
from avlink.system import build_model
from avlink.upsampler import Upsampler

from helpers import tiny_config


def test_dit_block_matches_a_hand_count():
    cfg = DiTConfig(dim=8, heads=2, mlp_ratio=4.0, text_dim=6)
    n, text = 10, 3
    forward = (
        2 * 8 * 48  # adaLN: 6 modulations from the timestep embedding
        + 2 * 10 * 8 * 24 + 4 * 10 * 10 * 8 + 2 * 10 * 8 * 8  # qkv, scores + weighted sum, out projection
        + 2 * 10 * 8 * 8 + 2 * 3 * 8 * 16 + 4 * 10 * 3 * 8 + 2 * 10 * 8 * 8  # cross: q, text kv, core, out
        + 2 * 10 * 8 * 32 + 2 * 10 * 32 * 8  # MLP
    )
    assert forward == 23616
    assert dit_block(cfg, n, text) == Flops(forward, 0)
    assert dit_block(cfg, n, text, text_kv=False) == Flops(forward - 2 * 3 * 8 * 16, 0)  # keys/values prepared
    assert dit_text(cfg, text, blocks=2) == Flops(2 * 3 * 6 * 8 + 2 * 3 * 8 * 8 + 2 * (2 * 3 * 8 * 16))
    # After a fusion point: activation gradients of every projection on the tokens (1x), both operands of the
    # self-attention core (2x), the queries' side of the text attention (1x); none for adaLN or text keys.
    backward = 3840 + 2 * 3200 + 1280 + 1280 + 960 + 1280 + 10240
    assert dit_block(cfg, n, text, grad=True) == Flops(forward, backward)


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("task", ["v2a", "a2v"])
@pytest.mark.parametrize("which", ["tiny", "tiny_after", "tiny_static", "paper"])
def test_analytic_flops_equal_torch_counter(which, task):
    """The analytic count equals what PyTorch counts op by op, for prepare, one step, the plain path's step, and
    a training step's forward + backward (the paper preset on the meta device: shapes only, no memory, no
    arithmetic)."""
    if which == "paper":
        cfg, device = get_preset("paper"), torch.device("meta")
    elif which == "tiny_after":
        cfg = tiny_config(**{"fusion.placement": "after", "fusion.after_block": 2})
        device = torch.device("cpu")
    elif which == "tiny_static":  # no reinjection: the whole conditioning stream in prepare
        cfg, device = tiny_config(**{"fusion.injection": "static"}), torch.device("cpu")
    else:
        cfg, device = tiny_config(), torch.device("cpu")
    text_tokens = 5
    model = build_model(cfg, device)
    inputs = random_inputs(cfg, 1, text_tokens, device)
    x_cond, text_gen, text_cond = inputs.for_task(task)
    expected = link_flops(cfg, task, text_tokens)

    model.eval()
    with torch.no_grad():
        assert _counted(lambda: model.prepare(task, x_cond, text_gen, text_cond)) == expected.prepare
        cond = model.prepare(task, x_cond, text_gen, text_cond)
        x = torch.randn(generated_shape(model, task, x_cond), device=device)
        t = torch.full((1,), 0.5, device=device)
        assert _counted(lambda: model(x, t, cond)) == expected.step
        if which != "paper":  # (the same walk at every size; counting it at paper size costs seconds)
            plain = model.prepare(task, x_cond, text_gen, text_cond, cache=False)
            assert _counted(lambda: model(x, t, plain)) == expected.step_uncached
    model.train()
    loss = lambda: model.loss(task, inputs.audio, inputs.video, inputs.text_a, inputs.text_v)  # noqa: E731
    assert _counted(lambda: loss().backward()) == expected.train.total
    assert expected.train.forward == expected.prepare + expected.step  # a training step's forward


@pytest.mark.parametrize("injection", ["fusion", "static"])
def test_cached_step_saves_exactly_the_prefix_and_the_text(injection):
    cfg = get_preset("tiny").override(**{"fusion.injection": injection})
    text_tokens = 16
    flops = link_flops(cfg, "v2a", text_tokens)
    points = fusion_points(cfg.fusion, cfg.audio.depth, cfg.video.depth)
    first_video_block, last_video_block = points[0][1], points[-1][1]
    assert 0 < first_video_block < last_video_block
    cached_blocks = first_video_block if injection == "fusion" else last_video_block
    n_v = cfg.clip.num_video_tokens
    saved = (dit_embed(cfg.video, cfg.clip.video.patch_dim, n_v).forward
             + cached_blocks * dit_block(cfg.video, n_v, text_tokens, text_kv=False).forward
             + dit_text(cfg.video, text_tokens, last_video_block).forward  # the video blocks that ever run
             + dit_text(cfg.audio, text_tokens, cfg.audio.depth).forward)
    assert flops.step_uncached - flops.step == flops.prepare == saved
    assert flops.predicted_speedup == flops.step_uncached / flops.step > 1
    assert flops.clip(64) == saved + 64 * flops.step
    if injection == "static":  # the conditioning stream's later blocks moved out of every step
        reinjected = link_flops(get_preset("tiny"), "v2a", text_tokens)
        middle = dit_block(cfg.video, n_v, text_tokens, text_kv=False) * (last_video_block - first_video_block)
        # ...and no fusion block builds the conditioning stream's output (its MLP), which nothing reads
        # (its modulation keeps 2 of 6 chunks): in every block but the last, which reinjection leaves unread too
        d, dim_v = cfg.fusion.dim, cfg.video.dim
        h = int(d * cfg.fusion.mlp_ratio)
        unread_output = 2 * (d * (3 * d + dim_v) + n_v * (d * h + h * dim_v)) * (cfg.fusion.num_blocks - 1)
        assert reinjected.step - flops.step == middle.forward + unread_output
        assert flops.step_uncached == reinjected.step_uncached - unread_output


def _bench(tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    code = main(["bench", "--presets", "tiny", "--matmul-size", "64", "--text-tokens", "4", "--out", str(out),
                 *extra])
    return code, json.loads(out.read_text())


SAMPLING_ROWS = ("prepare", "step", "step (plain)", "clip", "prepare (static)", "step (static)",
                 "step (static, plain)", "train")
FLOPS_OF = {"prepare": ("flops", "prepare"), "step": ("flops", "step"), "step (plain)": ("flops", "step_uncached"),
            "clip": ("flops", "clip"), "prepare (static)": ("flops_static", "prepare"),
            "step (static)": ("flops_static", "step"), "step (static, plain)": ("flops_static", "step_uncached")}


def test_bench_runs_and_its_numbers_agree(tmp_path, capsys):
    steps = 2
    code, result = _bench(tmp_path, "--steps", str(steps), "--repeats", "3", "--batch", "2", "--windows")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny" in printed and "matmul peak fp32" in printed
    assert printed.count("cache speed-up") == 4  # the plain step of each task, with and without reinjection

    assert result["machine"]["torch"] == torch.__version__
    peak = result["peak"]["fp32"]["flops_per_s"]
    assert peak > 0 and result["peak"]["bf16"]["flops_per_s"] > 0
    rows = {(r["task"], r["what"]): r for r in result["rows"]}
    # tiny has a video upsampler: A2V gets its row, timed beside the base clip
    assert set(rows) == {(t, w) for t in ("v2a", "a2v") for w in SAMPLING_ROWS} | {("a2v", "upsample")}
    up = rows.pop(("a2v", "upsample"))
    assert up["seconds"] > 0 and up["steps"] == get_preset("tiny").upsampler.steps and up["flops"] is None
    assert up["ratio_to_base_clip"] == pytest.approx(up["seconds"] / rows["a2v", "clip"]["seconds"])
    assert up["params"] == count(Upsampler(get_preset("tiny").upsampler, get_preset("tiny").clip.video))
    assert "x the base A2V clip" in printed
    preset = result["presets"]["tiny"]
    counted = preset["flops"]
    for (task, what), r in rows.items():
        assert r["flops"] > 0 and r["seconds"] > 0 and r["peak_bytes"] > 0
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"])
        assert r["utilisation"] == pytest.approx(r["flops_per_s"] / peak)
        if what != "train":
            table, key = FLOPS_OF[what]
            assert r["flops"] == preset[table][task][key]
    for task in ("v2a", "a2v"):
        for variant, table in (("", "flops"), ("static, ", "flops_static")):
            plain = rows[task, f"step ({variant}plain)"]
            f = preset[table][task]
            assert plain["speedup_predicted"] == f["predicted_speedup"] == f["step_uncached"] / f["step"] > 1
            pairs = [p / c for p, c in zip(plain["times"], plain["cached_times"], strict=True)]  # in alternation
            assert plain["speedup_measured"] == pytest.approx(statistics.median(pairs))
            assert plain["speedup_ratio"] == pytest.approx(plain["speedup_measured"] / plain["speedup_predicted"])
        # No reinjection: the conditioning stream's later blocks move from every step into prepare (and its
        # fused outputs, which nothing reads, are not built: test_cached_step_saves_exactly_the_prefix_and_the_text).
        assert preset["flops_static"][task]["step"] < counted[task]["step"]
        assert preset["flops_static"][task]["step_uncached"] < counted[task]["step_uncached"]
        clip, prep, step = rows[task, "clip"], rows[task, "prepare"], rows[task, "step"]
        assert step["finite"] is True
        assert clip["flops"] == prep["flops"] + steps * step["flops"]
        assert clip["expected_seconds"] == pytest.approx(prep["seconds"] + steps * step["seconds"])
        # One clip is prepare plus its steps, and a little solver bookkeeping: wide bounds, since a shared CPU
        # makes single timings noisy.
        assert 0.33 < clip["ratio_to_expected"] < 3.0, clip
        train = rows[task, "train"]
        assert train["batch"] == 2
        assert train["flops"] == 2 * (counted[task]["train_forward"] + counted[task]["train_backward"])
        assert train["clips_per_s"] == pytest.approx(2 / train["seconds"])


def test_time_budget_skips_and_still_writes(tmp_path):
    code, result = _bench(tmp_path, "--time-budget", "1e-9", "--repeats", "1")
    assert code == 0
    assert result["rows"] and all(r.get("skipped") == "time budget" for r in result["rows"])
    assert result["presets"]["tiny"]["flops"]["v2a"]["step"] > 0


def test_batch_search_stops_at_out_of_memory(tmp_path, monkeypatch):
    """The search logic, with out of memory faked at batch 4 (a CPU raises no such error)."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--presets", "tiny", "--tasks", "v2a", "--out", str(tmp_path / "b.json"),
                              "--max-batch-search", "--warmup", "0", "--repeats", "1"])
    args.matmul_size = 64
    runner = bench.Bench(args, torch.device("cpu"))
    runner.result["presets"]["tiny"] = {}
    batches = []

    def fake(model, task, batch, plan):
        batches.append(batch)
        if batch >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return bench.Timing([0.01 * batch], 123)

    monkeypatch.setattr(runner, "train_timing", fake)
    flops = link_flops(get_preset("tiny"), "v2a", 16)
    runner.batch_search("tiny", None, "v2a", flops, bench.plan_for("tiny", torch.device("cpu"), args))
    assert batches == [1, 2, 4]
    search = runner.result["presets"]["tiny"]["batch_search"]["v2a"]
    assert search == {"largest_batch": 2, "stopped": "out of memory"}
    assert [r["batch"] for r in runner.result["rows"]] == [1, 2, 4]
    assert runner.result["rows"][-1]["skipped"] == "out of memory"
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["clips_per_s"] == pytest.approx(2 / 0.02)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--max-batch-search"], ["--batch", "0"], ["--windows", "0"]])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv):
    assert main(["bench", "--out", str(tmp_path / "b.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avlink bench: --") and err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda(tmp_path):
    code, result = _bench(tmp_path, "--device", "cuda", "--precision", "bf16", "--steps", "2",
                          "--repeats", "1", "--max-batch-search", "--max-batch", "4")
    assert code == 0
    assert result["presets"]["tiny"]["batch_search"]["v2a"]["largest_batch"] == 4
    assert all(r["peak_bytes"] > 0 for r in result["rows"] if "seconds" in r)


def test_windowed_generation_rows(tmp_path, monkeypatch):
    """Windowed V2A through the pipeline on 1x and 2x a (smaller still) clip: the rows agree with the plan."""
    from avlink.pipeline import plan_windows

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "b.json"), "--steps", "1", "--repeats", "1", "--warmup", "0",
                              "--windows", "2"])
    args.matmul_size = 64
    runner = bench.Bench(args, torch.device("cpu"))
    runner.result["presets"]["tiny"] = {}
    cfg = tiny_config()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the random checkpoint folder goes
    runner.windowed("tiny", cfg, bench.plan_for("tiny", torch.device("cpu"), args))
    rows = runner.result["rows"]
    assert [r["what"] for r in rows] == ["windows 1x", "windows 2x"]  # 1x always runs, as the base
    clip = cfg.clip
    for r, multiple in zip(rows, (1, 2), strict=True):
        frames = multiple * clip.num_frames
        planned = plan_windows(frames, clip.num_frames, clip.audio.num_tokens(frames / clip.video.fps),
                               clip.num_audio_tokens, clip.video.fps, clip.audio.eta)
        assert r["windows"] == len(planned) and r["multiple"] == multiple and r["steps"] == 1
        assert r["video_seconds"] == pytest.approx(frames / clip.video.fps)
        assert r["seconds_per_window"] == pytest.approx(r["seconds"] / r["windows"])
        assert r["seconds_per_video_second"] == pytest.approx(r["seconds"] / r["video_seconds"])
        assert r["ratio_to_1x"] == pytest.approx(r["seconds"] / rows[0]["seconds"])
        assert r["windows_ratio_to_1x"] == pytest.approx(r["windows"] / rows[0]["windows"])
        assert r["flops"] is None and r["utilisation"] is None
    assert rows[1]["windows"] > rows[0]["windows"] == 1
    assert "windows, " in bench.format_table(runner.result)
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["windows"] == rows[1]["windows"]
    assert not any(scratch.iterdir())  # the random checkpoint folder is gone


# --- end to end ----------------------------------------------------------------------------------------------

FAKE_NETWORKS = '''
import torch
from torch import nn

CALLS = []  # (latent shape, which conditions) of every network evaluation


class TinyPeer(nn.Module):
    """MMAudio's network as the bench calls it: sequence lengths, empty features, conditions, guided velocity."""

    latent_dim, latent_seq_len, clip_seq_len, sync_seq_len = 4, 10, 16, 8

    def __init__(self):
        super().__init__()
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, 6))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, 5))
        self.empty_string_feat = nn.Parameter(torch.zeros(3, 7))
        self.proj = nn.Linear(4, 4)

    def preprocess_conditions(self, clip_f, sync_f, text_f):
        assert clip_f.shape == (1, 16, 6) and sync_f.shape == (1, 8, 5) and text_f.shape == (1, 3, 7)
        return "cond"

    def get_empty_conditions(self, bs):
        return "empty"

    def predict_flow(self, latent, t, conditions):
        CALLS.append((tuple(latent.shape), conditions))
        return self.proj(latent)

    def ode_wrapper(self, t, latent, conditions, empty_conditions, cfg_strength):
        if cfg_strength < 1.0:
            return self.predict_flow(latent, t, conditions)
        return (cfg_strength * self.predict_flow(latent, t, conditions)
                + (1 - cfg_strength) * self.predict_flow(latent, t, empty_conditions))


def get_my_mmaudio(name):
    if name != "small_16k":
        raise ValueError(f"Unknown model name: {name}")
    return TinyPeer()
'''


def fake_peer(folder, networks: str = FAKE_NETWORKS):
    """A checkout laid out as MMAudio's, holding a tiny network of the same interface."""
    model = folder / "mmaudio" / "model"
    model.mkdir(parents=True)
    (folder / "mmaudio" / "__init__.py").write_text("")
    (model / "__init__.py").write_text("")
    (model / "networks.py").write_text(networks)
    (model / "sequence_config.py").write_text("class SequenceConfig:\n    clip_frame_rate = 8\n")
    return folder


def test_end_to_end_times_v2a_from_file_to_mp4_default_fast_and_the_peer(tmp_path, monkeypatch, capsys):
    import sys

    from avlink.pipeline import Pipeline, windows_for

    calls = []
    real = Pipeline.video_to_audio

    def spy(self, frames, **options):
        calls.append((options["fast"], options["steps"]))
        return real(self, frames, **options)

    monkeypatch.setattr(Pipeline, "video_to_audio", spy)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the peer's folder goes in front for this test only
    peer = fake_peer(tmp_path / "peer")
    out = tmp_path / "e2e.json"
    code = main(["bench", "--end-to-end", "--presets", "tiny", "--seconds", "3", "--steps", "2", "--fast-steps", "1",
                 "--vocoder", "griffinlim", "--peer", str(peer), "--peer-steps", "3", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert set(rows) == {"end-to-end (default)", "end-to-end (fast)", "peer: MMAudio small_16k network"}
    # Each setting warms up on one window at one step, then one timed clip (the default --repeats here).
    assert calls == [(False, 1), (False, 2), (True, 1), (True, 1)]
    default, fast, peer_row = rows["end-to-end (default)"], rows["end-to-end (fast)"], rows[
        "peer: MMAudio small_16k network"]
    tiny = get_preset("tiny")
    geometry = SimpleNamespace(clip=tiny.clip, fps=tiny.clip.video.fps)  # what windows_for reads of a pipeline
    assert default["windows"] == fast["windows"] == windows_for(3.0, geometry) == 2
    assert default["steps"] == 2 and fast["steps"] == 1
    assert default["video_seconds"] == 3.0 and len(default["times"]) == 1
    assert default["seconds_per_video_second"] == pytest.approx(default["seconds"] / 3.0)
    summary = result["presets"]["tiny"]["end_to_end"]
    assert summary["fast_speedup"] == pytest.approx(default["seconds"] / fast["seconds"])
    # The peer: conditions once, 3 Euler steps of two evaluations (guided and empty), after a 1-step warm-up.
    networks = sys.modules["mmaudio.model.networks"]
    evaluations = networks.CALLS
    assert evaluations == [((1, 10, 4), c) for _ in range(1 + 3) for c in ("cond", "empty")]
    assert peer_row["network_evaluations"] == 6 and peer_row["video_seconds"] == 2.0  # 16 CLIP frames at 8 fps
    assert peer_row["params"] == sum(p.numel() for p in networks.TinyPeer().parameters())
    printed = capsys.readouterr().out
    assert "end-to-end (fast) (1 steps)" in printed and "network only" in printed
    assert "tiny end to end per clip: default" in printed and "fast / peer network" in printed


def test_a_peer_that_cannot_be_had_is_one_line_before_anything_is_timed(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "e2e.json"

    def bench_line(*flags: str) -> str:
        assert main(["bench", "--end-to-end", "--presets", "tiny", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    assert "not an MMAudio checkout" in bench_line("--peer", str(tmp_path / "nowhere"))
    broken = fake_peer(tmp_path / "broken", "import einops_not_here\n")
    assert "cannot import MMAudio's network" in bench_line("--peer", str(broken))
    assert "--peer-model medium_1k" in bench_line("--peer", str(fake_peer(tmp_path / "ok")), "--peer-model",
                                                  "medium_1k")
    assert main(["bench", "--peer", str(tmp_path / "ok"), "--out", str(out)]) == 2
    assert "needs --end-to-end" in capsys.readouterr().err
    assert not out.exists()  # refused before any row was timed


def test_a_vocoder_for_an_analysis_the_universal_hifigan_does_not_fit(tmp_path):
    from avlink.codecs.vocoder import load_vocoder

    assert bench.upsample_rates(256) == (4, 4, 4, 4) and bench.upsample_rates(160) == (5, 4, 4, 2)
    tiny, small = get_preset("tiny").clip.audio, get_preset("small").clip.audio
    assert bench.bench_vocoder(tiny, tmp_path / "tiny") == "hifigan"
    assert bench.bench_vocoder(small, tmp_path / "gl", "griffinlim") == "griffinlim"
    path = bench.bench_vocoder(small, tmp_path / "small")
    vocoder = load_vocoder(path, small)
    mel = torch.zeros(1, small.n_mels, 7)
    assert vocoder(mel).shape == (1, 7 * small.hop_length)
