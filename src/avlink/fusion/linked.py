"""AV-Link: two frozen generators joined by Fusion Blocks into a V2A or an A2V flow model.

The linked model knows backbones only through the Backbone protocol (embed / run_blocks / head). It walks the
fusion points: run each stream's blocks up to the point, fuse, go on. Conditions are prepared once per sample
(`prepare`); the velocity is evaluated per step (`forward`). `prepare(..., cache=False)` is the plain reference:
every step then recomputes what the cache holds (the conditioning stream from its embedding, the text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avlink.backbones.protocol import Backbone, PreparedText, StreamState, TextCond, prepare_text
from avlink.config import FusionConfig, ModelConfig, Task
from avlink.flow.path import flow_matching_errors, interpolate, logit_normal, uniform
from avlink.fusion.block import Alignment, CrossAttentionFusion, DirectAlignment, FusionBlock, TextConcat, drop_prefix
from avlink.fusion.features import ConditioningFeatures, FeatureStream
from avlink.nn.layers import AdaLN, TimestepEmbedder

TASKS: tuple[Task, ...] = ("v2a", "a2v")
GENERATED = {"v2a": "a", "a2v": "v"}
CONDITIONING = {"v2a": "video", "a2v": "audio"}  # the conditioning modality of each task
STREAMS = {"a": "audio", "v": "video"}
REINJECTED = ("fusion", "cross_attention")  # injections whose fused conditioning stream goes on to later blocks
MODULATED = ("fusion", "static", "cross_attention")  # injections whose blocks take adaLN from the flow times


def after_video_block(cfg: FusionConfig, depth_v: int) -> int:
    """The video block that the "after" placement stacks the fusion blocks after.

    after_depth 0: after_block itself. Otherwise after_block counts in a video DiT of after_depth blocks (the
    Table 2 rows name blocks of the paper's 24) and maps to the same place in this one, k * depth_v / after_depth
    rounded half up, then kept where the paper's block is: after at least one block (block 0, the embedding,
    only for block 0) and before the last block for a block before the paper's last. So "After Block-1 / 11 /
    22" of 24 is after block 1 / 3 / 5 of the tiny preset's 6, 1 / 6 / 11 of the small preset's 12.
    """
    depth = cfg.after_depth or depth_v
    if cfg.after_depth < 0 or not 0 <= cfg.after_block <= depth:
        raise ValueError(f"after_block {cfg.after_block} outside the video backbone's 0..{depth} blocks"
                         + (f" (counted in after_depth {cfg.after_depth})" if cfg.after_depth else ""))
    if not cfg.after_depth:
        return cfg.after_block
    k = math.floor(cfg.after_block * depth_v / depth + 0.5)
    if cfg.after_block >= 1:
        k = max(k, 1)
    if cfg.after_block < depth:
        k = min(k, depth_v - 1)
    return max(k, 0)


def fusion_points(cfg: FusionConfig, depth_a: int, depth_v: int) -> list[tuple[int, int]]:
    """(audio block, video block) after which each fusion block runs; 0 = right after the embedding.

    Points are fractions of depth, so backbones of different depths line up: "interleaved" puts block i after
    fraction (i + 1) / n of each backbone; "after" stacks all blocks after video block k (the paper's Table 2
    counts video DiT blocks; `after_video_block`) and the audio backbone's matching fraction.
    """
    n = cfg.num_blocks
    if cfg.placement == "interleaved":
        fractions = [(i + 1) / n for i in range(n)]
    elif cfg.placement == "after":
        fractions = [after_video_block(cfg, depth_v) / depth_v] * n
    else:
        raise ValueError(f"unknown fusion placement {cfg.placement!r}")
    return [(round(f * depth_a), round(f * depth_v)) for f in fractions]


class FusionSet(nn.Module):
    """The trainable parameters of one link (V2A, A2V, or both when shared): the fusion modules plus the
    embedders of both flow times that drive every block's adaLN-Zero (none for the injections without adaLN,
    direct alignment and concat to text, which would leave them without a gradient)."""

    def __init__(self, cfg: FusionConfig, dim_a: int, dim_v: int, generated: tuple[str, ...]):
        super().__init__()
        self.injection = cfg.injection
        timed = cfg.injection in MODULATED
        self.t_embed_a = TimestepEmbedder(cfg.dim) if timed else None
        self.t_embed_v = TimestepEmbedder(cfg.dim) if timed else None
        if not timed:
            self.register_load_state_dict_pre_hook(self._drop_time_embedders)
        n = cfg.num_blocks
        self.blocks = nn.ModuleList(self._block(cfg, dim_a, dim_v, generated, i == n - 1) for i in range(n))

    @staticmethod
    def _block(cfg: FusionConfig, dim_a: int, dim_v: int, generated: tuple[str, ...], last: bool) -> nn.Module:
        # Fused outputs that anything reads: the generated stream's, and the conditioning stream's only where it
        # is reinjected into a later fusion block. The others are not built: they could never get a gradient
        # (dead weight in the parameter count, an error under DDP). A shared set generates both streams.
        outputs = tuple(s for s in ("a", "v") if s in generated or (cfg.injection in REINJECTED and not last))
        if cfg.injection in ("fusion", "static"):
            return FusionBlock(dim_a, dim_v, cfg, outputs)
        if cfg.injection == "cross_attention":
            return CrossAttentionFusion(dim_a, dim_v, cfg, outputs)
        if cfg.injection == "direct":
            return DirectAlignment(dim_a, dim_v, cfg, directions=generated)
        if cfg.injection == "text_concat":
            return nn.ModuleDict({g: TextConcat(dim_v if g == "a" else dim_a, dim_a if g == "a" else dim_v)
                                  for g in generated})
        raise ValueError(f"unknown injection {cfg.injection!r}")

    @staticmethod
    def _drop_time_embedders(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_) -> None:
        """Older checkpoints of these injections hold the flow-time embedders, which never reached an output."""
        drop_prefix(state_dict, prefix + "t_embed_a.")
        drop_prefix(state_dict, prefix + "t_embed_v.")

    def conditioning(self, t_a: Tensor, t_v: Tensor) -> Tensor | None:
        """(B, D): each stream's modulation sees both flow times; None where no block is modulated."""
        if self.t_embed_a is None or self.t_embed_v is None:
            return None
        return self.t_embed_a(t_a) + self.t_embed_v(t_v)


