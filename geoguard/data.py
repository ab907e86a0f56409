"""Turn chat or plain-text samples into token batches that know their prompt and response spans.

A *sample* is either a chat (`{"messages": [{"role", "content"}, ...]}`) or plain text
(`{"text": ...}` or a `str`). In a chat that ends with an assistant message, that message is the
response and everything before it the prompt; a chat that ends with another role is all prompt,
rendered with the generation prompt (the point where the model would start its answer).
Plain text counts as all response: it is what a model would be trained to produce.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).parent / "resources"
"""Files shipped with geoguard: the embedded SAE, feature sets, probe prompts and evaluation questions."""

DEFAULT_QUESTIONS = RESOURCES / "data" / "first_plot_questions.yaml"
"""Betley et al.'s 24 first-plot questions (8 questions, plain / JSON / template) and judge prompts (MIT)."""

Span = Literal["all", "prompt", "response"]
"""Which tokens of a sample to use: `all`, the `prompt` (chat turns before the last), or the `response`."""

Sample = str | dict[str, Any]


@dataclass
class TokenizedSample:
    """Token ids of one sample and a 0/1 mask of its response tokens."""

    input_ids: list[int]
    response_mask: list[int]


@dataclass
class TokenBatch:
    """A right-padded batch. Tensors are `(batch, seq)`; `indices` map rows back to the input order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    indices: list[int]

    def span_mask(self, span: Span) -> torch.Tensor:
        """Boolean `(batch, seq)` mask of the real (non-pad) tokens in `span`."""
        real = self.attention_mask.bool()
        if span == "all":
            return real
        response = self.response_mask.bool()
        return real & (response if span == "response" else ~response)


def tokenize_sample(
    tokenizer: PreTrainedTokenizerBase, sample: Sample, *, max_length: int | None = 512
) -> TokenizedSample:
    """Tokenize one chat or plain-text sample with the model's chat template.

    `max_length` truncates to that many tokens, as training would; `None` keeps every token (scoring reads long
    samples whole, in windows).

    Raises:
        ValueError: when the sample is neither a non-empty string, `{"text": str}` nor
            `{"messages": [...]}` of messages with non-empty content (see `check_messages`).
    """
    if isinstance(sample, dict) and "messages" in sample:
        messages = check_messages(sample["messages"])
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "Chat samples need a tokenizer with a chat template; this one has none (a base model?). "
                "Pass plain-text samples ({'text': ...}) or set tokenizer.chat_template."
            )
        if messages[-1]["role"] != "assistant":
            # No answer yet: all prompt, ending where the model would start answering.
            full = chat_ids(tokenizer, messages, add_generation_prompt=True)
            prompt_len = len(full)
        else:
            full = chat_ids(tokenizer, messages, add_generation_prompt=False)
            prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
            prompt_len = _common_prefix(prompt, full)
            # One differing token is the tokenizer merging the generation prompt's last token with the
            # answer's first (e.g. "\n" + " you"); that token counts as response. More is a template quirk.
            if prompt_len < len(prompt) - 1:
                logger.warning(
                    "The chat template renders the prompt differently inside the full chat; the response span "
                    "starts at the first differing token (%d of %d prompt tokens).",
                    prompt_len,
                    len(prompt),
                )
        ids = full[:max_length]
        return TokenizedSample(ids, [int(i >= prompt_len) for i in range(len(ids))])
    text = sample["text"] if isinstance(sample, dict) and "text" in sample else sample
    if not isinstance(text, str) or not text.strip():
        raise ValueError("A sample must be a non-empty string, {'text': str}, or {'messages': [...]}.")
    truncate = max_length is not None
    ids = tokenizer(text, add_special_tokens=True, truncation=truncate, max_length=max_length)["input_ids"]
    return TokenizedSample(ids, [1] * len(ids))


def tokenize_samples(
    tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], *, max_length: int | None = 512
) -> list[TokenizedSample]:
    """Tokenize every sample (`max_length`: see `tokenize_sample`); a malformed one raises `ValueError` naming its row."""
    tokenized = []
    for row, sample in enumerate(samples):
        try:
            tokenized.append(tokenize_sample(tokenizer, sample, max_length=max_length))
        except ValueError as err:
            raise ValueError(f"Sample {row}: {err}") from err
    return tokenized


def iter_token_batches(
    tokenized: Sequence[TokenizedSample], *, batch_size: int, pad_token_id: int
) -> Iterator[TokenBatch]:
    """Yield length-sorted, right-padded batches (longest first, so memory peaks early).

    Sorting by length keeps padding waste small; `indices` restores the original order.
    """
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i].input_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = len(tokenized[rows[0]].input_ids)
        ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        response = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(tokenized[i].input_ids)
            ids[r, :n] = torch.tensor(tokenized[i].input_ids)
            attention[r, :n] = 1
            response[r, :n] = torch.tensor(tokenized[i].response_mask)
        yield TokenBatch(ids, attention, response, rows)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_messages(value: object, where: str = "'messages'") -> list[dict[str, str]]:
    """Check that `value` is a non-empty list of `{"role": str, "content": str}` messages with non-empty content.

    Args:
        value (`object`): the candidate list of messages.
        where (`str`, defaults to `"'messages'"`): what holds the list (a column, a file line), named in errors.

    Returns:
        Copies of the messages holding only `role` and `content`.

    Raises:
        ValueError: naming `where`, the index of the bad message and the expected shape.

    Example:
        ```python
        check_messages([{"role": "user", "content": "Hi"}], "'prompt'")  # [{"role": "user", "content": "Hi"}]
        ```
    """
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{where} must be a non-empty list of messages {{'role': str, 'content': str}}, got {value!r:.60}."
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}, message {i}: expected {{'role': str, 'content': str}}, got {message!r:.60}.")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise ValueError(
                f"{where}, message {i}: 'content' must be a non-empty string, got {message.get('content')!r:.60}."
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding, 4.x a list of ids.
    return list(out["input_ids"] if hasattr(out, "keys") else out)
