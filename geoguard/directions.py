"""Direction sets: residual-space directions of a concept, found by the same contrasts as feature sets.

Where a feature set picks SAE features, a *direction set* holds one direction in the residual stream at a hook
point (Persona Vectors' and Soligo et al.'s tool): a token's value is its residual's projection on the direction
minus an offset, positive on the target side. One read of the contrasts' samples gives each sample's mean-pooled
residual (attention sinks excluded); on the selection rows (the same split `find_features` makes with the same
seed) two directions are fitted, and both are measured on the held-out rows and the check contrasts:

- `mean_diff`: the difference of the target and reference means, averaged over the contrasts (offset: the
  midpoint's projection);
- `probe`: an L2 logistic regression on the standardized pooled residuals, strength chosen by 5-fold
  cross-validated AUROC (offset: its intercept). A linear probe on pooled residuals is also the ceiling any
  feature set of that layer is compared with.

A direction set is saved like a feature set (`FeatureSet` with `kind="directions"`) and read everywhere one is
(scores, filtering, the collator, the monitor, the judge) through `geoguard.readout.SetReadout`; it refuses
another model (`model_signature`) or a hook the model lacks. `direction_composition` says which SAE features a
direction is made of (cosine to the decoder directions).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

import numpy as np
import torch
from sae_lens import SAE
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from geoguard.capture import SinkRule, iter_activations, resolve_hook_point
from geoguard.data import Span
from geoguard.features import (
    Contrast,
    FeatureSet,
    _contrast_warnings,
    _Group,
    _span_lengths,
    _tokenize_groups,
    contrast_provenance,
    logit_lens_tokens,
    model_signature,
    pool_rows,
    truncation_warnings,
)
from geoguard.stats import auroc, permutation_auroc

DirectionMethod = Literal["probe", "mean_diff"]
"""How the direction is fitted on the selection rows: `probe` (logistic regression) or `mean_diff`."""


@torch.no_grad()
def pooled_residuals(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    groups: Sequence[_Group],
    hook_name: str,
    *,
    span: Span,
    batch_size: int,
    sink_rule: SinkRule | None,
    progress: bool = True,
) -> list[np.ndarray]:
    """Each group's mean-pooled residuals at `hook_name`, `(n_rows, d_in)` float32 over all its rows."""
    out = []
    with tqdm(total=sum(len(g.tokenized) for g in groups), desc="residuals", disable=not progress) as bar:
        for group in groups:
            pooled = None
            for acts, keep, indices in iter_activations(
                model, tokenizer, group.tokenized, hook_name, span=span, batch_size=batch_size, sink_rule=sink_rule
            ):
                rows = pool_rows(acts[keep].float().cpu(), keep.cpu(), "mean").numpy()  # (batch, d_in)
                if pooled is None:
                    pooled = np.zeros((len(group.tokenized), rows.shape[1]), dtype=np.float32)
                pooled[indices] = rows
                bar.update(len(indices))
            out.append(pooled)
    return out


def fit_directions(
    selection: Sequence[tuple[np.ndarray, np.ndarray]], *, seed: int = 0
) -> dict[DirectionMethod, tuple[np.ndarray, float]]:
    """Fit both directions on the selection rows' pooled residuals, one `(target, reference)` pair per contrast.

    Returns:
        `{method: (unit direction (d_in,), offset)}`: a residual `x` scores `x @ direction - offset`.
    """
    from sklearn.linear_model import LogisticRegressionCV

    diffs = [t.mean(0) - r.mean(0) for t, r in selection]
    mean_diff = np.mean(diffs, axis=0)
    mean_diff /= np.linalg.norm(mean_diff) + 1e-12
    midpoints = [(t.mean(0) + r.mean(0)) / 2 @ mean_diff for t, r in selection]

    x = np.vstack([np.vstack([t, r]) for t, r in selection])
    y = np.concatenate([np.r_[np.ones(len(t)), np.zeros(len(r))] for t, r in selection])
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegressionCV(
        Cs=np.logspace(-4, 1, 8).tolist(),
        l1_ratios=(0,),  # L2
        cv=5,
        scoring="roc_auc",
        max_iter=2000,
        random_state=seed,
        use_legacy_attributes=False,
    ).fit((x - mean) / std, y)
    weights = probe.coef_[0] / std  # raw units: x @ weights + bias is the logit
    bias = float(probe.intercept_[0] - (probe.coef_[0] * mean / std).sum())
    norm = float(np.linalg.norm(weights)) + 1e-12
    return {
        "mean_diff": (mean_diff.astype(np.float32), float(np.mean(midpoints))),
        "probe": ((weights / norm).astype(np.float32), -bias / norm),
    }


