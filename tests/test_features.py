from __future__ import annotations

import pytest
import torch

from geoguard.features import (
    EMBEDDED_FEATURE_SETS,
    Contrast,
    FeatureSet,
    TokenPooler,
    find_features,
    pool_rows,
    pooled_feature_acts,
    sae_fingerprint,
)
from geoguard.sae import EMBEDDED_SAE, load_sae

from conftest import PLANTED, char_tokenizer, planted_sae, planted_texts, tiny_llama, tiny_sae


def _feature_set(sae) -> FeatureSet:
    ids = [3, 1, 7]
    return FeatureSet(
        name="toxic",
        feature_ids=ids,
        hook_name="blocks.1.hook_resid_post",
        d_sae=sae.cfg.d_sae,
        sae_fingerprint=sae_fingerprint(sae),
        stats={"heldout_auroc": [0.9, 0.8, 0.7]},
        summary={"heldout_auroc": 0.75},
        provenance={"contrasts": [{"name": "hate_vs_neutral"}]},
        labels=[{"top_tokens": ["a"], "examples": []}] * 3,
        decoder=sae.W_dec[ids].detach(),
        density=torch.rand(sae.cfg.d_sae),
    )


def test_feature_set_round_trip(tmp_path):
    sae = tiny_sae()
    original = _feature_set(sae)
    original.save(tmp_path / "set")
    loaded = FeatureSet.load(tmp_path / "set", sae=sae)
    assert loaded.feature_ids == [3, 1, 7]
    assert (loaded.stats, loaded.provenance, loaded.labels) == (original.stats, original.provenance, original.labels)
    torch.testing.assert_close(loaded.decoder, original.decoder)
    torch.testing.assert_close(loaded.density, original.density)


def test_short_labels_prefer_the_snippet_end_and_fall_back_to_logit_lens_tokens():
    feature_set = _feature_set(tiny_sae())
    feature_set.labels = [
        {"top_tokens": ["x"], "examples": [{"text": "a long snippet ending in «tok»"}]},
        {"top_tokens": ["a", "b", "c", "d", "e", "f"], "examples": []},
        {"top_tokens": [], "examples": []},
    ]
    assert feature_set.short_labels(max_chars=5) == {3: "«tok»", 1: "a b c d e"}


def _passage_pooled(values: torch.Tensor, pooling: str, width: int) -> torch.Tensor:
    """The passage poolings written out token by token, for one row `(n, d)`: the mean of the best passage."""
    if len(values) <= width:
        return values.mean(0)
    if pooling == "topk_mean":
        return values[values.mean(1).topk(width).indices].mean(0)
    windows = torch.stack([values[i : i + width].mean(0) for i in range(len(values) - width + 1)])
    return windows[windows.mean(1).argmax()]


@pytest.mark.parametrize("pooling", ["max", "mean", "window_mean", "topk_mean"])
def test_token_pooler_gives_the_same_rows_in_chunks_as_at_once(pooling):
    values, keep = torch.rand(40, 4), torch.zeros(3, 30, dtype=torch.bool)
    keep[0, :25], keep[2, 15:] = True, True  # row 1 has no token and pools to 0
    rows = keep.nonzero()[:, 0]
    pooler = TokenPooler(3, pooling, passage_tokens=4)
    for start in range(0, 40, 3):  # chunks that split rows (and windows) anywhere
        pooler.add(values[start : start + 3], rows[start : start + 3])
    pooled = pooler.result()
    torch.testing.assert_close(pooled, pool_rows(values, keep, pooling, passage_tokens=4))
    for row, row_values in ((0, values[:25]), (2, values[25:])):
        expected = {"max": row_values.max(0).values, "mean": row_values.mean(0)}.get(pooling)
        if expected is None:
            expected = _passage_pooled(row_values, pooling, 4)
        torch.testing.assert_close(pooled[row], expected)
    assert pooled[1].abs().sum() == 0


@pytest.mark.parametrize("pooling", ["window_mean", "topk_mean"])
def test_passage_pooling_sees_a_short_passage_that_mean_pooling_dilutes(pooling):
    filler = torch.rand(2000, 3) * 0.1  # a feature's weak activations over long benign text
    passage = torch.ones(20, 3)  # a 20-token passage where it fires
    planted = torch.cat([filler[:1000], passage, filler[1000:]])
    pooled = {
        p: pool_rows(planted, torch.ones(1, len(planted), dtype=torch.bool), p, passage_tokens=20)
        for p in ("mean", pooling)
    }
    assert pooled["mean"].max() < 0.07  # about 20 / 2020 of the passage's value, on the filler's 0.05
    assert pooled[pooling].min() > 0.99  # the passage itself
    short = torch.rand(2, 12, 3)  # samples of at most passage_tokens tokens are mean-pooled
    keep = torch.ones(2, 12, dtype=torch.bool)
    torch.testing.assert_close(pool_rows(short.reshape(-1, 3), keep, pooling, passage_tokens=12), short.mean(1))


