"""Scores on a tiny model with planted toxic features: methods, sliced encoding, cache, resume, sharding."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from geoguard.capture import SinkRule
from geoguard.data import TokenizedSample, tokenize_samples
from geoguard.features import TokenPooler
from geoguard.readout import encode_features
from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset, window_start_ends
from geoguard.stats import auroc

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama

TOXIC = planted_texts(12, "".join(PLANTED), seed=1)
BENIGN = planted_texts(12, "", seed=2)


@pytest.fixture(scope="module")
def parts():
    model = tiny_llama()
    sae = planted_sae(model, align_decoder=True)
    return model, char_tokenizer(), sae, planted_feature_set(sae)


def scorer(parts, **settings) -> ToxicScorer:
    model, tokenizer, sae, feature_set = parts
    return ToxicScorer(model, tokenizer, sae, feature_set, ScoreSettings(**settings), batch_size=4)


def _random_sae(cls, config_cls):
    sae = cls(config_cls(d_in=16, d_sae=64))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 0.5)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.uniform_(0, 1)  # a real threshold: some positive pre-activations are cut
    return sae


@pytest.mark.parametrize(("cls", "config_cls"), [(StandardSAE, StandardSAEConfig), (JumpReLUSAE, JumpReLUSAEConfig)])
def test_sliced_encoding_equals_full_encoding_for_relu_and_jumprelu(cls, config_cls):
    sae = _random_sae(cls, config_cls)
    x = torch.randn(50, 16)
    ids = torch.tensor([3, 17, 40, 63])
    full = sae.encode(x)[:, ids]
    assert (full > 0).any() and (full == 0).any()  # both branches of the activation are exercised
    torch.testing.assert_close(encode_features(sae, x, ids), full, rtol=0, atol=1e-6)


def test_topk_sae_is_encoded_in_full_because_slicing_would_be_wrong(parts):
    _, _, sae, _ = parts
    x = torch.randn(20, sae.cfg.d_in)
    ids = torch.tensor([0, 5, 11])
    torch.testing.assert_close(encode_features(sae, x, ids), sae.encode(x)[:, ids])


@pytest.mark.parametrize("method", ["direct", "proximity", "subspace"])
def test_every_method_ranks_planted_toxic_samples_above_benign_ones(parts, method):
    result = scorer(parts, method=method)(TOXIC + BENIGN)
    assert auroc(result.scores[:12], result.scores[12:]) > 0.95
    assert result.n_tokens.min() > 20
    if method != "subspace":  # the largest contributor of a planted sample is a planted feature
        assert set(result.nearest[:12, 0]) <= set(PLANTED.values())


def test_score_dataset_restores_the_input_order_across_chunks(parts):
    s = scorer(parts)
    direct = s(TOXIC + BENIGN)
    chunked = score_dataset(s, TOXIC + BENIGN, cache=None, chunk_size=5, progress=False)
    np.testing.assert_allclose(chunked.scores, direct.scores, rtol=1e-6)
    np.testing.assert_array_equal(chunked.nearest, direct.nearest)


def _count_batches(s: ToxicScorer) -> list[int]:
    calls = []
    original = s.score_tokenized

    def counted(tokenized, **kwargs):
        calls.append(len(tokenized))
        return original(tokenized, **kwargs)

    s.score_tokenized = counted
    return calls


def test_cache_hit_runs_no_model_and_returns_the_same_scores(parts, tmp_path):
    s = scorer(parts)
    first = score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=5, progress=False)
    calls = _count_batches(s)
    second = score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=5, progress=False)
    assert calls == []
    np.testing.assert_array_equal(second.scores, first.scores)
    np.testing.assert_array_equal(second.nearest, first.nearest)


def test_a_cache_written_with_another_chunk_size_is_not_misread(parts, tmp_path):
    s = scorer(parts)
    score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=5, progress=False)
    again = score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=7, progress=False)
    np.testing.assert_allclose(again.scores, s(TOXIC + BENIGN).scores, rtol=1e-6)


def test_cache_key_changes_with_data_model_settings_and_feature_set(parts):
    model, tokenizer, sae, feature_set = parts
    tokenized = [TokenizedSample([5, 6, 7, 8], [1, 1, 1, 1])]
    key = scorer(parts).cache_key(tokenized)
    assert scorer(parts).cache_key(tokenized) == key
    assert scorer(parts).cache_key([TokenizedSample([5, 6, 7, 9], [1, 1, 1, 1])]) != key
    assert scorer(parts).cache_key([TokenizedSample([5, 6, 7, 8], [0, 1, 1, 1])]) != key
    assert scorer(parts, method="proximity").cache_key(tokenized) != key
    assert scorer(parts, span="all").cache_key(tokenized) != key
    for setting in ({"truncate": True}, {"pooling": "window_mean"}, {"passage_tokens": 16}, {"window_overlap": 0.5}):
        assert scorer(parts, **setting).cache_key(tokenized) != key
    fewer = planted_feature_set(sae)
    fewer.feature_ids = fewer.feature_ids[:2]
    assert ToxicScorer(model, tokenizer, sae, fewer, ScoreSettings(n_nearest=2)).cache_key(tokenized) != key
    trained = tiny_llama()
    with torch.no_grad():
        trained.model.layers[0].mlp.down_proj.weight.add_(1e-3)  # "fine-tuning" one tensor
    assert ToxicScorer(trained, tokenizer, sae, feature_set).cache_key(tokenized) != key


def test_interrupted_run_resumes_at_the_missing_chunks(parts, tmp_path):
    s = scorer(parts)
    full = score_dataset(s, TOXIC + BENIGN, cache=None, chunk_size=5, progress=False)
    original, done = s.score_tokenized, []

    def interrupted(tokenized, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return original(tokenized, **kwargs)

    s.score_tokenized = interrupted
    with pytest.raises(KeyboardInterrupt):
        score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=5, progress=False)
    s.score_tokenized = original
    calls = _count_batches(s)
    resumed = score_dataset(s, TOXIC + BENIGN, cache=tmp_path, chunk_size=5, progress=False)
    assert len(calls) == 5 - 2  # 24 samples in chunks of 5: two were done before the interruption
    np.testing.assert_allclose(resumed.scores, full.scores, rtol=1e-6)


def test_samples_without_tokens_in_the_span_are_named(parts):
    s = scorer(parts, span="response")
    prompt_only = TokenizedSample([5, 6, 7, 8], [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"Samples at rows \[1\] have no tokens to score in span 'response'"):
        s.score_tokenized([TokenizedSample([5, 6, 7, 8], [1, 1, 1, 1]), prompt_only])
    sink_only = TokenizedSample([5, 6, 7, 8], [1, 0, 0, 0])  # its one response token is position 0, a sink
    with pytest.raises(ValueError, match=r"Samples at rows \[0\] have only attention-sink tokens in span 'response'"):
        s.score_tokenized([sink_only])


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_score_dataset_names_the_callers_rows_before_any_forward_pass(parts):
    model, _, sae, feature_set = parts
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    s = ToxicScorer(model, tokenizer, sae, feature_set, ScoreSettings(), batch_size=4)
    calls = _count_batches(s)
    samples = TOXIC[:7] + [{"messages": [{"role": "user", "content": "a question only"}]}] + BENIGN[:3] + ["a"]
    # Rows 7 (a prompt-only chat) and 11 (one token, the sink) are named by their index in `samples`, not by
    # their place in a length-sorted chunk, and nothing runs first.
    with pytest.raises(ValueError, match=r"rows \[7\] have no tokens.*rows \[11\] have only attention-sink tokens"):
        score_dataset(s, samples, cache=None, chunk_size=5, progress=False)
    assert calls == []


def test_window_start_ends_tile_the_sample_with_context_for_every_later_window():
    assert window_start_ends(5, 8, 2) == [(0, 0, 5)]  # fits: one window, the whole sample
    for n, length, overlap in [(9, 8, 2), (100, 16, 4), (1000, 512, 128), (513, 512, 0)]:
        windows = window_start_ends(n, length, overlap)
        assert windows[0][:2] == (0, 0) and windows[-1][2] == n
        for (_, _, end), (start, first, next_end) in zip(windows, windows[1:], strict=False):
            assert first == end  # the scored parts tile [0, n): each token is scored once
            assert next_end - start == length and first - start >= overlap


LONG_FILLER = planted_texts(1, "", seed=3)[0] * 8  # about 260 characters of benign letters


def test_a_long_sample_is_scored_whole_in_windows_and_each_token_once(parts):
    settings = {"max_length": 64, "sink_rule": SinkRule(norm_ratio=0)}  # only position 0 is a sink
    toxic_at_end = LONG_FILLER + "".join(PLANTED) * 3
    short = TOXIC[0]
    result = scorer(parts, **settings)([toxic_at_end, short, LONG_FILLER])
    n = len(toxic_at_end)  # one token per character
    assert result.n_windows.tolist() == [len(window_start_ends(n, 64, 16)), 1, len(window_start_ends(n - 9, 64, 16))]
    assert result.n_tokens[0] == n - 1 and result.truncated_tokens.tolist() == [0, 0, 0]
    # A sample that fits scores as before: one window is one pass over the whole sample.
    np.testing.assert_allclose(result.scores[1], scorer(parts, sink_rule=SinkRule(norm_ratio=0))([short]).scores[0])
    # The toxic passage past the first 64 tokens is read: the toxic-ended sample scores above the filler alone.
    assert result.scores[0] > result.scores[2]


def test_truncation_is_opt_in_counted_and_logged(parts, caplog):
    toxic_at_end = LONG_FILLER + "".join(PLANTED) * 3
    whole = scorer(parts, max_length=64, pooling="max")([toxic_at_end, TOXIC[0]])
    with caplog.at_level(logging.WARNING, logger="geoguard.scoring"):
        cut = scorer(parts, max_length=64, pooling="max", truncate=True)([toxic_at_end, TOXIC[0]])
    assert cut.truncated_tokens.tolist() == [len(toxic_at_end) - 64, 0]
    assert cut.n_windows.tolist() == [1, 1] and cut.n_tokens[0] < 64
    assert "1 of 2 samples are longer than max_length=64 tokens and were truncated" in caplog.text
    assert cut.scores[0] < whole.scores[0]  # the planted passage was cut off
    np.testing.assert_allclose(cut.scores[1], whole.scores[1])


@pytest.mark.parametrize("pooling", ["window_mean", "topk_mean"])
def test_passage_pooling_keeps_a_short_toxic_passage_visible_where_mean_dilutes_it(parts, pooling):
    passage = "".join(PLANTED) * 2
    settings = {"max_length": 64, "passage_tokens": 8, "span": "all"}
    samples = [LONG_FILLER[:100] + passage + LONG_FILLER[100:], LONG_FILLER, passage + "ab", "ab" + "cd"]
    mean = scorer(parts, pooling="mean", **settings)(samples).scores
    passage_pooled = scorer(parts, pooling=pooling, **settings)(samples).scores
    contrast = {"mean": mean[0] - mean[1], pooling: passage_pooled[0] - passage_pooled[1]}
    # The short toxic sample alone sets the scale: mean pooling keeps less than a third of it inside the long
    # filler, the passage pooling more than half.
    alone = {"mean": mean[2] - mean[1], pooling: passage_pooled[2] - passage_pooled[1]}
    assert contrast["mean"] < alone["mean"] / 3
    assert contrast[pooling] > alone[pooling] / 2
    # Samples of at most passage_tokens tokens are mean-pooled.
    np.testing.assert_allclose(passage_pooled[2:], mean[2:], rtol=1e-5)


def test_token_values_are_the_stream_the_score_pools(parts):
    s = scorer(parts, max_length=32, pooling="topk_mean", passage_tokens=4)
    samples = [LONG_FILLER + TOXIC[0], TOXIC[1], BENIGN[0]]
    pooler = TokenPooler(3, "topk_mean", passage_tokens=4)
    for rows, (acts,) in s.iter_token_values(tokenize_samples(char_tokenizer(), samples, max_length=None)):
        assert acts.shape == (len(rows), len(PLANTED))
        pooler.add(acts, rows)
    np.testing.assert_allclose(pooler.result().mean(dim=1).numpy(), s(samples).scores, rtol=1e-6)


def test_windowed_chunks_and_batches_give_the_same_passage_scores(parts, tmp_path):
    s = scorer(parts, max_length=32, pooling="window_mean", passage_tokens=8)
    samples = [LONG_FILLER + TOXIC[i] + LONG_FILLER[:50] for i in range(3)] + TOXIC[3:8] + BENIGN[:4]
    direct = s(samples)
    chunked = score_dataset(s, samples, cache=tmp_path, chunk_size=5, progress=False)
    np.testing.assert_allclose(chunked.scores, direct.scores, rtol=1e-5)
    again = score_dataset(s, samples, cache=tmp_path, chunk_size=5, progress=False)  # read back from the cache
    for field in ("n_windows", "truncated_tokens", "n_tokens"):
        np.testing.assert_array_equal(getattr(again, field), getattr(direct, field))
    assert direct.n_windows[:3].min() > 1


def test_bad_settings_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="method must be 'proximity', 'direct' or 'subspace'"):
        ScoreSettings(method="nearest")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_scores_equal_single_process_scores(parts, tmp_path):
    model, _, sae, feature_set = parts
    model.save_pretrained(tmp_path / "model")
    sae.save_model(str(tmp_path / "sae"))
    feature_set.save(tmp_path / "features")
    single = score_dataset(
        scorer(parts),
        planted_texts(9, "".join(PLANTED), seed=1) + planted_texts(8, "", seed=2),
        cache=None,
        chunk_size=3,
        progress=False,
    )
    script = os.path.join(os.path.dirname(__file__), "distributed_scoring.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script]
    command += [str(tmp_path / p) for p in ("model", "sae", "features", "cache", "out.json")]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["world"] == 2
    for rank_scores in out["scores"]:  # every rank returns the full, gathered result
        np.testing.assert_allclose(rank_scores, single.scores, rtol=1e-5)
    # Each rank wrote the chunks it scored: 17 samples in chunks of 3 make 6 chunk files in the cache.
    assert len(list((tmp_path / "cache").rglob("chunk-*.npz"))) == 6
