"""Statistics behind feature discovery and geometry: streaming AUROC, permutation p-values, effect sizes.

Feature discovery ranks tens of thousands of SAE features over data sets of any size, so the
per-feature statistics are accumulated in fixed memory: `PooledHistogram` keeps, per feature,
a histogram of pooled activations on log-spaced bins plus running moments. AUROC and the
standardized mean difference come from those. Significance comes from label permutations on
data the features were not selected on, so the p-values need no correction for the selection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from scipy.stats import t as student_t

HISTOGRAM_EDGES = torch.cat([torch.zeros(1), torch.logspace(-5, 5, 320)]).double()
"""Bin edges of `PooledHistogram`: one bin for zero (inactive) and 320 log-spaced bins over
1e-5..1e5 (a 7.5% step): SAE activations are non-negative, and values in one bin count as ties."""


class PooledHistogram:
    """Fixed-memory summary of `(n, d)` pooled feature activations seen in batches.

    Memory is `d * len(HISTOGRAM_EDGES)` counts, whatever the number of samples.

    Example:
        >>> hist = PooledHistogram(d=4)
        >>> hist.update(torch.rand(8, 4))
        >>> hist.n, hist.mean.shape
        (8, torch.Size([4]))
    """

    def __init__(self, d: int) -> None:
        self.d = d
        self.n_bins = len(HISTOGRAM_EDGES) + 1
        self.counts = torch.zeros(d * self.n_bins, dtype=torch.int32)
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.sum_sq = torch.zeros(d, dtype=torch.float64)
        self.firing = torch.zeros(d, dtype=torch.int64)
        self.n = 0

    def update(self, pooled: torch.Tensor) -> None:
        """Add a batch of pooled activations `(batch, d)`."""
        pooled = pooled.double().cpu()
        bins = torch.bucketize(pooled, HISTOGRAM_EDGES)  # (batch, d)
        flat = (bins + torch.arange(self.d) * self.n_bins).flatten()
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.sum += pooled.sum(0)
        self.sum_sq += pooled.square().sum(0)
        self.firing += (pooled > 0).sum(0)
        self.n += len(pooled)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sum_sq / max(self.n, 1) - self.mean.square()).clamp(min=0)

    @property
    def firing_fraction(self) -> torch.Tensor:
        """Share of samples in which each feature is active at all."""
        return self.firing.double() / max(self.n, 1)


def histogram_auroc(target: PooledHistogram, reference: PooledHistogram) -> np.ndarray:
    """Per-feature AUROC of target over reference from their histograms (ties within a bin count half)."""
    t = target.counts.view(target.d, -1).double()
    r = reference.counts.view(reference.d, -1).double()
    r_below = r.cumsum(1) - r
    return ((t * (r_below + 0.5 * r)).sum(1) / (target.n * reference.n)).numpy()


def standardized_mean_difference(target: PooledHistogram, reference: PooledHistogram) -> np.ndarray:
    """Per-feature (mean_t - mean_r) / pooled standard deviation (Cohen's d); 0 where both are constant."""
    spread = ((target.var + reference.var) / 2).sqrt()
    diff = target.mean - reference.mean
    return torch.where(spread > 0, diff / spread.clamp(min=1e-12), torch.zeros_like(diff)).numpy()


def auroc(target: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """Exact AUROC of target over reference per column (Mann-Whitney U, ties averaged); 1-D inputs give a scalar."""
    target, reference = np.asarray(target, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    ranks = rankdata(np.concatenate([target, reference]), axis=0)
    n_t, n_r = len(target), len(reference)
    return (ranks[:n_t].sum(0) - n_t * (n_t + 1) / 2) / (n_t * n_r)


def permutation_auroc(
    groups: Sequence[tuple[np.ndarray, np.ndarray]], *, n_permutations: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean AUROC over groups of (target `(n_t, k)`, reference `(n_r, k)`) and its one-sided permutation p-value.

    Labels are shuffled within each group (a stratified test: a group is one contrast), and the
    p-value is the share of shuffles whose mean AUROC reaches the observed one, `(1 + hits) / (1 + n)`.

    Returns:
        `(auroc, p_value)`, each of shape `(k,)`.
    """
    rng = np.random.default_rng(seed)
    observed = np.zeros(groups[0][0].shape[1])
    null = np.zeros((n_permutations, len(observed)))
    for target, reference in groups:
        n_t, n_r = len(target), len(reference)
        ranks = rankdata(np.concatenate([target, reference]).astype(np.float64), axis=0)  # (n, k)
        offset = n_t * (n_t + 1) / 2
        observed += (ranks[:n_t].sum(0) - offset) / (n_t * n_r)
        picks = _random_subsets(rng, n_permutations, n_t + n_r, n_t)  # (P, n_t)
        null += (ranks[picks].sum(1) - offset) / (n_t * n_r)
    observed /= len(groups)
    null /= len(groups)
    return observed, permutation_p_value(null, observed)


def permutation_p_value(null: np.ndarray, observed: np.ndarray | float) -> np.ndarray | float:
    """One-sided p-value of `observed` against null draws `(n_null, ...)`: `(1 + hits) / (1 + n_null)`.

    A hit is a null draw that reaches the observed value (within 1e-12, so float noise in equal statistics
    counts as a tie). The added 1 counts the observed labelling itself, so the p-value is never 0.

    Args:
        null (`np.ndarray`): statistics under the null, one per permutation (or sign flip, or random draw)
            along axis 0.
        observed (`np.ndarray` or `float`): the observed statistic, shaped like one null draw.

    Returns:
        The p-value, shaped like `observed`.

    Example:
        >>> permutation_p_value(np.array([0.1, 0.5, 0.9]), 0.5)
        0.75
    """
    null = np.asarray(null)
    p_value = (1 + (null >= observed - 1e-12).sum(0)) / (1 + len(null))
    return float(p_value) if np.ndim(p_value) == 0 else p_value


def _random_subsets(rng: np.random.Generator, n_permutations: int, n: int, size: int) -> np.ndarray:
    """`(n_permutations, size)` indices: per permutation, the first `size` of a random order of `range(n)`."""
    return np.argsort(rng.random((n_permutations, n)), axis=1)[:, :size]


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """False-discovery-rate q-values of `p_values` (Benjamini-Hochberg)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    scaled = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1)
    out = np.empty_like(q)
    out[order] = q
    return out


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """Standardized difference of means of two samples, pooled standard deviation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def permutation_mean_difference(
    a: np.ndarray, b: np.ndarray, *, n_permutations: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """Difference of means `mean(a) - mean(b)` and its one-sided permutation p-value (a larger than b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    null_a = pooled[_random_subsets(rng, n_permutations, len(pooled), len(a))].mean(1)
    null = null_a - (pooled.sum() - null_a * len(a)) / len(b)
    observed = a.mean() - b.mean()
    return float(observed), permutation_p_value(null, observed)


# ---- rates of counted outcomes (misaligned answers out of judged ones) ----------------------------------

_Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial rate (95% by default); `None` for no trials.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or `trials` successes.
    """
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be within 0..trials, got {successes} of {trials}.")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, min(p, centre - half))), float(min(1.0, max(p, centre + half)))  # p inside, despite rounding


def rate_difference_interval(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, z: float = _Z95
) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval (his method 10) of the difference of two independent rates, a minus b.

    Built from the two Wilson intervals; well behaved at rates near 0 and with unequal sizes, where the
    normal-approximation interval is too narrow. `None` when either side has no trials.
    """
    wa, wb = wilson_interval(successes_a, trials_a, z), wilson_interval(successes_b, trials_b, z)
    if wa is None or wb is None:
        return None
    pa, pb = successes_a / trials_a, successes_b / trials_b
    low = pa - pb - np.sqrt((pa - wa[0]) ** 2 + (wb[1] - pb) ** 2)
    high = pa - pb + np.sqrt((wa[1] - pa) ** 2 + (pb - wb[0]) ** 2)
    return float(low), float(high)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of a few independent values (per-seed results); `None` below two."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = student_t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)
