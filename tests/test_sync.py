"""The learned sync scorer (sync.py): trained on a toy, it tells an aligned pair from a shifted one; its weight
file round-trips and a bad one is refused in one line; a checkpoint folder with it ranks best-of-N by it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from avlink.checkpoint import save_weights
from avlink.codecs.mel import MelSpectrogram
from avlink.config import get_preset
from avlink.pipeline import Pipeline, Window
from avlink.rank import Ranking
from avlink.sync import SYNC_FILE, SyncConfig, SyncScorer, load_sync, sync_metadata
from avlink.train.objectives import SyncObjective
from avlink.weights import WeightsError

from helpers import random_checkpoint

CLIP = get_preset("tiny").clip  # 16 frames of 16 x 16 at 6 fps, 2.67 s of sound at 22,050 Hz
SMALL = SyncConfig(width=24, video_width=8)


def toy_clip(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A flash in one quadrant at 2 to 4 random frames, fading over the next, and a click at each flash:
    (frames (T, H, W, 3) uint8, wave (n,))."""
    t, size, rate = CLIP.num_frames, CLIP.video.height, CLIP.audio.sample_rate
    events = np.sort(rng.choice(np.arange(1, t), size=rng.integers(2, 5), replace=False))
    frames = np.full((t, size, size, 3), 40.0)
    wave = 0.01 * rng.standard_normal(CLIP.num_samples)
    burst = rng.standard_normal(int(0.05 * rate)) * np.exp(-np.arange(int(0.05 * rate)) / (0.01 * rate))
    for k in events:
        q = rng.integers(4)
        rows, cols = slice(8 * (q // 2), 8 * (q // 2) + 8), slice(8 * (q % 2), 8 * (q % 2) + 8)
        for j in range(k, t):
            frames[j, rows, cols] += 180 * np.exp(-(j - k) / 0.6)
        start = int((k - 0.5) / CLIP.video.fps * rate)
        wave[start:start + len(burst)] += 0.5 * burst[:len(wave) - start]
    return frames.clip(0, 255).astype(np.uint8), wave.astype(np.float32)


def toy_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    frames, waves = zip(*(toy_clip(rng) for _ in range(n)), strict=True)
    mel = MelSpectrogram(CLIP.audio)(torch.from_numpy(np.stack(waves)))
    video = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return {"mel": mel, "video": video}


def test_after_a_short_training_the_aligned_pair_scores_above_the_shifted_one():
    torch.manual_seed(0)
    objective = SyncObjective(SyncScorer(SMALL), augment=False)
    train, held_out = toy_batch(48, seed=1), toy_batch(24, seed=2)
    optimizer = torch.optim.Adam(objective.trainable.parameters(), lr=3e-3)
    for _ in range(120):
        rows = torch.randperm(48)[:16]
        loss = objective.loss({k: v[rows] for k, v in train.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scorer = objective.trainable.eval()
    with torch.no_grad():
        mel, video = held_out["mel"], held_out["video"]
        aligned = scorer(mel, video)
        shifted = scorer(mel, video.roll(3, dims=2))  # the video three frames late
        other = scorer(mel.roll(1, dims=0), video)  # another clip's sound
    assert (aligned > shifted).float().mean() >= 0.85, (aligned, shifted)
    assert (aligned > other).float().mean() >= 0.85, (aligned, other)


def test_the_weight_file_round_trips_and_a_bad_one_is_one_line(tmp_path):
    torch.manual_seed(0)
    scorer = SyncScorer(SMALL)
    path = tmp_path / SYNC_FILE
    save_weights(path, scorer, sync_metadata(SMALL, CLIP))
    ranker = load_sync(path, CLIP)
    frames, wave = toy_clip(np.random.default_rng(0))
    late = np.roll(frames, 4, axis=0)
    scores = ranker.scores("a2v", wave, [frames, late])
    batch = toy_batch(1, seed=0)  # the same clip, scored by the module itself
    with torch.no_grad():
        direct = scorer(batch["mel"].expand(2, -1, -1), torch.stack([batch["video"][0],
                                                                     batch["video"][0].roll(4, dims=1)]))
    np.testing.assert_allclose(scores, direct.numpy(), rtol=1e-4, atol=1e-5)
    assert scores[0] != scores[1], "the score does not change when the video is shifted"
    assert ranker.scores("v2a", frames, [wave, np.roll(wave, 5000)])[0] == pytest.approx(scores[0], abs=1e-5)

    other = CLIP.__class__(**{**CLIP.__dict__, "video": CLIP.video.__class__(**{**CLIP.video.__dict__, "fps": 8.0})})
    with pytest.raises(WeightsError, match=r"sync\.safetensors: trained on .* but the checkpoint's clips are") as err:
        load_sync(path, other)
    assert "\n" not in str(err.value)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(bare))
    with pytest.raises(WeightsError, match=r"bare\.safetensors: not a sync scorer export") as err:
        load_sync(bare, CLIP)
    assert "\n" not in str(err.value)
    wide = tmp_path / "wide.safetensors"
    save_weights(wide, scorer, {**sync_metadata(SMALL, CLIP), "sync": json.dumps({**SMALL.__dict__, "width": 32})})
    with pytest.raises(WeightsError, match=r"wide\.safetensors: tensor .* has shape"):
        load_sync(wide, CLIP)


def test_a_checkpoint_with_the_scorer_ranks_by_it(tmp_path, monkeypatch):
    """The folder's sync.safetensors replaces AV-Align as the ranker: the recorded ranking says "sync", its scores
    are the scorer's of the conditioning input and the candidates alone, and N = 1 stays unranked."""
    folder = random_checkpoint(tmp_path / "ckpt")
    plain = Pipeline.load(folder, vocoder="griffinlim")
    clip = plain.clip
    torch.manual_seed(0)
    save_weights(folder / SYNC_FILE, SyncScorer(SMALL), sync_metadata(SMALL, clip))
    pipe = Pipeline.load(folder, vocoder="griffinlim")
    assert pipe.system.sync is not None
    seen = []
    real = pipe.system.sync.scores

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.system.sync, "scores", spy)
    wave = (0.1 * np.random.default_rng(1).standard_normal(round(clip.duration * clip.audio.sample_rate))
            ).astype(np.float32)
    ranking: list[Ranking] = []
    frames = pipe.audio_to_video(wave, steps=2, candidates=3, ranking=ranking)
    ((args, kwargs),) = seen
    task, conditioning, candidates = args
    assert task == "a2v" and kwargs == {} and len(candidates) == 3
    assert np.array_equal(conditioning, pipe.window_wave(wave, Window(0, 0)))
    (r,) = ranking
    assert r.score == "sync" and r.kept == int(np.argmax(r.scores))
    assert list(r.scores) == pytest.approx(real(task, conditioning, candidates))
    assert np.abs(frames.astype(int) - candidates[r.kept][:len(frames)].astype(int)).max() <= 1
    assert np.array_equal(pipe.audio_to_video(wave, steps=2, candidates=1, ranking=ranking),
                          plain.audio_to_video(wave, steps=2)), "N = 1 is generation without best-of-N"
    assert len(seen) == 1 and len(ranking) == 1, "one candidate is not ranked"
