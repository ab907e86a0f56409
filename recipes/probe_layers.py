"""Choose the SAE layer: where does a linear probe best separate format-matched toxic and neutral text?

For every layer's residual stream (output of decoder layer L; `embed` is the embedding output),
mean-pool each ToxiGen sentence's tokens (attention sinks dropped by `SinkRule`), fit a logistic
regression and report its 5-fold cross-validated AUROC for hate vs neutral. Both sides are short
single sentences about the same groups, so format cannot separate them.

Usage:
    python recipes/probe_layers.py --data_dir ../shared/data --output_json outputs/probe_layers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from geoguard.capture import SinkRule
from geoguard.corpora import data_root, load_toxigen
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--output_json", default="outputs/probe_layers.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
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
        json.dumps({"model": args.model, "n_hate": len(hate), "n_neutral": len(neutral), "layers": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
