"""Feature sets: the SAE features tied to a concept (toxicity, a training data set), found by contrasts.

A *feature set* is a list of SAE feature ids with per-feature statistics, readable labels, their
decoder directions, and the identity of the SAE and hook point they belong to.

`find_features` selects one from one or more *contrasts*, each a pair of text collections
(target vs reference) that should differ only in the concept:

1. Each side of each contrast is split into a selection part and a held-out part.
2. Selection pass: every sample's SAE feature activations are pooled over the tokens of a span
   (max or mean) and streamed into fixed-memory histograms (`geoguard.stats.PooledHistogram`);
   no activation is kept. Features are ranked by AUROC (or standardized mean difference) of
   target over reference, averaged over the contrasts, so a feature must separate every
   contrast. Features active in nearly every sample of every side are skipped: they carry
   position or format, not content.
3. Held-out pass: only the selected features are kept, for the held-out samples. Their AUROC
   there comes with a stratified permutation p-value (valid: the features were not selected on
   these samples) and a Benjamini-Hochberg q-value. The set's score (mean pooled activation of
   its features) is reported per contrast, next to what length alone achieves, and on extra
   `check` contrasts used for nothing else.

The traps are flagged in `summary["warnings"]`: a contrast whose sides differ in format, length
or source finds those differences instead of the concept, and a set that only works on one
source's data does not separate the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from geoguard.capture import SinkRule, final_norm, iter_activations, resolve_hook_point, unwrap_model
from geoguard.data import RESOURCES, Sample, Span, TokenizedSample, tokenize_samples
from geoguard.sae import check_sae_fits, sae_hook_name
from geoguard.stats import (
    PooledHistogram,
    auroc,
    benjamini_hochberg,
    histogram_auroc,
    permutation_auroc,
    standardized_mean_difference,
)

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "max", "window_mean", "topk_mean"]
"""How token values become one value per sample:

- `mean`: each feature's mean over the sample's tokens (length-normalised; a short passage in a long sample is
  diluted by the rest);
- `max`: each feature's largest token value (one token is enough; grows with length on benign text);
- `window_mean`: the mean over the sample's most toxic run of `passage_tokens` consecutive tokens (the window
  with the highest score, e.g. the highest mean activation of the toxic features);
- `topk_mean`: the mean over the sample's `passage_tokens` most toxic tokens, wherever they are.