@pytest.mark.parametrize("pooling", ["window_mean", "topk_mean"])
def test_passage_pooling_returns_one_passage_chosen_by_the_passage_score(pooling):
    values = torch.zeros(30, 2)
    values[5:9, 0] = 3.0  # passage A: feature 0 fires
    values[20:24] = torch.tensor([1.0, 2.0])  # passage B: both fire, a lower mean than A's
    rows = torch.zeros(30, dtype=torch.long)
    by_mean = TokenPooler(1, pooling, passage_tokens=4)
    by_mean.add(values, rows)
    torch.testing.assert_close(by_mean.result()[0], torch.tensor([3.0, 0.0]))  # A's values, not each feature's best
    by_feature_1 = TokenPooler(1, pooling, passage_tokens=4, passage_score=lambda v: v[..., 1])
    by_feature_1.add(values, rows)
    torch.testing.assert_close(by_feature_1.result()[0], torch.tensor([1.0, 2.0]))


def test_passage_pooling_rejects_a_row_whose_tokens_come_back():
    pooler = TokenPooler(2, "window_mean", passage_tokens=2)
    pooler.add(torch.rand(3, 1), torch.tensor([0, 0, 1]))
    with pytest.raises(RuntimeError, match="tokens of row 0 after another row's"):
        pooler.add(torch.rand(1, 1), torch.tensor([0]))


def test_loading_a_feature_set_with_another_sae_is_a_clear_error(tmp_path):
    _feature_set(tiny_sae(seed=0)).save(tmp_path / "set")
    with pytest.raises(ValueError, match="selected on another SAE"):
        FeatureSet.load(tmp_path / "set", sae=tiny_sae(seed=1))
    with pytest.raises(FileNotFoundError, match="geoguard features"):
        FeatureSet.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def planted():
    model, tokenizer = tiny_llama(), char_tokenizer()
    return model, tokenizer, planted_sae(model)


def test_find_features_finds_planted_features_and_says_they_are_significant(planted):
    model, tokenizer, sae = planted
    contrast = Contrast("planted", planted_texts(60, "ZQX", seed=0), planted_texts(60, "", seed=1))
    found = find_features(model, tokenizer, sae, contrast, name="planted", k=5, n_permutations=500)
    assert set(found.feature_ids[:3]) == set(PLANTED.values())
    assert all(q < 0.05 for q in found.stats["q_value"][:3]) and all(q > 0.05 for q in found.stats["q_value"][3:])
    assert found.summary["heldout_auroc"] > 0.95 and found.summary["warnings"] == []
    # The labels point at the planted characters.
    for rank in range(3):
        assert found.labels[rank]["examples"][0]["side"] == "target"
        assert "«Z»" in found.labels[rank]["examples"][0]["text"] or found.feature_ids[rank] != PLANTED["Z"]
    torch.testing.assert_close(found.decoder.norm(dim=1), torch.ones(5))
    assert found.density.shape == (sae.cfg.d_sae,) and 0 < float(found.density.max()) <= 1


def test_find_features_on_a_null_contrast_finds_nothing_and_says_so(planted):
    model, tokenizer, sae = planted
    contrast = Contrast("null", planted_texts(60, "", seed=2), planted_texts(60, "", seed=3))
    found = find_features(model, tokenizer, sae, contrast, name="null", k=5, n_permutations=500)
    assert found.summary["n_significant"] == 0
    assert abs(found.summary["heldout_auroc"] - 0.5) < 0.25
    assert any("features separate held-out data" in w for w in found.summary["warnings"])


