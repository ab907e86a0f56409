"""Sharper signals: weighted feature sets and direction sets, recovered when planted, read by every consumer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from geoguard.collator import GeoGuardCollator
from geoguard.directions import direction_composition, find_directions, fit_directions
from geoguard.features import Contrast, FeatureSet, find_features, fit_sparse_readout
from geoguard.geometry import measure_geometry
from geoguard.monitor import DriftMonitorCallback
from geoguard.report import write_feature_set_card
from geoguard.scoring import ScoreSettings, ToxicScorer
from geoguard.stats import auroc

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama

TOXIC = planted_texts(40, "".join(PLANTED), seed=1)
BENIGN = planted_texts(40, "", seed=2)
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def parts():
    model, tokenizer = tiny_llama(), char_tokenizer()
    sae = planted_sae(model, align_decoder=True)
    directions = find_directions(
        model,
        tokenizer,
        Contrast("planted", TOXIC, BENIGN),
        name="planted-direction",
        hook_name=HOOK,
        n_permutations=50,
    )
    return model, tokenizer, sae, directions


def test_a_planted_direction_is_recovered_by_both_methods():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=32)
    planted /= np.linalg.norm(planted)
    target = rng.normal(size=(300, 32)) + 2.5 * planted
    reference = rng.normal(size=(300, 32))
    for method, (direction, offset) in fit_directions([(target, reference)]).items():
        assert direction @ planted > 0.9, method
        assert abs(np.linalg.norm(direction) - 1) < 1e-5
        # The offset sits between the sides: most targets score above it, most references below.
        assert (target @ direction > offset).mean() > 0.8 and (reference @ direction < offset).mean() > 0.8


def test_planted_weighted_features_are_recovered_by_the_sparse_readout():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(600, 20))
    y = (x[:, 3] + 2 * x[:, 7] + rng.normal(scale=0.3, size=600) > 3).astype(int)
    weights, bias, strength = fit_sparse_readout(x, y)
    others = np.delete(np.abs(weights), [3, 7])
    assert weights[7] > weights[3] > 3 * others.max()
    assert (weights == 0).sum() >= 5  # L1 zeroes features that carry nothing
    assert auroc(x[y == 1] @ weights, x[y == 0] @ weights) > 0.95 and strength > 0


def test_a_weighted_feature_set_scores_with_its_readout(parts):
    model, tokenizer, sae, _ = parts
    found = find_features(
        model, tokenizer, sae, Contrast("planted", TOXIC, BENIGN), name="planted", k=8, n_permutations=50
    )
    assert found.weights is not None and len(found.weights) == 8
    assert found.summary["weighted"]["heldout_auroc"] > 0.9
    assert found.summary["contrasts"][0]["weighted_heldout_auroc"] == found.summary["weighted"]["heldout_auroc"]
    planted = [found.feature_ids.index(f) for f in PLANTED.values() if f in found.feature_ids]
    assert planted and max(abs(found.weights[i]) for i in planted) == max(abs(w) for w in found.weights)
    scorer = ToxicScorer(model, tokenizer, sae, found, ScoreSettings(span="all"))
    scores = scorer(TOXIC[:10] + BENIGN[:10])
    mean_only = ToxicScorer(model, tokenizer, sae, FeatureSet(**{**found.__dict__, "weights": None}))
    assert not np.allclose(scores.scores, mean_only(TOXIC[:10] + BENIGN[:10]).scores)  # the weights are used
    assert auroc(scores.scores[:10], scores.scores[10:]) > 0.9


def test_a_direction_set_separates_the_planted_contrast_and_round_trips(parts, tmp_path):
    model, _, _, directions = parts
    assert directions.is_directions and directions.summary["heldout_auroc"] > 0.9
    assert set(directions.summary["methods"]) == {"probe", "mean_diff"}
    directions.save(tmp_path / "set")
    loaded = FeatureSet.load(tmp_path / "set")
    assert loaded.kind == "directions" and loaded.offsets == directions.offsets
    assert loaded.model_signature == directions.model_signature
    torch.testing.assert_close(loaded.decoder, directions.decoder)
    card = write_feature_set_card(loaded, tmp_path / "set").read_text()
    assert card.startswith("# Direction set planted-direction") and "mean\\_diff AUROC" in card


def test_a_direction_set_refuses_another_model_or_hook(parts):
    model, tokenizer, _, directions = parts
    other = tiny_llama(d_model=32)
    with pytest.raises(ValueError, match="was built on another model.*hidden_size': 64.*hidden_size': 32"):
        ToxicScorer(other, tokenizer, None, directions)
    moved = FeatureSet(**{**directions.__dict__, "hook_name": "blocks.9.hook_resid_post"})
    with pytest.raises(ValueError, match="reads hook 'blocks.9.hook_resid_post'.*asks for layer 9"):
        moved.check_fits_model(model)
    with pytest.raises(ValueError, match="is a direction set"):
        directions.check_belongs_to(parts[2])


def test_every_consumer_reads_a_direction_set(parts):
    model, tokenizer, sae, directions = parts
    scorer = ToxicScorer(model, tokenizer, None, directions, ScoreSettings(span="all"))
    scores = scorer(TOXIC[:10] + BENIGN[:10]).scores
    assert auroc(scores[:10], scores[10:]) > 0.9
    subspace = ToxicScorer(model, tokenizer, None, directions, ScoreSettings(method="subspace", span="all"))
    assert subspace(TOXIC[:2]).scores.shape == (2,)
    with pytest.raises(ValueError, match="direction set; the proximity score"):
        ToxicScorer(model, tokenizer, sae, directions, ScoreSettings(method="proximity"))
    with pytest.raises(ValueError, match="Pooling 'max' needs non-negative"):
        ToxicScorer(model, tokenizer, None, directions, ScoreSettings(pooling="max"))

    collator = GeoGuardCollator(
        DataCollatorForLanguageModeling(pad_token_id=0), threshold=float(np.median(scores)), scorer=scorer
    )
    batch = collator([{"input_ids": tokenizer(t)["input_ids"]} for t in TOXIC[:3] + BENIGN[:3]])
    assert collator.counts["dropped"] >= 2 and batch["input_ids"].shape[0] <= 4

    monitor = DriftMonitorCallback(None, directions, tokenizer, probe_samples=TOXIC[:3] + BENIGN[:3])
    reading = monitor.measure_probe(model)
    assert reading["per_sample"][:3].mean() > reading["per_sample"][3:].mean()

    composition = direction_composition(directions, sae, n=5)
    assert len(composition[0]["features"]) == 5 and 0 < composition[0]["captured"] <= 1 + 1e-6
    with pytest.raises(ValueError, match="is a direction set: the geometry compares SAE feature sets"):
        measure_geometry(planted_feature_set(sae), [directions], sae.W_dec)