@torch.no_grad()
def find_directions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contrasts: Contrast | Sequence[Contrast],
    *,
    name: str,
    hook_name: str,
    method: DirectionMethod = "probe",
    span: Span = "all",
    heldout_fraction: float = 0.3,
    match_lengths: bool = False,
    check_contrasts: Sequence[Contrast] = (),
    flag_below: float = 0.6,
    n_permutations: int = 1000,
    batch_size: int = 16,
    max_length: int = 512,
    sink_rule: SinkRule | None = SinkRule(),
    seed: int = 0,
    provenance: dict | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Fit a concept's direction at `hook_name` from contrasts and measure it on held-out rows.

    Args:
        model, tokenizer: the model read (any model `resolve_hook_point` knows) and its tokenizer.
        contrasts (`Contrast` or list): target vs reference pairs matched in format, as for `find_features`.
        name (`str`): name of the set.
        hook_name (`str`): where the residual is read, e.g. `blocks.11.hook_resid_post` (an SAE's hook, so
            that `direction_composition` can relate the direction to its features).
        method (`DirectionMethod`, defaults to `"probe"`): the direction the set keeps; both are measured.
        span, heldout_fraction, match_lengths, check_contrasts, flag_below, n_permutations, batch_size,
        max_length, sink_rule, seed, provenance, progress: as in `find_features` (same split for the same seed).

    Returns:
        A `FeatureSet` with `kind="directions"`: one unit direction in `decoder`, its `offsets`, the model's
        signature, and `summary["methods"]` with both directions' held-out AUROC.

    Example:
        >>> toxic = find_directions(model, tokenizer, Contrast("toxigen", hate, neutral), name="toxic-direction",
        ...                         hook_name="blocks.11.hook_resid_post")
        >>> toxic.summary["heldout_auroc"]
    """
    contrasts = [contrasts] if isinstance(contrasts, Contrast) else list(contrasts)
    if not contrasts:
        raise ValueError("find_directions needs at least one Contrast(name, target, reference).")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    resolve_hook_point(model, hook_name)  # a bad hook fails before any forward pass
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
    pooled = pooled_residuals(
        model, tokenizer, groups, hook_name, span=span, batch_size=batch_size, sink_rule=sink_rule, progress=progress
    )
    by_side = {(g.contrast, g.side): (g, x) for g, x in zip(groups, pooled, strict=True)}

    def rows(contrast: str, side: str, which: str) -> np.ndarray:
        group, x = by_side[(contrast, side)]
        return x[getattr(group, which)]

    fitted = fit_directions(
        [(rows(c.name, "target", "select"), rows(c.name, "reference", "select")) for c in contrasts]
    )
    contrast_rows, warnings = [], []
    for role, items in (("selection", contrasts), ("check", check_contrasts)):
        for contrast in items:
            target, reference = rows(contrast.name, "target", "heldout"), rows(contrast.name, "reference", "heldout")
            scores = [(target @ d - o, reference @ d - o) for d, o in fitted.values()]  # one column per method
            values, p = permutation_auroc(
                [(np.stack([t for t, _ in scores], 1), np.stack([r for _, r in scores], 1))],
                n_permutations=n_permutations,
                seed=seed,
            )
            by_method = dict(zip(fitted, values.tolist(), strict=True))
            lengths = [
                _span_lengths(
                    [by_side[(contrast.name, s)][0].tokenized[i] for i in by_side[(contrast.name, s)][0].heldout], span
                )
                for s in ("target", "reference")
            ]
            row = {
                "name": contrast.name,
                "role": role,
                "n_target": len(target),
                "n_reference": len(reference),
                "heldout_auroc": by_method[method],
                "p_value": float(p[list(fitted).index(method)]),
                "length_auroc": float(auroc(*lengths)),
                "methods": by_method,
            }
            contrast_rows.append(row)
            warnings += _contrast_warnings(row, flag_below)
    warnings += truncation_warnings(truncated, max_length)

    def mean_auroc(key: str) -> float:
        return float(np.mean([r["methods"][key] for r in contrast_rows if r["role"] == "selection"]))

    direction, offset = fitted[method]
    directions = torch.from_numpy(direction).unsqueeze(0)  # (1, d_in)
    return FeatureSet(
        name=name,
        feature_ids=[0],
        hook_name=hook_name,
        d_sae=0,
        sae_fingerprint="",
        stats={"heldout_auroc": [mean_auroc(method)]},
        summary={
            "heldout_auroc": mean_auroc(method),
            "methods": {key: mean_auroc(key) for key in fitted},
            "contrasts": contrast_rows,
            "warnings": warnings,
        },
        provenance={
            "contrasts": contrast_provenance(contrasts, check_contrasts),
            "method": method,
            "length_matched": length_note,
            "truncated_samples": truncated,
            "max_length": max_length,
            "span": span,
            "pooling": "mean",
            "heldout_fraction": heldout_fraction,
            "n_permutations": n_permutations,
            "seed": seed,
            "sink_rule": asdict(sink_rule) if sink_rule is not None else None,
            **(provenance or {}),
        },
        labels=[{"top_tokens": logit_lens_tokens(model, tokenizer, directions)[0], "examples": []}],
        kind="directions",
        offsets=[offset],
        model_signature=model_signature(model),
        decoder=directions,
    )


def direction_composition(
    direction_set: FeatureSet,
    sae: SAE,
    *,
    n: int = 10,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[dict]:
    """Which SAE features each direction of `direction_set` is made of (as Persona Vectors' appendix shows).

    Returns:
        Per direction: `features` (the `n` SAE features whose decoder directions have the largest |cosine| with
        it, as `[feature, cosine]`, with their logit-lens tokens as `tokens` when `model` and `tokenizer` are
        given), and `captured`, the share of the direction's norm inside the span of those `n` decoder directions.

    Raises:
        ValueError: when the SAE reads another hook point or width than the direction.
    """
    directions = direction_set.decoder.float()  # (m, d_in)
    if sae.cfg.d_in != directions.shape[1]:
        raise ValueError(f"The SAE reads d_in={sae.cfg.d_in}; the directions have d_in={directions.shape[1]}.")
    with torch.no_grad():
        decoder = nn.functional.normalize(sae.W_dec.detach().float(), dim=1)  # (d_sae, d_in)
        cosine = directions @ decoder.T  # (m, d_sae)
        out = []
        for row, direction in zip(cosine, directions, strict=True):
            top = row.abs().topk(n).indices
            basis = torch.linalg.qr(decoder[top].T).Q  # (d_in, n)
            captured = float((direction @ basis).norm() / direction.norm())
            entry = {"features": [[int(f), float(row[f])] for f in top], "captured": captured}
            if model is not None and tokenizer is not None:
                entry["tokens"] = logit_lens_tokens(model, tokenizer, decoder[top], n=5)
            out.append(entry)
    return out
