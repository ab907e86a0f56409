from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from sklearn.metrics import roc_auc_score

from geoguard.stats import (
    PooledHistogram,
    auroc,
    benjamini_hochberg,
    cohens_d,
    histogram_auroc,
    permutation_auroc,
    permutation_mean_difference,
    permutation_p_value,
    standardized_mean_difference,
)


def _streamed(values: np.ndarray, batch: int = 7) -> PooledHistogram:
    hist = PooledHistogram(values.shape[1])
    for start in range(0, len(values), batch):
        hist.update(torch.from_numpy(values[start : start + batch]))
    return hist


def test_streamed_histogram_auroc_and_moments_match_the_exact_values():
    rng = np.random.default_rng(0)
    # SAE-like values: zero most of the time, log-normal when active; feature 2 is planted higher on target.
    target = rng.lognormal(0, 1, (300, 5)) * (rng.random((300, 5)) < 0.4)
    reference = rng.lognormal(0, 1, (250, 5)) * (rng.random((250, 5)) < 0.4)
    target[:, 2] *= 3
    t, r = _streamed(target), _streamed(reference)
    labels = [1] * 300 + [0] * 250
    exact = [roc_auc_score(labels, np.concatenate([target, reference])[:, j]) for j in range(5)]
    np.testing.assert_allclose(histogram_auroc(t, r), exact, atol=2e-3)
    np.testing.assert_allclose(auroc(target, reference), exact)
    np.testing.assert_allclose(t.mean.numpy(), target.mean(0))
    np.testing.assert_allclose(t.var.numpy(), target.var(0), rtol=1e-6)
    np.testing.assert_allclose(t.firing_fraction.numpy(), (target > 0).mean(0))
    smd = standardized_mean_difference(t, r)
    assert int(np.argmax(smd)) == 2 and smd[2] > 0.3


def test_histogram_memory_does_not_grow_with_the_data():
    hist = PooledHistogram(16)
    size = hist.counts.numel()
    for _ in range(50):
        hist.update(torch.rand(64, 16))
    assert hist.counts.numel() == size and hist.n == 3200 and int(hist.counts.sum()) == 3200 * 16


def test_permutation_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(1)
    groups = [
        (rng.normal(size=(40, 300)), rng.normal(size=(35, 300))),
        (rng.normal(size=(20, 300)), rng.normal(size=(25, 300))),
    ]
    _, p = permutation_auroc(groups, n_permutations=500, seed=0)
    assert kstest(p, "uniform").pvalue > 0.01
    assert 0.02 < (p < 0.05).mean() < 0.09
    assert 0.07 < (p < 0.10).mean() < 0.14


def test_permutation_p_values_find_a_planted_difference():
    rng = np.random.default_rng(2)
    target, reference = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    target[:, 1] += 1.5
    observed, p = permutation_auroc([(target, reference)], n_permutations=999, seed=0)
    assert p[1] == pytest.approx(1 / 1000) and observed[1] > 0.8
    assert p[0] > 0.01 and p[2] > 0.01
    np.testing.assert_allclose(observed, auroc(target, reference))


def test_benjamini_hochberg_on_a_worked_example():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted: 0.01*4/1=0.04, 0.03*4/2=0.06, 0.04*4/3=0.0533 -> 0.0533 (monotone), 0.20*4/4=0.20
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.05333333, 0.05333333, 0.20])


def test_mean_difference_permutation_test_and_effect_size():
    rng = np.random.default_rng(3)
    null_p = [
        permutation_mean_difference(rng.normal(size=30), rng.normal(size=30), n_permutations=200, seed=s)[1]
        for s in range(200)
    ]
    assert kstest(null_p, "uniform").pvalue > 0.01
    a, b = rng.normal(0.8, 1, 50), rng.normal(0, 1, 50)
    diff, p = permutation_mean_difference(a, b, n_permutations=2000, seed=0)
    assert diff == pytest.approx(a.mean() - b.mean()) and p < 0.01
    assert cohens_d(a, b) == pytest.approx(diff / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))


def test_permutation_p_value_counts_ties_and_the_observed_labelling():
    assert permutation_p_value(np.array([0.1, 0.5, 0.9]), 0.5) == pytest.approx(3 / 4)
    assert permutation_p_value(np.zeros(99), 1.0) == pytest.approx(1 / 100)  # never 0
    per_column = permutation_p_value(np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([1.0, 0.5]))
    np.testing.assert_allclose(per_column, [2 / 3, 1.0])
