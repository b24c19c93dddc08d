"""What each `avlink train` part optimises, over batches of prepared shards (see data/shards.py `collate`):
mel (B, n_mels, F), latent (B, Ta, Da) when prepared with a VAE, video (B, 3, T, H, W) in [-1, 1],
text (B, L, Dt) with text_mask (B, L).

`avlink train classifiers` trains the evaluation's SyncBench classifiers (eval/classifiers.py) on the same
batches: both networks, binary cross-entropy per class, with the labels of each clip's SyncBench metadata, which
`avlink prepare` keeps in the shards' json (`meta.objects[i].class`). Augmentation: the mel gets a gain, a time
shift and, for half the clips, another clip's sound added (the labels become the union: SyncBench rarely puts
every pair of classes in one clip); the video gets a mirror image, a random order of the colour channels
(colour is drawn at random per object, so it must not matter), contrast, brightness and a one-pixel shift.
With `--upsampled` the video classifier of the upsampler's output geometry trains alone on the true clips at
that geometry (the upsampler's pairs, data/pairs.py), with the same augmentation (the shift: one base pixel).

`avlink train sync` trains best-of-N's learned sync scorer (sync.py) on the same batches: true pairs against
pairs shifted in time and other clips' sound (`SyncObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from avlink.backbones.dit import DiT, drop_text
from avlink.backbones.protocol import TextCond
from avlink.checkpoint import PARTS
from avlink.codecs.mel import LOG_FLOOR
from avlink.codecs.pixels import frames_to_pixels
from avlink.codecs.vae import AudioVAE, vae_loss
from avlink.config import ModelConfig, PretrainedConfig, UpsamplerConfig
from avlink.data.syncbench import CLASSES
from avlink.errors import UserError
from avlink.eval.classifiers import (
    ClassifierConfig,
    SyncBenchClassifiers,
    accuracy,
    load_classifiers,
    shard_labels,
    syncbench_labels,
)
from avlink.flow.path import flow_matching_errors, logit_normal
from avlink.fusion.linked import AVLink
from avlink.seq import AudioGeometry
from avlink.sync import MAX_SHIFT, MIN_SHIFT, SyncConfig, SyncScorer, onset_bins
from avlink.system import video_codec
from avlink.train.loop import LossOutput
from avlink.upsampler import Upsampler, flow_start, noised_condition, silence

# Caption dropout for classifier-free guidance: the usual 10%.
TEXT_DROPOUT = 0.1
# Fusion training: the share of rows trained with no caption on either stream, as prompt-free generation runs the
# link (the CLI's and the app's default). The paper reports V2A and A2V both with and without prompts from one
# model (Sec. 4, "we report results for both settings"), so the Fusion Blocks must know the conditioning stream's
# activations under its null text as well as under a caption; half and half is our choice.
PROMPT_FREE = 0.5
# `avlink train classifiers` defaults where the config and the command line leave them unset: a classifier
# takes a larger step than the generators; 1000 steps of 32 clips take about 3.5 minutes on 2 CPU cores.
CLASSIFIER_TRAIN_DEFAULTS: dict[str, Any] = {"max_steps": 1000, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.01}
# `--upsampled`: a step of 32 clips at 64 x 64 px and 24 fps took 1.5 s of CPU time on one core (50 steps on the
# tiny recipe's 800 train pairs, OMP_NUM_THREADS=1), so 400 steps are about 10 minutes.
UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS: dict[str, Any] = {**CLASSIFIER_TRAIN_DEFAULTS, "max_steps": 400}
MEL_GAIN = 0.7  # classifier mel augmentation: +-0.7 in natural-log magnitude, about +-6 dB
MEL_SHIFT = 0.25  # classifier mel augmentation: circular time shift by up to this fraction of the clip
MEL_MIX = 0.5  # classifier mel augmentation: share of clips that get another clip's sound added (labels: the union)


def batch_text(batch: dict[str, Any], device: torch.device) -> TextCond:
    return TextCond(batch["text"].to(device), batch["text_mask"].to(device))


def with_dropout(text: TextCond, null: TextCond, p: float) -> TextCond:
    if p <= 0:
        return text
    return drop_text(text, null, torch.rand(text.batch_size, device=text.tokens.device) < p)


def audio_latents(batch: dict[str, Any], vae: AudioVAE | None, device: torch.device) -> Tensor:
    """The audio DiT's input: the shards' VAE latent, or the frozen VAE's encoding of the mel, scaled."""
    if "latent" in batch:
        z = batch["latent"].to(device)
    else:
        assert vae is not None, "these shards hold no VAE latents: prepare them with --vae, or pass a VAE"
        with torch.no_grad():
            z = vae.encode(batch["mel"].to(device)).mode()
    return vae.scale_latent(z) if vae is not None else z


