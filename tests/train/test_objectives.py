import pytest
import torch

from avlink.backbones.audio_dit import AudioDiT
from avlink.backbones.video_dit import VideoDiT
from avlink.codecs.mel import LOG_FLOOR
from avlink.codecs.vae import AudioVAE
from avlink.eval.classifiers import ClassifierConfig, SyncBenchClassifiers, multi_hot
from avlink.train.loop import TrainConfig, fit
from avlink.train.objectives import (
    ClassifierObjective,
    FusionObjective,
    GeneratorObjective,
    VAEObjective,
    augment_mel,
    augment_video,
    mix_mels,
)

from helpers import tiny_config, tiny_link


def make_batch(cfg, b=2, seed=0, latent=True):
    g = torch.Generator().manual_seed(seed)
    clip = cfg.clip
    batch = {
        "mel": torch.randn(b, clip.audio.n_mels, clip.num_mel_frames, generator=g),
        "video": torch.rand(b, *clip.video_shape, generator=g) * 2 - 1,
        "text": torch.randn(b, 3, 16, generator=g),
        "text_mask": torch.ones(b, 3, dtype=torch.bool),
    }
    if latent:
        batch["latent"] = torch.randn(b, *clip.latent_shape, generator=g)
    return batch


def batches_of(cfg, latent=True):
    def batches(epoch, skip):
        for i in range(skip, 3):
            yield make_batch(cfg, seed=10 * epoch + i, latent=latent)
    return batches


TC = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=1, ckpt_every=4, log_every=1)
SMALL_CLASSIFIERS = ClassifierConfig(audio_width=16, video_width=8, embed_dim=24)