The two passage poolings score a sample by its most toxic passage, so a short harmful request stays visible
inside long benign text; they equal `mean` for a sample of at most `passage_tokens` tokens.
"""

RankBy = Literal["auroc", "smd"]
"""Selection statistic: `auroc` (rank-based, robust to heavy tails) or `smd` (standardized mean difference)."""

EMBEDDED_FEATURE_SETS = RESOURCES / "feature_sets"
"""Feature sets shipped for the embedded SAE: `toxic`, `inducing-insecure`, `control-secure`, `control-educational`."""

EMBEDDED_TOXIC_SET = EMBEDDED_FEATURE_SETS / "toxic"
"""The toxic feature set of the embedded SAE (ToxiGen hate vs neutral, harmful vs harmless requests)."""


@dataclass
class Contrast:
    """Two text collections that should differ only in the concept of interest.

    Attributes:
        name: short name used in reports, e.g. `"toxigen"`.
        target: samples with the concept (toxic sentences, insecure code, ...).
        reference: samples without it, matched in format and length as far as possible.
    """

    name: str
    target: list[Sample]
    reference: list[Sample]


def model_signature(model: nn.Module) -> dict:
    """What fixes a model's residual basis, for direction sets: its type, width, depth and vocabulary size.

    Fine-tuning (LoRA or full) keeps the signature, so a set built on the base model reads the trained one.
    """
    config = unwrap_model(model).config.get_text_config()
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }


def sae_fingerprint(sae: SAE) -> str:
    """A short hash of the SAE's decoder: identifies the SAE a feature set belongs to."""
    return hashlib.sha256(sae.W_dec.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass
class FeatureSet:
    """SAE feature ids with statistics, labels, decoder directions and provenance.

    Attributes:
        name: short name, e.g. `"toxic"`.
        feature_ids: selected SAE feature indices, best first.
        hook_name: hook point of the SAE.
        d_sae: width of the SAE.
        sae_fingerprint: `sae_fingerprint(sae)` of the SAE the ids refer to.
        stats: per-feature lists aligned with `feature_ids` (e.g. `heldout_auroc`, `p_value`).
        summary: set-level results (e.g. `heldout_auroc`, `contrasts`, `warnings`).
        provenance: model, data and parameters the set was selected with.
        labels: per feature, `top_tokens` (logit lens) and top-activating `examples`.
        decoder: `(k, d_in)` unit-norm decoder directions of the features.
        density: `(d_sae,)` share of tokens on which each SAE feature fired in the selection data
            (used to draw frequency-matched random feature sets in `geoguard.geometry`).
        weights: per feature, the weight of a sparse (L1) logistic readout of its pooled activation, fitted on
            the selection split (`None`: the set scores by the mean of its features); zero for features the
            readout does not use. Scores and drift use them when present.
        bias: the readout's intercept: `pooled @ weights + bias` is its logit.
        kind: `"sae_features"`, or `"directions"` for a *direction set*: `decoder` then holds unit residual-space
            directions `(m, d_in)` (made by `geoguard.directions.find_directions`), `feature_ids` numbers them
            `0..m-1`, `d_sae` is 0 and `sae_fingerprint` empty.
        offsets: a direction set's per-direction offset: a token's value is its projection minus the offset,
            positive on the target side.
        model_signature: a direction set's model (`model_signature(model)`): it reads only that model.
    """

    name: str
    feature_ids: list[int]
    hook_name: str
    d_sae: int
    sae_fingerprint: str
    stats: dict[str, list[float]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    labels: list[dict] = field(default_factory=list)
    weights: list[float] | None = None
    bias: float = 0.0
    kind: Literal["sae_features", "directions"] = "sae_features"
    offsets: list[float] | None = None
    model_signature: dict | None = None
    decoder: torch.Tensor | None = None
    density: torch.Tensor | None = None

    @property
    def is_directions(self) -> bool:
        """Whether the set holds residual-space directions (read without an SAE) rather than SAE features."""
        return self.kind == "directions"

    def score_weights(self) -> torch.Tensor:
        """`(k,)` weights that turn the features' pooled activations into the set's score: the sparse readout's
        weights when the set has them, else `1/k` each (the top-k mean)."""
        if self.weights is not None:
            return torch.tensor(self.weights, dtype=torch.float32)
        return torch.full((len(self.feature_ids),), 1 / len(self.feature_ids))

    def save(self, path: str | Path) -> None:
        """Write `feature_set.json` and `decoder.safetensors` (decoder directions, density) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(self).items() if k not in ("decoder", "density")}
        (path / "feature_set.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        tensors = {
            k: v.contiguous() for k, v in (("decoder", self.decoder), ("density", self.density)) if v is not None
        }
        if tensors:
            save_file(tensors, path / "decoder.safetensors")

    @classmethod
    def load(cls, path: str | Path = EMBEDDED_TOXIC_SET, sae: SAE | None = None) -> FeatureSet:
        """Load a feature set; with `sae`, check that the set belongs to it.

        Raises:
            FileNotFoundError: when `path` holds no `feature_set.json`.
            ValueError: when the SAE feature set was selected on another SAE (width or decoder differ).
        """
        path = Path(path)
        if not (path / "feature_set.json").is_file():
            raise FileNotFoundError(
                f"No feature set at {path} (feature_set.json missing). Create one with `geoguard features` "
                "or pass the directory of a saved set."
            )
        meta = json.loads((path / "feature_set.json").read_text(encoding="utf-8"))
        tensors = load_file(path / "decoder.safetensors") if (path / "decoder.safetensors").is_file() else {}
        feature_set = cls(**meta, decoder=tensors.get("decoder"), density=tensors.get("density"))
        if sae is not None and not feature_set.is_directions:  # a direction set reads no SAE
            feature_set.check_belongs_to(sae)
        return feature_set

    def short_labels(self, max_chars: int = 80) -> dict[int, str]:
        """A short text per feature: the end of its top-activating snippet, else its first logit-lens tokens.

        Args:
            max_chars (`int`, defaults to 80): characters kept from the end of the snippet, where the activating
                token (marked «») sits: a snippet holds 12 tokens before it and 3 after.

        Returns:
            `{feature_id: label}` for every feature with a snippet or, failing that, logit-lens tokens (the
            first 5, joined by spaces).

        Example:
            >>> toxic = FeatureSet.load()
            >>> toxic.short_labels(60)[toxic.feature_ids[0]]
        """
        labels = {}
        for feature, label in zip(self.feature_ids, self.labels, strict=False):
            if label.get("examples"):
                labels[feature] = label["examples"][0]["text"][-max_chars:]
            elif label.get("top_tokens"):
                labels[feature] = " ".join(label["top_tokens"][:5])
        return labels

    def check_fits_model(self, model: nn.Module) -> None:
        """Raise `ValueError` unless this direction set was built on `model`'s architecture and its hook exists."""
        signature = model_signature(model)
        if self.model_signature is not None and signature != self.model_signature:
            raise ValueError(
                f"Direction set {self.name!r} was built on another model ({self.model_signature}); this model is "
                f"{signature}. Build the directions again on this model (`geoguard features --kind directions`)."
            )
        try:
            resolve_hook_point(model, self.hook_name)
        except ValueError as err:
            raise ValueError(f"Direction set {self.name!r} reads hook {self.hook_name!r}: {err}") from err

    def check_belongs_to(self, sae: SAE) -> None:
        """Raise `ValueError` unless this set was selected on `sae`."""
        if self.is_directions:
            raise ValueError(
                f"{self.name!r} is a direction set: it reads the residual stream itself, not the features of an SAE."
            )
        if sae.cfg.d_sae != self.d_sae or sae_fingerprint(sae) != self.sae_fingerprint:
            raise ValueError(
                f"Feature set {self.name!r} was selected on another SAE (d_sae={self.d_sae}, "
                f"fingerprint {self.sae_fingerprint}); this SAE has d_sae={sae.cfg.d_sae}, fingerprint "
                f"{sae_fingerprint(sae)}. Select the features again on this SAE (`geoguard features`)."
            )


class TokenPooler:
    """Pool per-token values into one row per sample (see `Pooling`), fed in chunks of tokens to bound memory.

    `mean` and `max` pool each column over a row's tokens, in any order. The passage poolings pick a row's
    passage by `passage_score` (a function of a `(..., d)` mean of token values, the mean over `d` by default: the
    `direct` score) and return the mean of its tokens' values: `window_mean` the best run of `passage_tokens`
    consecutive tokens, `topk_mean` the `passage_tokens` best tokens. They keep the state of one row at a time, so
    they need each row's tokens in order and together: a row may span several `add` calls (a long sample read in
    windows), but once another row's tokens have come, it is finished. Row-major tokens (`acts[keep]`) are in that
    order; a finished row that receives tokens again raises `RuntimeError`.

    Values pooled with `max` must be non-negative (SAE activations, norms): every row starts at 0, the
    identity of max over such values. A row that receives no token pools to 0.

    Args:
        n_rows (`int`): number of samples, the rows of the result.
        pooling (`Pooling`): `mean`, `max`, `window_mean` or `topk_mean` over each row's tokens.
        passage_tokens (`int`, defaults to 8): the window of `window_mean`, the k of `topk_mean`.
        passage_score (callable, *optional*): maps values `(..., d)` to the score `(...)` passages are ranked by;
            defaults to their mean over `d`.

    Example:
        >>> pooler = TokenPooler(2, "mean")
        >>> pooler.add(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]))
        >>> pooler.result()
        tensor([[2.],
                [5.]])
    """

    def __init__(
        self,
        n_rows: int,
        pooling: Pooling,
        *,
        passage_tokens: int = 8,
        passage_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if pooling not in ("mean", "max", "window_mean", "topk_mean"):
            raise ValueError(f"pooling must be 'mean', 'max', 'window_mean' or 'topk_mean', got {pooling!r}.")
        if passage_tokens < 1:
            raise ValueError(f"passage_tokens must be >= 1, got {passage_tokens}.")
        self.n_rows, self.pooling, self.passage_tokens = n_rows, pooling, passage_tokens
        self.passage_score = passage_score or partial(torch.mean, dim=-1)
        self.pooled: torch.Tensor | None = None  # (n_rows, d), allocated by the first chunk
        self.n_tokens = torch.zeros(n_rows, dtype=torch.int64)
        self._finished = torch.zeros(n_rows, dtype=torch.bool)
        self._row: int | None = None  # the row a passage pooling is reading
        self._kept: torch.Tensor | None = None  # its last passage_tokens - 1 tokens (window_mean) or best tokens
        self._kept_scores: torch.Tensor | None = None  # topk_mean: the scores of those tokens
        self._best: tuple[float, torch.Tensor] | None = None  # window_mean: its best window's score and mean
        self._sum: torch.Tensor | None = None  # window_mean: its sum, the mean of a row shorter than a window
        self._count = 0  # window_mean: its tokens so far

    def add(self, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Add a chunk of token values `(n_tokens, d)`; `rows` `(n_tokens,)` is each token's sample row."""
        if self.pooled is None:
            self.pooled = torch.zeros(self.n_rows, values.shape[1], dtype=values.dtype)
        if self.pooling == "max":
            self.pooled.index_reduce_(0, rows, values, "amax", include_self=True)
        elif self.pooling == "mean":
            self.pooled.index_add_(0, rows, values)
        else:
            runs, counts = torch.unique_consecutive(rows, return_counts=True)
            for row, run in zip(runs.tolist(), values.split(counts.tolist()), strict=True):
                self._read_passages(row, run)
        self.n_tokens += torch.bincount(rows, minlength=self.n_rows)

    def _read_passages(self, row: int, run: torch.Tensor) -> None:
        """Extend the open row with the next tokens `run` `(m, d)` of `row` (opening it if it is another row)."""
        if row != self._row:
            self._finish_row()
            if self._finished[row]:
                raise RuntimeError(
                    f"TokenPooler({self.pooling!r}) got tokens of row {row} after another row's: a passage pooling "
                    "needs each row's tokens together and in order."
                )
            self._row, self._kept, self._kept_scores = row, run[:0], run[:0, 0]
            self._best, self._sum, self._count = None, torch.zeros_like(run[0]), 0
        width = self.passage_tokens
        tokens = torch.cat([self._kept, run])  # (kept + m, d)
        if self.pooling == "topk_mean":
            scores = torch.cat([self._kept_scores, self.passage_score(run)])  # (kept + m,)
            best = scores.topk(min(width, len(scores))).indices
            self._kept, self._kept_scores = tokens[best], scores[best]
            return
        self._sum += run.sum(0)
        self._count += len(run)
        if len(tokens) >= width:
            # Every window ending in `run` (the kept tail holds the width - 1 tokens before it).
            means = nn.functional.avg_pool1d(tokens.T.unsqueeze(0), width, stride=1)[0].T  # (windows, d)
            scores = self.passage_score(means)  # (windows,)
            best = int(scores.argmax())
            if self._best is None or scores[best] > self._best[0]:
                self._best = (float(scores[best]), means[best].clone())
        self._kept = tokens[max(len(tokens) - (width - 1), 0) :]

    def _finish_row(self) -> None:
        if self._row is None:
            return
        row = self._row
        if self.pooling == "topk_mean":
            self.pooled[row] = self._kept.mean(0)  # all of a row's tokens when it has fewer than passage_tokens
        else:
            self.pooled[row] = self._best[1] if self._best is not None else self._sum / self._count
        self._finished[row], self._row = True, None

    def result(self) -> torch.Tensor:
        """The pooled values `(n_rows, d)`."""
        if self.pooled is None:
            raise RuntimeError("TokenPooler.result() needs at least one add(), which gives the width d.")
        if self.pooling == "mean":
            return self.pooled / self.n_tokens.clamp(min=1).unsqueeze(1).to(self.pooled.dtype)
        self._finish_row()
        return self.pooled


def pool_rows(
    feature_acts: torch.Tensor, keep: torch.Tensor, pooling: Pooling, *, passage_tokens: int = 8
) -> torch.Tensor:
    """Pool kept-token activations `(n_kept, d)` into one row per sequence `(batch, d)`; `keep` is `(batch, seq)`."""
    pooler = TokenPooler(keep.shape[0], pooling, passage_tokens=passage_tokens)
    pooler.add(feature_acts, keep.nonzero()[:, 0])  # row of each kept token, in the order of acts[keep]
    return pooler.result()


@torch.no_grad()
def iter_feature_acts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    samples: Sequence[Sample] | Sequence[TokenizedSample],
    *,
    hook_name: str | None = None,
    span: Span = "all",
    batch_size: int = 16,
    sink_rule: SinkRule | None = SinkRule(),
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Yield `(feature_acts, keep, indices)` per batch: SAE activations `(n_kept, d_sae)` of the kept tokens on CPU."""
    hook_name = hook_name or sae_hook_name(sae)
    for acts, keep, indices in iter_activations(
        model, tokenizer, samples, hook_name, span=span, batch_size=batch_size, sink_rule=sink_rule
    ):
        feature_acts = sae.encode(acts[keep].to(sae.device, sae.dtype)).float().cpu()  # (n_kept, d_sae)
        yield feature_acts, keep.cpu(), indices


@torch.no_grad()
def pooled_feature_acts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    samples: Sequence[Sample] | Sequence[TokenizedSample],
    *,
    hook_name: str | None = None,
    span: Span = "all",
    pooling: Pooling = "max",
    batch_size: int = 16,
    sink_rule: SinkRule | None = SinkRule(),
) -> torch.Tensor:
    """Return `(n_samples, d_sae)` SAE feature activations pooled over each sample's kept tokens.

    This holds one row per sample; `find_features` streams instead and never needs it.
    """
    pooled = torch.zeros(len(samples), sae.cfg.d_sae)
    for feature_acts, keep, indices in iter_feature_acts(
        model, tokenizer, sae, samples, hook_name=hook_name, span=span, batch_size=batch_size, sink_rule=sink_rule
    ):
        pooled[indices] = pool_rows(feature_acts, keep, pooling)
    return pooled


def logit_lens_tokens(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, directions: torch.Tensor, n: int = 8
) -> list[list[str]]:
    """Top tokens of each direction `(k, d_in)` read through the model's final norm and unembedding."""
    base = unwrap_model(model)
    unembed = base.get_output_embeddings()
    with torch.no_grad():
        logits = unembed(final_norm(base)(directions.to(unembed.weight.device, unembed.weight.dtype)))  # (k, vocab)
    return [[tokenizer.decode([t]) for t in row] for row in logits.topk(n, dim=-1).indices.tolist()]


@dataclass
class _Group:
    """One side of one contrast, tokenized, with its selection and held-out rows."""

    contrast: str
    side: Literal["target", "reference"]
    role: Literal["selection", "check"]
    tokenized: list[TokenizedSample]
    select: list[int]
    heldout: list[int]


class _TopExamples:
    """Running top-`n` activating (sample, position) pairs of `k` features over all groups."""

    def __init__(self, k: int, n: int) -> None:
        self.values = torch.full((k, n), -1.0)
        self.refs = torch.full((k, n, 3), -1, dtype=torch.long)  # (group, row in group, token position)

    def update(self, sel_acts: torch.Tensor, keep: torch.Tensor, group: int, rows: list[int]) -> None:
        dense = torch.zeros(*keep.shape, sel_acts.shape[1])  # (batch, seq, k)
        dense[keep] = sel_acts
        best, pos = dense.max(1)  # (batch, k): one example per sample
        refs = torch.stack(
            [torch.full_like(pos, group), torch.tensor(rows).unsqueeze(1).expand_as(pos), pos], dim=-1
        ).transpose(0, 1)  # (k, batch, 3)
        values = torch.cat([self.values, best.T], dim=1)
        self.values, top = values.topk(self.values.shape[1], dim=1)
        self.refs = torch.cat([self.refs, refs], dim=1).gather(1, top.unsqueeze(-1).expand(-1, -1, 3))

    def examples(self, feature: int, groups: list[_Group], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
        """The feature's top snippets: 12 tokens before the top token, the token in «», 3 after."""
        out = []
        for value, (group_index, row, pos) in zip(
            self.values[feature].tolist(), self.refs[feature].tolist(), strict=True
        ):
            if group_index < 0 or value <= 0:
                continue
            group = groups[group_index]
            ids = group.tokenized[row].input_ids
            before, token, after = ids[max(0, pos - 12) : pos], ids[pos : pos + 1], ids[pos + 1 : pos + 4]
            text = f"{tokenizer.decode(before)}«{tokenizer.decode(token)}»{tokenizer.decode(after)}"
            out.append({"text": text, "activation": value, "contrast": group.contrast, "side": group.side})
        return out


def _contrast_row(
    name: str, role: str, target, reference, *, n_permutations: int, seed: int, readout: _Readout | None = None
) -> dict:
    """Held-out separation of one contrast by the set's score (mean pooled activation of its features), by the
    weighted readout when there is one, and by length."""
    (t_acts, t_len), (r_acts, r_len) = target, reference
    scores = [(t_acts.mean(1, keepdims=True), r_acts.mean(1, keepdims=True))]
    if readout is not None:
        scores.append((readout.logits(t_acts), readout.logits(r_acts)))
    set_auroc, set_p = permutation_auroc(
        [(np.hstack([t for t, _ in scores]), np.hstack([r for _, r in scores]))],
        n_permutations=n_permutations,
        seed=seed,
    )
    row = {
        "name": name,
        "role": role,
        "n_target": len(t_acts),
        "n_reference": len(r_acts),
        "heldout_auroc": float(set_auroc[0]),
        "p_value": float(set_p[0]),
        "length_auroc": float(auroc(t_len, r_len)),
    }
    if readout is not None:
        row |= {"weighted_heldout_auroc": float(set_auroc[1]), "weighted_p_value": float(set_p[1])}
    return row


def _contrast_warnings(row: dict, flag_below: float) -> list[str]:
    warnings = []
    if row["heldout_auroc"] < flag_below:
        what = "does not transfer to" if row["role"] == "check" else "barely separates"
        warnings.append(
            f"The set {what} {row['name']!r} (held-out AUROC {row['heldout_auroc']:.2f}): it may detect another "
            "contrast's format or source rather than the concept."
        )
    if abs(row["length_auroc"] - 0.5) > 0.2:
        warnings.append(
            f"In {row['name']!r}, length alone separates the sides (held-out AUROC {row['length_auroc']:.2f}): "
            "features may track length or format. Use a format-matched contrast or match_lengths=True."
        )
    return warnings


def _split(name: str, side: str, samples: list[int], heldout_fraction: float, rng: random.Random):
    rows = samples[:]
    rng.shuffle(rows)
    n_held = int(len(rows) * heldout_fraction)
    if n_held < 2 or len(rows) - n_held < 2:
        raise ValueError(
            f"Contrast {name!r}: the {side} side has {len(rows)} samples, too few for selection and held-out "
            f"splits of at least 2 each at heldout_fraction={heldout_fraction}. Add samples or change heldout_fraction."
        )
    return sorted(rows[n_held:]), sorted(rows[:n_held])


def _match_lengths(t_len: np.ndarray, r_len: np.ndarray, rng: random.Random, n_bins: int = 10):
    """Row indices of both sides subsampled so that their length histograms match (decile bins of the union)."""
    edges = np.quantile(np.concatenate([t_len, r_len]), np.linspace(0, 1, n_bins + 1)[1:-1])
    t_bins, r_bins = np.digitize(t_len, edges), np.digitize(r_len, edges)
    keep_t, keep_r = [], []
    for b in range(n_bins):
        t_rows, r_rows = np.flatnonzero(t_bins == b).tolist(), np.flatnonzero(r_bins == b).tolist()
        n = min(len(t_rows), len(r_rows))
        keep_t += rng.sample(t_rows, n)
        keep_r += rng.sample(r_rows, n)
    return sorted(keep_t), sorted(keep_r)


def _span_lengths(tokenized: list[TokenizedSample], span: Span) -> np.ndarray:
    if span == "all":
        return np.array([len(t.input_ids) for t in tokenized])
    want = int(span == "response")
    return np.array([sum(m == want for m in t.response_mask) for t in tokenized])


@torch.no_grad()
def find_features(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    contrasts: Contrast | Sequence[Contrast],
    *,
    name: str,
    k: int = 100,
    span: Span = "all",
    pooling: Pooling = "mean",
    rank_by: RankBy = "auroc",
    heldout_fraction: float = 0.3,
    max_sample_firing: float = 0.9,
    match_lengths: bool = False,
    check_contrasts: Sequence[Contrast] = (),
    flag_below: float = 0.6,
    weighted: bool = True,
    n_permutations: int = 1000,
    n_examples: int = 5,
    batch_size: int = 16,
    max_length: int = 512,
    sink_rule: SinkRule | None = SinkRule(),
    seed: int = 0,
    provenance: dict | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Select the `k` SAE features that best separate target from reference in every contrast.

    Args:
        model, tokenizer, sae: the model and the SAE that reads it (checked with `check_sae_fits`).
        contrasts (`Contrast` or list): target vs reference pairs matched in format (e.g. ToxiGen hate vs
            neutral sentences; harmful vs harmless requests). Features are ranked by their statistic
            averaged over the contrasts.
        name (`str`): name of the set.
        k (`int`, defaults to 100): number of features (the paper's top-100).
        span (`Span`, defaults to `"all"`): tokens used per sample (all, prompt or response).
        pooling (`Pooling`, defaults to `"mean"`): token pooling per sample. Mean is length-normalised
            and separated ToxiGen hate from neutral better than max on the embedded SAE.
        rank_by (`RankBy`, defaults to `"auroc"`): selection statistic.
        heldout_fraction (`float`, defaults to 0.3): share of each side kept out of selection and used
            for the held-out statistics.
        max_sample_firing (`float`, defaults to 0.9): skip features active in more than this share of
            the samples of every side of every contrast (dense, always-on features).
        match_lengths (`bool`, defaults to `False`): subsample each contrast so that both sides have the
            same token-length histogram (decile bins), removing length as a confound.
        check_contrasts (list of `Contrast`, defaults to none): contrasts used only to measure the set's
            separation (e.g. another data source), never for selection.
        flag_below (`float`, defaults to 0.6): warn when the set's held-out AUROC on a contrast is below this.
        weighted (`bool`, defaults to `True`): also fit a sparse (L1) logistic readout of the `k` features' pooled
            activations on the selection rows (cross-validated strength; one more pass over those rows) and
            measure it on the held-out rows; the set then carries `weights` and `bias`.
        n_permutations (`int`, defaults to 1000): label permutations for the held-out p-values.
        n_examples (`int`, defaults to 5): top-activating held-out snippets kept per feature.
        batch_size (`int`, defaults to 16), max_length (`int`, defaults to 512): batching and truncation.
        sink_rule (`SinkRule`, *optional*): attention-sink tokens left out of every statistic.
        seed (`int`, defaults to 0): seed of the splits and permutations.
        provenance (`dict`, *optional*): description of the model and data, stored with the set.
        progress (`bool`, defaults to `True`): show a progress bar over the samples of both passes.

    Returns:
        The `FeatureSet`. `stats` holds per feature `selection_auroc`, `selection_smd`, `heldout_auroc`,
        `p_value`, `q_value`, `target_mean`, `reference_mean`; `summary` holds the set's held-out AUROC
        (mean over selection contrasts), a row per contrast (set AUROC, p-value, AUROC of length alone)
        and `warnings`.

    Example:
        >>> toxic = find_features(model, tokenizer, sae, Contrast("toxigen", hate, neutral), name="toxic")
        >>> toxic.summary["heldout_auroc"], toxic.summary["warnings"]
    """
    contrasts = [contrasts] if isinstance(contrasts, Contrast) else list(contrasts)
    if not contrasts:
        raise ValueError("find_features needs at least one Contrast(name, target, reference).")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    if k < 1 or k > sae.cfg.d_sae:
        raise ValueError(f"k must be between 1 and the SAE width {sae.cfg.d_sae}, got {k}.")
    names = [c.name for c in [*contrasts, *check_contrasts]]
    if len(set(names)) != len(names):
        raise ValueError(f"Contrast names must be unique, got {names}.")
    check_sae_fits(sae, model)
    hook_name = sae_hook_name(sae)

    # The steps of the module docstring: split, selection pass, held-out pass; then statistics and labels.
    groups, length_note, truncated = _tokenize_groups(
        tokenizer,
        contrasts,
        check_contrasts,
        span=span,
        match_lengths=match_lengths,
        heldout_fraction=heldout_fraction,
        max_length=max_length,
        rng=random.Random(seed),
    )
    total = sum(len(g.select) * (1 + weighted) + len(g.heldout) for g in groups)
    with tqdm(total=total, desc=f"features {name}", unit="sample", disable=not progress) as bar:
        reader = _GroupReader(
            model, tokenizer, sae, bar, hook_name=hook_name, span=span, batch_size=batch_size, sink_rule=sink_rule
        )
        selection = _selection_pass(
            groups,
            contrasts,
            reader,
            d_sae=sae.cfg.d_sae,
            k=k,
            pooling=pooling,
            rank_by=rank_by,
            max_sample_firing=max_sample_firing,
        )
        heldout, top = _heldout_pass(groups, selection.ids, reader, pooling=pooling, span=span, n_examples=n_examples)
        readout = _fit_readout(groups, selection.ids, reader, pooling=pooling, seed=seed) if weighted else None
    stats, summary = _summarize(
        name,
        contrasts,
        check_contrasts,
        selection,
        heldout,
        n_permutations=n_permutations,
        seed=seed,
        flag_below=flag_below,
        readout=readout,
    )
    for warning in truncation_warnings(truncated, max_length):
        summary["warnings"].append(warning)
        logger.warning("Feature set %r: %s", name, warning)

    decoder = sae.W_dec[selection.ids].detach().float().cpu()
    tokens = logit_lens_tokens(model, tokenizer, decoder)
    labels = [
        {"top_tokens": tokens[f], "examples": top.examples(f, groups, tokenizer)} for f in range(len(selection.ids))
    ]
    return FeatureSet(
        name=name,
        feature_ids=selection.ids,
        hook_name=hook_name,
        d_sae=sae.cfg.d_sae,
        sae_fingerprint=sae_fingerprint(sae),
        stats=stats,
        summary=summary,
        provenance={
            "contrasts": contrast_provenance(contrasts, check_contrasts),
            "length_matched": length_note,
            "truncated_samples": truncated,
            "max_length": max_length,
            "span": span,
            "pooling": pooling,
            "rank_by": rank_by,
            "k": k,
            "heldout_fraction": heldout_fraction,
            "max_sample_firing": max_sample_firing,
            "weighted": weighted,
            "n_permutations": n_permutations,
            "seed": seed,
            "sink_rule": asdict(sink_rule) if sink_rule is not None else None,
            **(provenance or {}),
        },
        labels=labels,
        weights=readout.weights.tolist() if readout else None,
        bias=readout.bias if readout else 0.0,
        decoder=decoder / decoder.norm(dim=1, keepdim=True),
        density=selection.density,
    )


def contrast_provenance(contrasts: Sequence[Contrast], check_contrasts: Sequence[Contrast]) -> list[dict]:
    """Each contrast's name, role (selection or check) and side sizes, for a set's provenance."""
    return [
        {"name": c.name, "role": role, "n_target": len(c.target), "n_reference": len(c.reference)}
        for role, items in (("selection", contrasts), ("check", check_contrasts))
        for c in items
    ]


def truncation_warnings(truncated: dict[str, dict[str, int]], max_length: int) -> list[str]:
    """One warning per contrast whose samples were cut to `max_length` tokens (`_tokenize_groups`' count)."""
    return [
        f"In {contrast!r}, {' and '.join(f'{n} {side}' for side, n in sides.items())} samples are longer than "
        f"max_length={max_length} tokens; only their first max_length tokens are read. Raise max_length "
        "(--max_length) to read them whole."
        for contrast, sides in truncated.items()
    ]


def _tokenize_groups(
    tokenizer: PreTrainedTokenizerBase,
    contrasts: Sequence[Contrast],
    check_contrasts: Sequence[Contrast],
    *,
    span: Span,
    match_lengths: bool,
    heldout_fraction: float,
    max_length: int,
    rng: random.Random,
) -> tuple[list[_Group], dict[str, list[int]], dict[str, dict[str, int]]]:
    """Tokenize both sides of every contrast and split them into selection and held-out rows.

    Check contrasts are held out whole. Samples longer than `max_length` tokens are cut to it, and counted.
    Returns the groups (selection contrasts first, target before reference); with `match_lengths`, the number
    of rows kept per side of each contrast; and the number of samples cut per side of each contrast.
    """
    groups: list[_Group] = []
    length_note, truncated = {}, {}
    for role, items in (("selection", contrasts), ("check", check_contrasts)):
        for contrast in items:
            sides = {}
            for side in ("target", "reference"):
                try:
                    whole = tokenize_samples(tokenizer, getattr(contrast, side), max_length=None)
                except ValueError as err:
                    raise ValueError(f"Contrast {contrast.name!r}, {side} side: {err}") from err
                if n_cut := sum(len(t.input_ids) > max_length for t in whole):
                    truncated.setdefault(contrast.name, {})[side] = n_cut
                sides[side] = [TokenizedSample(t.input_ids[:max_length], t.response_mask[:max_length]) for t in whole]
            rows = {side: list(range(len(tok))) for side, tok in sides.items()}
            if match_lengths:
                rows["target"], rows["reference"] = _match_lengths(
                    _span_lengths(sides["target"], span), _span_lengths(sides["reference"], span), rng
                )
                length_note[contrast.name] = [len(rows["target"]), len(rows["reference"])]
            for side in ("target", "reference"):
                if role == "selection":
                    select, heldout = _split(contrast.name, side, rows[side], heldout_fraction, rng)
                else:
                    select, heldout = [], rows[side]
                groups.append(_Group(contrast.name, side, role, sides[side], select, heldout))
    return groups, length_note, truncated


class _GroupReader:
    """Streams the SAE feature activations of chosen rows of a group; one progress bar counts both passes.

    `options` are `iter_feature_acts`'s keyword arguments.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, sae: SAE, bar: tqdm, **options) -> None:
        self.read = partial(iter_feature_acts, model, tokenizer, sae, **options)
        self.bar = bar

    def __call__(self, group: _Group, rows: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        for feature_acts, keep, indices in self.read([group.tokenized[i] for i in rows]):
            self.bar.update(len(indices))
            yield feature_acts, keep, indices


class _Selection(NamedTuple):
    """What the selection pass found."""

    ids: list[int]  # the k selected features, best first
    auroc: np.ndarray  # (d_sae,) selection AUROC, mean over contrasts
    smd: np.ndarray  # (d_sae,) standardized mean difference, mean over contrasts
    pairs: list[tuple[PooledHistogram, PooledHistogram]]  # (target, reference) histograms per contrast
    always_on: np.ndarray  # (d_sae,) features skipped as active in nearly every sample
    density: torch.Tensor  # (d_sae,) share of selection tokens on which each feature fired
    n_tokens: int  # selection tokens seen


def _selection_pass(
    groups: list[_Group],
    contrasts: Sequence[Contrast],
    reader: _GroupReader,
    *,
    d_sae: int,
    k: int,
    pooling: Pooling,
    rank_by: RankBy,
    max_sample_firing: float,
) -> _Selection:
    """Stream the selection rows into fixed-memory histograms, count token firing, and rank every feature."""
    hists: dict[tuple[str, str], PooledHistogram] = {}
    token_firing, n_tokens = torch.zeros(d_sae, dtype=torch.int64), 0
    for group in (g for g in groups if g.role == "selection"):
        hist = hists[(group.contrast, group.side)] = PooledHistogram(d_sae)
        for feature_acts, keep, _ in reader(group, group.select):
            hist.update(pool_rows(feature_acts, keep, pooling))
            token_firing += (feature_acts > 0).sum(0)
            n_tokens += len(feature_acts)
    pairs = [(hists[(c.name, "target")], hists[(c.name, "reference")]) for c in contrasts]
    sel_auroc = np.mean([histogram_auroc(t, r) for t, r in pairs], axis=0)
    sel_smd = np.mean([standardized_mean_difference(t, r) for t, r in pairs], axis=0)
    always_on = np.all([h.firing_fraction.numpy() > max_sample_firing for h in hists.values()], axis=0)
    ranking = (sel_auroc if rank_by == "auroc" else sel_smd).copy()
    ranking[always_on] = -np.inf
    ids = [int(i) for i in np.argsort(-ranking, kind="stable")[:k]]
    density = (token_firing.double() / max(n_tokens, 1)).float()
    return _Selection(ids, sel_auroc, sel_smd, pairs, always_on, density, n_tokens)


def _heldout_pass(
    groups: list[_Group], ids: list[int], reader: _GroupReader, *, pooling: Pooling, span: Span, n_examples: int
) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], _TopExamples]:
    """Read the held-out rows for the selected features only.

    Returns, per `(contrast, side)`, the pooled activations `(n_heldout, k)` and span lengths `(n_heldout,)`,
    and each feature's top-activating snippets.
    """
    top = _TopExamples(len(ids), n_examples)
    heldout: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for gi, group in enumerate(groups):
        acts = np.zeros((len(group.heldout), len(ids)), dtype=np.float32)
        for feature_acts, keep, indices in reader(group, group.heldout):
            sel = feature_acts[:, ids]  # (n_kept, k)
            acts[indices] = pool_rows(sel, keep, pooling).numpy()
            top.update(sel, keep, gi, [group.heldout[i] for i in indices])
        lengths = _span_lengths([group.tokenized[i] for i in group.heldout], span)
        heldout[(group.contrast, group.side)] = (acts, lengths)
    return heldout, top


def _summarize(
    name: str,
    contrasts: Sequence[Contrast],
    check_contrasts: Sequence[Contrast],
    selection: _Selection,
    heldout: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    *,
    n_permutations: int,
    seed: int,
    flag_below: float,
    readout: _Readout | None = None,
) -> tuple[dict[str, list[float]], dict]:
    """Per-feature `stats` and the set's `summary`: held-out tests per feature and per contrast, and warnings."""
    ids = selection.ids
    selection_groups = [(heldout[(c.name, "target")][0], heldout[(c.name, "reference")][0]) for c in contrasts]
    feature_auroc, p_value = permutation_auroc(selection_groups, n_permutations=n_permutations, seed=seed)
    q_value = benjamini_hochberg(p_value)

    rows, warnings = [], []
    for role, items in (("selection", contrasts), ("check", check_contrasts)):
        for contrast in items:
            row = _contrast_row(
                contrast.name,
                role,
                heldout[(contrast.name, "target")],
                heldout[(contrast.name, "reference")],
                n_permutations=n_permutations,
                seed=seed,
                readout=readout,
            )
            rows.append(row)
            warnings += _contrast_warnings(row, flag_below)
    n_significant = int((q_value < 0.05).sum())
    if n_significant < len(ids) / 2:
        warnings.append(f"Only {n_significant} of {len(ids)} features separate held-out data (BH q < 0.05).")
    for warning in warnings:
        logger.warning("Feature set %r: %s", name, warning)

    stats = {
        "selection_auroc": [float(selection.auroc[i]) for i in ids],
        "selection_smd": [float(selection.smd[i]) for i in ids],
        "heldout_auroc": feature_auroc.tolist(),
        "p_value": p_value.tolist(),
        "q_value": q_value.tolist(),
        "target_mean": np.mean([t.mean.numpy()[ids] for t, _ in selection.pairs], axis=0).tolist(),
        "reference_mean": np.mean([r.mean.numpy()[ids] for _, r in selection.pairs], axis=0).tolist(),
    }
    summary = {
        "heldout_auroc": float(np.mean([r["heldout_auroc"] for r in rows if r["role"] == "selection"])),
        "contrasts": rows,
        "n_significant": n_significant,
        "always_on_skipped": int(selection.always_on.sum()),
        "selection_tokens": selection.n_tokens,
        "warnings": warnings,
    }
    if readout is not None:
        stats["weight"] = readout.weights.tolist()
        summary["weighted"] = {
            "heldout_auroc": float(np.mean([r["weighted_heldout_auroc"] for r in rows if r["role"] == "selection"])),
            "n_nonzero": int((readout.weights != 0).sum()),
            "C": readout.C,
        }
    return stats, summary


class _Readout(NamedTuple):
    """A sparse logistic readout of pooled feature activations, in their raw units."""

    weights: np.ndarray  # (k,)
    bias: float
    C: float  # the inverse regularization strength chosen by cross-validation

    def logits(self, acts: np.ndarray) -> np.ndarray:
        """`(n, 1)` readout logits of pooled activations `(n, k)`."""
        return (acts @ self.weights + self.bias)[:, None]


def fit_sparse_readout(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Fit an L1 logistic regression of labels `y` on pooled activations `x` `(n, k)` (scikit-learn).

    Features are standardized for the fit and the strength is chosen by 5-fold cross-validated AUROC; the weights
    and intercept are returned in the raw units of `x`, with the chosen inverse strength `C`.
    """
    from sklearn.linear_model import LogisticRegressionCV

    mean, std = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegressionCV(
        Cs=np.logspace(-2, 1, 8).tolist(),
        l1_ratios=(1,),  # pure L1
        solver="liblinear",
        cv=5,
        scoring="roc_auc",
        random_state=seed,
        use_legacy_attributes=False,
    ).fit((x - mean) / std, y)
    coef = model.coef_[0]
    return coef / std, float(model.intercept_[0] - (coef * mean / std).sum()), float(model.C_)


def _fit_readout(groups: list[_Group], ids: list[int], reader: _GroupReader, *, pooling: Pooling, seed: int):
    """Read the selection rows for the selected features and fit the sparse readout on them."""
    x, y = [], []
    for group in (g for g in groups if g.role == "selection"):
        acts = np.zeros((len(group.select), len(ids)), dtype=np.float32)
        for feature_acts, keep, indices in reader(group, group.select):
            acts[indices] = pool_rows(feature_acts[:, ids], keep, pooling).numpy()
        x.append(acts)
        y.append(np.full(len(acts), int(group.side == "target")))
    weights, bias, strength = fit_sparse_readout(np.vstack(x), np.concatenate(y), seed=seed)
    return _Readout(weights.astype(np.float32), bias, strength)
