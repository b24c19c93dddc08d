"""Typed configuration and the named presets (tiny, small, paper).

Every size that follows from others is a property (see `seq.py` for token counts), never a stored field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from avlink.seq import AudioGeometry, ClipGeometry, VideoGeometry

Task = Literal["v2a", "a2v"]
Placement = Literal["interleaved", "after"]
# The "Feature injection" rows of the paper's Table 2.
Injection = Literal["fusion", "static", "cross_attention", "direct", "text_concat"]
TCondMode = Literal["fixed", "uniform"]


@dataclass(frozen=True)
class DiTConfig:
    """One frozen generator: a DiT with adaLN timestep, self-attention + RoPE, text cross-attention, MLP."""

    kind: Literal["dit"] = "dit"  # the backbone kind (backbones/__init__.py BACKBONES): our own DiT
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384  # width of the text encoder's token states
    rope_theta: float = 10000.0
    qk_norm: bool = True
    # Video only: a learned embedding of each token's place in the frame, added to its input; time keeps RoPE
    # alone, so clips of any length still work. RoPE tells a token where the others are, not where it is: a
    # RoPE-only video DiT gives every patch of a uniform input the same velocity, and the tiny T2V's first-step
    # estimate from pure noise repeats one patch's mean over the frame. The paper's video model uses 3D RoPE
    # alone, which every preset keeps. At the tiny budget the option helped only with guidance (SyncBench test
    # class accuracy of T2V samples after 1800 steps at lr 1e-3: 0.23 with it, 0.22 without at guidance 1; 0.47
    # and 0.35 at guidance 3; one seed each).
    frame_positions: bool = False

    @property
    def head_dim(self) -> int:
        assert self.dim % self.heads == 0, f"dim {self.dim} is not divisible by heads {self.heads}"
        return self.dim // self.heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Split of the head dim between the (t, h, w) axes of 3D RoPE; each part even."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


@dataclass(frozen=True)
class PretrainedConfig:
    """A generator that others trained, run through its published `diffusers` module by an adapter in
    backbones/ (wan.py: Wan 2.x text-to-video; stable_audio.py: Stable Audio Open text-to-audio)."""

    kind: str = "wan"
    # A local diffusers folder of the model (model_index.json, transformer/, vae/, text_encoder/, tokenizer/), read
    # with from_pretrained, safetensors only. "": the published architecture named below with random weights
    # (parameter counts on the meta device, tests); nothing can be generated from it that means anything.
    folder: str = ""
    architecture: str = ""  # a published transformer config the adapter knows ("": the kind's default)
    dtype: str = "float32"  # of the frozen weights once loaded ("bfloat16" on a GPU)


# kind -> the settings dataclass of that backbone kind; a config file names the kind of each stream
# (`audio.kind`), and one written before kinds existed is a "dit".
BACKBONE_CONFIGS: dict[str, type] = {"dit": DiTConfig, "wan": PretrainedConfig, "ltx": PretrainedConfig,
                                     "stable-audio": PretrainedConfig}
BackboneConfig = DiTConfig | PretrainedConfig  # the union of BACKBONE_CONFIGS' classes


@dataclass(frozen=True)
class FusionConfig:
    """The trainable link between the two frozen generators."""

    dim: int = 96  # D: common width inside a Fusion Block
    heads: int = 4
    num_blocks: int = 3
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    # "interleaved": block i after fraction (i+1)/num_blocks of each backbone's depth (the paper's choice).
    # "after": every block stacked after video block `after_block` (Table 2, "After Block-k"); the audio
    # backbone gets the same fraction of its own depth.
    placement: Placement = "interleaved"
    after_block: int = 1
    # The depth `after_block` is counted in: 0, the video backbone's own; else (the Table 2 rows: the paper's
    # 24-block video DiT) the block at the same place in the video backbone (fusion/linked.py `after_video_block`).
    after_depth: int = 0
    injection: Injection = "fusion"
    # What the Fusion Blocks read of the conditioning modality (Table 2, "Conditioning features type"):
    # "generator", the frozen generator's activations (the paper's); or the name of a pretrained extractor
    # (eval/features.py EXTRACTORS) whose per-time features, computed once per clip, take the conditioning stream's
    # place. Such a link is built with the extractor (`build_model(..., features=...)`).
    features: str = "generator"
    # Train the generated stream's backbone with the fusion parameters (Table 2, "w/FT"): its fine-tuned weights
    # are exported beside the Fusion Blocks (train/objectives.py `FusionObjective`).
    finetune: bool = False
    # The conditioning modality is noised once to a fixed flow time (paper: 0.96 V2A, 0.8 A2V), or, for the
    # ablation, to t ~ U(0, 1) in training.
    t_cond_mode: TCondMode = "fixed"
    t_cond_v2a: float = 0.96
    t_cond_a2v: float = 0.8
    shared: bool = False  # one parameter set for V2A and A2V ("Ours-Joint")

    def t_cond(self, task: Task) -> float:
        return self.t_cond_v2a if task == "v2a" else self.t_cond_a2v

    @property
    def head_dim(self) -> int:
        assert self.dim % self.heads == 0, f"fusion dim {self.dim} is not divisible by heads {self.heads}"
        return self.dim // self.heads


@dataclass(frozen=True)
class UpsamplerConfig:
    """The second video stage (paper Sec. 4: 64x36 px at 6 fps raised to 512x288 at 24 fps by a latent video
    upsampler finetuned from the video model). Ours works on pixels, as our generators do (the tiny preset has
    no video autoencoder): a conditional flow-matching network (upsampler.py) that draws the high-resolution
    clip given the base model's frames and, in A2V, the sound's energy envelope at the output rate.

    Output geometry: the base clip's frames `scale` = (time, space) times over, e.g. tiny 16x16 at 6 fps ->
    64x64 at 24 fps (the base frames are the centre square of SyncBench's 16:9 frames, so the output stays
    square); small and paper 64x36 at 6 fps -> 512x288 at 24 fps."""

    scale: tuple[int, int] = (4, 4)  # (frames, pixels per side) of output per base frame / pixel
    dim: int = 64  # width of the residual blocks
    depth: int = 4  # residual blocks (two 3x3x3 convolutions each)
    audio: bool = True  # condition on the audio envelope at the output frame rate (A2V knows the sound)
    # Conditioning augmentation: the base frames are noised along the flow to a time in [cond_t_min, 1] in
    # training (1: clean), and to cond_t at sampling, so that the network learns not to trust the base model's
    # frames pixel for pixel (cascaded diffusion's noise conditioning augmentation, in the flow's own noise).
    # Sampling at cond_t 1 (the frames as they are): noise the net has to guess away costs more than it gains
    # (cond_t 0.95 against 1 after 300 steps, 16 test clips: PSNR 25.22 against 25.70 dB, SSIM 0.735 against
    # 0.788), and training in [0.9, 1] keeps the net near what it sees at sampling.
    cond_t_min: float = 0.9
    cond_t: float = 1.0
    # The flow's start: the (noised) base frames interpolated to the output geometry plus Gaussian noise of this
    # spread. 0: the flow starts at the interpolated frames themselves and transports them to the true clip,
    # deterministic given the base frames (restoration by direct iteration from the degraded input, InDI,
    # Delbracio and Milanfar 2023). Noise at the start cannot be removed by this net: an output block's
    # 3 * 4 * 4 * 4 = 192 independent noise values at a base position pass through `dim` (64) channels, so
    # whatever spread the start has stays in the result. Scored on 16 test clips from their true base frames
    # (`avlink eval --task upsample`, 16 Euler steps; linear interpolation 24.77 dB, SSIM 0.771): spread 0.1
    # (cond_t 0.9, 1500 steps) 21.68 dB / 0.312; spread 0 (cond_t 0.9, 300 steps) 24.06 dB / 0.668; spread 0 with
    # the conditioning above (300 steps) 25.70 dB / 0.788.
    start_noise: float = 0.0
    # Training draws the flow time as u ** time_power, u uniform: with no start noise the sample is decided at t
    # near 0 (from there on x_t tells the target: v = (x_t - x_0) / t), which the logit-normal draw of the
    # generators visits least. Event F1 of the 24 fps output within 1/24 s (SyncBench cue onsets against the
    # true events, 16 test clips from their true base frames; the true clips 0.979), 600 steps of 16 at lr 1e-3:
    # logit-normal 0.481, uniform (power 1) 0.719, power 2 0.851; with power 2 and the sound's envelope replaced
    # by silence 0.452, or moved 2 output frames late 0.485, so the timing is the sound's. The upsampler shipped
    # before (logit-normal, centred envelope windows, no FiLM, 1500 steps) scored 0.462 on these clips. (Runs
    # with the envelope windows of `audio_envelope`, then ending one sample earlier.)
    time_power: float = 2.0
    # Base frames that place a cue as the base model does: on A2V's frames the net trained on true base frames
    # alone drew cues off the sound's time (73 SyncBench test clips: of the 271 events that the base frames
    # matched within 1/6 s, 50 had the nearest cue at 24 fps 2-4 output frames off and 34 none within 4), since
    # true base frames also time a cue within their interval by how bright it still is, which a generated cue
    # is not. In training, a share `phase_share` of the clips gets base frames that show the clip `phase_shift`
    # or fewer output frames (not 0) early or late: the decoded base frames plus the change of the true 24 fps
    # clip's frames, box-filtered to the base size, between the base frames' own times and the shifted ones. The
    # sound and the output stay, so the time of an event has to come from the sound. The sound is replaced by
    # silence for a share `audio_dropout` of the clips, so that sampling can guide on it: v = v(silence) +
    # audio_guidance * (v(sound) - v(silence)) (classifier-free guidance, Ho and Salimans 2022, with the sound
    # as the condition; 1: none). On the 64 val clips' A2V frames (event F1 within 1/24 s; the base frames 0.761
    # within 1/6 s): the net without these 0.660; with them (a first version, which rounded the shifted frames to
    # 8 bits), 600 steps, 0.674 unguided and 0.706 at guidance 2; 1500 steps (Budget.upsampler_steps) 0.737 at 2
    # and 0.749 at 3; the shipped training of the recipe (this code), 1500 steps, at 3: 0.762 (precision 0.879,
    # recall 0.672).
    phase_shift: int = 2
    phase_share: float = 0.5
    audio_dropout: float = 0.1
    audio_guidance: float = 3.0
    # Cycle spinning (upsampler.py): sampling averages the velocity over this many places of the base frames in
    # the packed blocks (evenly spaced; it divides scale[0]), so every output frame is drawn from each place,
    # at this many times the network's cost. On the 64 val clips' A2V frames, trained for 1500 steps (as the
    # recipe), 16 Euler steps, guidance 3: the net without it AV-Align 0.196, 8.2 motion peaks per second,
    # event F1 within 1/24 s 0.762; with it, 4 places 0.261 / 5.8 / 0.763, 2 places 0.241 / 6.6 / 0.749; the
    # first 30 of these clips' true 24 fps frames show 4.7 peaks per second. From the true base frames (first
    # 30): PSNR 26.60 -> 26.57 dB. A loss on the change between output frames (w * the mean squared difference
    # of the velocity error between neighbouring frames, w = 1) gave AV-Align 0.236 and 0.232 (two seeds)
    # without spinning, nothing more with it (0.259), and cost 0.6 dB.
    spin: int = 4
    crop: tuple[int, int, int] = (8, 8, 8)  # training crop in base (frames, pixels, pixels): a convolutional net
    steps: int = 16  # Euler steps at sampling (default)

    def __post_init__(self) -> None:
        if not (isinstance(self.spin, int) and 1 <= self.spin <= self.scale[0] and self.scale[0] % self.spin == 0):
            raise ValueError(f"upsampler.spin {self.spin!r} must divide the time scale {self.scale[0]}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpsamplerConfig:
        return _build(cls, d)

    def output(self, video: VideoGeometry) -> VideoGeometry:
        """The upsampled clip's geometry for base frames of `video` (pixels, whatever the base's codec)."""
        st, ss = self.scale
        return VideoGeometry(fps=video.fps * st, height=video.height * ss, width=video.width * ss,
                             channels=video.channels, patch=(1, 1, 1))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    clip: ClipGeometry
    audio: BackboneConfig
    video: BackboneConfig
    fusion: FusionConfig = field(default_factory=FusionConfig)
    text_encoder: str = "minilm"
    upsampler: UpsamplerConfig | None = None  # the second video stage, where the preset has one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict (a JSON round trip turns tuples into lists; they come back as tuples)."""
        clip = d["clip"]
        return cls(
            name=d["name"],
            clip=_build(ClipGeometry, {**clip, "audio": _build(AudioGeometry, clip["audio"]),
                                       "video": _build(VideoGeometry, clip["video"])}),
            audio=_backbone(d["audio"]),
            video=_backbone(d["video"]),
            fusion=_build(FusionConfig, d.get("fusion", {})),
            text_encoder=d.get("text_encoder", "minilm"),
            upsampler=UpsamplerConfig.from_dict(d["upsampler"]) if d.get("upsampler") else None,
        )

    def override(self, **changes: Any) -> ModelConfig:
        """Dotted overrides, e.g. override(**{"fusion.injection": "static", "audio.depth": 4}). A stream's kind
        (`video.kind=wan`) starts that stream's settings afresh as the new kind's defaults; later keys refine
        them (`video.folder=...`)."""
        cfg = self
        for key, value in changes.items():
            path = key.split(".")
            if len(path) == 2 and path[0] in ("audio", "video") and path[1] == "kind":
                cfg = replace(cfg, **{path[0]: _backbone({"kind": value})})
                continue
            cfg = _replace_path(cfg, path, value)
        return cfg


