"""Layers against the plain formulas written out here."""

import pytest
import torch

from avlink.nn.layers import MLP, layer_norm, modulate, modulated_norm


def reference_modulated_norm(x, shift, scale, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale) + shift


def test_modulate_matches_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    shift, scale = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


@pytest.mark.parametrize("batch", [1, 3])
def test_modulated_norm_matches_reference_with_gradients(batch):
    """Batch 1 takes the LayerNorm's affine step, larger batches two steps: both the same function."""
    g = torch.Generator().manual_seed(batch)
    norm = layer_norm(16)
    x = (torch.randn(batch, 7, 16, generator=g) * 3 + 1).requires_grad_()
    shift = torch.randn(batch, 1, 16, generator=g).requires_grad_()
    scale = torch.randn(batch, 1, 16, generator=g).requires_grad_()
    weight = torch.randn(batch, 7, 16, generator=g)
    out = modulated_norm(norm, x, shift, scale)
    (out * weight).sum().backward()
    got = [t.grad.clone() for t in (x, shift, scale)]
    for t in (x, shift, scale):
        t.grad = None
    ref = reference_modulated_norm(x, shift, scale)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, t in zip(got, (x, shift, scale), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


def test_modulated_norm_keeps_type_promotion():
    """A bf16 stream with fp32 modulation promotes to fp32, as modulate(norm(x)) does."""
    norm = layer_norm(8)
    x = torch.randn(1, 4, 8).bfloat16()
    shift, scale = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    out = modulated_norm(norm, x, shift, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, modulate(norm(x), shift, scale))


def reference_mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    return h @ mlp.fc2.weight.T + mlp.fc2.bias


@pytest.mark.parametrize("grad", [False, True])
def test_mlp_in_chunks_matches_reference(grad):
    """Rows that are not a multiple of the chunk, over a batch of two: the same result with and without
    autograd (which runs the whole sequence at once)."""
    torch.manual_seed(0)
    mlp = MLP(16, 64, out_dim=12)
    mlp.chunk_bytes = 64 * 64 * 4  # 64 rows of hidden activations per chunk
    x = torch.randn(2, 75, 16)  # 150 rows: chunks of 64, 64, 22
    assert mlp.chunk_rows(x) == 64
    with torch.set_grad_enabled(grad):
        out = mlp(x)
    assert out.shape == (2, 75, 12) and out.requires_grad == grad
    torch.testing.assert_close(out, reference_mlp(mlp, x), atol=1e-5, rtol=1e-5)


def test_mlp_chunks_are_taken(monkeypatch):
    """Without autograd a long input goes through fc1 in chunks; a short one in one call."""
    mlp = MLP(8, 32)
    mlp.chunk_bytes = 64 * 32 * 4
    rows = []
    fc1 = mlp.fc1.forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[:-1].numel())
        return fc1(x)

    monkeypatch.setattr(mlp.fc1, "forward", counting)
    with torch.no_grad():
        mlp(torch.randn(1, 200, 8))
        assert rows == [64, 64, 64, 8]
        rows.clear()
        mlp(torch.randn(1, 100, 8))  # fewer than two chunks: one call
        assert rows == [100]