@dataclass
class VAEObjective:
    trainable: AudioVAE
    kl_weight: float = 1e-4
    device: torch.device = torch.device("cpu")

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        mel = batch["mel"].to(self.device)
        recon, posterior = self.trainable(mel)
        terms = vae_loss(mel, recon, posterior, self.kl_weight)
        return LossOutput(terms.total, scalars={"recon": terms.recon.item(), "kl": terms.kl.item()})


@dataclass
class GeneratorObjective:
    """A text-to-audio or text-to-video generator alone (the frozen backbones of AV-Link are trained so)."""

    trainable: DiT
    modality: str  # "audio" | "video"
    vae: AudioVAE | None = None
    text_dropout: float = TEXT_DROPOUT
    device: torch.device = torch.device("cpu")

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        if self.modality == "audio":
            x1 = audio_latents(batch, self.vae, self.device)
        else:
            x1 = video_codec(self.trainable.geometry).encode(batch["video"].to(self.device))
        b = x1.shape[0]
        text = with_dropout(batch_text(batch, self.device), self.trainable.null_text_cond(b), self.text_dropout)
        t = logit_normal(b, device=self.device)
        per = flow_matching_errors(lambda x, tt: self.trainable(x, tt, text), x1, t)
        return LossOutput(per.mean(), per, t)


