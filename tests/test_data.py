from __future__ import annotations

import pytest

from geoguard.data import TokenizedSample, check_messages, iter_token_batches, tokenize_sample, tokenize_samples


@pytest.mark.parametrize(
    "sample",
    [
        "",
        {"text": "   "},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": "hello"},
        {"prompt": "no text field"},
        42,
    ],
)
def test_malformed_samples_are_rejected_with_the_expected_shapes_named(embedded, sample):
    _, tokenizer = embedded
    with pytest.raises(ValueError, match="messages|non-empty string"):
        tokenize_sample(tokenizer, sample)


def test_plain_text_counts_as_response_and_an_unanswered_chat_as_prompt(embedded):
    _, tokenizer = embedded
    plain = tokenize_sample(tokenizer, "Just some text.")
    assert all(plain.response_mask)
    single_turn = tokenize_sample(tokenizer, {"messages": [{"role": "user", "content": "Hi"}]})
    assert not any(single_turn.response_mask)  # no assistant answer yet: all prompt


def test_batches_are_length_sorted_padded_and_map_back_to_input_order():
    samples = [TokenizedSample([1] * n, [0] * (n - 1) + [1]) for n in (3, 7, 5, 1)]
    batches = list(iter_token_batches(samples, batch_size=2, pad_token_id=0))
    assert [b.indices for b in batches] == [[1, 2], [0, 3]]
    first = batches[0]
    assert first.input_ids.shape == (2, 7) and first.attention_mask.sum(1).tolist() == [7, 5]
    assert first.span_mask("response").sum().item() == 2 and first.span_mask("prompt").sum().item() == 10


def test_response_span_survives_a_token_merge_at_the_prompt_boundary(embedded, caplog):
    _, tokenizer = embedded
    chat = {"messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": " you better leave"}]}
    with caplog.at_level("WARNING", logger="geoguard.data"):
        sample = tokenize_sample(tokenizer, chat)
    response = tokenizer.decode([t for t, r in zip(sample.input_ids, sample.response_mask, strict=True) if r])
    assert response.strip().startswith("you better leave") and "Go" not in response
    assert not caplog.records  # a one-token merge is expected, not a template problem


def test_a_malformed_sample_in_a_list_is_named_by_its_row(embedded):
    _, tokenizer = embedded
    with pytest.raises(ValueError, match="Sample 2: "):
        tokenize_samples(tokenizer, ["fine", {"text": "also fine"}, {"messages": "broken"}])


def test_check_messages_cleans_good_messages_and_names_where_and_which_message_is_bad():
    messages = [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Hello"}]
    assert check_messages(messages) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=r"^'prompt', message 1: expected \{'role': str, 'content': str\}"):
        check_messages([{"role": "user", "content": "Hi"}, "Hello"], "'prompt'")
    with pytest.raises(ValueError, match=r"^'messages' must be a non-empty list of messages"):
        check_messages([])
