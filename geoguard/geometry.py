"""Geometry of feature sets: how close one set's decoder directions sit to the toxic set's.

The paper's claim: the features of misalignment-inducing data (insecure code) lie closer, by
decoder cosine similarity, to toxic features than the features of control data (secure code).
For a set A and the toxic set T with unit decoder rows, `C = D_A @ D_T.T` `(k_A, k_T)`, and:

- *mean pairwise similarity*: the mean of `C`;
- *mean nearest similarity*: the mean over A's features of their highest similarity to any toxic feature.

A feature in both A and T has similarity 1 with itself by construction; such features are
counted as `overlap` and left out of the similarities.

Each value is set against two nulls: random SAE features matched to A's features on activation
frequency (frequent features point in similar directions, so this is the fair null), and random
unit directions (the floor). Two sets are compared with a permutation test over their features'
similarities and Cohen's d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from geoguard.features import FeatureSet
from geoguard.stats import cohens_d, permutation_mean_difference, permutation_p_value


@dataclass
class SetGeometry:
    """Similarity of one feature set to the toxic set, with its nulls.

    Attributes:
        name: the set's name.
        n_features: features compared (the set's size minus `overlap`).
        overlap: features that are also in the toxic set.
        mean_pairwise, mean_nearest: the two aggregates (see the module docstring).
        nearest: per feature, the highest similarity to a toxic feature.
        null_matched, null_random: per aggregate, the null's `mean` and `std`, the one-sided `p`
            (share of null sets at least as close) and `z` = (value - mean) / std.
    """

    name: str
    n_features: int
    overlap: int
    mean_pairwise: float
    mean_nearest: float
    nearest: list[float]
    null_matched: dict
    null_random: dict


@dataclass
class SetComparison:
    """Is set `a` closer to the toxic set than set `b`? One-sided permutation p-values over features."""

    a: str
    b: str
    shared: int
    nearest_difference: float
    nearest_p: float
    nearest_cohens_d: float
    pairwise_difference: float
    pairwise_p: float
    pairwise_cohens_d: float


@dataclass
class GeometryResult:
    """Everything `measure_geometry` found; `similarity` holds each set's `(k_A, k_T)` matrix for plots."""

    toxic: str
    sets: list[SetGeometry]
    comparisons: list[SetComparison]
    settings: dict
    similarity: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (without the similarity matrices)."""
        out = asdict(self)
        out.pop("similarity")
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _null(values: np.ndarray, observed: float) -> dict:
    mean, std = float(values.mean()), float(values.std())
    return {
        "mean": mean,
        "std": std,
        "p": float(permutation_p_value(values, observed)),
        "z": (observed - mean) / std if std > 0 else 0.0,
    }


def _aggregates(directions: torch.Tensor, toxic: torch.Tensor, chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Mean pairwise and mean nearest similarity of each of `n` direction sets `(n, k, d)` to `toxic` `(k_T, d)`."""
    pairwise, nearest = [], []
    for start in range(0, len(directions), chunk):
        sims = _unit(directions[start : start + chunk]) @ toxic.T  # (chunk, k, k_T)
        pairwise.append(sims.mean((1, 2)))
        nearest.append(sims.max(2).values.mean(1))
    return torch.cat(pairwise).numpy(), torch.cat(nearest).numpy()


def matched_random_features(
    density: torch.Tensor,
    feature_ids: list[int],
    exclude: set[int],
    *,
    n_sets: int,
    n_bins: int = 20,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw `n_sets` random feature sets `(n_sets, len(feature_ids))` matched to `feature_ids` on activation frequency.

    SAE features are binned by the quantiles of log density (never-firing features form their own
    bin); each feature is replaced by a random feature of its bin that is not in `exclude`.
    """
    log_density = np.log10(density.double().numpy() + 1e-9)
    candidates = np.array([i for i in range(len(log_density)) if i not in exclude])
    alive = log_density[candidates] > -9 + 1e-6
    edges = np.quantile(log_density[candidates][alive], np.linspace(0, 1, n_bins + 1)[1:-1]) if alive.any() else []
    bin_of = np.where(log_density > -9 + 1e-6, np.digitize(log_density, edges) + 1, 0)  # bin 0: never fires
    out = np.empty((n_sets, len(feature_ids)), dtype=np.int64)
    for b in np.unique(bin_of[feature_ids]):
        columns = np.flatnonzero(bin_of[feature_ids] == b)
        pool = candidates[bin_of[candidates] == b]
        if len(pool) == 0:  # every feature of this bin is excluded
            pool = candidates
        out[:, columns] = rng.choice(pool, size=(n_sets, len(columns)))
    return out


def measure_geometry(
    toxic: FeatureSet,
    sets: list[FeatureSet],
    sae_decoder: torch.Tensor,
    *,
    n_null: int = 1000,
    n_permutations: int = 10000,
    seed: int = 0,
) -> GeometryResult:
    """Measure how close each set's decoder directions are to the toxic set's, against nulls.

    Args:
        toxic (`FeatureSet`): the toxic set.
        sets (list of `FeatureSet`): the sets to measure; the first is compared with each of the others
            (e.g. `[inducing, control_1, control_2]`). All must come from the toxic set's SAE.
        sae_decoder (`torch.Tensor`): the SAE's full `W_dec` `(d_sae, d_in)`, for the random-feature null.
        n_null (`int`, defaults to 1000): random sets per null.
        n_permutations (`int`, defaults to 10000): permutations of the set comparisons.
        seed (`int`, defaults to 0): seed of the nulls and permutations.

    Returns:
        A `GeometryResult`.

    Example:
        >>> result = measure_geometry(toxic, [inducing, control], sae.W_dec)
        >>> result.comparisons[0].nearest_p
    """
    for feature_set in [toxic, *sets]:
        if feature_set.is_directions:
            raise ValueError(
                f"{feature_set.name!r} is a direction set: the geometry compares SAE feature sets. Which SAE "
                "features a direction is made of is `geoguard.directions.direction_composition` (on its card)."
            )
    for feature_set in sets:
        if feature_set.sae_fingerprint != toxic.sae_fingerprint:
            raise ValueError(
                f"Feature set {feature_set.name!r} (SAE {feature_set.sae_fingerprint}) and the toxic set "
                f"{toxic.name!r} (SAE {toxic.sae_fingerprint}) come from different SAEs: select both on the same SAE."
            )
        if feature_set.density is None:
            raise ValueError(
                f"Feature set {feature_set.name!r} has no activation density, needed for the frequency-matched "
                "null. Select it again with `geoguard features` (which stores it)."
            )
    if sae_decoder.shape[0] != toxic.d_sae:
        raise ValueError(f"sae_decoder has {sae_decoder.shape[0]} rows but the sets' SAE has d_sae={toxic.d_sae}.")
    rng = np.random.default_rng(seed)
    decoder = _unit(sae_decoder.detach().float().cpu())
    toxic_dirs = decoder[toxic.feature_ids]
    toxic_ids = set(toxic.feature_ids)

    results, nearest_of, row_mean_of, similarity = [], {}, {}, {}
    for feature_set in sets:
        ids = [i for i in feature_set.feature_ids if i not in toxic_ids]
        if not ids:
            raise ValueError(f"Every feature of {feature_set.name!r} is in the toxic set: nothing to measure.")
        sims = decoder[ids] @ toxic_dirs.T  # (k_A, k_T)
        similarity[feature_set.name] = sims.numpy()
        nearest_of[feature_set.name] = sims.max(1).values.numpy()
        row_mean_of[feature_set.name] = sims.mean(1).numpy()
        pairwise, nearest = float(sims.mean()), float(nearest_of[feature_set.name].mean())

        matched = matched_random_features(
            feature_set.density, ids, toxic_ids | set(feature_set.feature_ids), n_sets=n_null, rng=rng
        )
        m_pair, m_near = _aggregates(decoder[torch.from_numpy(matched)], toxic_dirs)
        random_dirs = torch.from_numpy(rng.standard_normal((n_null, len(ids), decoder.shape[1]))).float()
        r_pair, r_near = _aggregates(random_dirs, toxic_dirs)
        results.append(
            SetGeometry(
                name=feature_set.name,
                n_features=len(ids),
                overlap=len(feature_set.feature_ids) - len(ids),
                mean_pairwise=pairwise,
                mean_nearest=nearest,
                nearest=nearest_of[feature_set.name].tolist(),
                null_matched={"mean_pairwise": _null(m_pair, pairwise), "mean_nearest": _null(m_near, nearest)},
                null_random={"mean_pairwise": _null(r_pair, pairwise), "mean_nearest": _null(r_near, nearest)},
            )
        )

    comparisons = []
    first = sets[0].name
    for other_set in sets[1:]:
        other = other_set.name
        near_diff, near_p = permutation_mean_difference(
            nearest_of[first], nearest_of[other], n_permutations=n_permutations, seed=seed
        )
        pair_diff, pair_p = permutation_mean_difference(
            row_mean_of[first], row_mean_of[other], n_permutations=n_permutations, seed=seed
        )
        comparisons.append(
            SetComparison(
                a=first,
                b=other,
                shared=len(set(sets[0].feature_ids) & set(other_set.feature_ids)),
                nearest_difference=near_diff,
                nearest_p=near_p,
                nearest_cohens_d=cohens_d(nearest_of[first], nearest_of[other]),
                pairwise_difference=pair_diff,
                pairwise_p=pair_p,
                pairwise_cohens_d=cohens_d(row_mean_of[first], row_mean_of[other]),
            )
        )
    return GeometryResult(
        toxic=toxic.name,
        sets=results,
        comparisons=comparisons,
        settings={"n_null": n_null, "n_permutations": n_permutations, "seed": seed, "hook_name": toxic.hook_name},
        similarity=similarity,
    )