@dataclass
class FusionObjective:
    """Fusion Blocks between frozen generators (Eq. 5). task "joint" trains V2A or A2V on each batch, drawn from
    the global RNG (so a resumed run draws the same), over the one shared parameter set ("Ours-Joint"); under
    torchrun every rank takes rank 0's draw, so a step trains one direction on the whole global batch.

    A link holding both tasks' sets trains only the one of its task: the other gets no gradient.

    With `fusion.finetune` ("w/FT" in Table 2) the generated stream's backbone trains too, at the same learning
    rate: `trainable` then holds {"fusion": the sets, "audio" or "video": that backbone}, so checkpoints, the EMA
    and validation cover both, and `export_parts` files the backbone's weights beside the Fusion Blocks (the
    checkpoint's generator file name, e.g. audio_dit.safetensors), which scoring loads in place of the frozen
    one. It costs what training that generator alone costs: its gradients, two Adam moments and an EMA copy
    (activation checkpointing, `train.activation_checkpointing`, cuts the activations)."""

    model: AVLink
    task: str  # "v2a" | "a2v" | "joint"
    vae: AudioVAE | None = None
    text_dropout: float = TEXT_DROPOUT
    prompt_free: float = PROMPT_FREE
    device: torch.device = torch.device("cpu")
    # The codecs of published generators (system.pretrained_codec) by modality: they encode the shards' waves
    # and frames; a modality without one takes the shards' latents or frames as our own generators do.
    codecs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The other task's set would never get a gradient; as a trained weight it would stop DDP at step 2.
        if self.task != "joint":
            used = self.model.fusion_set(self.task)
            for fset in self.model.fusion.values():
                fset.requires_grad_(fset is used)
        finetuned = {name: getattr(self.model, name) for name in self.model.finetuned}
        self._trainable = nn.ModuleDict({"fusion": self.model.fusion, **finetuned}) if finetuned else self.model.fusion

    @property
    def trainable(self) -> nn.Module:
        return self._trainable

    def export_parts(self, weights: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """The trained weights by export file stem: "fusion", and a fine-tuned backbone's checkpoint name."""
        if not self.model.finetuned:
            return {"fusion": weights}
        files = {attr: stem for stem, attr in PARTS.items()}  # a backbone's file is the checkpoint's name for it
        stems = {"fusion": "fusion", **{name: files[name] for name in self.model.finetuned}}
        parts: dict[str, dict[str, Tensor]] = {stem: {} for stem in stems.values()}
        for key, value in weights.items():
            head, _, rest = key.partition(".")
            parts[stems[head]][rest] = value
        return parts

    @property
    def steps_leave_weights_unused(self) -> bool:
        """Whether a step may leave trained weights without a gradient: where one set serves both directions
        (shared), each leaves unread what only the other reads (the last conditioning-side output), and "joint"
        changes the direction from step to step (with two sets: the set). A fine-tuned generator's null text
        gets a gradient only in steps with a dropped caption."""
        return self.task == "joint" or self.model.cfg.fusion.shared or bool(self.model.finetuned)

    def draw_task(self) -> str:
        """V2A or A2V for this step. Under torchrun all ranks take rank 0's draw: DDP then averages gradients of
        one direction, as one process would on the global batch, and FSDP's ranks reduce the same weights."""
        draw = torch.randint(2, ())
        if dist.is_initialized():
            draw = draw.to(self.device)  # NCCL broadcasts device tensors
            dist.broadcast(draw, src=0)
        return ("v2a", "a2v")[int(draw)]

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        task = self.draw_task() if self.task == "joint" else self.task
        audio, video = self.audio_input(batch), self.video_input(batch)
        b = audio.shape[0]
        text = batch_text(batch, self.device)
        # Prompt-free rows: both streams get their null text, as generation without a prompt gives them. The
        # other rows keep the caption on the conditioning stream and drop the generated stream's for guidance.
        free = torch.rand(b, device=self.device) < self.prompt_free
        dropped = free | (torch.rand(b, device=self.device) < self.text_dropout)
        gen, cond = ("audio", "video") if task == "v2a" else ("video", "audio")
        texts = {gen: self.stream_text(gen, text, dropped), cond: self.stream_text(cond, text, free)}
        per, t = self.model.loss_terms(task, audio, video, texts["audio"], texts["video"])
        return LossOutput(per.mean(), per, t, scalars={f"loss/{task}": per.mean().item()})

    def stream_text(self, modality: str, text: TextCond, drop: Tensor) -> TextCond | None:
        """A stream's caption states with the rows `drop` says as its null text. The shards hold the states of one
        text encoder, ours; a published generator reads its own encoder's, so its stream trains prompt-free (None:
        its null text), as it is used without a prompt."""
        if isinstance(getattr(self.model.cfg, modality), PretrainedConfig):
            return None
        return drop_text(text, getattr(self.model, modality).null_text_cond(text.batch_size), drop)

    @property
    def captions(self) -> dict[str, float]:
        """How captions were dropped, for the model card."""
        return {"prompt_free": self.prompt_free, "generated_dropout": self.text_dropout}

    def audio_input(self, batch: dict[str, Any]) -> Tensor:
        codec = self.codecs.get("audio")
        if codec is None:
            return audio_latents(batch, self.vae, self.device)
        if "wave" not in batch:
            raise UserError("these shards hold no waves, which this model's audio codec encodes: prepare them "
                            f"for its preset ({self.model.cfg.name})")
        return codec.encode(batch["wave"].to(self.device), self.model.cfg.clip.num_audio_tokens)

    def video_input(self, batch: dict[str, Any]) -> Tensor:
        codec = self.codecs.get("video") or video_codec(self.model.cfg.clip.video)
        return codec.encode(batch["video"].to(self.device))


@dataclass
class UpsamplerObjective:
    """The video upsampler (upsampler.py) on pairs of base and output frames (data/pairs.py): the flow-matching
    loss of the output clip given the base frames, noised to a time drawn in [cond_t_min, 1] (the conditioning
    augmentation of UpsamplerConfig), and the audio envelope; a share of the clips sees its base frames a few
    output frames early or late (`shifted_phase`), another share silence for its sound (for the guidance on the
    sound at sampling; both UpsamplerConfig). Each clip is cut to a random crop of
    `cfg.crop` base (frames, pixels, pixels) and what lies over it at the output rate and size: the network is
    convolutional, so it samples whole clips after training on crops, and a step costs what the crop costs."""

    trainable: Upsampler
    device: torch.device = torch.device("cpu")

    def crop(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.trainable.cfg
        st, ss = cfg.scale
        low, high = frames_to_pixels(batch["low"]), frames_to_pixels(batch["high"])
        env = batch["envelope"].float()
        b, _, t, h, w = low.shape
        low = shifted_phase(low, high, cfg)
        dropped = (torch.rand(b) < cfg.audio_dropout)[:, None, None]
        env = torch.where(dropped, silence(b, env.shape[-1]), env)
        ct, ch, cw = min(cfg.crop[0], t), min(cfg.crop[1], h), min(cfg.crop[2], w)
        t0, y0, x0 = (int(torch.randint(n - c + 1, ())) for n, c in ((t, ct), (h, ch), (w, cw)))
        low = low[:, :, t0:t0 + ct, y0:y0 + ch, x0:x0 + cw]
        high = high[:, :, t0 * st:(t0 + ct) * st, y0 * ss:(y0 + ch) * ss, x0 * ss:(x0 + cw) * ss]
        env = env[..., t0 * st:(t0 + ct) * st]
        return low.to(self.device), high.to(self.device), env.to(self.device)

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        cfg = self.trainable.cfg
        low, high, env = self.crop(batch)
        b = low.shape[0]
        cond_t = cfg.cond_t_min + (1 - cfg.cond_t_min) * torch.rand(b, device=self.device)
        low = noised_condition(low, cond_t)
        x0 = flow_start(low, cfg.scale, torch.randn_like(high) if cfg.start_noise else None, cfg.start_noise)
        t = torch.rand(b, device=self.device) ** cfg.time_power  # near 0, where the sample is decided (config)
        offset = int(torch.randint(cfg.scale[0], ()))  # where in the packed blocks the base frames fall
        per = flow_matching_errors(lambda x, tt: self.trainable(x, tt, low, cond_t, env, offset), high, t, x0)
        return LossOutput(per.mean(), per, t)


def shifted_phase(low: Tensor, high: Tensor, cfg: UpsamplerConfig) -> Tensor:
    """Base frames low (B, C, T, H, W) of the output clips high (B, C, T * st, H * ss, W * ss), pixels in [-1, 1]:
    for a share cfg.phase_share of the clips, moved by s output frames (1 <= |s| <= cfg.phase_shift): low plus
    the change of high's box-filtered frames from the base frames' times to s frames later (UpsamplerConfig)."""
    st, ss = cfg.scale
    b, _, t = low.shape[:3]
    if not (cfg.phase_shift and cfg.phase_share):
        return low
    shift = torch.randint(1, cfg.phase_shift + 1, (b,)) * (torch.randint(0, 2, (b,)) * 2 - 1)
    shift = torch.where(torch.rand(b) < cfg.phase_share, shift, 0)
    times = torch.arange(t) * st  # output frame of each base frame

    def box(frames: Tensor) -> Tensor:  # (B, C, T, H*ss, W*ss) -> (B, C, T, H, W)
        c, hh, ww = frames.shape[1], frames.shape[3], frames.shape[4]
        pooled = F.avg_pool2d(frames.transpose(1, 2).reshape(-1, c, hh, ww), ss)
        return pooled.reshape(b, t, c, hh // ss, ww // ss).transpose(1, 2)

    moved = (times[None] + shift[:, None]).clamp(0, high.shape[2] - 1)  # (B, T)
    index = moved[:, None, :, None, None].expand(-1, high.shape[1], -1, *high.shape[3:]).to(high.device)
    change = box(torch.gather(high, 2, index) - high[:, :, times])  # the filter is linear: one pass
    return (low + change).clamp(-1, 1)


def augment_mel(mel: Tensor) -> Tensor:
    """(B, n_mels, F) log-mel: a random gain per clip (silence stays at the floor) and a circular time shift."""
    b, _, frames = mel.shape
    gain = (torch.rand(b, 1, 1, device=mel.device) * 2 - 1) * MEL_GAIN
    mel = (mel + gain).clamp(min=LOG_FLOOR)
    limit = int(frames * MEL_SHIFT)
    shifts = torch.randint(-limit, limit + 1, (b,)).tolist()
    return torch.stack([m.roll(s, dims=-1) for m, s in zip(mel, shifts, strict=True)])


def augment_video(video: Tensor, shift: int = 1) -> Tensor:
    """(B, 3, T, H, W) in [-1, 1], per clip: a mirror image, the colour channels in a random order (an object's
    colour says nothing of its class), contrast and brightness, a shift by up to `shift` pixels."""
    b = video.shape[0]
    flip = torch.rand(b, device=video.device) < 0.5
    video = torch.where(flip[:, None, None, None, None], video.flip(-1), video)
    order = torch.rand(b, 3, device=video.device).argsort(dim=1)  # (B, 3) a permutation per clip
    video = torch.gather(video, 1, order[:, :, None, None, None].expand_as(video))
    contrast = 1 + (torch.rand(b, 1, 1, 1, 1, device=video.device) * 2 - 1) * 0.2
    brightness = (torch.rand(b, 1, 1, 1, 1, device=video.device) * 2 - 1) * 0.1
    video = (video * contrast + brightness).clamp(-1, 1)
    shifts = torch.randint(-shift, shift + 1, (b, 2)).tolist()
    return torch.stack([v.roll((dy, dx), dims=(-2, -1)) for v, (dy, dx) in zip(video, shifts, strict=True)])


def mix_mels(mel: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """With probability p per clip, add the sound of the next clip in the batch: the magnitudes add (about),
    and the classes present are the union."""
    chosen = (torch.rand(mel.shape[0], device=mel.device) < p)[:, None]  # (B, 1)
    other_mel, other_y = mel.roll(1, dims=0), y.roll(1, dims=0)
    mixed = torch.logaddexp(mel, other_mel)
    return torch.where(chosen[..., None], mixed, mel), torch.where(chosen, torch.maximum(y, other_y), y)


@dataclass
class ClassifierObjective:
    """Both classifiers on one batch of shards: binary cross-entropy per class, audio and video summed. A video
    network alone (`trainable.audio` None: the upsampled-geometry classifier) reads the output frames of a
    batch of upsampler pairs ("high")."""

    trainable: SyncBenchClassifiers
    labels: dict[str, Tensor]  # clip id -> (C,) multi-hot
    augment: bool = True
    mix: float = MEL_MIX
    device: torch.device = torch.device("cpu")

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        missing = [i for i in batch["id"] if i not in self.labels]
        assert not missing, f"no labels for clips {missing[:3]}"
        y = torch.stack([self.labels[i] for i in batch["id"]]).to(self.device)  # (B, C)
        if self.trainable.audio is None:
            video = frames_to_pixels(batch["high"]).to(self.device)
            if self.augment:
                video = augment_video(video, shift=self.trainable.cfg.video_scale[1])
            logits_v = self.trainable.video(video)
            loss_v = F.binary_cross_entropy_with_logits(logits_v, y)
            return LossOutput(loss_v, scalars={"loss/video": loss_v.item(),
                                               "acc/video": accuracy(logits_v.detach(), y).exact})
        mel, video = batch["mel"].to(self.device), batch["video"].to(self.device)
        y_a = y
        if self.augment:
            mel, video = augment_mel(mel), augment_video(video)
            mel, y_a = mix_mels(mel, y, self.mix)  # only the audio sees mixtures
        logits_a, logits_v = self.trainable.audio(mel), self.trainable.video(video)  # (B, C) each
        loss_a = F.binary_cross_entropy_with_logits(logits_a, y_a)
        loss_v = F.binary_cross_entropy_with_logits(logits_v, y)
        acc_a, acc_v = accuracy(logits_a.detach(), y_a), accuracy(logits_v.detach(), y)
        return LossOutput(loss_a + loss_v, scalars={"loss/audio": loss_a.item(), "loss/video": loss_v.item(),
                                                    "acc/audio": acc_a.exact, "acc/video": acc_v.exact})


def classifier_objective(data: str | Path, device: torch.device, n_mels: int = 80) -> ClassifierObjective:
    """What `avlink train classifiers` optimises, over the prepared shards in `data`."""
    model = SyncBenchClassifiers(ClassifierConfig(n_mels=n_mels)).to(device)
    return ClassifierObjective(model, shard_labels(data), device=device)


def upsampled_classifier_objective(pairs: str | Path, labels: str | Path, scale: tuple[int, int],
                                   device: torch.device, init: Path | None = None) -> ClassifierObjective:
    """What `avlink train classifiers --upsampled` optimises: the video classifier of the output geometry
    (`scale` times the base's frames and size) on the pairs folder `pairs`, labelled by the metadata of the
    SyncBench folder `labels`. init: a base classifiers file whose video network the body starts from (the
    stem starts as the area mean either way, so the body first sees what it was trained on)."""
    from avlink.data.pairs import Pairs

    cfg = ClassifierConfig(audio=False, video_scale=tuple(scale))
    if init is not None:
        base, classes = load_classifiers(init)
        if tuple(classes) != tuple(CLASSES):
            raise UserError(f"{init}: classes {', '.join(classes)}, but the labels are {', '.join(CLASSES)}")
        if base.cfg.video_scale != (1, 1):
            raise UserError(f"{init}: --init takes the base classifiers (classifiers.safetensors), not an "
                            f"upsampled one")
        cfg = replace(cfg, num_classes=base.cfg.num_classes, video_width=base.cfg.video_width,
                      embed_dim=base.cfg.embed_dim)
    model = SyncBenchClassifiers(cfg)
    if init is not None:
        missing, unexpected = model.video.load_state_dict(base.video.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("stem.") for k in missing), (missing, unexpected)
    ids = [str(i) for i in Pairs(pairs).meta["ids"]]
    return ClassifierObjective(model.to(device), syncbench_labels(labels, ids), device=device)


def classifier_train_defaults(train: dict[str, Any], max_steps: int | None,
                              upsampled: bool = False) -> dict[str, Any]:
    """CLASSIFIER_TRAIN_DEFAULTS (UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS for --upsampled) less whatever the config
    file (`train`) or --max-steps set."""
    defaults = UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS if upsampled else CLASSIFIER_TRAIN_DEFAULTS
    return {k: v for k, v in defaults.items() if k not in train and not (k == "max_steps" and max_steps is not None)}


@dataclass
class SyncObjective:
    """The sync scorer (sync.py) on batches of prepared shards: each clip's true pair against its time-shifted
    and mismatched pairs, a softmax over them (sync.py's docstring says which and why). Augmentation keeps timing:
    a gain on the mel and augment_video's colours, mirror and pixel shift."""

    trainable: SyncScorer
    audio: AudioGeometry  # of the mel, for the events head's targets (sync.onset_bins)
    augment: bool = True
    device: torch.device = torch.device("cpu")

    def loss(self, batch: dict[str, Any]) -> LossOutput:
        mel, video = batch["mel"].to(self.device), batch["video"].to(self.device)
        frames = video.shape[2]
        if frames < MAX_SHIFT + 2:
            raise UserError(f"the sync scorer trains on clips of more than {MAX_SHIFT + 1} frames, got {frames}")
        if self.augment:
            gain = (torch.rand(mel.shape[0], 1, 1, device=self.device) * 2 - 1) * MEL_GAIN
            mel, video = mel + gain, augment_video(video)
        audio, seen = self.trainable.audio_frames(mel, frames), self.trainable.video_frames(video)  # (B, W, T)
        length = frames - MAX_SHIFT
        start = int(torch.randint(0, MAX_SHIFT + 1, ()))  # the true pair's crop, one per batch

        def crop(x: Tensor, at: int) -> Tensor:
            return x[..., at:at + length]

        a, v = crop(audio, start), crop(seen, start)
        shifted = [s for s in range(MAX_SHIFT + 1) if abs(s - start) >= MIN_SHIFT]
        pairs = [(a, v)] + [(crop(audio, s), v) for s in shifted] + [(a, crop(seen, s)) for s in shifted]
        if mel.shape[0] > 1:
            pairs.append((a.roll(1, dims=0), v))  # the next clip's sound
        logits = torch.stack([self.trainable.pair(x, y) for x, y in pairs], dim=1)  # (B, 1 + negatives)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=self.device)
        loss = F.cross_entropy(logits, target)
        top = (logits.detach().argmax(dim=1) == 0).float().mean().item()
        scalars = {"acc/true_pair_first": top}
        if self.trainable.cfg.events:  # the whole clip's frames against the onsets of its own sound
            onsets = onset_bins(batch["mel"], frames, self.audio).to(self.device)
            events = F.binary_cross_entropy_with_logits(self.trainable.event_logits(seen), onsets)
            scalars.update({"loss/pair": loss.item(), "loss/events": events.item()})
            loss = loss + events
        return LossOutput(loss, scalars=scalars)


def sync_objective(cfg: ModelConfig, device: torch.device) -> SyncObjective:
    """What `avlink train sync` optimises: a scorer for the preset's mel."""
    scorer = SyncScorer(SyncConfig(n_mels=cfg.clip.audio.n_mels, events=True)).to(device)
    return SyncObjective(scorer, cfg.clip.audio, device=device)
