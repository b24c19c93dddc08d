"""What each `avlink train` part optimises, over batches of prepared shards (see data/shards.py `collate`):
mel (B, n_mels, F), latent (B, Ta, Da) when prepared with a VAE, video (B, 3, T, H, W) in [-1, 1],
text (B, L, Dt) with text_mask (B, L)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from avlink.backbones.dit import DiT, drop_text
from avlink.backbones.protocol import TextCond
from avlink.codecs.vae import AudioVAE, vae_loss
from avlink.flow.path import flow_matching_errors, logit_normal
from avlink.fusion.linked import AVLink
from avlink.system import video_codec
from avlink.train.loop import LossOutput

# Caption dropout for classifier-free guidance: the usual 10%.
TEXT_DROPOUT = 0.1


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

    A link holding both tasks' sets trains only the one of its task: the other gets no gradient."""

    model: AVLink
    task: str  # "v2a" | "a2v" | "joint"
    vae: AudioVAE | None = None
    text_dropout: float = TEXT_DROPOUT
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        # The other task's set would never get a gradient; as a trained weight it would stop DDP at step 2.
        if self.task != "joint":
            used = self.model.fusion_set(self.task)
            for fset in self.model.fusion.values():
                fset.requires_grad_(fset is used)

    @property
    def trainable(self) -> nn.Module:
        return self.model.fusion

    @property
    def steps_leave_weights_unused(self) -> bool:
        """Whether a step may leave trained weights without a gradient: where one set serves both directions
        (shared), each leaves unread what only the other reads (the last conditioning-side output), and "joint"
        changes the direction from step to step (with two sets: the set)."""
        return self.task == "joint" or self.model.cfg.fusion.shared

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
        audio = audio_latents(batch, self.vae, self.device)
        video = video_codec(self.model.cfg.clip.video).encode(batch["video"].to(self.device))
        b = audio.shape[0]
        text = batch_text(batch, self.device)
        gen_bb, _ = self.model.backbones(task)
        text_gen = with_dropout(text, gen_bb.null_text_cond(b), self.text_dropout)
        # The conditioning stream sees the caption as it would at inference.
        text_a, text_v = (text_gen, text) if task == "v2a" else (text, text_gen)
        per, t = self.model.loss_terms(task, audio, video, text_a, text_v)
        return LossOutput(per.mean(), per, t, scalars={f"loss/{task}": per.mean().item()})
