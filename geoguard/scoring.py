"""Scores: how close each training sample is to the toxic features, computed once and cached.

A *score* is one number per sample; higher means closer to the toxic feature set. The paper
(Minegishi et al. 2026) filters by "proximity to toxic features" without saying how a sample's
proximity is computed, so geoguard offers three scores (`ScoreMethod`), all read at the SAE's hook
point over the tokens of a span (the response by default: what training would teach):

- `proximity`: the sample's SAE features weighted by their pooled activation, each by the cosine
  similarity of its decoder direction to the nearest toxic feature's (negative similarities count
  as 0): `sum_j f_j * w_j / sum_j f_j`. This is the paper's geometry applied to one sample; it needs
  every feature, so the whole SAE is encoded.
- `direct`: the set's score of its units' pooled values (`geoguard.readout.SetReadout`): the mean pooled
  activation of the toxic features, or their weighted readout's logit when the set has one, or a direction set's
  pooled projection. For ReLU and JumpReLU SAEs only those k columns of the encoder are computed (exact); TopK
  SAEs need the full encoding; a direction costs one dot product per token.
- `subspace`: the norm of the residual's projection onto the span of the toxic decoder directions,
  pooled over tokens. No SAE encoding at all.

Token values become one value per sample by a pooling (`geoguard.features.Pooling`): `mean`, `max`, or a
passage pooling (`window_mean`, `topk_mean`) that keeps a short harmful passage visible in a long sample.
A sample longer than `ScoreSettings.max_length` tokens is read whole, in overlapping windows of at most that
many tokens (one forward pass each), and pooled over all its tokens, each token read once; it is cut to
`max_length` only with `ScoreSettings(truncate=True)`, and `SampleScores` records both per sample.

Each score also names the toxic features that contributed most (for the audit file of dropped
samples). `score_dataset` runs a `ToxicScorer` over a data set in length-sorted batches with early
exit at the SAE's layer, splits the work across accelerate processes, and caches the results on
disk under a key of data, model, SAE, feature set and score settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from sae_lens import SAE
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from geoguard.capture import SinkRule, iter_activations, unwrap_model
from geoguard.data import Sample, Span, TokenizedSample, tokenize_samples
from geoguard.distributed import from_main_process, gather_dicts, my_share, process_state
from geoguard.features import FeatureSet, Pooling, TokenPooler
from geoguard.models import cache_dir
from geoguard.readout import SetReadout

logger = logging.getLogger(__name__)

ScoreMethod = Literal["proximity", "direct", "subspace"]
"""How a sample's closeness to the toxic features is measured (see the module docstring)."""

SCORE_COLUMN = "geoguard_score"
"""Data set column holding precomputed scores (read by `GeoGuardCollator`)."""

NEAREST_COLUMN = "geoguard_nearest"
"""Column `geoguard score` writes with the ids of each sample's largest-contributing toxic features."""

_TOKEN_CHUNK = 1024  # tokens encoded at once: each (tokens, d_sae) matrix of the encoding is 32 MB at d_sae 8192


