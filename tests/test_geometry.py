from __future__ import annotations

import numpy as np
import pytest
import torch

from geoguard.features import FeatureSet
from geoguard.geometry import matched_random_features, measure_geometry

D_SAE, D_IN, K = 600, 32, 20


def _set(
    name: str, ids: list[int], decoder: torch.Tensor, density: torch.Tensor, fingerprint: str = "sae"
) -> FeatureSet:
    return FeatureSet(
        name=name,
        feature_ids=ids,
        hook_name="blocks.0.hook_resid_post",
        d_sae=D_SAE,
        sae_fingerprint=fingerprint,
        decoder=decoder[ids],
        density=density,
    )


@pytest.fixture(scope="module")
def planted_geometry():
    """A random decoder in which features 100-119 are built next to the toxic features 0-19."""
    gen = torch.Generator().manual_seed(0)
    decoder = torch.randn(D_SAE, D_IN, generator=gen)
    decoder[100:120] = decoder[0:20] + 0.4 * torch.randn(K, D_IN, generator=gen)
    decoder /= decoder.norm(dim=1, keepdim=True)
    density = torch.rand(D_SAE, generator=gen) * 0.1
    toxic = _set("toxic", list(range(0, 20)), decoder, density)
    inducing = _set("inducing", list(range(100, 120)), decoder, density)
    control = _set("control", list(range(300, 320)), decoder, density)
    return decoder, toxic, inducing, control


def test_planted_closeness_is_found_and_beats_both_nulls(planted_geometry):
    decoder, toxic, inducing, control = planted_geometry
    result = measure_geometry(toxic, [inducing, control], decoder, n_null=300, n_permutations=2000)
    near, far = result.sets
    assert near.mean_nearest > 0.8 and near.null_matched["mean_nearest"]["p"] < 0.01
    assert near.null_random["mean_nearest"]["p"] < 0.01 and near.null_matched["mean_nearest"]["z"] > 5
    (comparison,) = result.comparisons
    assert comparison.nearest_p < 0.001 and comparison.nearest_cohens_d > 2
    assert result.similarity["inducing"].shape == (K, K)


def test_random_sets_look_like_the_null(planted_geometry):
    decoder, toxic, _, _ = planted_geometry
    sets = [_set(f"random{i}", list(range(200 + 20 * i, 220 + 20 * i)), decoder, toxic.density) for i in range(2)]
    result = measure_geometry(toxic, sets, decoder, n_null=300, n_permutations=2000)
    for s in result.sets:
        assert 0.01 < s.null_matched["mean_nearest"]["p"] and abs(s.null_matched["mean_nearest"]["z"]) < 3
    assert result.comparisons[0].nearest_p > 0.01


def test_overlap_with_the_toxic_set_is_counted_and_left_out(planted_geometry):
    decoder, toxic, _, control = planted_geometry
    mixed = _set("mixed", [0, 1] + control.feature_ids[2:], decoder, toxic.density)
    (s,) = measure_geometry(toxic, [mixed], decoder, n_null=50).sets
    assert s.overlap == 2 and s.n_features == K - 2 and max(s.nearest) < 0.99


def test_matched_random_features_respect_frequency_bins_and_exclusions():
    density = torch.cat([torch.zeros(100), torch.logspace(-6, -1, 900)])
    ids = [0, 150, 500, 999]
    draws = matched_random_features(density, ids, exclude=set(ids), n_sets=200, rng=np.random.default_rng(0))
    assert draws.shape == (200, 4) and not np.isin(draws, ids).any()
    assert (density[torch.from_numpy(draws[:, 0])] == 0).all()  # a dead feature is matched with dead features
    for column, fid in enumerate(ids[1:], start=1):
        ratio = density[torch.from_numpy(draws[:, column])] / density[fid]
        assert ratio.min() > 0.3 and ratio.max() < 3


def test_sets_from_different_saes_or_without_density_are_clear_errors(planted_geometry):
    decoder, toxic, inducing, _ = planted_geometry
    other = _set("other", inducing.feature_ids, decoder, toxic.density, fingerprint="another-sae")
    with pytest.raises(ValueError, match="different SAEs"):
        measure_geometry(toxic, [other], decoder)
    no_density = _set("old", inducing.feature_ids, decoder, None)
    with pytest.raises(ValueError, match="no activation density"):
        measure_geometry(toxic, [no_density], decoder)
