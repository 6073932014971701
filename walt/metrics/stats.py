"""Feature statistics and the Frechet distance, kept apart: statistics are computed once per data set (and
cached), the distance is a pure function of two sets of statistics.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from walt.atomic import write_atomic

__all__ = ["FeatureStats", "frechet_distance", "frechet_distance_from_moments"]

_FORMAT_VERSION = 1


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64, mergeable across processes and files.

    Keeps the count, the mean and the centred sum of outer products (Chan et al.'s parallel update), which
    stays accurate where the textbook ``E[xx^T] - mu mu^T`` loses digits (features with a large common offset).
    Folding the same batches in the same order gives bit-identical results, which is what makes evaluation
    independent of the number of processes (see ``walt.metrics.evaluate``).
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"feature dimension must be positive, got {dim}")
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray | torch.Tensor) -> FeatureStats:
        """Add a batch of features (N, dim)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf; check the inputs of the feature network")
        if len(x) == 0:
            return self
        batch = FeatureStats(self.dim)
        batch.count = len(x)
        batch.mean = x.mean(axis=0)
        centred = x - batch.mean
        batch.scatter = centred.T @ centred
        return self.merge(batch)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold ``other`` into these statistics (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.scatter = (
            self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / total)
        )
        self.mean = self.mean + delta * (other.count / total)
        self.count = total
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1, like ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        return self.scatter / (self.count - 1)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the statistics as ``.npz``, atomically (a killed run leaves no truncated cache)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.int64(_FORMAT_VERSION),
            count=np.int64(self.count),
            mean=self.mean,
            scatter=self.scatter,
        )
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Statistics written by :meth:`save`; a file that is not one (empty, truncated, foreign, inconsistent)
        raises ValueError naming it."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != _FORMAT_VERSION:
                    raise ValueError(f"statistics format {version}, expected {_FORMAT_VERSION}")
                count, mean, scatter = int(data["count"]), data["mean"], data["scatter"]
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(
                f"{path} is not a readable statistics file (.npz of FeatureStats.save): {err}"
            ) from None
        dim = mean.shape[0] if mean.ndim == 1 else 0
        if (
            dim < 1
            or scatter.shape != (dim, dim)
            or count < 0
            or not np.isfinite(scatter).all()
            or not np.isfinite(mean).all()
        ):
            raise ValueError(
                f"{path} holds inconsistent statistics: mean {mean.shape}, scatter {scatter.shape}, count {count}"
            )
        stats = cls(dim)
        stats.count = count
        stats.mean = mean.astype(np.float64)
        stats.scatter = scatter.astype(np.float64)
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


def frechet_distance_from_moments(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    As in the reference FID code, a product whose square root is not finite (singular covariances, e.g. fewer
    samples than dimensions) is retried with ``eps`` added to both diagonals, and the negligible imaginary part
    that round-off leaves in the square root is dropped. Where the square root keeps a large imaginary part
    (rank-deficient covariances, far fewer samples than dimensions), the trace is taken from the eigenvalues
    of ``sigma1^(1/2) sigma2 sigma1^(1/2)`` instead: they are those of ``sigma1 sigma2``, and real and
    non-negative for covariances, so the distance stays defined (and biased, as any from so few samples).

    The linear algebra runs on one BLAS thread: multi-threaded BLAS rounds differently for each thread count,
    and the square root of a near-singular product amplifies that, so the same statistics would give
    different distances on machines with different core counts.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"moment shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular input; handled below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    trace = None
    if np.iscomplexobj(covmean):
        largest = np.abs(covmean.imag).max()
        if largest > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            with threadpool_limits(limits=1, user_api="blas"):
                trace = _trace_sqrt_product(sigma1, sigma2)
        covmean = covmean.real
    trace = np.trace(covmean) if trace is None else trace
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 sigma2)^(1/2))`` for covariances, from symmetric eigendecompositions only."""
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # sigma1^(1/2)
    middle = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())


def _moments(x: FeatureStats | np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    stats = x if isinstance(x, FeatureStats) else FeatureStats(np.shape(x)[-1]).update(x)
    return stats.mean, stats.covariance


def frechet_distance(
    a: FeatureStats | np.ndarray | torch.Tensor, b: FeatureStats | np.ndarray | torch.Tensor
) -> float:
    """Frechet distance between two feature sets (N, D) and (M, D), or their :class:`FeatureStats`."""
    return frechet_distance_from_moments(*_moments(a), *_moments(b))