@dataclass(frozen=True)
class ScoreSettings:
    """Everything a score depends on besides the data, the model, the SAE and the feature set.

    Attributes:
        method: `proximity`, `direct` or `subspace` (see `ScoreMethod`).
        span: tokens scored: `response` (what training teaches; plain text counts as response), `prompt` or `all`.
        pooling: how token values become a sample value (see `geoguard.features.Pooling`): `mean`
            (length-normalised; dilutes a short passage in a long sample), `max`, `window_mean` (the most
            activating run of `passage_tokens` tokens) or `topk_mean` (the `passage_tokens` most activating tokens).
        passage_tokens: tokens a passage pooling averages over: the window of `window_mean`, the k of `topk_mean`.
            8 is the width the scoring-quality benchmark chose for `window_mean` on its development split;
            a sample this short is mean-pooled.
        max_length: tokens per forward pass. A longer sample is read whole in consecutive windows of this many
            tokens (at most the model's context), each token scored once.
        window_overlap: share of each window after the first that re-reads the end of the one before as context
            (scored in the earlier window), so that every scored token has at least that much context.
        truncate: score only the first `max_length` tokens of a longer sample, as training with that
            `max_length` would see it, instead of all of it; `SampleScores.truncated_tokens` counts the rest.
        sink_rule: attention-sink tokens left out (`None` keeps them).
        n_nearest: toxic features named per sample in the audit (the largest contributors).
    """

    method: ScoreMethod = "direct"
    span: Span = "response"
    pooling: Pooling = "mean"
    passage_tokens: int = 8
    max_length: int = 512
    window_overlap: float = 0.25
    truncate: bool = False
    sink_rule: SinkRule | None = SinkRule()
    n_nearest: int = 3

    def __post_init__(self):
        if self.method not in ("proximity", "direct", "subspace"):
            raise ValueError(f"method must be 'proximity', 'direct' or 'subspace', got {self.method!r}.")
        if self.span not in ("all", "prompt", "response"):
            raise ValueError(f"span must be 'all', 'prompt' or 'response', got {self.span!r}.")
        if self.pooling not in ("mean", "max", "window_mean", "topk_mean"):
            raise ValueError(f"pooling must be 'mean', 'max', 'window_mean' or 'topk_mean', got {self.pooling!r}.")
        if self.passage_tokens < 1:
            raise ValueError(f"passage_tokens must be >= 1, got {self.passage_tokens}.")
        if not 0 <= self.window_overlap < 1:
            raise ValueError(f"window_overlap must be in [0, 1), got {self.window_overlap}.")
        if self.max_length <= self.overlap_tokens:
            raise ValueError(
                f"max_length={self.max_length} leaves no new token per window after {self.overlap_tokens} tokens "
                f"of overlap (window_overlap={self.window_overlap} and the sink rule's first positions); raise "
                "max_length or lower window_overlap."
            )

    @property
    def overlap_tokens(self) -> int:
        """Context tokens at the start of each window after the first; at least the sink rule's first positions."""
        sinks = self.sink_rule.first_positions if self.sink_rule is not None else 0
        return max(int(self.window_overlap * self.max_length), sinks)

    def check_scoreable(self, tokenized: Sequence[TokenizedSample], rows: Sequence[int] | None = None) -> None:
        """Raise `ValueError` naming the samples with no token to score, before any forward pass.

        A sample has none when its span is empty (a prompt-only chat with `span="response"`; with `truncate`,
        a response past the first `max_length` tokens) or holds only the first positions the sink rule leaves
        out as attention sinks.

        Args:
            tokenized (list of `TokenizedSample`): the samples, whole (truncation is applied here with `truncate`).
            rows (list of `int`, *optional*): the caller's row of each sample, named in the message (defaults to
                the positions in `tokenized`).
        """
        settings = self
        rows = range(len(tokenized)) if rows is None else rows
        sinks = settings.sink_rule.first_positions if settings.sink_rule is not None else 0
        empty, sinks_only = [], []
        for row, sample in zip(rows, tokenized, strict=True):
            in_span = _span_positions(self.cut(sample)[0], settings.span)
            if not any(in_span):
                empty.append(row)
            elif not any(in_span[sinks:]):
                sinks_only.append(row)
        problems = []
        if empty:
            cut = (
                f" within the first max_length={settings.max_length} tokens (truncate=True)"
                if settings.truncate
                else ""
            )
            problems.append(
                f"Samples at rows {_first(empty)} have no tokens to score in span {settings.span!r}{cut} (prompt-only "
                "chats score nothing with span='response'). Score with span='all' or give the chats an answer."
            )
        if sinks_only:
            problems.append(
                f"Samples at rows {_first(sinks_only)} have only attention-sink tokens in span {settings.span!r}: the "
                f"first {sinks} position(s) of a sample are left out (ScoreSettings.sink_rule). Score with span='all' "
                "or give them a longer answer."
            )
        if problems:
            raise ValueError(" ".join(problems))

    def cut(self, sample: TokenizedSample) -> tuple[TokenizedSample, int]:
        """The sample as scored (its first `max_length` tokens with `truncate`) and the number of tokens cut."""
        cut = len(sample.input_ids) - self.max_length
        if not self.truncate or cut <= 0:
            return sample, 0
        length = self.max_length
        return TokenizedSample(sample.input_ids[:length], sample.response_mask[:length]), cut


