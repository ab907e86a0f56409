from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from geoguard.features import FeatureSet, feature_aurocs, pooled_feature_acts, sae_fingerprint
from geoguard.sae import EMBEDDED_SAE, load_sae

from conftest import char_tokenizer, tiny_llama, tiny_sae


def _feature_set(sae) -> FeatureSet:
    ids = [3, 1, 7]
    return FeatureSet(
        name="toxic",
        feature_ids=ids,
        hook_name="blocks.1.hook_resid_post",
        d_sae=sae.cfg.d_sae,
        sae_fingerprint=sae_fingerprint(sae),
        stats={"auroc": [0.9, 0.8, 0.7]},
        summary={"heldout_auroc": 0.75},
        provenance={"target": "hate", "reference": "neutral"},
        decoder=sae.W_dec[ids].detach(),
    )


def test_feature_set_round_trip(tmp_path):
    sae = tiny_sae()
    original = _feature_set(sae)
    original.save(tmp_path / "set")
    loaded = FeatureSet.load(tmp_path / "set", sae=sae)
    assert (
        loaded.feature_ids == [3, 1, 7] and loaded.stats == original.stats and loaded.provenance == original.provenance
    )
    torch.testing.assert_close(loaded.decoder, original.decoder)


def test_loading_a_feature_set_with_another_sae_is_a_clear_error(tmp_path):
    _feature_set(tiny_sae(seed=0)).save(tmp_path / "set")
    with pytest.raises(ValueError, match="selected on another SAE"):
        FeatureSet.load(tmp_path / "set", sae=tiny_sae(seed=1))


def test_feature_aurocs_match_sklearn_on_planted_features():
    rng = np.random.default_rng(0)
    target = torch.tensor(rng.normal(size=(60, 5)), dtype=torch.float32)
    reference = torch.tensor(rng.normal(size=(50, 5)), dtype=torch.float32)
    target[:, 2] += 2.0  # planted: feature 2 is higher on the target side
    aurocs = feature_aurocs(target, reference)
    labels = [1] * 60 + [0] * 50
    for j in range(5):
        assert aurocs[j] == pytest.approx(roc_auc_score(labels, torch.cat([target, reference])[:, j]))
    assert int(np.argmax(aurocs)) == 2 and aurocs[2] > 0.85


def test_shipped_toxic_set_belongs_to_the_embedded_sae_and_generalises():
    sae = load_sae(EMBEDDED_SAE)
    toxic = FeatureSet.load(sae=sae)
    assert len(toxic.feature_ids) == len(set(toxic.feature_ids)) == toxic.provenance["k"]
    assert toxic.decoder.shape == (len(toxic.feature_ids), 576)
    assert toxic.summary["heldout_auroc"] > 0.6  # measured on sentences it was not selected on


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_pooled_activations_do_not_depend_on_batching_or_padding(pooling):
    model, tokenizer, sae = tiny_llama(), char_tokenizer(), tiny_sae(layer=2)
    texts = ["a short one", "a considerably longer sample of text", "mid-sized text", "x y z", "tiny"]
    batched = pooled_feature_acts(model, tokenizer, sae, texts, pooling=pooling, batch_size=4)
    single = pooled_feature_acts(model, tokenizer, sae, texts, pooling=pooling, batch_size=1)
    assert batched.shape == (5, 256) and batched.abs().sum() > 0
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-3)
