import pytest
import torch

from avlink.flow.guidance import classifier_free_guidance
from avlink.flow.path import flow_matching_loss, interpolate, logit_normal


def test_path_ends():
    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(2)), x1)
    torch.testing.assert_close(interpolate(x0, x1, torch.tensor([0.25, 0.5]))[1], (x0[1] + x1[1]) / 2)


def test_logit_normal_distribution():
    t = logit_normal(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    logit = torch.log(t / (1 - t))
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)


def test_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    x0, x1, t = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4)
    assert flow_matching_loss(lambda x, tt: x1 - x0, x1, t, x0).item() == 0.0
    assert flow_matching_loss(lambda x, tt: torch.zeros_like(x), x1, t, x0).item() == pytest.approx(
        (x1 - x0).square().mean().item())


def test_loss_mask_ignores_padding():
    x0, x1, t = torch.randn(2, 5), torch.randn(2, 5), torch.rand(2)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)

    def velocity(x, tt):
        v = (x1 - x0).clone()
        v[:, 3:] += 100.0  # wrong only where padded
        return v

    assert flow_matching_loss(velocity, x1, t, x0, mask=mask).item() == 0.0


def test_guidance_formula_and_scale_one():
    def velocity(x, t, scale):
        return x * scale

    x, t = torch.ones(2, 3), torch.rand(2)
    s = torch.full((2, 1), 2.0)
    u = torch.full((2, 1), 0.5)
    guided = classifier_free_guidance(velocity, 4.0, {"scale": s}, {"scale": u})(x, t)
    torch.testing.assert_close(guided, torch.full((2, 3), 0.5 + 4.0 * 1.5))
    torch.testing.assert_close(classifier_free_guidance(velocity, 1.0, {"scale": s}, {"scale": u})(x, t), x * 2)
