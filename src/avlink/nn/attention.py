"""Attention: one pure function over torch SDPA, and the two modules every block uses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from avlink.nn.rope import apply_rope


def attention(
    q: Tensor, k: Tensor, v: Tensor,
    angles_q: Tensor | None = None, angles_k: Tensor | None = None, key_mask: Tensor | None = None,
) -> Tensor:
    """q (B, H, Nq, Dh), k/v (B, H, Nk, Dh) -> (B, Nq, H*Dh). key_mask (B, Nk) bool, True = attend.

    Any strides are accepted. Keys and values are made contiguous: the fused kernel reads them again for every
    block of queries, and strided rows (a view into a packed qkv projection) cost more than the copy.
    """
    if angles_q is not None:
        q = apply_rope(q, angles_q)
    if angles_k is not None:
        k = apply_rope(k, angles_k)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Nk)
    out = F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # RMS-normalised queries and keys keep attention logits bounded in long training runs.
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, angles: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        return self.proj(attention(self.q_norm(q), self.k_norm(k), v, angles, angles))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a context (text tokens, or the other stream)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} is not divisible by heads {heads}"
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Nk, context_dim) -> normalised keys and values, 2 x (B, H, Nk, Dh).

        A context that stays the same over many calls (a prompt over the sampling steps) is projected once with
        this and handed to `forward` as `kv`."""
        k, v = self.kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nk, Dh)
        return self.k_norm(k), v

    def forward(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor | None = None,
        angles_q: Tensor | None = None, angles_k: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """kv: `context_kv(context)` computed beforehand; context is then not read."""
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, Nq, Dh)
        if kv is None:
            assert context is not None, "cross-attention needs a context or its prepared keys and values"
            kv = self.context_kv(context)
        k, v = kv
        assert k.shape[0] == q.shape[0] and k.shape[1] == self.heads, (
            f"keys {tuple(k.shape)} do not fit queries {tuple(q.shape)} ({self.heads} heads)")
        out = attention(self.q_norm(q), k, v, angles_q, angles_k, context_mask)
        return self.proj(out)