def test_vae_objective_trains(tmp_path):
    cfg = tiny_config()
    vae = AudioVAE(cfg.clip.audio, hidden=16, depth=1)
    result = fit(VAEObjective(vae), batches_of(cfg), TC, tmp_path, progress=False)
    assert result.step == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_generator_objective_trains_alone(tmp_path, modality):
    cfg = tiny_config()
    model = AudioDiT(cfg.audio, cfg.clip.audio) if modality == "audio" else VideoDiT(cfg.video, cfg.clip.video)
    before = [p.detach().clone() for p in model.parameters()]
    fit(GeneratorObjective(model, modality), batches_of(cfg), TC, tmp_path, progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_audio_objective_encodes_mels_with_a_frozen_vae():
    cfg = tiny_config()
    vae = AudioVAE(cfg.clip.audio, hidden=16, depth=1).freeze()
    model = AudioDiT(cfg.audio, cfg.clip.audio)
    out = GeneratorObjective(model, "audio", vae=vae).loss(make_batch(cfg, latent=False))
    out.loss.backward()
    assert all(p.grad is None for p in vae.parameters())


@pytest.mark.parametrize("task", ["v2a", "a2v", "joint"])
def test_fusion_objective_leaves_backbones_untouched(tmp_path, task):
    model = tiny_link(**({"fusion.shared": True} if task == "joint" else {}))
    frozen = {k: v.clone() for k, v in {**model.audio.state_dict(), **model.video.state_dict()}.items()}
    objective = FusionObjective(model, task)
    fit(objective, batches_of(model.cfg), TC, tmp_path, progress=False)
    after = {**model.audio.state_dict(), **model.video.state_dict()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not model.audio.training and not model.video.training
    saved = (tmp_path / "checkpoints" / "step_000000004" / "weights.safetensors")
    assert saved.is_file()


def test_a_finetuning_fusion_objective_trains_saves_and_exports_the_generated_backbone(tmp_path):
    """"w/FT": the objective's trainable holds the fusion set and the generated stream's generator; the
    checkpoints hold both (with their EMA), and export_parts files them apart, each loadable as it is."""
    from avlink.system import build_model

    from helpers import randomize_backbone

    model = build_model(tiny_config(**{"fusion.injection": "text_concat", "fusion.finetune": True}), tasks=("a2v",))
    randomize_backbone(model.audio)
    randomize_backbone(model.video, 1)
    audio_before = {k: v.clone() for k, v in model.audio.state_dict().items()}
    video_before = {k: v.clone() for k, v in model.video.state_dict().items()}
    objective = FusionObjective(model, "a2v")
    assert set(objective.trainable) == {"fusion", "video"} and objective.steps_leave_weights_unused
    fit(objective, batches_of(model.cfg), TC, tmp_path, progress=False)
    assert all(torch.equal(v, audio_before[k]) for k, v in model.audio.state_dict().items())
    assert any(not torch.equal(v, video_before[k]) for k, v in model.video.state_dict().items())
    from avlink.train.state import CheckpointManager

    weights = CheckpointManager(tmp_path / "checkpoints").latest().weights(ema=True)
    parts = objective.export_parts(weights)
    assert set(parts) == {"fusion", "video_dit"}
    assert all(k.startswith("a2v.") for k in parts["fusion"])
    model.video.load_state_dict(parts["video_dit"])  # strict: the generator's own keys, all of them
    model.fusion.load_state_dict(parts["fusion"])
    plain = FusionObjective(tiny_link(), "v2a")
    assert plain.trainable is plain.model.fusion and set(plain.export_parts({"v2a.x": torch.zeros(1)})) == {"fusion"}


def test_video_flows_run_on_the_geometry_normalised_pixels(monkeypatch):
    """Both the T2V objective and the fusion objective feed the flow the video codec's encoding of the pixels."""
    from avlink.train import objectives

    cfg = tiny_config(**{"clip.video.shift": -0.5, "clip.video.scale": 0.25})
    batch = make_batch(cfg)
    expected = (batch["video"] + 0.5) / 0.25
    seen = {}
    real = objectives.flow_matching_errors

    def spy(velocity, x1, t, *args, **kwargs):
        seen["x1"] = x1
        return real(velocity, x1, t, *args, **kwargs)

    monkeypatch.setattr(objectives, "flow_matching_errors", spy)
    GeneratorObjective(VideoDiT(cfg.video, cfg.clip.video), "video").loss(batch)
    assert torch.allclose(seen["x1"], expected)

    model = tiny_link(**{"clip.video.shift": -0.5, "clip.video.scale": 0.25})
    real_terms = model.loss_terms

    def terms(task, audio, video, *args):
        seen["video"] = video
        return real_terms(task, audio, video, *args)

    monkeypatch.setattr(model, "loss_terms", terms)
    FusionObjective(model, "a2v").loss(make_batch(model.cfg))
    assert torch.allclose(seen["video"], (make_batch(model.cfg)["video"] + 0.5) / 0.25)


def test_classifier_objective_reduces_the_loss_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = SyncBenchClassifiers(SMALL_CLASSIFIERS)
    labels = {"a": multi_hot(["ball"]), "b": multi_hot(["lamp", "rain"]),
              "c": multi_hot(["drum", "slider", "hammer"]), "d": multi_hot(["rain"])}
    batch = {"id": list(labels), "mel": torch.randn(4, 80, 64) - 5, "video": torch.rand(4, 3, 8, 16, 16) * 2 - 1}
    objective = ClassifierObjective(model, labels, augment=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = objective.loss(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert out.scalars["acc/audio"] == 1.0 and out.scalars["acc/video"] == 1.0


def test_classifier_augmentation_keeps_shapes_ranges_and_mixture_labels() -> None:
    torch.manual_seed(0)
    mel = torch.randn(4, 80, 40) - 5
    video = torch.rand(4, 3, 6, 16, 16) * 2 - 1
    assert augment_mel(mel).shape == mel.shape and augment_mel(mel).min() >= LOG_FLOOR
    out = augment_video(video)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    y = torch.eye(6)[:4]
    mixed, y_mixed = mix_mels(mel, y, p=1.0)
    assert torch.equal(y_mixed, torch.maximum(y, y.roll(1, dims=0)))  # the union of both clips' classes
    assert torch.allclose(mixed, torch.logaddexp(mel, mel.roll(1, dims=0)))
    kept, y_kept = mix_mels(mel, y, p=0.0)
    assert torch.equal(kept, mel) and torch.equal(y_kept, y)


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_fusion_training_has_prompt_free_rows_with_the_null_text_on_both_streams(monkeypatch, task):
    """Prompt-free generation gives both streams their null text: the share `prompt_free` of training rows does
    too; the other rows keep the caption on the conditioning stream (guidance dropout on the generated one)."""
    model = tiny_link()
    seen = {}

    def terms(task, audio, video, text_a, text_v):
        seen["a"], seen["v"] = text_a, text_v
        return torch.zeros(audio.shape[0]), torch.zeros(audio.shape[0])

    monkeypatch.setattr(model, "loss_terms", terms)
    batch = make_batch(model.cfg, b=64)
    null = {"a": model.audio.null_text_cond(1).tokens[0, 0], "v": model.video.null_text_cond(1).tokens[0, 0]}
    gen, cond = ("a", "v") if task == "v2a" else ("v", "a")

    def is_null(stream):  # (B,) rows that are the stream's null text: one real token, the learned one
        text = seen[stream]
        return (text.mask.sum(1) == 1) & (text.tokens[:, 0] == null[stream]).all(-1)

    for share in (0.0, 1.0):
        FusionObjective(model, task, prompt_free=share, text_dropout=0.0).loss(batch)
        assert bool(is_null(cond).all()) if share == 1.0 else not is_null(cond).any()
        assert torch.equal(is_null(gen), is_null(cond))
    torch.manual_seed(0)
    FusionObjective(model, task).loss(batch)
    free, dropped = is_null(cond), is_null(gen)
    assert 16 < int(free.sum()) < 48  # about half of 64
    assert bool((dropped >= free).all()) and int(dropped.sum()) > int(free.sum())  # guidance dropout on top
    assert torch.equal(seen[cond].tokens[~free], batch["text"][~free])  # the rest keep their caption
