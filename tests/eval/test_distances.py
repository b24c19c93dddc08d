import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch

from avlink.eval import distances


def textbook_fd(x: np.ndarray, y: np.ndarray, offset: float = 0.0) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm; with `offset`, the square root is
    taken of (S1 + offset I)(S2 + offset I), as the usual fallback does."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eye = offset * np.eye(x.shape[1])
    covmean = scipy.linalg.sqrtm((s1 + eye) @ (s2 + eye)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_the_textbook_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) * 0.7 + 0.3
    ours = distances.frechet_distance_features(x, y)
    assert ours == pytest.approx(textbook_fd(x, y), rel=1e-8)
    assert distances.frechet_distance_features(y, x) == pytest.approx(ours, rel=1e-10)
    assert abs(distances.frechet_distance_features(x, x)) < 1e-9


def test_frechet_distance_with_fewer_clips_than_dimensions():
    """Singular covariances (rank 5 and 4 in 32 dimensions): no offset needed, the textbook value."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 32)), rng.normal(size=(5, 32)) + 1.0
    ours = distances.frechet_distance_features(x, y)
    assert ours == pytest.approx(textbook_fd(x, y), rel=1e-8)


def test_frechet_distance_retries_with_the_offset_when_the_root_fails(monkeypatch):
    calls = []
    real = distances.trace_sqrt_product

    def flaky(s1, s2):
        calls.append(np.trace(s1))
        if len(calls) == 1:
            raise np.linalg.LinAlgError("no convergence")
        return real(s1, s2)

    monkeypatch.setattr(distances, "trace_sqrt_product", flaky)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    value = distances.frechet_distance_features(x, y)
    assert len(calls) == 2 and calls[1] == pytest.approx(calls[0] + 4 * distances.FD_EPS)
    assert value == pytest.approx(textbook_fd(x, y, offset=distances.FD_EPS), rel=1e-6)


def published_is(logits: np.ndarray) -> float:
    """Salimans et al.: exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the set."""
    p = scipy.special.softmax(logits, axis=1)
    marginal = p.mean(axis=0)
    return float(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in p])))


def test_inception_score_follows_the_published_definition():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(40, 7)) * 3
    mean, std = distances.inception_score(logits, splits=1)
    assert mean == pytest.approx(published_is(logits), rel=1e-10) and std == 0.0
    mean, std = distances.inception_score(logits, splits=4)
    parts = [published_is(part) for part in np.split(logits, 4)]
    assert (mean, std) == (pytest.approx(np.mean(parts)), pytest.approx(np.std(parts)))
    # confident and balanced over K classes -> K; one class for everything -> 1
    confident = np.eye(5)[np.arange(50) % 5] * 60.0
    assert distances.inception_score(confident, splits=1)[0] == pytest.approx(5.0, rel=1e-6)
    assert distances.inception_score(np.tile(confident[:1], (50, 1)), splits=1)[0] == pytest.approx(1.0)


def test_kl_is_reference_against_generated_per_pair():
    rng = np.random.default_rng(4)
    ref, gen = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    expected = [scipy.stats.entropy(scipy.special.softmax(r), scipy.special.softmax(g))
                for r, g in zip(ref, gen, strict=True)]
    np.testing.assert_allclose(distances.kl_per_pair(ref, gen), expected, rtol=1e-10)
    assert np.allclose(distances.kl_per_pair(ref, ref), 0.0)


def test_cosine_per_pair_and_tensor_inputs():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 16)), rng.normal(size=(4, 16))
    expected = [1 - scipy.spatial.distance.cosine(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(distances.cosine_per_pair(torch.from_numpy(a), b), expected, rtol=1e-10)
    assert distances.frechet_distance_features(torch.from_numpy(a).float(), b) == pytest.approx(
        distances.frechet_distance_features(a.astype(np.float32).astype(np.float64), b), rel=1e-9)
