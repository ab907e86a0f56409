"""Filter a data set by score, with an audit file of every dropped sample.

A *policy* turns scores into a drop decision; all three share one interface (`drop_mask(scores)`):

- `DropTopFraction(0.5)`: drop the highest-scoring fraction (the paper drops the closest 50%);
- `DropAboveThreshold(t)`: drop every sample scoring above an absolute value;
- `DropAbovePercentile(reference_scores, 95)`: drop samples scoring above a percentile of a benign
  reference set's scores (calibrated: "more toxic-looking than 95% of known-benign data").

Baselines use the same policies on other scores, so they get the same budget: `random_scores` gives
random removal, `judge_scores` turns any text-scoring callable (a classifier, an LLM judge) into scores.
`filter_dataset` applies a policy and writes every dropped row, with its score, rank and nearest toxic
features, to an audit file: nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from geoguard.data import Sample
from geoguard.features import FeatureSet
from geoguard.scoring import SCORE_COLUMN, SampleScores


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one number per sample, got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:10].tolist()
        raise ValueError(f"Samples {bad} have no finite score; score them again or remove them before filtering.")
    return scores


@dataclass(frozen=True)
class DropTopFraction:
    """Drop the `fraction` of samples with the highest scores (ties broken by position, so exactly that many)."""

    fraction: float = 0.5

    def __post_init__(self):
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}.")

    def drop_mask(self, scores: np.ndarray) -> np.ndarray:
        scores = _check_scores(scores)
        n_drop = round(len(scores) * self.fraction)
        mask = np.zeros(len(scores), dtype=bool)
        mask[np.argsort(-scores, kind="stable")[:n_drop]] = True
        return mask

    def describe(self) -> str:
        return f"drop the top {self.fraction:.0%} by score"


@dataclass(frozen=True)
class DropAboveThreshold:
    """Drop every sample whose score is above `threshold`."""

    threshold: float

    def drop_mask(self, scores: np.ndarray) -> np.ndarray:
        return _check_scores(scores) > self.threshold

    def describe(self) -> str:
        return f"drop scores above {self.threshold:.6g}"


@dataclass(frozen=True)
class DropAbovePercentile:
    """Drop samples scoring above the `percentile`-th percentile of `reference_scores` (a benign set's scores).

    Example:
        ```python
        benign = score_dataset(scorer, load_samples("benign.jsonl")).scores
        policy = DropAbovePercentile(benign, percentile=95)  # ~5% of benign-like data would be dropped
        ```
    """

    reference_scores: np.ndarray
    percentile: float = 95.0

    def __post_init__(self):
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}.")
        if len(self.reference_scores) == 0:
            raise ValueError("reference_scores is empty; score a benign reference set first.")

    @property
    def threshold(self) -> float:
        return float(np.percentile(_check_scores(self.reference_scores), self.percentile))

    def drop_mask(self, scores: np.ndarray) -> np.ndarray:
        return _check_scores(scores) > self.threshold

    def describe(self) -> str:
        return (
            f"drop scores above the reference set's {self.percentile:g}th percentile ({self.threshold:.6g}, "
            f"{len(self.reference_scores)} reference samples)"
        )


FilterPolicy = DropTopFraction | DropAboveThreshold | DropAbovePercentile


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random scores: with any policy, the random-removal baseline at the same budget."""
    return np.random.default_rng(seed).random(n)


def sample_text(sample: Sample) -> str:
    """One string for a chat (`role: content` blocks) or a plain-text sample, for text-based judges."""
    if isinstance(sample, dict) and "messages" in sample:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in sample["messages"])
    return sample["text"] if isinstance(sample, dict) else sample


def judge_scores(samples: Sequence[Sample], judge: Callable[[str], float]) -> np.ndarray:
    """Score samples with any callable that maps a text to a number (higher = more harmful).

    Raises:
        ValueError: naming the sample when the judge returns something that is not a finite number.
    """
    scores = np.empty(len(samples))
    for i, sample in enumerate(samples):
        value = judge(sample_text(sample))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"Sample {i}: the judge returned {value!r}, not a finite number.")
        scores[i] = value
    return scores