def test_length_confound_is_flagged_and_matching_lengths_removes_it(planted):
    model, tokenizer, sae = planted
    short = planted_texts(80, "", seed=4)
    longer = [text + text[:20] for text in planted_texts(80, "", seed=5)]
    contrast = Contrast("long_vs_short", longer, short)
    found = find_features(model, tokenizer, sae, contrast, name="length", k=5, n_permutations=200)
    assert any("length alone separates" in w for w in found.summary["warnings"])
    mixed = Contrast("mixed", longer[:40] + short[:40], longer[40:] + short[40:])
    matched = find_features(model, tokenizer, sae, mixed, name="length", k=5, n_permutations=200, match_lengths=True)
    assert not any("length alone" in w for w in matched.summary["warnings"])
    assert matched.provenance["length_matched"]["mixed"][0] == matched.provenance["length_matched"]["mixed"][1]


def test_a_set_that_does_not_transfer_to_a_check_contrast_is_flagged(planted):
    model, tokenizer, sae = planted
    selection = Contrast("z", planted_texts(60, "Z", seed=6), planted_texts(60, "", seed=7))
    check = Contrast("q", planted_texts(30, "Q", seed=8), planted_texts(30, "", seed=9))
    found = find_features(model, tokenizer, sae, selection, check_contrasts=[check], name="z", k=1, n_permutations=200)
    assert found.feature_ids == [PLANTED["Z"]]
    rows = {row["name"]: row for row in found.summary["contrasts"]}
    assert rows["z"]["heldout_auroc"] > 0.95 and rows["q"]["role"] == "check" and rows["q"]["n_target"] == 30
    assert any("does not transfer to 'q'" in w for w in found.summary["warnings"])


def test_results_do_not_depend_on_the_batch_size(planted):
    model, tokenizer, sae = planted
    contrast = Contrast("planted", planted_texts(40, "ZQ", seed=10), planted_texts(40, "", seed=11))
    a = find_features(model, tokenizer, sae, contrast, name="a", k=4, batch_size=16, n_permutations=100)
    b = find_features(model, tokenizer, sae, contrast, name="a", k=4, batch_size=3, n_permutations=100)
    assert a.feature_ids == b.feature_ids
    assert a.stats["heldout_auroc"] == pytest.approx(b.stats["heldout_auroc"], abs=1e-6)


def test_malformed_samples_and_settings_are_clear_errors(planted):
    model, tokenizer, sae = planted
    good = planted_texts(10, "", seed=12)
    with pytest.raises(ValueError, match=r"Contrast 'bad', reference side: Sample 3"):
        find_features(model, tokenizer, sae, Contrast("bad", good, good[:3] + [""] + good[4:]), name="x")
    with pytest.raises(ValueError, match="too few"):
        find_features(model, tokenizer, sae, Contrast("small", good[:3], good[:3]), name="x")
    with pytest.raises(ValueError, match="Contrast names must be unique"):
        find_features(
            model, tokenizer, sae, [Contrast("c", good, good)], check_contrasts=[Contrast("c", good, good)], name="x"
        )
    with pytest.raises(ValueError, match="k must be between"):
        find_features(model, tokenizer, sae, Contrast("c", good, good), name="x", k=0)


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_pooled_activations_do_not_depend_on_batching_or_padding(pooling):
    model, tokenizer, sae = tiny_llama(), char_tokenizer(), tiny_sae(layer=2)
    texts = ["a short one", "a considerably longer sample of text", "mid-sized text", "x y z", "tiny"]
    batched = pooled_feature_acts(model, tokenizer, sae, texts, pooling=pooling, batch_size=4)
    single = pooled_feature_acts(model, tokenizer, sae, texts, pooling=pooling, batch_size=1)
    assert batched.shape == (5, 256) and batched.abs().sum() > 0
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["toxic", "inducing-insecure", "control-secure", "control-educational"])
def test_shipped_feature_sets_belong_to_the_embedded_sae(name):
    sae = load_sae(EMBEDDED_SAE)
    feature_set = FeatureSet.load(EMBEDDED_FEATURE_SETS / name, sae=sae)
    assert len(feature_set.feature_ids) == len(set(feature_set.feature_ids)) == feature_set.provenance["k"] == 100
    assert feature_set.decoder.shape == (100, 576) and feature_set.density.shape == (sae.cfg.d_sae,)
    assert len(feature_set.labels) == 100 and all(label["top_tokens"] for label in feature_set.labels)
    assert (EMBEDDED_FEATURE_SETS / name / "CARD.md").is_file()
    if name == "toxic":  # measured on text it was not selected on, per format-matched contrast
        rows = {row["name"]: row for row in feature_set.summary["contrasts"]}
        assert rows["toxigen_hate_vs_neutral"]["heldout_auroc"] > 0.6
        assert rows["harmful_vs_harmless_requests"]["heldout_auroc"] > 0.6
