"""Set and pair scores over embeddings and class logits: Frechet distance, Inception Score, KL, cosine.

- Frechet distance (Heusel et al., 2017; FAD / FVD / FD_PaSST etc. differ only in the embedder):
  ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)), with S the sample covariance (ddof 1).
  The trace of the matrix square root is the sum of the square roots of the eigenvalues of
  S_1^(1/2) S_2 S_1^(1/2), which is symmetric positive semi-definite and has the eigenvalues of S_1 S_2; this
  way it is real by construction, and a singular covariance (fewer clips than dimensions) needs no offset.
  Where it still fails (the eigen solver does not converge, or the result is not finite) we retry with
  eps * I added to both covariances, the fallback of the usual implementations (pytorch-fid, torch-fidelity)
  around scipy's sqrtm.
- Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))) over each of `splits` contiguous parts
  of the set, mean and standard deviation over the parts (the published code uses 10 splits).
- KL as in the V2A literature (audioldm_eval's `calculate_kl`, reused by later V2A benchmarks): per pair of
  generated and reference clip, KL(softmax(reference logits) || softmax(generated logits)), averaged over
  pairs.
- cosine scores (CLAP score: text vs generated audio; ImageBind score: audio vs video): per-pair cosine
  similarity of two embeddings, averaged over pairs.
Everything runs in float64 numpy; torch tensors are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FD_EPS = 1e-6


def as_array(x: Any) -> np.ndarray:
    """A float64 numpy copy of an array or a (CPU or GPU) tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and sample covariance (D, D) of features (N, D), N >= 2."""
    x = as_array(features)
    assert x.ndim == 2 and x.shape[0] >= 2, f"features must be (N >= 2, D), got {x.shape}"
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (rounding below zero clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for covariance matrices."""
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = FD_EPS) -> float:
    mu1, mu2, sigma1, sigma2 = (as_array(v) for v in (mu1, mu2, sigma1, sigma2))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == (mu1.size, mu1.size), (
        f"shapes do not fit: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}"
    )
    try:
        covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        covmean = float("nan")
    if not np.isfinite(covmean):
        offset = eps * np.eye(mu1.size)
        covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * covmean)


def frechet_distance_features(generated: Any, reference: Any, eps: float = FD_EPS) -> float:
    """FD between two sets of embeddings (N, D) and (M, D)."""
    return frechet_distance(*feature_stats(generated), *feature_stats(reference), eps=eps)


def log_softmax(logits: Any) -> np.ndarray:
    x = as_array(logits)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over min(splits, N) contiguous parts of logits (N, C)."""
    log_p = log_softmax(logits)
    assert log_p.ndim == 2 and log_p.shape[0] >= 1, f"logits must be (N, C), got {log_p.shape}"
    scores = []
    for part in np.array_split(log_p, min(splits, log_p.shape[0])):
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (part - log_marginal)).sum(axis=1)  # KL(p(y|x) || p(y)) per item
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def kl_per_pair(reference_logits: Any, generated_logits: Any) -> np.ndarray:
    """(N,) KL(softmax(reference) || softmax(generated)) of each pair of logits (N, C)."""
    log_ref, log_gen = log_softmax(reference_logits), log_softmax(generated_logits)
    assert log_ref.shape == log_gen.shape, f"logits differ in shape: {log_ref.shape} != {log_gen.shape}"
    return (np.exp(log_ref) * (log_ref - log_gen)).sum(axis=-1)


def cosine_per_pair(a: Any, b: Any) -> np.ndarray:
    """(N,) cosine similarity of each pair of embeddings (N, D)."""
    x, y = as_array(a), as_array(b)
    assert x.shape == y.shape, f"embeddings differ in shape: {x.shape} != {y.shape}"
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return (x * y).sum(axis=-1) / np.maximum(norms, 1e-12)
