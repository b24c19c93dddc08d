import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from avlink import bench
from avlink.bench import Flops, dit_block, dit_embed, link_flops, random_inputs
from avlink.cli import main
from avlink.config import DiTConfig, get_preset
from avlink.fusion.linked import fusion_points
from avlink.params import build_model
from avlink.sample import generated_shape

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
    # After a fusion point: activation gradients of every projection on the tokens (1x), both operands of the
    # self-attention core (2x), the queries' side of the text attention (1x); none for adaLN or text keys.
    backward = 3840 + 2 * 3200 + 1280 + 1280 + 960 + 1280 + 10240
    assert dit_block(cfg, n, text, grad=True) == Flops(forward, backward)


def _counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("task", ["v2a", "a2v"])
@pytest.mark.parametrize("which", ["tiny", "tiny_after", "paper"])
def test_analytic_flops_equal_torch_counter(which, task):
    """The analytic count equals what PyTorch counts op by op, for prepare, one step, and a training step's
    forward + backward (the paper preset on the meta device: shapes only, no memory, no arithmetic)."""
    if which == "paper":
        cfg, device = get_preset("paper"), torch.device("meta")
    elif which == "tiny_after":
        cfg = tiny_config(**{"fusion.placement": "after", "fusion.after_block": 2})
        device = torch.device("cpu")
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
        assert _counted(lambda: model(x, torch.full((1,), 0.5, device=device), cond)) == expected.step
    model.train()
    loss = lambda: model.loss(task, inputs.audio, inputs.video, inputs.text_a, inputs.text_v)  # noqa: E731
    assert _counted(lambda: loss().backward()) == expected.train.total
    assert expected.train.forward == expected.prepare + expected.step  # a training step's forward


def test_cached_step_saves_exactly_the_prefix():
    cfg = get_preset("tiny")
    text_tokens = 16
    flops = link_flops(cfg, "v2a", text_tokens)
    first_video_block = fusion_points(cfg.fusion, cfg.audio.depth, cfg.video.depth)[0][1]
    assert first_video_block > 0
    n_v = cfg.clip.num_video_tokens
    prefix = (dit_embed(cfg.video, cfg.clip.video.patch_dim, n_v, text_tokens).forward
              + first_video_block * dit_block(cfg.video, n_v, text_tokens).forward)
    assert flops.step_uncached - flops.step == prefix
    assert flops.step < flops.step_uncached
    assert flops.clip(64) == prefix + 64 * flops.step


def _bench(tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    code = main(["bench", "--presets", "tiny", "--matmul-size", "64", "--text-tokens", "4", "--out", str(out),
                 *extra])
    return code, json.loads(out.read_text())


def test_bench_runs_and_its_numbers_agree(tmp_path, capsys):
    steps = 2
    code, result = _bench(tmp_path, "--steps", str(steps), "--repeats", "3", "--batch", "2")
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny" in printed and "matmul peak fp32" in printed

    assert result["machine"]["torch"] == torch.__version__
    peak = result["peak"]["fp32"]["flops_per_s"]
    assert peak > 0 and result["peak"]["bf16"]["flops_per_s"] > 0
    rows = {(r["task"], r["what"]): r for r in result["rows"]}
    assert set(rows) == {(t, w) for t in ("v2a", "a2v") for w in ("prepare", "step", "clip", "train")}
    counted = result["presets"]["tiny"]["flops"]
    for (task, what), r in rows.items():
        assert r["flops"] > 0 and r["seconds"] > 0 and r["peak_bytes"] > 0
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"])
        assert r["utilisation"] == pytest.approx(r["flops_per_s"] / peak)
        if what != "train":
            assert r["flops"] == counted[task][what]
    for task in ("v2a", "a2v"):
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


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--max-batch-search"], ["--batch", "0"]])
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