@dataclass
class SampleScores:
    """Scores of a list of samples, in the samples' order.

    Attributes:
        scores: `(n,)` the score of each sample.
        nearest: `(n, n_nearest)` SAE ids of the toxic features that contributed most, largest first.
        contributions: `(n, n_nearest)` their contributions (their share of the score's sum, or for `subspace`
            the pooled projection onto their direction).
        n_tokens: `(n,)` tokens each score was computed over.
        n_windows: `(n,)` forward passes each sample was read in: 1 where it fits in `max_length` tokens, more
            for a longer sample read whole (windows with no token in the span are not run).
        truncated_tokens: `(n,)` tokens past `max_length` left unscored: 0 unless `ScoreSettings(truncate=True)`.
    """

    scores: np.ndarray
    nearest: np.ndarray
    contributions: np.ndarray
    n_tokens: np.ndarray
    n_windows: np.ndarray
    truncated_tokens: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[SampleScores]) -> SampleScores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def take(self, rows: Sequence[int] | np.ndarray) -> SampleScores:
        return SampleScores(*(getattr(self, f)[np.asarray(rows)] for f in self.__dataclass_fields__))


class ToxicScorer:
    """Score samples by their closeness to a toxic feature set, with a model and its SAE.

    The model is only read (no gradients, early exit at the SAE's layer). Scoring with the model being
    trained gives scores that move with training; pass a frozen copy to score against the starting weights.

    Args:
        model (`nn.Module`): the model, possibly wrapped; its device is used for the forward passes.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (the chat template renders chats).
        sae (`sae_lens.SAE`): the SAE reading the model's residual stream (`None` with a direction set).
        feature_set (`FeatureSet`): the toxic features (must belong to `sae`) or a direction set.
        settings (`ScoreSettings`, defaults to `ScoreSettings()`): method, span, pooling, ...
        batch_size (`int`, defaults to 16): samples per forward pass.

    Example:
        ```python
        sae = load_sae(); scorer = ToxicScorer(model, tokenizer, sae, FeatureSet.load(sae=sae))
        scorer(["How do I pick a lock?", {"messages": [...]}]).scores
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        sae: SAE,
        feature_set: FeatureSet,
        settings: ScoreSettings = ScoreSettings(),
        *,
        batch_size: int = 16,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.readout = SetReadout(feature_set, sae)
        self.readout.check_fits(model)
        if feature_set.is_directions and settings.method == "proximity":
            raise ValueError(
                f"{feature_set.name!r} is a direction set; the proximity score weighs SAE features by their decoder "
                "similarity and needs an SAE feature set. Use method 'direct' or 'subspace'."
            )
        if not self.readout.nonnegative and settings.pooling == "max":
            raise ValueError(
                f"Pooling 'max' needs non-negative token values; {feature_set.name!r} is a direction set, whose "
                "projections can be negative. Use pooling 'mean', 'window_mean' or 'topk_mean'."
            )
        self.model, self.tokenizer, self.sae, self.feature_set = model, tokenizer, sae, feature_set
        self.settings, self.batch_size = settings, batch_size
        self.hook_name = self.readout.hook_name
        self.toxic_ids = torch.tensor(feature_set.feature_ids)
        # The audit names up to n_nearest units: a direction set may have fewer.
        self.n_nearest = (
            min(settings.n_nearest, len(self.toxic_ids)) if feature_set.is_directions else settings.n_nearest
        )
        if self.n_nearest > len(self.toxic_ids):
            raise ValueError(f"n_nearest={settings.n_nearest} exceeds the {len(self.toxic_ids)} toxic features.")
        context = getattr(getattr(unwrap_model(model), "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and settings.max_length > context:
            logger.warning(
                "ScoreSettings(max_length=%d) exceeds the model's context (%d positions): windows that long read "
                "positions it was not trained on. Set max_length=%d or less.",
                settings.max_length,
                context,
                context,
            )
        with torch.no_grad():
            if settings.method == "proximity":
                directions = nn.functional.normalize(sae.W_dec.detach().float(), dim=1)  # (d_sae, d_in)
                # Each SAE feature's similarity to its nearest toxic feature, and which one that is.
                similarity, nearest = (directions @ directions[self.toxic_ids].T).max(dim=1)  # (d_sae,)
                self._nearest, self._weight = nearest.cpu(), similarity.clamp(min=0).cpu()  # pooling runs on CPU

    def __call__(self, samples: Sequence[Sample]) -> SampleScores:
        """Score chats or plain texts (not cached; `score_dataset` caches); long samples are read whole."""
        result = self.score_tokenized(tokenize_samples(self.tokenizer, samples, max_length=None))
        _log_long_samples(result, self.settings)
        return result

    def check_scoreable(self, tokenized: Sequence[TokenizedSample], rows: Sequence[int] | None = None) -> None:
        """See `ScoreSettings.check_scoreable` (the check needs the settings only, not the model)."""
        self.settings.check_scoreable(tokenized, rows)

    def _cut(self, sample: TokenizedSample) -> tuple[TokenizedSample, int]:
        return self.settings.cut(sample)

    @torch.no_grad()
    def score_tokenized(
        self, tokenized: Sequence[TokenizedSample], *, rows: Sequence[int] | None = None
    ) -> SampleScores:
        """Score samples already tokenized with `geoguard.data.tokenize_samples` (or built from training batches).

        A sample longer than `settings.max_length` tokens is read in overlapping windows of `max_length` tokens
        (`window_start_ends`), one forward pass each, and pooled over all its tokens, each read once in the
        window that gives it the most context: its score equals one pass over the whole sample where that fits.
        With `settings.truncate`, it is cut to its first `max_length` tokens instead.

        Args:
            tokenized (list of `TokenizedSample`): the samples, whole.
            rows (list of `int`, *optional*): the caller's row of each sample, named in errors (defaults to the
                positions in `tokenized`).

        Raises:
            ValueError: naming the rows that have no token to score (see `check_scoreable`; also a sample whose
                every span token the sink rule's norm test leaves out, found during the forward pass).
        """
        settings, n = self.settings, len(tokenized)
        rows = list(range(n)) if rows is None else list(rows)
        self.check_scoreable(tokenized, rows)
        windows = self._windows(tokenized)
        # The passage poolings rank passages by the method's score of their mean values.
        passage_score = {"proximity": self._proximity, "direct": self.readout.token_scores}.get(settings.method)
        pooler = partial(TokenPooler, n, passage_tokens=settings.passage_tokens, passage_score=passage_score)
        # subspace pools the projection norms and, for the audit, the mean projection along each toxic direction
        poolers = [pooler(settings.pooling)] + ([pooler("mean")] if settings.method == "subspace" else [])
        n_kept = torch.zeros(n, dtype=torch.int64)
        for token_rows, values in self._iter_values(windows):
            for pooler, value in zip(poolers, values, strict=True):
                pooler.add(value, token_rows)
            n_kept += torch.bincount(token_rows, minlength=n)
        if empty := (n_kept == 0).nonzero()[:, 0].tolist():
            ratio = settings.sink_rule.norm_ratio if settings.sink_rule is not None else 0
            raise ValueError(
                f"Samples at rows {_first([rows[i] for i in empty])} have only attention-sink tokens in span "
                f"{settings.span!r}: each of their tokens has an activation norm above {ratio:g} times the batch's "
                "median (ScoreSettings.sink_rule). Score with span='all' or give them a longer answer."
            )
        scores, contributions = self._pooled_scores([p.result() for p in poolers])
        top = contributions.topk(self.n_nearest, dim=1)
        return SampleScores(
            scores=scores.numpy(),
            nearest=self.toxic_ids[top.indices].numpy(),
            contributions=top.values.numpy(),
            n_tokens=n_kept.numpy(),
            n_windows=windows.n_windows,
            truncated_tokens=windows.truncated_tokens,
        )

    def iter_token_values(
        self, tokenized: Sequence[TokenizedSample]
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Yield the per-token values a score pools, `(rows, values)` per chunk of scored tokens.

        `rows` `(n,)` is each token's sample (its position in `tokenized`). `values` holds the method's per-token
        quantities: `direct`, the toxic features' activations `(n, k)`; `proximity`, the SAE encoding `(n, d_sae)`;
        `subspace`, the projection norm `(n, 1)` and the projection along each toxic direction `(n, k)`. Samples
        are read as `score_tokenized` reads them (windows or truncation, span, sink rule), and each sample's tokens
        come together and in order, as `TokenPooler`'s passage poolings need: pool them several ways at once, or
        find where in a sample the toxic features fire.

        Example:
            ```python
            for rows, (acts,) in scorer.iter_token_values(tokenize_samples(tokenizer, texts, max_length=None)):
                ...  # acts[i]: the toxic features' activations at the i-th scored token, of sample rows[i]
            ```
        """
        return self._iter_values(self._windows(tokenized))

    def _windows(self, tokenized: Sequence[TokenizedSample]) -> _Windows:
        """The forward windows of `tokenized` (cut with `truncate`); windows with no token to score are left out."""
        settings = self.settings
        windows, sample_of, first_of = [], [], []
        n_windows, truncated = np.zeros(len(tokenized), np.int64), np.zeros(len(tokenized), np.int64)
        for i, whole in enumerate(tokenized):
            sample, truncated[i] = self._cut(whole)
            in_span = _span_positions(sample, settings.span)
            for start, first, end in window_start_ends(
                len(sample.input_ids), settings.max_length, settings.overlap_tokens
            ):
                if any(in_span[first:end]):
                    windows.append(TokenizedSample(sample.input_ids[start:end], sample.response_mask[start:end]))
                    sample_of.append(i)
                    first_of.append(first - start)
                    n_windows[i] += 1
        return _Windows(
            windows, torch.tensor(sample_of, dtype=torch.int64), torch.tensor(first_of), n_windows, truncated
        )

    @torch.no_grad()
    def _iter_values(self, windows: _Windows) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        was_training = self.model.training
        self.model.eval()
        try:
            # Windows are length-sorted stably, so a long sample's windows (all max_length long) come one after
            # another, in order: each sample's tokens come together and in order.
            for acts, keep, indices in iter_activations(
                self.model,
                self.tokenizer,
                windows.tokens,
                self.hook_name,
                span=self.settings.span,
                batch_size=self.batch_size,
                sink_rule=self.settings.sink_rule,
            ):
                positions = torch.arange(keep.shape[1], device=keep.device)  # (seq,)
                keep = keep & (positions >= windows.first[indices].to(keep.device).unsqueeze(1))  # context: not scored
                rows = windows.sample[indices][keep.nonzero()[:, 0].cpu()]  # (n_kept,) sample of each kept token
                x = acts[keep]  # (n_kept, d_in)
                for start in range(0, x.shape[0], _TOKEN_CHUNK):
                    values = self._token_values(x[start : start + _TOKEN_CHUNK])
                    yield rows[start : start + _TOKEN_CHUNK], [v.float().cpu() for v in values]
        finally:
            self.model.train(was_training)

    def _token_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The method's per-token values of residuals `x` `(tokens, d_in)` (see `iter_token_values`).

        Every quantity pooled with max or a passage pooling (SAE activations, projection norms) is non-negative,
        as `TokenPooler` requires of max.
        """
        if self.settings.method == "direct":
            return [self.readout.unit_values(x)]  # (tokens, k)
        if self.settings.method == "proximity":
            return [self.sae.encode(x.to(self.sae.device, self.sae.dtype))]  # (tokens, d_sae)
        return [self.readout.projection(x).unsqueeze(1), self.readout.along(x)]

    def _pooled_scores(self, pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `(n,)` and per-toxic-feature contributions `(n, k)` from the pooled token values."""
        if self.settings.method == "direct":  # (n, k)
            return self.readout.score(pooled[0]), self.readout.contributions(pooled[0])
        if self.settings.method == "proximity":  # (n, d_sae)
            weighted = pooled[0] * self._weight
            contributions = torch.zeros(len(weighted), len(self.toxic_ids)).index_add_(1, self._nearest, weighted)
            total = pooled[0].sum(dim=1).clamp(min=1e-12)
            return weighted.sum(dim=1) / total, contributions / total.unsqueeze(1)
        return pooled[0][:, 0], pooled[1]

    def _proximity(self, pooled: torch.Tensor) -> torch.Tensor:
        """The proximity score `(...)` of pooled SAE activations `(..., d_sae)`."""
        return (pooled * self._weight).sum(dim=-1) / pooled.sum(dim=-1).clamp(min=1e-12)

    def cache_key(self, tokenized: Sequence[TokenizedSample]) -> str:
        """Hash of (data, model, SAE, feature set, settings): equal keys mean equal scores."""
        digest = hashlib.sha256()
        for sample in tokenized:
            digest.update(np.asarray(sample.input_ids, np.int64).tobytes())
            digest.update(np.asarray(sample.response_mask, np.int8).tobytes())
            digest.update(b"|")
        parts = {
            "data": digest.hexdigest(),
            "model": model_fingerprint(self.model),
            "readout": self.readout.fingerprint(),
            "settings": asdict(self.settings),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Windows(NamedTuple):
    """The forward windows of a list of samples: each window's tokens, sample and first scored position."""

    tokens: list[TokenizedSample]
    sample: torch.Tensor  # (n_windows,)
    first: torch.Tensor  # (n_windows,)
    n_windows: np.ndarray  # (n_samples,) windows run per sample
    truncated_tokens: np.ndarray  # (n_samples,) tokens cut off per sample (truncate=True)


def window_start_ends(n_tokens: int, max_length: int, overlap: int) -> list[tuple[int, int, int]]:
    """Forward windows `(start, first, end)` over a sample of `n_tokens` tokens: each reads `[start, end)` and scores
    `[first, end)`.

    The first window starts at 0 and each next one `max_length - overlap` tokens later; the last one ends at the
    sample's end (it may overlap more). Every window is `max_length` long unless the sample is shorter. The scored
    parts tile the sample, each token scored in the earliest window that holds it, where it has the most context
    (after the first window, at least `overlap` tokens).

    Example:
        >>> window_start_ends(10, 4, 1)
        [(0, 0, 4), (3, 4, 7), (6, 7, 10)]
    """
    starts = [0]
    while starts[-1] + max_length < n_tokens:
        starts.append(min(starts[-1] + max_length - overlap, n_tokens - max_length))
    ends = [min(start + max_length, n_tokens) for start in starts]
    return list(zip(starts, [0, *ends[:-1]], ends, strict=True))


def _span_positions(sample: TokenizedSample, span: Span) -> list[int]:
    """1 for each token of `sample` in `span`, else 0."""
    if span == "all":
        return [1] * len(sample.input_ids)
    return sample.response_mask if span == "response" else [1 - m for m in sample.response_mask]


def _first(rows: Sequence[int], n: int = 10) -> str:
    """`rows` for a message: the first `n`, then how many more."""
    return f"{list(rows[:n])}" + (f" and {len(rows) - n} more" if len(rows) > n else "")


def _log_long_samples(scores: SampleScores, settings: ScoreSettings) -> None:
    """Say how many samples were longer than `max_length` tokens: truncated (a warning) or read in windows."""
    n = len(scores.scores)
    if cut := int((scores.truncated_tokens > 0).sum()):
        logger.warning(
            "%d of %d samples are longer than max_length=%d tokens and were truncated to it (truncate=True): %d "
            "tokens were not scored. SampleScores.truncated_tokens has the count per sample (so does the audit file "
            "of dropped rows); truncate=False scores them whole.",
            cut,
            n,
            settings.max_length,
            int(scores.truncated_tokens.sum()),
        )
    if long := int((scores.n_windows > 1).sum()):
        logger.info(
            "%d of %d samples are longer than max_length=%d tokens and were scored whole, in %d windows in all "
            "(SampleScores.n_windows).",
            long,
            n,
            settings.max_length,
            int(scores.n_windows[scores.n_windows > 1].sum()),
        )


def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of a model's weights: every parameter's name, shape and 4096 evenly strided values.

    Fine-tuning (full or LoRA) changes whole tensors, so a strided sample tells trained weights apart from
    the starting ones without hashing billions of values.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_score_cache() -> Path:
    """`<geoguard cache>/scores` (`$GEOGUARD_CACHE` moves the whole cache)."""
    return cache_dir() / "scores"


def score_dataset(
    scorer: ToxicScorer,
    samples: Sequence[Sample],
    *,
    cache: str | Path | None = "default",
    chunk_size: int = 256,
    progress: bool = True,
) -> SampleScores:
    """Score every sample, split across accelerate processes, with an on-disk cache that resumes.

    Samples are tokenized, sorted by length (longest first) and cut into chunks of `chunk_size`; each chunk is
    scored in batches of `scorer.batch_size` with early exit at the SAE's layer. Under `accelerate launch`
    every process scores every `num_processes`-th chunk and the results are gathered, so every process
    returns the same full result, identical to a single-process run (the chunks and batches do not depend
    on the number of processes). Each finished chunk is written to the cache at once: an interrupted run
    resumes at the first missing chunk, and a repeated run reads everything back without running the model.

    Every sample is checked for tokens to score before any forward pass (errors name its row in `samples`).
    A sample longer than `scorer.settings.max_length` tokens is scored whole, in windows (`SampleScores.n_windows`),
    or truncated with `ScoreSettings(truncate=True)` (`SampleScores.truncated_tokens`; the count is logged).

    Args:
        scorer (`ToxicScorer`): model, SAE, feature set and settings; place its model on the process's device.
        samples (`list`): chats or plain texts (`geoguard.corpora.load_samples` reads files and data sets).
        cache (`str` or path, *optional*, defaults to `"default"`): cache directory; `"default"` is
            `default_score_cache()`, `None` disables caching. With several machines, use shared storage.
        chunk_size (`int`, defaults to 256): samples per cache chunk (the unit of resuming and of sharding).
        progress (`bool`, defaults to `True`): a progress bar on the main process.

    Returns:
        `SampleScores` aligned with `samples`.

    Example:
        ```python
        scores = score_dataset(ToxicScorer(model, tokenizer, sae, toxic), load_samples("train.jsonl"))
        ```
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if not samples:
        raise ValueError("score_dataset got no samples.")
    state = process_state()
    tokenized = tokenize_samples(scorer.tokenizer, samples, max_length=None)  # whole: the scorer windows or truncates
    scorer.check_scoreable(tokenized)  # before any forward pass, naming rows of `samples`
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i].input_ids))
    chunks = [order[start : start + chunk_size] for start in range(0, len(order), chunk_size)]
    root = default_score_cache() if cache == "default" else cache
    # A chunk file holds the scores of the samples at its place in the length order, for this chunk size.
    store = _ChunkStore(None if root is None else Path(root) / scorer.cache_key(tokenized) / f"chunks-of-{chunk_size}")

    # The main process decides which chunks are missing, so every process agrees even without shared storage.
    missing = from_main_process(lambda: store.missing(len(chunks)))
    bar = tqdm(
        total=sum(len(chunks[c]) for c in missing),
        desc="scoring",
        unit="sample",
        disable=not progress or not state.is_main_process,
    )

    def score_my_chunks() -> dict[int, SampleScores]:
        mine = {}
        for c in my_share(missing):
            mine[c] = scorer.score_tokenized([tokenized[i] for i in chunks[c]], rows=chunks[c])
            store.save(c, mine[c])  # at once, so a failed or interrupted run resumes here
            bar.update(len(chunks[c]) * state.num_processes)
        return mine

    # A failure on one process is raised on every process (no process waits for a rank that gave up). The bar
    # is closed whatever happens, so an interruption's message starts on a line of its own.
    with bar:
        computed = gather_dicts(score_my_chunks)
    computed |= from_main_process(lambda: {c: store.load(c) for c in range(len(chunks)) if c not in missing})
    result = SampleScores.concatenate([computed[c] for c in range(len(chunks))])
    result = result.take(np.argsort(np.asarray(order, dtype=np.int64)))
    if state.is_main_process:
        _log_long_samples(result, scorer.settings)
    return result


class _ChunkStore:
    """Per-chunk score files in one cache directory, written atomically; a no-op without a directory."""

    def __init__(self, path: Path | None):
        self.path = path

    def missing(self, n_chunks: int) -> list[int]:
        if self.path is None:
            return list(range(n_chunks))
        return [c for c in range(n_chunks) if not (self.path / f"chunk-{c:06d}.npz").is_file()]

    def save(self, chunk: int, part: SampleScores) -> None:
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".chunk-{chunk:06d}.{os.getpid()}.npz"
        np.savez(tmp, **asdict(part))
        os.replace(tmp, self.path / f"chunk-{chunk:06d}.npz")

    def load(self, chunk: int) -> SampleScores:
        with np.load(self.path / f"chunk-{chunk:06d}.npz") as data:
            return SampleScores(**{f: data[f] for f in SampleScores.__dataclass_fields__})