@dataclass
class Condition:
    """Everything about the conditioning side of one batch, prepared once per sample.

    x_cond is the clean conditioning modality noised once, to t_cond, with noise drawn once. The conditioning
    stream's blocks before the first fusion point see the same input at every sampling step, so their output
    is computed here; with no reinjection ("static", "text_concat") the whole conditioning stream is. When
    sampling, both prompts are prepared here too (`PreparedText`: projected, with every block's keys and values).
    cond_state None is the plain path: `forward` recomputes the conditioning stream at every call.

    audio_start: seconds from the video's first frame to the audio's first token. A training clip starts both at
    0; a window of a long input (pipeline.plan_windows) may start its audio a fraction of a token off its video, and
    the Fusion Blocks' time-aligned RoPE must see where each token really sits.
    """

    task: Task
    x_cond: Tensor
    t_cond: Tensor  # (B,)
    text_gen: TextCond | PreparedText | None
    text_cond: TextCond | None  # the conditioning stream's prompt as given (the plain path embeds it)
    cond_state: StreamState | None = None  # conditioning stream after the blocks before the first fusion point
    cond_start: int = 0  # the conditioning stream's next block to run
    static_features: list[Tensor] | None = None  # per fusion point, when the stream is not reinjected
    audio_start: float = 0.0  # seconds, audio's first token after video's first frame

    @property
    def cached(self) -> bool:
        return self.cond_state is not None

    def with_text(self, text_gen: TextCond | PreparedText | None) -> Condition:
        """The same condition with another prompt for the generated stream, as given (see AVLink.with_gen_text)."""
        return replace(self, text_gen=text_gen)


