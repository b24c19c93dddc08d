"""The trained system: the one place that builds the linked model, loads a checkpoint folder, and turns media
into the generators' tensors and back.

    build_model(cfg)                 the frozen audio and video backbones (of the kinds the config names), linked
                                     by Fusion Blocks: every caller builds the model here
    load_system(folder, ...)         a checkpoint folder -> System (linked model, a codec per modality, text)
    load_link / load_codecs          the linked model alone, the codecs alone, of a folder
    load_fast_link(folder, model)    the folder's fast V2A set (fusion-fast.safetensors) linking the same
                                     generators as `model` (System.fast_link loads it on first use)
    build_upsampler / load_upsampler the second video stage (upsampler.py): built from a config, or read from
                                     its weights file, whose metadata holds its config
    System.encode(modality, media)   waves (audio) or uint8 frames (video) -> the flow's space
    System.decode(modality, x)       and back (encode_media / decode_media where only codecs are at hand)
    make_codecs(clip, vae, vocoder)  the codecs the clip geometry names (`clip.audio.codec`, `clip.video.codec`)

A checkpoint folder holds config.json, the two generators, the Fusion Blocks (checkpoint.py reads and writes
those), the audio VAE (vae.safetensors) and, optionally, the video upsampler (upsampler.safetensors: without it
A2V gives the base frames) and the learned sync scorer (sync.safetensors: best-of-N ranks by it, by AV-Align
without it; sync.py, rank.py); the vocoder is chosen at load time (codecs/vocoder.py). A published
generator (`PretrainedConfig`) keeps its weights, its codec and its text encoder in its own diffusers folder, which
the config names: the checkpoint folder then holds the Fusion Blocks and what is ours. A new codec is one class in
codecs/ and one line in `CODECS` (ours) or `PRETRAINED_CODECS` (a published generator's).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from avlink.backbones import build_backbone
from avlink.backbones.dit import null_for_empty
from avlink.backbones.protocol import TextCond
from avlink.checkpoint import (
    FAST_FUSION,
    fast_overrides,
    fusion_tasks,
    load_config,
    load_parts,
    load_weights,
    read_fusion_tasks,
    stored_parts,
)
from avlink.codecs.audio import AudioCodec
from avlink.codecs.pixels import PixelCodec, frames_to_pixels, pixels_to_frames
from avlink.codecs.vae import AudioVAE
from avlink.config import ModelConfig, PretrainedConfig, Task, UpsamplerConfig
from avlink.errors import UserError
from avlink.fusion.features import ConditioningFeatures
from avlink.fusion.linked import TASKS, AVLink
from avlink.seq import ClipGeometry, VideoGeometry
from avlink.sync import SYNC_FILE, SyncRanker, load_sync
from avlink.upsampler import Upsampler
from avlink.weights import read_tensors

Modality = Literal["audio", "video"]
VAE_FILE = "vae.safetensors"
# The optional second video stage (upsampler.py): its architecture in the file's metadata, so a folder gains it by
# the file alone; without it a folder generates at the base geometry.
UPSAMPLER_FILE = "upsampler.safetensors"
# The files of a checkpoint folder of our own generators (the shipped one); checkpoint_files says it for any config.
FILES = ("config.json", "audio_dit.safetensors", "video_dit.safetensors", "fusion.safetensors", VAE_FILE)
# codec kind -> class; audio codecs are built from (clip, vae, vocoder), video codecs from the video geometry
CODECS: dict[str, type] = {"mel-vae": AudioCodec, "pixels": PixelCodec}
# codec kind -> (modality, class): a published generator's codec, loaded from that generator's folder by the
# class's `load(folder, geometry, device, dtype)`
PRETRAINED_CODECS: dict[str, tuple[Modality, str]] = {"wan-vae": ("video", "avlink.codecs.wan_vae:WanVideoCodec"),
                                                       "ltx-vae": ("video", "avlink.codecs.ltx_vae:LTXVideoCodec"),
                                                       "oobleck": ("audio", "avlink.codecs.oobleck:OobleckCodec")}


def checkpoint_files(cfg: ModelConfig) -> tuple[str, ...]:
    """The files a checkpoint folder of this config holds (checkpoint.stored_parts, and our audio VAE)."""
    files = ["config.json", *(f"{name}.safetensors" for name in stored_parts(cfg))]
    return (*files, VAE_FILE) if cfg.clip.audio.codec in CODECS else tuple(files)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", tasks: tuple[Task, ...] = TASKS,
                features: ConditioningFeatures | None = None) -> AVLink:
    """Frozen audio and video backbones linked by the fusion parameters of `tasks` (both by default), at their
    initial weights (`load_system` / checkpoint.load_link fill them). features: the extractor that a config with
    `fusion.features` other than "generator" conditions on (eval/features.py `load_features` builds it)."""
    with torch.device(device):
        audio = build_backbone("audio", cfg.audio, cfg.clip.audio)
        video = build_backbone("video", cfg.video, cfg.clip.video)
        return AVLink(cfg, audio, video, tasks=tasks, features=features)


def build_upsampler(cfg: ModelConfig, device: torch.device | str = "cpu") -> Upsampler:
    """The video upsampler of the config's `upsampler` section over its base frames (`clip.video`'s geometry in
    pixels), at its initial weights."""
    if cfg.upsampler is None:
        raise UserError(f"config {cfg.name}: no upsampler section")
    with torch.device(device):
        return Upsampler(cfg.upsampler, cfg.clip.video)


def upsampler_metadata(cfg: ModelConfig) -> dict[str, str]:
    """What an upsampler's weights file carries to be built again: its config and its base frames' geometry."""
    assert cfg.upsampler is not None
    video = cfg.clip.video
    return {"upsampler": json.dumps(asdict(cfg.upsampler)),
            "base_video": json.dumps({"fps": video.fps, "height": video.height, "width": video.width})}


def load_upsampler(path: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> Upsampler:
    """A frozen upsampler from its weights file (`avlink train upsampler`'s export), checked against the base
    frames of `cfg` (its clip geometry). Damage or a mismatch is refused in one line naming the file."""
    from safetensors import safe_open

    from avlink.weights import WeightsError, check_state, read_tensors

    path = Path(path)
    state = read_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        ucfg = UpsamplerConfig.from_dict(json.loads(meta["upsampler"]))
        base = json.loads(meta["base_video"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: not an upsampler export (metadata: {type(err).__name__} {err})") from None
    video = cfg.clip.video
    if (base["fps"], base["height"], base["width"]) != (video.fps, video.height, video.width):
        raise WeightsError(f"{path}: upsamples {base['width']}x{base['height']} at {base['fps']:g} fps, but the "
                           f"model makes {video.width}x{video.height} at {video.fps:g} fps")
    model = Upsampler(ucfg, video)
    check_state(path, state, model)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def load_link(folder: str | Path, device: torch.device | str = "cpu", strict: bool = True) -> AVLink:
    """The linked model of a checkpoint folder, frozen backbones in eval mode. A fusion file with one
    direction's blocks (a fine-tuned export) gives a model with that direction only (`AVLink.has_task`).
    Every damaged file is refused in one line naming it (WeightsError)."""
    folder = Path(folder)
    cfg = load_config(folder / "config.json")
    model = build_model(cfg, tasks=read_fusion_tasks(folder, cfg))
    load_parts(folder, model, strict)
    return model.to(device).eval()


def load_fast_link(folder: str | Path, base: AVLink) -> AVLink:
    """The fast V2A set of a checkpoint folder (fusion-fast.safetensors, checkpoint.py) linking base's own
    frozen generators: the backbones are shared, not loaded twice; only the Fusion Blocks are the fast set's,
    built from base's config with the file's overrides (`checkpoint.fast_overrides`). A folder without the file
    is refused in one line that says how to make it."""
    path = Path(folder) / FAST_FUSION
    if not path.is_file():
        raise UserError(f"{path}: not found; --fast needs the no-reinjection V2A Fusion Blocks there (train them "
                        f"with `avlink recipe --fusion-only {folder} --out NEW_FOLDER`, or copy in the "
                        f"fusion.safetensors that `avlink train fusion --task v2a --set "
                        f"model.fusion.injection=static ...` exports; README, 'Fast V2A')")
    cfg = base.cfg.override(**fast_overrides(path))
    fast = AVLink(cfg, base.audio, base.video, tasks=fusion_tasks(read_tensors(path).keys(), cfg))
    load_weights(path, fast.fusion)
    return fast.to(next(base.parameters()).device).eval()


def _codec_class(kind: str) -> type:
    if kind not in CODECS:
        known = ", ".join([*CODECS, *PRETRAINED_CODECS])
        raise ValueError(f"unknown codec {kind!r}; known: {known}" if kind not in PRETRAINED_CODECS else
                         f"codec {kind!r} comes with a published generator: load it with load_codecs")
    return CODECS[kind]


def video_codec(geometry: VideoGeometry):
    """The video codec the geometry names (`geometry.codec`)."""
    return _codec_class(geometry.codec)(geometry)


def make_codecs(clip: ClipGeometry, vae: AudioVAE | None, vocoder=None) -> dict[Modality, object]:
    """The codec of each modality that the clip geometry names. vae None: no audio codec (a video-only use);
    vocoder None: an audio codec that encodes but cannot decode to waves."""
    codecs: dict[Modality, object] = {"video": video_codec(clip.video)}
    if vae is not None:
        codecs["audio"] = _codec_class(clip.audio.codec)(clip, vae, vocoder)
    return codecs


@dataclass
class System:
    """A linked model with its codecs and text encoder, on one device.

    media, as System takes and gives it: audio (N,) or (B, N) float waves in [-1, 1] at clip.audio.sample_rate;
    video (T, H, W, 3) or (B, T, H, W, 3) uint8 frames at clip.video's fps and size (numpy arrays or tensors).
    """

    model: AVLink
    codecs: dict[Modality, object]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    folder: Path | None = None  # the checkpoint folder it was loaded from
    text_encoders: dict[str, object] = field(default_factory=dict)  # by name, each loaded on its first prompt
    fast: AVLink | None = None  # the fast V2A set on the same generators, loaded on first use (fast_link)
    upsampler: Upsampler | None = None  # the second video stage, where the folder holds one (UPSAMPLER_FILE)
    sync: SyncRanker | None = None  # best-of-N's learned scorer, where the folder holds one (sync.SYNC_FILE)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def clip(self) -> ClipGeometry:
        return self.model.cfg.clip

    def fast_link(self) -> AVLink:
        """The folder's fast V2A link (load_fast_link), loaded once; refused in one line where the folder has
        none, or where its set holds no V2A blocks."""
        if self.fast is None:
            if self.folder is None:
                raise UserError("--fast: this system was not loaded from a checkpoint folder")
            fast = load_fast_link(self.folder, self.model)
            if not fast.has_task("v2a"):
                raise UserError(f"{self.folder / FAST_FUSION}: holds no V2A Fusion Blocks (--fast is V2A only)")
            self.fast = fast
        return self.fast

    def codec(self, modality: Modality):
        if modality not in self.codecs:
            raise UserError(f"{self.folder}: no {modality} codec loaded")
        return self.codecs[modality]

    def encode(self, modality: Modality, media, tokens: int | None = None) -> Tensor:
        """encode_media with this system's codecs, on its device."""
        return encode_media(self.codec(modality), modality, media, tokens, self.device)

    def decode(self, modality: Modality, x: Tensor) -> np.ndarray:
        """decode_media with this system's codecs."""
        return decode_media(self.codec(modality), modality, x)

    def text(self, prompts: list[str] | str | None, modality: Modality, batch_size: int = 1) -> TextCond:
        """The text condition of a stream: the prompts' token states, or the backbone's learned null text for no
        prompt (None, or "" in any row)."""
        backbone = self.model.audio if modality == "audio" else self.model.video
        if isinstance(prompts, str):
            prompts = [prompts] * batch_size
        if not prompts or not any(p.strip() for p in prompts):
            return backbone.null_text_cond(batch_size if not prompts else len(prompts))
        text = self.text_encoder(modality).encode(list(prompts)).to(self.device)
        return null_for_empty(text, backbone.null_text_cond(len(prompts)))

    def text_encoder(self, modality: Modality):
        """The text encoder of a stream: the config's (`text_encoder`, shared by our own generators), or the one a
        published generator ships in its folder. Loaded on first use, once per name."""
        from avlink.codecs.text import PretrainedTextEncoder, load_text_encoder

        cfg = getattr(self.cfg, modality)
        name = f"pretrained:{cfg.folder}" if isinstance(cfg, PretrainedConfig) else self.cfg.text_encoder
        if name not in self.text_encoders:
            if isinstance(cfg, PretrainedConfig):
                backbone = getattr(self.model, modality)
                self.text_encoders[name] = PretrainedTextEncoder(cfg.folder, backbone.text_length, backbone.download,
                                                                 device=self.device)
            else:
                self.text_encoders[name] = load_text_encoder(name, device=self.device)
        return self.text_encoders[name]

    def check_task(self, task: Task) -> None:
        """Refuse, in one line, a direction whose Fusion Blocks the checkpoint lacks (a one-direction export)."""
        if not self.model.has_task(task):
            held = ", ".join(t for t in TASKS if self.model.has_task(t))
            raise UserError(f"{self.folder}: its fusion.safetensors holds {held} Fusion Blocks only, none for {task} "
                            f"(README, 'Using a fine-tuned export', says how to merge it with a full set)")


@torch.no_grad()
def encode_media(codec, modality: Modality, media, tokens: int | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """media (System's docstring) -> the flow's space through the modality's codec: audio (B, Ta, Da) scaled
    latents (`tokens` of them, default what the wave fills), video (B, C, T, H, W). One item without a batch axis
    gives a batch of one."""
    data = torch.as_tensor(media)
    single = data.ndim == (1 if modality == "audio" else 4)
    data = (data[None] if single else data).to(device)
    if modality == "audio":
        return codec.encode(data, tokens)
    return codec.encode(frames_to_pixels(data))


@torch.no_grad()
def decode_media(codec, modality: Modality, x: Tensor) -> np.ndarray:
    """The flow's space -> media as numpy through the modality's codec: audio (B, N) float32 waves clipped to
    [-1, 1], video (B, T, H, W, 3) uint8 frames."""
    if modality == "video":
        return pixels_to_frames(codec.decode(x.float())).cpu().numpy()
    out = codec.decode(x).cpu().numpy()
    return np.clip(out, -1.0, 1.0, out=out)


def pretrained_codec(cfg: ModelConfig, modality: Modality, device: torch.device | str = "cpu"):
    """The codec of a published generator, from the folder the config names for that stream (Wan's video VAE,
    Stable Audio Open's autoencoder)."""
    kind = getattr(cfg.clip, modality).codec
    held, path = PRETRAINED_CODECS[kind]
    module, name = path.split(":")  # imported here: these codecs bring diffusers
    cls = getattr(importlib.import_module(module), name)
    backbone = getattr(cfg, modality)
    if held != modality or not getattr(backbone, "folder", ""):
        raise UserError(f"the {modality} codec {kind!r} is loaded from a published generator's folder: set "
                        f"model.{modality}.kind and model.{modality}.folder to that generator's")
    geometry = cfg.clip if modality == "audio" else cfg.clip.video
    return cls.load(backbone.folder, geometry, device=device, dtype=backbone.dtype)


def load_codecs(folder: str | Path, cfg: ModelConfig, vocoder: str | None = "hifigan",
                device: torch.device | str = "cpu") -> dict[Modality, object]:
    """The codecs of a checkpoint folder: the audio VAE it holds (vae.safetensors: an AudioVAE state dict with
    its architecture in the safetensors metadata, "hidden" and "depth"; loading is strict) with the vocoder
    named (codecs/vocoder.py; None: none, nothing is decoded to a wave), and the video codec; a published
    generator's codec from that generator's folder instead (`pretrained_codec`)."""
    from avlink.codecs.vae import load_vae
    from avlink.codecs.vocoder import load_vocoder

    clip = cfg.clip
    codecs: dict[Modality, object] = {}
    if clip.audio.codec in PRETRAINED_CODECS:
        codecs["audio"] = pretrained_codec(cfg, "audio", device)
    else:
        path = Path(folder) / VAE_FILE
        if not path.is_file():
            raise UserError(f"{path}: not found; the checkpoint's audio VAE belongs there "
                            f"(an AudioVAE state dict saved as safetensors with 'hidden' and 'depth' metadata)")
        vae = load_vae(str(path), clip)
        voc = None if vocoder is None else load_vocoder(vocoder, clip.audio, device)
        codecs["audio"] = _codec_class(clip.audio.codec)(clip, vae, voc).to(device)
    if clip.video.codec in PRETRAINED_CODECS:
        codecs["video"] = pretrained_codec(cfg, "video", device)
    else:
        codecs["video"] = video_codec(clip.video).to(device)
    return codecs


def load_system(folder: str | Path, device: torch.device | str = "cpu", vocoder: str | None = "hifigan",
                hint: str = "") -> System:
    """A checkpoint folder loaded for generation, frozen, in eval mode. vocoder: its name or path
    (codecs/vocoder.py), None to load none (nothing will be decoded to a wave). Every damaged file is refused in
    one line naming it (weights.WeightsError); a folder missing files in one line naming them (+ `hint`)."""
    folder = Path(folder)
    config = folder / "config.json"
    missing = [name for name in (checkpoint_files(load_config(config)) if config.is_file() else FILES)
               if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: not a complete checkpoint folder, missing {', '.join(missing)}{hint}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    model = load_link(folder, device)
    upsampler = load_upsampler(folder / UPSAMPLER_FILE, model.cfg, device) if (folder / UPSAMPLER_FILE).is_file() \
        else None
    sync = load_sync(folder / SYNC_FILE, model.cfg.clip, device) if (folder / SYNC_FILE).is_file() else None
    return System(model, load_codecs(folder, model.cfg, vocoder, device), device, folder, upsampler=upsampler,
                  sync=sync)
