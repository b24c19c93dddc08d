"""The DiT both frozen generators share: adaLN timestep, self-attention with RoPE, text cross-attention after
each self-attention, MLP (the paper's Sec. 3.2). Subclasses say how data becomes tokens and where each token sits.

Reads top-down: text conditioning helpers, the block, the final layer, the model.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from avlink.backbones.protocol import PreparedText, StreamState, TextCond, TextKV
from avlink.config import DiTConfig
from avlink.nn.attention import CrossAttention, SelfAttention
from avlink.nn.layers import MLP, AdaLN, TimestepEmbedder, layer_norm, modulate


def drop_text(text: TextCond, null: TextCond, drop: Tensor) -> TextCond:
    """Classifier-free guidance dropout: rows where drop (B,) is True become the null text. No host sync."""
    assert null.tokens.shape[1] == 1, "the null text is one token"
    assert text.tokens.shape[1] >= 1, "text states must be at least one token long"
    tokens = torch.where(drop[:, None, None], torch.zeros_like(text.tokens), text.tokens)
    tokens[:, :1] = torch.where(drop[:, None, None], null.tokens.to(tokens.dtype), tokens[:, :1])
    first = torch.zeros_like(text.mask)
    first[:, 0] = True
    return TextCond(tokens, torch.where(drop[:, None], first, text.mask))


def null_for_empty(text: TextCond, null: TextCond) -> TextCond:
    """Rows without a real token (a clip without a caption: codecs/text.py gives it no states) become the null
    text, which no prompt is at inference; the other rows stay as they are."""
    return drop_text(text, null, ~text.mask.any(1))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = layer_norm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross = CrossAttention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm3 = layer_norm(d)
        self.mlp = MLP(d, int(d * cfg.mlp_ratio))
        self.ada = AdaLN(d, (d,) * 6)

    def forward(
        self, x: Tensor, c: Tensor, angles: Tensor, text: Tensor, text_mask: Tensor, text_kv: TextKV | None = None,
    ) -> Tensor:
        """text_kv: this block's text keys and values prepared once per sample; None: projected from text."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), angles)
        kv = None if text_kv is None else (text_kv.k, text_kv.v)
        x = x + self.cross(self.norm2(x), text, text_mask, kv=kv)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.ada = AdaLN(dim, (dim, dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """A text-conditioned flow model over tokens; implements the Backbone protocol."""

    def __init__(self, cfg: DiTConfig, token_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.x_embed = nn.Linear(token_dim, d)
        self.t_embed = TimestepEmbedder(d)
        # Text states are projected to the model width once per forward (once per sample: prepare_text).
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))  # learned "no prompt" for CFG
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(d, token_dim)
        # Recompute each block's activations in backward instead of storing them (memory for compute).
        self.activation_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        # adaLN-Zero: every block starts as the identity; the output layer starts at zero velocity.
        for module in self.modules():
            if isinstance(module, AdaLN):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # -- what a subclass defines ------------------------------------------------------------------------
    @property
    @abstractmethod
    def eta(self) -> float:
        """Token positions per second along time."""

    def position_embedding(self, grid: tuple[int, ...]) -> Tensor | None:
        """(N, D) added to the embedded tokens of this grid, or None: positions come from RoPE alone."""
        return None

    @abstractmethod
    def tokenize(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Data -> (B, N, token_dim) tokens and the grid that untokenize needs."""

    @abstractmethod
    def untokenize(self, tokens: Tensor, grid: tuple[int, ...]) -> Tensor: ...

    @abstractmethod
    def token_times(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """(N,) start time of each token in seconds."""

    @abstractmethod
    def rope(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """(N, head_dim / 2) RoPE angles of the backbone's own self-attention."""

    # -- the Backbone protocol ---------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        return self.cfg.dim

    @property
    def num_blocks(self) -> int:
        return self.cfg.depth

    def null_text_cond(self, batch_size: int) -> TextCond:
        tokens = self.null_text.expand(batch_size, 1, -1)
        return TextCond(tokens, torch.ones(batch_size, 1, dtype=torch.bool, device=tokens.device))

    def _text_or_null(self, text: TextCond | None, batch_size: int) -> TextCond:
        """The text a prompt gives: None, or a row of it without a real token (an empty caption), is the null text."""
        null = self.null_text_cond(batch_size)
        if text is None:
            return null
        assert text.tokens.shape[-1] == self.cfg.text_dim, (
            f"text states are {text.tokens.shape[-1]}-d, this backbone expects {self.cfg.text_dim}-d"
        )
        return null_for_empty(text, null)

    def _project_text(self, text: TextCond, dtype: torch.dtype) -> Tensor:
        return self.text_proj(text.tokens.to(dtype))  # (B, L, D)

    @torch.no_grad()
    def prepare_text(self, text: TextCond | None, batch_size: int, stop: int | None = None) -> PreparedText:
        """A prompt (None: the null text) projected once per sample, with the keys and values of blocks
        [0, stop) (None: every block): sampling evaluates the same prompt at every step. For sampling only:
        gradients never reach the text path through it (training takes the plain `TextCond` path)."""
        stop = self.num_blocks if stop is None else stop
        assert 0 <= stop <= self.num_blocks, f"stop {stop} out of 0..{self.num_blocks}"
        text = self._text_or_null(text, batch_size)
        tokens = self._project_text(text, self.x_embed.weight.dtype)  # (B, L, D)
        kv: list[TextKV | None] = []
        for block in self.blocks[:stop]:
            k, v = block.cross.context_kv(tokens)  # views into one projection; attention reads them each step
            kv.append(TextKV(k.contiguous(), v.contiguous()))
        return PreparedText(tokens, text.mask, kv + [None] * (self.num_blocks - stop))

    def embed(self, x_t: Tensor, t: Tensor, text: TextCond | PreparedText | None = None) -> StreamState:
        tokens, grid = self.tokenize(x_t)
        b = tokens.shape[0]
        t = t.expand(b) if t.ndim == 0 or t.shape[0] == 1 else t
        assert t.shape == (b,), f"t must be (B,) = ({b},), got {tuple(t.shape)}"
        if isinstance(text, PreparedText):
            assert text.batch_size == b and len(text.kv) == self.num_blocks, (
                f"prepared text for batch {text.batch_size} and {len(text.kv)} blocks, "
                f"used at batch {b} with {self.num_blocks} blocks")
            assert not (torch.is_grad_enabled() and self.text_proj[0].weight.requires_grad), (
                "prepared text carries no gradient to the text projection; train with the TextCond")
            text_tokens, text_mask, text_kv = text.tokens, text.mask, text.kv
        else:
            text = self._text_or_null(text, b)
            text_tokens, text_mask, text_kv = self._project_text(text, tokens.dtype), text.mask, None
        x = self.x_embed(tokens)  # (B, N, D)
        positions = self.position_embedding(grid)
        return StreamState(
            x=x if positions is None else x + positions,
            t=t,
            c=self.t_embed(t),  # (B, D)
            times=self.token_times(grid, tokens.device),
            angles=self.rope(grid, tokens.device),
            text=text_tokens,  # (B, L, D)
            text_mask=text_mask,
            grid=grid,
            text_kv=text_kv,
        )

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        assert 0 <= start <= stop <= self.num_blocks, f"blocks [{start}, {stop}) out of 0..{self.num_blocks}"
        x = state.x
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i in range(start, stop):
            kv = None if state.text_kv is None else state.text_kv[i]
            args = (x, state.c, state.angles, state.text, state.text_mask, kv)
            x = checkpoint(self.blocks[i], *args, use_reentrant=False) if recompute else self.blocks[i](*args)
        return state.with_x(x)

    def head(self, state: StreamState) -> Tensor:
        return self.untokenize(self.final(state.x, state.c), state.grid)

    def forward(self, x_t: Tensor, t: Tensor, text: TextCond | PreparedText | None = None) -> Tensor:
        """The generator alone (T2A / T2V): velocity of the whole stack."""
        state = self.run_blocks(self.embed(x_t, t, text), 0, self.num_blocks)
        return self.head(state)