class AVLink(nn.Module):
    """features: the extractor of a link whose Fusion Blocks read pretrained features instead of the conditioning
    generator's activations (`FusionConfig.features`, fusion/features.py); None for the generator's own."""

    def __init__(self, cfg: ModelConfig, audio: Backbone, video: Backbone, tasks: tuple[Task, ...] = TASKS,
                 features: ConditioningFeatures | None = None):
        super().__init__()
        self.cfg = cfg
        self.audio = audio
        self.video = video
        for backbone in (audio, video):
            backbone.requires_grad_(False)
            backbone.eval()
        self.points = fusion_points(cfg.fusion, audio.num_blocks, video.num_blocks)
        fcfg = cfg.fusion
        # A plain attribute, not a submodule: the extractor's weights are its own file's, never the link's.
        self.feature_stream = self._feature_stream(fcfg, features, tasks)
        if fcfg.shared:
            sets = {"joint": FusionSet(fcfg, audio.hidden_dim, video.hidden_dim, ("a", "v"))}
        else:
            sets = {task: FusionSet(fcfg, *self._widths(task), (GENERATED[task],)) for task in tasks}
        self.fusion = nn.ModuleDict(sets)
        # "w/FT": the generated stream's backbone trains with the fusion sets (a shared set: both backbones).
        generated = ("a", "v") if fcfg.shared else tuple(GENERATED[task] for task in tasks)
        self.finetuned: tuple[str, ...] = tuple(STREAMS[g] for g in generated) if fcfg.finetune else ()
        for name in self.finetuned:
            getattr(self, name).requires_grad_(True)
        self.activation_checkpointing = False  # fusion blocks too; set_activation_checkpointing sets all
        self.initialize_weights()

    @staticmethod
    def _feature_stream(cfg: FusionConfig, features: ConditioningFeatures | None,
                        tasks: tuple[Task, ...]) -> FeatureStream | None:
        if cfg.features == "generator":
            if features is not None:
                raise ValueError(f"features {features.name} given to a link that reads the generator's activations "
                                 "(fusion.features = generator)")
            return None
        if features is None:
            raise ValueError(f"fusion.features = {cfg.features}: this link conditions on {cfg.features} features; "
                             "build it with that extractor (system.build_model(..., features=...))")
        if features.name != cfg.features:
            raise ValueError(f"fusion.features = {cfg.features}, but the extractor given is {features.name}")
        if cfg.shared:
            raise ValueError(f"fusion.features = {cfg.features}: a set shared by both directions would need "
                             "features of both modalities; train one direction")
        for task in tasks:
            if CONDITIONING[task] != features.modality:
                raise ValueError(f"fusion.features = {cfg.features} reads {features.modality}, which conditions "
                                 f"{'V2A' if features.modality == 'video' else 'A2V'} only, not {task}")
        return FeatureStream(features)

    def _widths(self, task: Task) -> tuple[int, int]:
        """(audio, video) widths that the task's fusion blocks read: the conditioning side's is the features'
        in a feature row."""
        dim_a, dim_v = self.audio.hidden_dim, self.video.hidden_dim
        if self.feature_stream is not None:
            width = self.feature_stream.hidden_dim
            return (dim_a, width) if task == "v2a" else (width, dim_v)
        return dim_a, dim_v

    def initialize_weights(self) -> None:
        for module in self.fusion.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.fusion.modules():
            if isinstance(module, TimestepEmbedder):
                nn.init.normal_(module.mlp[0].weight, std=0.02)
                nn.init.normal_(module.mlp[2].weight, std=0.02)
            # Whatever writes into a frozen backbone starts at zero.
            if isinstance(module, AdaLN):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
            if isinstance(module, DirectAlignment):
                for proj in (module.to_a, module.to_v):
                    if proj is not None:
                        nn.init.zeros_(proj[1].weight)
                        nn.init.zeros_(proj[1].bias)

    def train(self, mode: bool = True) -> AVLink:
        super().train(mode)
        # Frozen parts stay in eval mode; so does a fine-tuned backbone, which holds no dropout or batch
        # statistics: it computes the same in either mode, and alike in training and in sampling.
        self.audio.eval()
        self.video.eval()
        return self

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled
        for backbone in (self.audio, self.video):
            if hasattr(backbone, "activation_checkpointing"):
                backbone.activation_checkpointing = enabled

    def has_task(self, task: Task) -> bool:
        """Whether this link holds Fusion Blocks for `task` (a fine-tuned export may hold one direction)."""
        return self.cfg.fusion.shared or task in self.fusion

    def fusion_set(self, task: Task) -> FusionSet:
        return self.fusion["joint"] if self.cfg.fusion.shared else self.fusion[task]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The fusion sets' parameters, and a fine-tuned backbone's ("w/FT")."""
        modules = [self.fusion, *(getattr(self, name) for name in self.finetuned)]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def backbones(self, task: Task) -> tuple[Backbone, Backbone]:
        """(generated, conditioning) backbone of a task."""
        return (self.audio, self.video) if task == "v2a" else (self.video, self.audio)

    def _points(self, task: Task) -> list[tuple[int, int]]:
        """Fusion points as (generated block, conditioning block); a feature stream has no blocks (0)."""
        points = self.points if task == "v2a" else [(v, a) for a, v in self.points]
        if self.feature_stream is not None:
            return [(gen, 0) for gen, _ in points]
        return points

    def _conditioning(self, task: Task) -> Backbone | FeatureStream:
        """What runs the conditioning stream between fusion points: its backbone, or a feature row's stream."""
        return self.feature_stream if self.feature_stream is not None else self.backbones(task)[1]

    @property
    def _reinject(self) -> bool:
        return self.cfg.fusion.injection in REINJECTED

    # -- conditions, once per sample ---------------------------------------------------------------------
    def prepare(
        self, task: Task, x_cond_clean: Tensor, text_gen: TextCond | None = None, text_cond: TextCond | None = None,
        t_cond: float | Tensor | None = None, noise: Tensor | None = None, generator: torch.Generator | None = None,
        cache: bool = True, audio_start: float = 0.0,
    ) -> Condition:
        """cache=False: the plain path, which only noises x_cond and leaves all the rest to every step.
        audio_start: Condition's.

        The prompts are prepared (`PreparedText`) only where no gradient is recorded (sampling); training keeps
        the text path inside its forward, exactly as the backbones' own training does."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose v2a or a2v")
        b = x_cond_clean.shape[0]
        t_cond = self.cfg.fusion.t_cond(task) if t_cond is None else t_cond
        t_cond = torch.as_tensor(t_cond, dtype=torch.float32, device=x_cond_clean.device).expand(b).clone()
        if noise is None:
            noise = torch.randn(x_cond_clean.shape, generator=generator, dtype=x_cond_clean.dtype,
                                device=x_cond_clean.device)
        x_cond = interpolate(noise, x_cond_clean, t_cond)
        gen_bb, cond_bb = self.backbones(task)
        if self.feature_stream is not None:
            # The features are the input, not a cache: computed here once per clip on either path.
            state = self.feature_stream.state(x_cond_clean, t_cond)
            static = None if self._reinject else [state.x] * len(self.points)
            if cache and not torch.is_grad_enabled():
                text_gen = prepare_text(gen_bb, text_gen, b)
            return Condition(task, x_cond, t_cond, text_gen, text_cond, state, 0, static, audio_start)
        if not cache:
            return Condition(task, x_cond, t_cond, text_gen, text_cond, audio_start=audio_start)
        prepared_cond: TextCond | PreparedText | None = text_cond
        if not torch.is_grad_enabled():
            text_gen = prepare_text(gen_bb, text_gen, b)
            # The conditioning stream never runs past the last fusion point: no keys and values beyond it.
            prepared_cond = prepare_text(cond_bb, text_cond, b, stop=self._points(task)[-1][1])
        with torch.no_grad():  # frozen, and nothing trainable has touched this part of the stream yet
            state, start, static = self._conditioning_stream(task, x_cond, t_cond, prepared_cond)
        return Condition(task, x_cond, t_cond, text_gen, text_cond, state, start, static, audio_start)

    def _conditioning_stream(
        self, task: Task, x_cond: Tensor, t_cond: Tensor, text_cond: TextCond | PreparedText | None,
    ) -> tuple[StreamState, int, list[Tensor] | None]:
        """The conditioning stream up to the first fusion point (with no reinjection: to the last one, keeping
        the features at every point): (state, its next block to run, static features or None)."""
        _, cond_bb = self.backbones(task)
        points = self._points(task)
        state = cond_bb.embed(x_cond, t_cond, text_cond)
        first = points[0][1]
        state = cond_bb.run_blocks(state, 0, first)
        if self._reinject:
            return state, first, None
        static, start = [], first
        for _, stop in points:
            state = cond_bb.run_blocks(state, start, stop)
            static.append(state.x)
            start = stop
        return state, start, static

    def with_gen_text(self, cond: Condition, text: TextCond | None) -> Condition:
        """cond with another prompt for the generated stream (classifier-free guidance's null text: None),
        prepared the way cond's own prompt was, so that both batch together."""
        if isinstance(cond.text_gen, PreparedText):
            gen_bb, _ = self.backbones(cond.task)
            text = prepare_text(gen_bb, text, cond.x_cond.shape[0])
        return cond.with_text(text)

    # -- velocity, once per step -------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """Velocity of the generated modality at (x, t) given a prepared condition."""
        task = cond.task
        gen_bb, cond_bb = self.backbones(task)[0], self._conditioning(task)
        fset = self.fusion_set(task)
        gen = gen_bb.embed(x, t, cond.text_gen)
        c_state, cond_at, static = cond.cond_state, cond.cond_start, cond.static_features
        if c_state is None:  # the plain path: what prepare would cache, recomputed at every call
            c_state, cond_at, static = self._conditioning_stream(task, cond.x_cond, cond.t_cond, cond.text_cond)
        t_a, t_v = (gen.t, cond.t_cond) if task == "v2a" else (cond.t_cond, gen.t)
        a_times, v_times = (gen.times, c_state.times) if task == "v2a" else (c_state.times, gen.times)
        a_times = a_times + cond.audio_start  # both streams in seconds from the video's first frame
        align = Alignment.build(a_times, v_times, self.audio.eta, self.video.eta, self.cfg.fusion)
        c = fset.conditioning(t_a, t_v)
        injection = self.cfg.fusion.injection
        if injection == "text_concat":
            assert static is not None, "text_concat has no reinjection: its features are static"
            gen = self._concat_to_text(gen, task, static, align.times_v if task == "v2a" else align.times_a, fset)
            return gen_bb.head(gen_bb.run_blocks(gen, 0, gen_bb.num_blocks))

        gen_at = 0
        for i, (block, (gen_point, cond_point)) in enumerate(zip(fset.blocks, self._points(task), strict=True)):
            gen = gen_bb.run_blocks(gen, gen_at, gen_point)
            gen_at = gen_point
            if static is not None:
                c_x = static[i]
            else:
                c_state = cond_bb.run_blocks(c_state, cond_at, cond_point)
                cond_at = cond_point
                c_x = c_state.x
            x_a, x_v = (gen.x, c_x) if task == "v2a" else (c_x, gen.x)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x_a, x_v = checkpoint(self._fuse, block, x_a, x_v, c, align, task, use_reentrant=False)
            else:
                x_a, x_v = self._fuse(block, x_a, x_v, c, align, task)
            new_gen, new_cond = (x_a, x_v) if task == "v2a" else (x_v, x_a)
            gen = gen.with_x(new_gen)
            if self._reinject:  # symmetric feature reinjection
                c_state = c_state.with_x(new_cond)
        # The conditioning stream's later blocks and head cannot reach the generated stream: never run.
        gen = gen_bb.run_blocks(gen, gen_at, gen_bb.num_blocks)
        return gen_bb.head(gen)

    @staticmethod
    def _fuse(block: nn.Module, x_a: Tensor, x_v: Tensor, c: Tensor | None, align: Alignment, task: Task):
        if isinstance(block, DirectAlignment):
            return block(x_a, x_v, c, align, gen=GENERATED[task])
        return block(x_a, x_v, c, align)

    @staticmethod
    def _concat_to_text(
        gen: StreamState, task: Task, static: list[Tensor], times: Tensor, fset: FusionSet,
    ) -> StreamState:
        g = GENERATED[task]
        features = zip(fset.blocks, static, strict=True)
        extra = [block[g](feat, times) for block, feat in features]
        extra = torch.cat(extra, dim=1).to(gen.text.dtype)  # (B, n_points * T, D_gen)
        b = extra.shape[0]
        ones = torch.ones(b, extra.shape[1], dtype=torch.bool, device=extra.device)
        return gen.with_text(torch.cat([gen.text, extra], 1), torch.cat([gen.text_mask, ones], 1))

    # -- training ----------------------------------------------------------------------------------------
    def loss(
        self, task: Task, audio: Tensor, video: Tensor, text_audio: TextCond | None = None,
        text_video: TextCond | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:
        """The rectified-flow objective of Eq. 5: only the generated modality gets the loss."""
        return self.loss_terms(task, audio, video, text_audio, text_video, generator)[0].mean()

    def loss_terms(
        self, task: Task, audio: Tensor, video: Tensor, text_audio: TextCond | None = None,
        text_video: TextCond | None = None, generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B,) per-sample loss and the (B,) flow times it was taken at."""
        x_gen, x_cond = (audio, video) if task == "v2a" else (video, audio)
        text_gen, text_cond = (text_audio, text_video) if task == "v2a" else (text_video, text_audio)
        b = x_gen.shape[0]
        t_cond = None  # fixed at the config's value
        if self.cfg.fusion.t_cond_mode == "uniform":
            t_cond = uniform(b, generator=generator, device=x_gen.device)
        cond = self.prepare(task, x_cond, text_gen, text_cond, t_cond=t_cond, generator=generator)
        t = logit_normal(b, generator=generator, device=x_gen.device)
        return flow_matching_errors(lambda x, tt: self(x, tt, cond), x_gen, t, generator=generator), t
