"""The pure `attention` function against plain softmax attention written out here."""

import math

import pytest
import torch

from avlink.nn.attention import attention
from avlink.nn.rope import rope_angles


def reference_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def reference_attention(q, k, v, angles_q=None, angles_k=None, key_mask=None):
    if angles_q is not None:
        q = reference_rope(q, angles_q)
    if angles_k is not None:
        k = reference_rope(k, angles_k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, Nq, H*Dh)


def packed(b: int, n: int, parts: int, h: int, dh: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Strided (B, H, N, Dh) views into one packed projection, as the attention modules make them."""
    x = torch.randn(b, n, parts * h * dh, generator=g)
    return tuple(x.unflatten(-1, (parts, h, dh)).permute(2, 0, 3, 1, 4))


def test_self_attention_with_rope_on_packed_views():
    g = torch.Generator().manual_seed(0)
    q, k, v = packed(2, 37, 3, 3, 16, g)
    angles = rope_angles(torch.rand(37, generator=g) * 40, 16)
    out = attention(q, k, v, angles, angles)
    assert out.shape == (2, 37, 48)
    torch.testing.assert_close(out, reference_attention(q, k, v, angles, angles), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("with_rope", [False, True])
def test_cross_attention_with_padded_keys(with_rope):
    """Rows of a batch with different numbers of valid keys; padded keys hold large values that would show
    if they got any weight."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 11, 2, 8, generator=g).transpose(1, 2)  # (B, H, Nq, Dh), a transposed view
    k, v = packed(3, 6, 2, 2, 8, g)
    key_mask = torch.tensor([[True] * 6, [True, True, False, False, False, False], [True] + [False] * 5])
    k = torch.where(key_mask[:, None, :, None], k, torch.full_like(k, 50.0))
    v = torch.where(key_mask[:, None, :, None], v, torch.full_like(v, 1e3))
    angles_q = rope_angles(torch.rand(11, generator=g) * 10, 8) if with_rope else None
    angles_k = rope_angles(torch.rand(3, 6, generator=g) * 10, 8) if with_rope else None  # per batch row
    out = attention(q, k, v, angles_q, angles_k, key_mask)
    ref = reference_attention(q, k, v, angles_q, angles_k[:, None] if with_rope else None, key_mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert out.abs().max() < 100  # no weight on the padded values


def test_attention_gradients_match_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.detach().clone().requires_grad_() for t in packed(1, 9, 3, 2, 8, g))
    angles = rope_angles(torch.arange(9.0), 8)
    weight = torch.randn(1, 9, 16, generator=g)
    (attention(q, k, v, angles, angles) * weight).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (reference_attention(q, k, v, angles, angles) * weight).sum().backward()
    for a, t in zip(got, (q, k, v), strict=True):
        torch.testing.assert_close(a, t.grad, atol=2e-5, rtol=1e-4)