@dataclass
class FilterResult:
    """What `filter_dataset` kept and dropped.

    Attributes:
        kept: the kept rows, with a `geoguard_score` column.
        dropped_rows: positions of the dropped rows in the input.
        audit_path: the JSONL file listing every dropped row.
        policy: the policy's description.
    """

    kept: Dataset
    dropped_rows: list[int]
    audit_path: Path
    policy: str


def filter_dataset(
    rows: Dataset | Sequence[dict],
    scores: SampleScores | np.ndarray,
    policy: FilterPolicy,
    audit_path: str | Path,
    *,
    feature_set: FeatureSet | None = None,
) -> FilterResult:
    """Drop the rows a policy flags and write each dropped row to `audit_path` with why it was dropped.

    Each line of the audit file (JSONL) holds `row` (position in the input), `score`, `rank` (1 = the highest
    score of the whole data set), `policy`; when `scores` is a `SampleScores`, the `nearest_toxic_features` (SAE
    id, contribution and, with `feature_set`, a label: the feature's top-activating snippet), `n_tokens` (tokens
    scored), `n_windows` (forward windows a long sample was read in) and `truncated_tokens` (tokens past
    `max_length` left unscored with `ScoreSettings(truncate=True)`, else 0); and the original row under `sample`.

    Args:
        rows (`datasets.Dataset` or list of dicts): the data set, in any columns (see `geoguard.corpora.load_rows`).
        scores (`SampleScores` or array): one score per row (a baseline's scores work the same way).
        policy (`FilterPolicy`): `DropTopFraction`, `DropAboveThreshold` or `DropAbovePercentile`.
        audit_path (`str` or path): where the dropped rows are written.
        feature_set (`FeatureSet`, *optional*): the toxic set, to label the nearest features.

    Returns:
        `FilterResult`; `kept` carries the scores in a `geoguard_score` column.

    Example:
        ```python
        result = filter_dataset(rows, scores, DropTopFraction(0.5), "out/dropped.jsonl", feature_set=toxic)
        result.kept.to_json("out/kept.jsonl")
        ```
    """
    rows = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
    details = scores if isinstance(scores, SampleScores) else None
    values = _check_scores(details.scores if details is not None else scores)
    if len(values) != len(rows):
        raise ValueError(f"Got {len(values)} scores for {len(rows)} rows; score exactly the rows being filtered.")
    drop = policy.drop_mask(values)
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
    labels = feature_set.short_labels() if feature_set is not None else {}

    audit_path = Path(audit_path)
    audit_path.parent.mkdir(parents=True, exist_ok=True)
    dropped = np.flatnonzero(drop).tolist()
    with audit_path.open("w", encoding="utf-8") as audit:
        for i in sorted(dropped, key=lambda i: ranks[i]):
            entry = {"row": i, "score": float(values[i]), "rank": int(ranks[i]), "policy": policy.describe()}
            if details is not None:
                entry["nearest_toxic_features"] = [
                    {"id": int(f), "contribution": float(c), **({"label": labels[int(f)]} if int(f) in labels else {})}
                    for f, c in zip(details.nearest[i], details.contributions[i], strict=True)
                ]
                entry |= {k: int(getattr(details, k)[i]) for k in ("n_tokens", "n_windows", "truncated_tokens")}
            entry["sample"] = rows[i]
            audit.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    if SCORE_COLUMN in rows.column_names:  # scores from an earlier run are replaced by the ones used here
        rows = rows.remove_columns(SCORE_COLUMN)
    scored = rows.add_column(SCORE_COLUMN, values.tolist())
    kept = scored.select(np.flatnonzero(~drop).tolist())
    return FilterResult(kept=kept, dropped_rows=dropped, audit_path=audit_path, policy=policy.describe())
