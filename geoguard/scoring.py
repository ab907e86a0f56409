"""Scores: how close each training sample is to the toxic features, computed once and cached.

A *score* is one number per sample; higher means closer to the toxic feature set. The paper
(Minegishi et al. 2026) filters by "proximity to toxic features" without saying how a sample's
proximity is computed, so geoguard offers three scores (`ScoreMethod`), all read at the SAE's hook
point over the tokens of a span (the response by default: what training would teach):

- `proximity`: the sample's SAE features weighted by their pooled activation, each by the cosine
  similarity of its decoder direction to the nearest toxic feature's (negative similarities count
  as 0): `sum_j f_j * w_j / sum_j f_j`. This is the paper's geometry applied to one sample; it needs
  every feature, so the whole SAE is encoded.
- `direct`: the mean pooled activation of the toxic features themselves. For ReLU and JumpReLU SAEs
  only those k columns of the encoder are computed (exact); TopK SAEs need the full encoding.
- `subspace`: the norm of the residual's projection onto the span of the toxic decoder directions,
  pooled over tokens. No SAE encoding at all.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.standard_sae import StandardSAE
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from geoguard.capture import SinkRule, iter_activations
from geoguard.data import Sample, Span, TokenizedSample, tokenize_samples
from geoguard.distributed import from_main_process, gather_dicts, my_share, process_state
from geoguard.features import FeatureSet, Pooling, TokenPooler, sae_fingerprint
from geoguard.models import cache_dir
from geoguard.sae import check_sae_fits, sae_hook_name

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
        pooling: token values become a sample value by `mean` (length-normalised) or `max`.
        max_length: tokens per sample; longer samples are truncated as training would truncate them.
        sink_rule: attention-sink tokens left out (`None` keeps them).
        n_nearest: toxic features named per sample in the audit (the largest contributors).
    """

    method: ScoreMethod = "direct"
    span: Span = "response"
    pooling: Pooling = "mean"
    max_length: int = 512
    sink_rule: SinkRule | None = SinkRule()
    n_nearest: int = 3

    def __post_init__(self):
        if self.method not in ("proximity", "direct", "subspace"):
            raise ValueError(f"method must be 'proximity', 'direct' or 'subspace', got {self.method!r}.")
        if self.span not in ("all", "prompt", "response"):
            raise ValueError(f"span must be 'all', 'prompt' or 'response', got {self.span!r}.")
        if self.pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {self.pooling!r}.")


@dataclass
class SampleScores:
    """Scores of a list of samples, in the samples' order.

    Attributes:
        scores: `(n,)` the score of each sample.
        nearest: `(n, n_nearest)` SAE ids of the toxic features that contributed most, largest first.
        contributions: `(n, n_nearest)` their contributions (their share of the score's sum, or for `subspace`
            the pooled projection onto their direction).
        n_tokens: `(n,)` tokens each score was computed over.
    """

    scores: np.ndarray
    nearest: np.ndarray
    contributions: np.ndarray
    n_tokens: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[SampleScores]) -> SampleScores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def take(self, rows: Sequence[int] | np.ndarray) -> SampleScores:
        return SampleScores(*(getattr(self, f)[np.asarray(rows)] for f in self.__dataclass_fields__))


def encode_features(sae: SAE, x: torch.Tensor, feature_ids: torch.Tensor) -> torch.Tensor:
    """SAE activations of only `feature_ids` for inputs `x` `(n, d_in)`, returned as `(n, len(feature_ids))`.

    For ReLU (`StandardSAE`) and JumpReLU SAEs a feature's activation depends on its own encoder column only,
    so just those columns are computed: exact, and about `d_sae / k` times cheaper. Other architectures (TopK,
    gated, ...) couple the features, so the full encoding is computed and sliced.
    """
    if not isinstance(sae, StandardSAE | JumpReLUSAE):
        return sae.encode(x)[:, feature_ids]
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae_in @ sae.W_enc[:, feature_ids] + sae.b_enc[feature_ids]  # (n, k)
    acts = sae.activation_fn(hidden_pre)
    if isinstance(sae, JumpReLUSAE):
        acts = acts * (hidden_pre > sae.threshold[feature_ids]).to(acts.dtype)
    return acts


