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
from avlink.sync import (
    SUBSTEPS,
    SYNC_FILE,
    TIE_WEIGHT,
    SyncConfig,
    SyncRanker,
    SyncScorer,
    event_agreement,
    event_times,
    load_sync,
    onset_bins,
    sync_metadata,
)
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
    objective = SyncObjective(SyncScorer(SMALL), CLIP.audio, augment=False)
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


def click_wave(times: list[float], seed: int = 0) -> np.ndarray:
    """Quiet noise with a short decaying burst at each time (seconds), CLIP's length and rate."""
    rng, rate = np.random.default_rng(seed), CLIP.audio.sample_rate
    wave = 0.002 * rng.standard_normal(CLIP.num_samples)
    burst = rng.standard_normal(int(0.05 * rate)) * np.exp(-np.arange(int(0.05 * rate)) / (0.01 * rate))
    for t in times:
        start = int(t * rate)
        wave[start:start + len(burst)] += 0.5 * burst[:len(wave) - start]
    return wave.astype(np.float32)


def test_the_events_targets_mark_the_bins_where_the_sound_has_an_onset():
    times = [0.4, 1.1, 2.0]
    mel = MelSpectrogram(CLIP.audio)(torch.from_numpy(click_wave(times))[None])
    bins = onset_bins(mel, CLIP.num_frames, CLIP.audio)
    assert bins.shape == (1, CLIP.num_frames * SUBSTEPS)
    found = np.flatnonzero(bins[0].numpy())
    bin_seconds = 1 / (CLIP.video.fps * SUBSTEPS)
    assert len(found) == len(times), found
    assert np.abs((found + 0.5) * bin_seconds - np.array(times)).max() <= 1.5 * bin_seconds, found
    silent = MelSpectrogram(CLIP.audio)(torch.zeros(1, CLIP.num_samples))
    assert onset_bins(silent, CLIP.num_frames, CLIP.audio).sum() == 0


def test_event_times_are_where_one_frame_interval_more_likely_than_not_holds_an_onset():
    p = np.zeros(CLIP.num_frames * SUBSTEPS)
    p[[4, 5, 6, 7]] = 0.2  # one onset whose quarter of the frame is unsure: no bin passes 0.25, the frame 0.8
    p[20] = 0.9
    p[40:42] = 0.2  # 0.4 in all: less likely than not
    bin_seconds = 1 / (CLIP.video.fps * SUBSTEPS)
    times = event_times(p, CLIP.video.fps)
    assert len(times) == 2, times
    assert abs(times[0] - 6 * bin_seconds) <= bin_seconds and abs(times[1] - 20.5 * bin_seconds) <= bin_seconds
    assert len(event_times(np.zeros_like(p), CLIP.video.fps)) == 0


def test_with_an_events_head_v2a_keeps_the_sound_whose_onsets_land_on_the_events(tmp_path, monkeypatch):
    """Event agreement ranks first, the pair logit only breaks its ties; A2V keeps the pair logit."""
    torch.manual_seed(0)
    cfg = SyncConfig(width=24, video_width=8, events=True)
    path = tmp_path / SYNC_FILE
    save_weights(path, SyncScorer(cfg), sync_metadata(cfg, CLIP))
    ranker = load_sync(path, CLIP)
    assert ranker.scorer.cfg.events
    frames, _ = toy_clip(np.random.default_rng(0))
    monkeypatch.setattr(ranker, "_events", lambda features: np.array([0.5, 1.5]))  # the events seen
    on, off, half = click_wave([0.5, 1.5], 1), click_wave([0.9, 2.2], 2), click_wave([0.5, 2.2], 3)
    also = click_wave([0.5, 1.5], 4)  # on the events too, other noise
    waves = [off, half, on, also]
    scores = ranker.scores("v2a", frames, waves)
    with torch.no_grad():
        logits = ranker.scorer(ranker._mel(waves), ranker._video([frames]).expand(4, -1, -1, -1, -1)).tolist()
    assert len(set(logits)) == 4
    below = [sum(other < logit for other in logits) for logit in logits]
    # agreement F1 0, 1/2, 1, 1; the pair logit's rank among the four decides between equals, worth less than that
    np.testing.assert_allclose(scores, np.array([0, 0.5, 1, 1]) + TIE_WEIGHT * np.array(below) / 4, atol=1e-9)
    assert int(np.argmax(scores)) == (2 if logits[2] > logits[3] else 3), (scores, logits)
    same = ranker.scores("v2a", frames, [on, off, on])
    assert same[0] == same[2] and int(np.argmax(same)) == 0, "equal candidates tie, and the lower is kept"
    a2v = ranker.scores("a2v", on, [frames, np.roll(frames, 3, axis=0)])
    with torch.no_grad():
        direct = ranker.scorer(ranker._mel([on]).expand(2, -1, -1),
                               ranker._video([frames, np.roll(frames, 3, axis=0)]))
    np.testing.assert_allclose(a2v, direct.numpy(), rtol=1e-4, atol=1e-5)


def test_a_short_training_teaches_the_events_head_where_the_flashes_are():
    torch.manual_seed(0)
    cfg = SyncConfig(width=24, video_width=8, events=True)
    objective = SyncObjective(SyncScorer(cfg), CLIP.audio, augment=False)
    train = toy_batch(48, seed=1)
    optimizer = torch.optim.Adam(objective.trainable.parameters(), lr=3e-3)
    for _ in range(150):
        rows = torch.randperm(48)[:16]
        out = objective.loss({k: v[rows] for k, v in train.items()})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert "loss/events" in out.scalars
    ranker = SyncRanker(objective.trainable, CLIP)
    rng = np.random.default_rng(2)
    agree = []
    for _ in range(12):
        frames, wave = toy_clip(rng)
        mel_one = MelSpectrogram(CLIP.audio)(torch.from_numpy(wave)[None])
        truth = (np.flatnonzero(onset_bins(mel_one, CLIP.num_frames, CLIP.audio)[0].numpy()) + 0.5) / (
            CLIP.video.fps * SUBSTEPS)
        agree.append(event_agreement(truth, ranker.events(frames), CLIP.video.fps))
    assert np.mean(agree) >= 0.8, agree
