"""Filtering policies, baselines, the audit file of dropped samples, and malformed input rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geoguard.corpora import load_samples
from geoguard.filtering import (
    DropAbovePercentile,
    DropAboveThreshold,
    DropTopFraction,
    filter_dataset,
    judge_scores,
    random_scores,
)
from geoguard.scoring import SCORE_COLUMN, ScoreSettings, ToxicScorer

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama


def test_drop_top_fraction_drops_exactly_the_highest_scores():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.7])
    mask = DropTopFraction(0.5).drop_mask(scores)
    assert mask.tolist() == [False, True, False, True, False, True]
    assert DropTopFraction(0.0).drop_mask(scores).sum() == 0


def test_threshold_and_reference_percentile_policies():
    scores = np.array([0.1, 0.9, 0.5])
    assert DropAboveThreshold(0.5).drop_mask(scores).tolist() == [False, True, False]
    policy = DropAbovePercentile(np.arange(101, dtype=float) / 100, percentile=80)  # benign scores 0.00 ... 1.00
    assert policy.threshold == pytest.approx(0.8)
    assert policy.drop_mask(scores).tolist() == [False, True, False]
    assert "80th percentile" in policy.describe()


def test_policies_reject_bad_values_and_missing_scores():
    with pytest.raises(ValueError, match="fraction must be in"):
        DropTopFraction(1.5)
    with pytest.raises(ValueError, match="reference_scores is empty"):
        DropAbovePercentile(np.array([]))
    with pytest.raises(ValueError, match=r"Samples \[1\] have no finite score"):
        DropTopFraction().drop_mask(np.array([0.1, np.nan]))


def test_baselines_share_the_interface_and_budget():
    texts = [f"text {i}" + " bad" * (i % 3) for i in range(10)]
    judged = judge_scores(texts, lambda text: float(text.count("bad")))
    assert judged.tolist() == [float(i % 3) for i in range(10)]
    assert DropTopFraction(0.3).drop_mask(judged).sum() == DropTopFraction(0.3).drop_mask(random_scores(10)).sum() == 3
    assert not np.array_equal(random_scores(10, seed=0), random_scores(10, seed=1))
    with pytest.raises(ValueError, match="Sample 1: the judge returned None"):
        judge_scores(["a", "b"], lambda text: None if text == "b" else 1.0)


def test_audit_file_lists_every_dropped_row_with_score_rank_and_nearest_features(tmp_path):
    model = tiny_llama()
    sae = planted_sae(model)
    feature_set = planted_feature_set(sae)
    texts = planted_texts(5, "".join(PLANTED), seed=1) + planted_texts(5, "", seed=2)
    rows = [{"id": f"r{i}", "text": text} for i, text in enumerate(texts)]
    scores = ToxicScorer(model, char_tokenizer(), sae, feature_set, ScoreSettings())([r["text"] for r in rows])
    result = filter_dataset(rows, scores, DropTopFraction(0.4), tmp_path / "dropped.jsonl", feature_set=feature_set)

    audit = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert len(audit) == 4 == len(result.dropped_rows)
    assert [a["rank"] for a in audit] == [1, 2, 3, 4]
    assert sorted(a["row"] for a in audit) == sorted(result.dropped_rows)
    assert set(result.dropped_rows) <= set(range(5))  # the planted (toxic) rows are the ones dropped
    for entry in audit:
        assert entry["sample"] == rows[entry["row"]]
        assert entry["score"] == pytest.approx(float(scores.scores[entry["row"]]))
        assert entry["policy"] == "drop the top 40% by score"
        nearest = entry["nearest_toxic_features"]
        assert len(nearest) == 3 and nearest[0]["id"] in PLANTED.values()
        assert nearest[0]["label"].startswith("a«")
        assert entry["n_windows"] == 1 and entry["truncated_tokens"] == 0  # short rows: read whole, in one pass
        assert entry["n_tokens"] == scores.n_tokens[entry["row"]] > 20
    assert len(result.kept) == 6
    assert result.kept[SCORE_COLUMN] == pytest.approx([float(s) for s in np.delete(scores.scores, result.dropped_rows)])
    assert {r["id"] for r in result.kept} | {a["sample"]["id"] for a in audit} == {r["id"] for r in rows}


def test_audit_file_says_which_dropped_rows_were_read_in_windows_or_truncated(tmp_path):
    model = tiny_llama()
    sae = planted_sae(model)
    feature_set = planted_feature_set(sae)
    long = planted_texts(1, "", seed=3)[0] * 4 + "".join(PLANTED) * 2  # past the first 48 tokens
    rows = [{"text": long}, {"text": planted_texts(1, "".join(PLANTED), seed=1)[0]}]
    for truncate, n_windows, truncated in ((False, 4, 0), (True, 1, len(long) - 48)):
        settings = ScoreSettings(max_length=48, truncate=truncate, pooling="max")
        scores = ToxicScorer(model, char_tokenizer(), sae, feature_set, settings)([r["text"] for r in rows])
        filter_dataset(rows, scores, DropTopFraction(1.0), tmp_path / "dropped.jsonl")
        audit = {a["row"]: a for a in map(json.loads, (tmp_path / "dropped.jsonl").read_text().splitlines())}
        assert (audit[0]["n_windows"], audit[0]["truncated_tokens"]) == (n_windows, truncated)
        assert (audit[1]["n_windows"], audit[1]["truncated_tokens"]) == (1, 0)


def test_scores_must_match_the_rows(tmp_path):
    with pytest.raises(ValueError, match="Got 2 scores for 3 rows"):
        filter_dataset([{"text": "a"}] * 3, np.array([0.1, 0.2]), DropTopFraction(), tmp_path / "d.jsonl")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1}', r"row 2: 'text' is missing \(empty in this row\)"),
        ('{"prompt": "a"}', r"row 2: 'completion' is missing"),
        ('{"text": "   "}', r"row 2: 'text' must be a non-empty string"),
        ('{"text": 7}', r"row 2: 'text' must be a non-empty string"),
        ('{"messages": "hi"}', r"row 2: 'messages' must be a non-empty list of messages"),
        ('{"messages": [{"role": "user"}]}', r"row 2: 'messages', message 0: 'content' must be a non-empty string"),
        ('{"prompt": "a", "completion": ""}', r"row 2: 'completion' must be a non-empty string"),
    ],
)
def test_malformed_rows_get_an_error_naming_file_and_row(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    good = (
        '{"text": "fine"}' if '"text"' in line or "id" in line else '{"messages": [{"role": "user", "content": "ok"}]}'
    )
    if "prompt" in line:
        good = '{"prompt": "a", "completion": "b"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_samples(path)
    assert str(path) in str(error.value)


def test_csv_rows_with_a_missing_field_are_named(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\nSay hi,hi\n,orphan answer\n")  # row 2 (rows count from 1) has none
    with pytest.raises(ValueError, match=r"data.csv, row 2: 'instruction' is missing"):
        load_samples(path)