class ToxicScorer:
    """Score samples by their closeness to a toxic feature set, with a model and its SAE.

    The model is only read (no gradients, early exit at the SAE's layer). Scoring with the model being
    trained gives scores that move with training; pass a frozen copy to score against the starting weights.

    Args:
        model (`nn.Module`): the model, possibly wrapped; its device is used for the forward passes.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (the chat template renders chats).
        sae (`sae_lens.SAE`): the SAE reading the model's residual stream.
        feature_set (`FeatureSet`): the toxic features; must belong to `sae`.
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
        feature_set.check_belongs_to(sae)
        check_sae_fits(sae, model)
        self.model, self.tokenizer, self.sae, self.feature_set = model, tokenizer, sae, feature_set
        self.settings, self.batch_size = settings, batch_size
        self.hook_name = sae_hook_name(sae)
        self.toxic_ids = torch.tensor(feature_set.feature_ids)
        if settings.n_nearest > len(self.toxic_ids):
            raise ValueError(f"n_nearest={settings.n_nearest} exceeds the {len(self.toxic_ids)} toxic features.")
        with torch.no_grad():
            if settings.method == "proximity":
                directions = nn.functional.normalize(sae.W_dec.detach().float(), dim=1)  # (d_sae, d_in)
                # Each SAE feature's similarity to its nearest toxic feature, and which one that is.
                similarity, nearest = (directions @ directions[self.toxic_ids].T).max(dim=1)  # (d_sae,)
                self._nearest, self._weight = nearest.cpu(), similarity.clamp(min=0).cpu()  # pooling runs on CPU
            elif settings.method == "subspace":
                self._toxic_directions, self._basis = toxic_subspace(sae, self.toxic_ids)

    def __call__(self, samples: Sequence[Sample]) -> SampleScores:
        """Score chats or plain texts (not cached; `score_dataset` caches)."""
        return self.score_tokenized(tokenize_samples(self.tokenizer, samples, max_length=self.settings.max_length))

    @torch.no_grad()
    def score_tokenized(self, tokenized: Sequence[TokenizedSample]) -> SampleScores:
        """Score samples already tokenized with `geoguard.data.tokenize_samples` (or built from training batches).

        Raises:
            ValueError: naming the samples that have no token in the span (e.g. prompt-only chats with
                `span="response"`).
        """
        n, n_nearest = len(tokenized), self.settings.n_nearest
        out = SampleScores(
            np.zeros(n, np.float32),
            np.zeros((n, n_nearest), np.int64),
            np.zeros((n, n_nearest), np.float32),
            np.zeros(n, np.int64),
        )
        was_training = self.model.training
        self.model.eval()
        try:
            for acts, keep, indices in iter_activations(
                self.model,
                self.tokenizer,
                list(tokenized),
                self.hook_name,
                span=self.settings.span,
                batch_size=self.batch_size,
                sink_rule=self.settings.sink_rule,
            ):
                n_kept = keep.sum(1).cpu()
                if empty := (n_kept == 0).nonzero()[:, 0].tolist():
                    rows = [indices[i] for i in empty]
                    raise ValueError(
                        f"Samples {rows[:10]} have no tokens to score in span {self.settings.span!r} (prompt-only chats "
                        "score nothing with span='response'). Score with span='all' or give the chats an answer."
                    )
                scores, contributions = self._score_batch(acts[keep], keep)
                top = contributions.topk(n_nearest, dim=1)
                out.scores[indices] = scores.numpy()
                out.nearest[indices] = self.toxic_ids[top.indices].numpy()
                out.contributions[indices] = top.values.numpy()
                out.n_tokens[indices] = n_kept.numpy()
        finally:
            self.model.train(was_training)
        return out

    def _score_batch(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `(batch,)` and per-toxic-feature contributions `(batch, k)` from kept-token residuals `x` `(n_kept, d_in)`."""
        rows = keep.nonzero()[:, 0].cpu()  # row of each kept token
        n_rows = keep.shape[0]
        sae = self.sae
        x = x.to(sae.device, sae.dtype)
        if self.settings.method == "direct":
            pooled = self._pool(lambda c: encode_features(sae, c, self.toxic_ids.to(sae.device)), x, rows, n_rows)
            return pooled.mean(dim=1), pooled
        if self.settings.method == "proximity":
            pooled = self._pool(sae.encode, x, rows, n_rows)  # (batch, d_sae)
            weighted = pooled * self._weight
            contributions = torch.zeros(n_rows, len(self.toxic_ids)).index_add_(1, self._nearest, weighted)
            total = pooled.sum(dim=1).clamp(min=1e-12)
            return weighted.sum(dim=1) / total, contributions / total.unsqueeze(1)
        centred = sae.process_sae_in(x).float()  # the SAE's input space (decoder bias removed)
        norms = self._pool(lambda c: (c @ self._basis).norm(dim=1, keepdim=True), centred, rows, n_rows)
        along = self._pool(lambda c: c @ self._toxic_directions.T, centred, rows, n_rows, pooling="mean")
        return norms[:, 0], along

    def _pool(
        self, fn, x: torch.Tensor, rows: torch.Tensor, n_rows: int, pooling: Pooling | None = None
    ) -> torch.Tensor:
        """Apply `fn` to token chunks of `x` and pool its `(tokens, d)` output per row into `(n_rows, d)`.

        Every quantity pooled with max here (SAE activations, projection norms) is non-negative, as `TokenPooler`
        requires.
        """
        pooler = TokenPooler(n_rows, pooling or self.settings.pooling)
        for start in range(0, x.shape[0], _TOKEN_CHUNK):
            pooler.add(fn(x[start : start + _TOKEN_CHUNK]).float().cpu(), rows[start : start + _TOKEN_CHUNK])
        return pooler.result()

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
            "sae": sae_fingerprint(self.sae),
            "hook": self.hook_name,
            "features": sorted(self.feature_set.feature_ids),
            "settings": asdict(self.settings),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def toxic_subspace(sae: SAE, feature_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit decoder directions `(k, d_in)` of `feature_ids` and an orthonormal basis `(d_in, k)` of their span.

    Both are float32 on the SAE's device; project residuals in the SAE's input space (`sae.process_sae_in`).
    """
    with torch.no_grad():
        directions = nn.functional.normalize(sae.W_dec.detach()[feature_ids].float(), dim=1)
        return directions, torch.linalg.qr(directions.T).Q


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
    tokenized = tokenize_samples(scorer.tokenizer, samples, max_length=scorer.settings.max_length)
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
    computed = {}
    for c in my_share(missing):
        computed[c] = scorer.score_tokenized([tokenized[i] for i in chunks[c]])
        store.save(c, computed[c])
        bar.update(len(chunks[c]) * state.num_processes)
    bar.close()
    computed = gather_dicts(computed)
    computed |= from_main_process(lambda: {c: store.load(c) for c in range(len(chunks)) if c not in missing})
    result = SampleScores.concatenate([computed[c] for c in range(len(chunks))])
    return result.take(np.argsort(np.asarray(order, dtype=np.int64)))


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
