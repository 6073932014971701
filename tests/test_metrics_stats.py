"""FeatureStats (streaming moments) and the Frechet distance: direct computations and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from walt.metrics import FeatureStats, frechet_distance, frechet_distance_from_moments


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(size=(250, 32)) @ rng.normal(size=(32, 32)) * 0.5 + 0.3
    return a, b


def test_streaming_moments_equal_numpy(features):
    a, _ = features
    stats = FeatureStats(32)
    for chunk in np.array_split(a, [1, 7, 100, 101]):  # uneven batches, including a single row
        stats.update(chunk)
    assert stats.count == 300
    np.testing.assert_allclose(stats.mean, a.mean(axis=0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(a, rowvar=False), rtol=1e-12, atol=1e-12)


def test_merge_of_shards_equals_one_pass(features):
    a, _ = features
    whole = FeatureStats(32).update(a)
    shards = [FeatureStats(32).update(part) for part in np.array_split(a, 3)]
    merged = FeatureStats(32)
    for shard in shards:
        merged.merge(shard)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=0, atol=1e-13)
    np.testing.assert_allclose(merged.covariance, whole.covariance, rtol=1e-12, atol=1e-12)


def test_same_batches_in_the_same_order_are_bit_identical(features):
    a, _ = features
    one = FeatureStats(32)
    for chunk in np.array_split(a, 5):
        one.update(chunk)
    two = FeatureStats(32)
    for chunk in np.array_split(a, 5):
        two.update(torch.from_numpy(chunk))  # tensors accepted as well
    assert np.array_equal(one.mean, two.mean) and np.array_equal(one.scatter, two.scatter)


def test_accurate_with_a_large_common_offset():
    # E[xx^T] - mu mu^T would lose every digit here (offset^2 = 1e16 against a variance of 1e-2).
    rng = np.random.default_rng(1)
    x = rng.normal(scale=0.1, size=(1000, 4)) + 1e8
    stats = FeatureStats(4)
    for chunk in np.array_split(x, 10):
        stats.update(chunk)
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False), rtol=1e-6, atol=1e-9)
    raw = (x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0))) / (len(x) - 1)
    assert np.abs(raw - np.cov(x, rowvar=False)).max() > 1.0  # the textbook formula is useless here


def test_save_load_round_trip_is_exact(tmp_path, features):
    stats = FeatureStats(32).update(features[0])
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStats.load(tmp_path / "s.npz")
    assert loaded.count == stats.count
    assert np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.scatter, stats.scatter)


def test_update_rejects_bad_features():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        FeatureStats(4).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats(2).update(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats(2).update(np.zeros((1, 2))).covariance


def test_distance_matches_a_direct_scipy_computation(features):
    a, b = features
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-10)
    assert frechet_distance(FeatureStats(32).update(a), FeatureStats(32).update(b)) == pytest.approx(
        direct, rel=1e-10
    )


def test_identical_sets_give_zero(features):
    a, _ = features
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_a_shift_gives_the_squared_mean_shift(features):
    a, _ = features
    shift = np.linspace(-1.0, 2.0, 32)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_diagonal_gaussians_closed_form():
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance_from_moments(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, rel=1e-12
    )


def test_fewer_samples_than_dimensions_stay_finite_and_non_negative():
    # Singular covariances (N < D), the situation of a small FVD run: a real, finite, non-negative number.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(6, 40)) + 0.5
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    assert value >= mean_term - 1e-6  # the covariance term of a Frechet distance is non-negative


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="moment shapes disagree"):
        frechet_distance_from_moments(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