def _backbone(d: dict[str, Any]) -> BackboneConfig:
    kind = d.get("kind", "dit")
    if kind not in BACKBONE_CONFIGS:
        raise ValueError(f"unknown backbone kind {kind!r}; known: {', '.join(BACKBONE_CONFIGS)}")
    return _build(BACKBONE_CONFIGS[kind], d)


def _build(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    name = path[0]
    if not is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
        raise KeyError(f"unknown config key {name!r} in {type(obj).__name__}")
    if len(path) == 1:
        current = getattr(obj, name)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        return replace(obj, **{name: value})
    return replace(obj, **{name: _replace_path(getattr(obj, name), path[1:], value)})


# --- presets --------------------------------------------------------------------------------------------

# The universal HiFi-GAN's analysis (22,050 Hz, 80 mels, n_fft 1024, hop 256, fmax 8000) so the shipped
# vocoder works on the embedded default.
HIFIGAN_AUDIO = AudioGeometry(
    sample_rate=22050, n_fft=1024, hop_length=256, win_length=1024, n_mels=80, f_max=8000.0,
    latent_downsample=4, latent_dim=8,
)
# Paper: 16 kHz audio. Mel analysis as AudioLDM/GenAU at 16 kHz (hop 160, 64 mels); the 1D VAE stride of 4
# gives 25 latent tokens per second. The paper does not state Da; 64 is our choice.
PAPER_AUDIO = AudioGeometry(
    sample_rate=16000, n_fft=1024, hop_length=160, win_length=1024, n_mels=64, f_max=8000.0,
    latent_downsample=4, latent_dim=64,
)
# Paper: RGB 64x36 px at 6 fps, 5.16 s. Patch size is not stated; 1x4x4 keeps one token row per frame time.
PAPER_VIDEO = VideoGeometry(fps=6.0, height=36, width=64, patch=(1, 4, 4))

# Stable Audio Open 1.0's autoencoder: 44.1 kHz, 2048 samples per latent frame of 64 channels (its vae/config.json:
# downsampling_ratios 2, 4, 4, 8, 8; decoder_input_channels 64). No mel is computed for it: the mel fields stay as
# the analysis window the demo's plots use.
SAO_AUDIO = AudioGeometry(
    sample_rate=44100, n_fft=2048, hop_length=2048, win_length=2048, n_mels=64, f_max=None,
    latent_downsample=1, latent_dim=64, codec="oobleck",
)
# Wan 2.1 text-to-video at 480p: 832x480 px at 16 fps, 81 frames (the Wan2.1-T2V-1.3B model card's setting); its
# causal VAE makes one latent frame of the first frame and one of each 4 after it, 8x smaller in space, 16
# channels; the transformer's patch is 1x2x2 latent pixels (16x16 px).
WAN_VIDEO = VideoGeometry(fps=16.0, height=480, width=832, patch=(1, 16, 16), codec="wan-vae", codec_stride=(4, 8),
                          codec_channels=16)
# LTX-Video at LTXPipeline's default size and rate: 704x512 px at 25 fps; its causal VAE makes one latent frame of
# the first frame and one of each 8 after it, 32x smaller in space, 128 channels; the transformer's patch is one
# latent pixel (32x32 px).
LTX_VIDEO = VideoGeometry(fps=25.0, height=512, width=704, patch=(1, 32, 32), codec="ltx-vae", codec_stride=(8, 32),
                          codec_channels=128)

PRESETS: dict[str, ModelConfig] = {
    # CPU: trains in minutes on SyncBench. 16x16 px at 6 fps for 16 frames (2.67 s).
    "tiny": ModelConfig(
        name="tiny",
        clip=ClipGeometry(duration=16 / 6, audio=HIFIGAN_AUDIO, video=VideoGeometry(fps=6.0, height=16, width=16)),
        audio=DiTConfig(dim=128, depth=6, heads=4),
        video=DiTConfig(dim=128, depth=6, heads=4),
        fusion=FusionConfig(dim=96, heads=4, num_blocks=3),
        upsampler=UpsamplerConfig(),
    ),
    # One GPU: the paper's clip geometry with narrower, shallower models.
    "small": ModelConfig(
        name="small",
        clip=ClipGeometry(duration=5.16, audio=PAPER_AUDIO, video=PAPER_VIDEO),
        audio=DiTConfig(dim=384, depth=12, heads=6, text_dim=384),
        video=DiTConfig(dim=384, depth=12, heads=6, text_dim=384),
        fusion=FusionConfig(dim=256, heads=4, num_blocks=4),
        upsampler=UpsamplerConfig(scale=(4, 8), dim=256, depth=8),
    ),
    # The paper: 576M-parameter audio and video DiTs (24 blocks, the Table 2 ablation names block 22), 8 fusion
    # blocks of 186M in all, T5 text states (4096-d, T5-XXL encoder).
    "paper": ModelConfig(
        name="paper",
        clip=ClipGeometry(duration=5.16, audio=PAPER_AUDIO, video=PAPER_VIDEO),
        audio=DiTConfig(dim=1024, depth=24, heads=16, text_dim=4096),
        video=DiTConfig(dim=1024, depth=24, heads=16, text_dim=4096),
        fusion=FusionConfig(dim=768, heads=12, num_blocks=8),
        text_encoder="t5",
        # The paper's upsampler is finetuned from its video model in MAGVIT-v2's latent space; its size is not
        # stated. Ours is a pixel-space net of 12 residual blocks of width 512.
        upsampler=UpsamplerConfig(scale=(4, 8), dim=512, depth=12),
    ),
    # Published generators linked (backbones/wan.py, backbones/stable_audio.py): Wan 2.1 T2V 1.3B and Stable Audio
    # Open 1.0, each from the local diffusers folder set with `--set model.video.folder=... model.audio.folder=...`;
    # without folders their published architectures are built with random weights (`avlink params`). The paper's
    # Fusion Blocks: 8 of width 768.
    "wan-sao": ModelConfig(
        name="wan-sao",
        clip=ClipGeometry(duration=81 / 16, audio=SAO_AUDIO, video=WAN_VIDEO),
        audio=PretrainedConfig(kind="stable-audio"),
        video=PretrainedConfig(kind="wan"),
        fusion=FusionConfig(dim=768, heads=12, num_blocks=8),
    ),
    # LTX-Video 0.9 (backbones/ltx.py) with Stable Audio Open 1.0, folders set as for wan-sao: 121 frames at 25 fps
    # (8k + 1 frames, as its VAE needs; 4.84 s, within Stable Audio Open's 47 s).
    "ltx-sao": ModelConfig(
        name="ltx-sao",
        clip=ClipGeometry(duration=121 / 25, audio=SAO_AUDIO, video=LTX_VIDEO),
        audio=PretrainedConfig(kind="stable-audio"),
        video=PretrainedConfig(kind="ltx"),
        fusion=FusionConfig(dim=768, heads=12, num_blocks=8),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
