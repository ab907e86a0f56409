"""Choose the SAE layer: where does a linear probe best separate format-matched toxic and neutral text?

For every layer's residual stream (output of decoder layer L; `embed` is the embedding output),
mean-pool each ToxiGen sentence's tokens (attention sinks dropped by `SinkRule`), fit a logistic
regression and report its 5-fold cross-validated AUROC for hate vs neutral. Both sides are short
single sentences about the same groups, so format cannot separate them.

Usage:
    python recipes/probe_layers.py --data_dir ../shared/data --output_json outputs/probe_layers.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from trl import ModelConfig, TrlParser

from geoguard.capture import SinkRule
from geoguard.corpora import DataDirArguments, data_root, load_toxigen
from geoguard.data import iter_token_batches, tokenize_sample
from geoguard.models import EMBEDDED_MODEL, load_model


def pooled_hidden_states(model, tokenizer, texts: list[str], sink_rule: SinkRule) -> np.ndarray:
    """Return `(n_layers + 1, n_texts, d_model)` mean-pooled residuals, embeddings first."""
    tokenized = [tokenize_sample(tokenizer, t) for t in texts]
    pooled = np.zeros((model.config.num_hidden_layers + 1, len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for batch in iter_token_batches(tokenized, batch_size=32, pad_token_id=tokenizer.pad_token_id):
            out = model(
                input_ids=batch.input_ids.to(model.device),
                attention_mask=batch.attention_mask.to(model.device),
                output_hidden_states=True,
            )
            for layer, hidden in enumerate(out.hidden_states):  # each (batch, seq, d_model)
                keep = sink_rule.keep_mask(hidden, batch.attention_mask.to(hidden.device)).unsqueeze(-1)
                mean = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
                pooled[layer, batch.indices] = mean.float().cpu().numpy()
    return pooled


@dataclass
class ProbeLayersArguments(DataDirArguments):
    output_json: str = field(default="outputs/probe_layers.json", metadata={"help": "Where the per-layer AUROCs go."})


def main(args: ProbeLayersArguments, model_args: ModelConfig) -> None:
    torch.manual_seed(0)
    model_name = model_args.model_name_or_path or EMBEDDED_MODEL
    model, tokenizer = load_model(model_name)
    hate, neutral = load_toxigen(data_root(args.data_dir))
    pooled = pooled_hidden_states(model, tokenizer, hate + neutral, SinkRule())
    labels = np.array([1] * len(hate) + [0] * len(neutral))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    rows = []
    for layer, features in enumerate(pooled):
        auroc = cross_val_score(probe, features, labels, cv=folds, scoring="roc_auc")
        # transformers returns the last layer's output after the final norm.
        name = "embed" if layer == 0 else f"layer {layer - 1}" + (" (normed)" if layer == len(pooled) - 1 else "")
        rows.append(
            {"hidden_state": layer, "name": name, "auroc_mean": float(auroc.mean()), "auroc_std": float(auroc.std())}
        )
        print(f"{name:>9}  AUROC {auroc.mean():.3f} ± {auroc.std():.3f}")
    best = max(rows[1:], key=lambda r: r["auroc_mean"])
    print(f"best: {best['name']} (AUROC {best['auroc_mean']:.3f}); n_hate={len(hate)} n_neutral={len(neutral)}")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(
        json.dumps({"model": model_name, "n_hate": len(hate), "n_neutral": len(neutral), "layers": rows}, indent=2)
    )


if __name__ == "__main__":
    main(*TrlParser((ProbeLayersArguments, ModelConfig)).parse_args_and_config())
