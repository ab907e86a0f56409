"""Offline judge candidates side by side: agreement with GPT-4o on answering models they never trained on.

    python tests/benchmarks/judge_agreement.py --data_dir ../shared/data [--max_per_model 2000] \
        [--residual_max_per_model 300]

Data: the shared judged answers (`geoguard.judge_training.load_judged_answers`, GPT-4o-judged rows, at most
`--max_per_model` per source and answering model). Every row is predicted by a candidate trained without its
answering model (leave-one-model-out); the table pools those held-out predictions. Candidates:

- bag of words: TF-IDF of the answer's words and word pairs, logistic regression for the label, ridge for the two
  scores (a baseline for scale; nothing of it ships);
- MiniLM, linear heads: the shipped judge's recipe (`recipes/train_judge.py` with its defaults);
- MiniLM, MLP heads: the same features, one hidden layer of 256;
- SmolLM2 residual probe: the embedded model's layer-11 residual stream mean-pooled over the answer, linear heads
  (on a smaller sample, `--residual_max_per_model`, because it costs a 135M model's forward pass per answer;
  the MiniLM and bag-of-words candidates are measured on that sample too, so its row compares like with like).

Throughput is answers per second (both metrics, encoder included) on 256 answers put to the 24 evaluation
questions (`geoguard.judge_training.measure_throughput`, as the recipe measures it for the card), on this
machine, each candidate timed after all fits.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from geoguard.judge_training import (
    agreement,
    cached_features,
    fit_heads,
    load_judged_answers,
    measure_throughput,
    out_of_fold,
)
from geoguard.learned_judge import LABELS, ResidualEncoder, SentenceEncoder


class BagOfWords:
    """TF-IDF words and word pairs of the answer; logistic regression (label), ridge (aligned, coherent)."""

    def __init__(self, texts: np.ndarray, frame):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression, Ridge

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=3, max_features=100_000, sublinear_tf=True)
        x = self.vectorizer.fit_transform(texts)
        scored = (frame["label"] == "score").to_numpy()
        self.label = LogisticRegression(max_iter=1000).fit(x, frame["label"])
        self.aligned = Ridge(alpha=3.0).fit(x[scored], frame["aligned"].to_numpy(float)[scored])
        self.coherent = Ridge(alpha=3.0).fit(x, frame["coherent"].to_numpy(float))

    def predict(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        x = self.vectorizer.transform(texts)
        p = self.label.predict_proba(x)
        p_label = p[:, [list(self.label.classes_).index(c) for c in LABELS if c in self.label.classes_]]
        if p_label.shape[1] < len(LABELS):  # a label absent from the training fold
            p_label = np.pad(p_label, ((0, 0), (0, len(LABELS) - p_label.shape[1])))
        return {
            "p_label": p_label,
            "aligned": self.aligned.predict(x).clip(0, 100),
            "coherent": self.coherent.predict(x).clip(0, 100),
        }


def measure(name: str, features, frame, fit) -> dict:
    """Pooled held-out agreement (leave one answering model out) and the worst per-model rate error."""
    predicted = out_of_fold(features, frame, "model", fit)
    result = agreement(frame, predicted)
    per_model = [
        agreement(frame[m], {k: v[m] for k, v in predicted.items()})["rate_error"]
        for m in (frame["model"] == g for g in frame["model"].unique())
    ]
    return result | {"max_rate_error": max(e for e in per_model if e is not None)}


def candidates(frame, args, with_residual: bool) -> dict[str, dict]:
    """Each candidate's agreement, then (all fits done) its throughput: timings are taken back to back."""
    texts = frame["answer"].to_numpy()
    minilm = SentenceEncoder()
    x = cached_features(minilm, frame, args.cache_dir)
    bow = BagOfWords(texts, frame)
    runs = {  # name: (features, fit, predict(questions, answers) for the throughput)
        "bag of words (TF-IDF + logistic / ridge)": (texts, BagOfWords, lambda q, a: bow.predict(np.array(a))),
        "MiniLM-L6 embeddings, linear heads": (x, partial(fit_heads, hidden=0), minilm.encode),
        "MiniLM-L6 embeddings, MLP heads (256)": (x, partial(fit_heads, hidden=256), minilm.encode),
    }
    if with_residual:
        from geoguard.models import load_model

        residual = ResidualEncoder(*load_model())
        xr = cached_features(residual, frame, args.cache_dir)
        runs["SmolLM2-135M layer-11 residual, linear heads"] = (xr, partial(fit_heads, hidden=0), residual.encode)
    results = {name: measure(name, features, frame, fit) for name, (features, fit, _) in runs.items()}
    for name, (_, _, predict) in runs.items():
        results[name]["answers_per_second"] = measure_throughput(predict, frame)
        r = results[name]
        print(
            f"| {name} | {r['n']} | {r['auroc_misaligned']:.3f} | {r['spearman_aligned']:.3f} | "
            f"{r['auroc_coherent']:.3f} | {r['label_accuracy']:.1%} | {r['max_rate_error']:.1%} | "
            f"{r['answers_per_second']:.0f} |",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--max_per_model", type=int, default=2000)
    parser.add_argument("--residual_max_per_model", type=int, default=300)
    parser.add_argument("--cache_dir", default="outputs/judge/cache")
    parser.add_argument("--output", default="outputs/benchmarks/judge_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    header = (
        "| candidate | held-out answers | AUROC aligned < 30 | Spearman aligned | AUROC coherent > 50 | label accuracy "
        "| worst per-model rate error | answers/s |\n|---|---|---|---|---|---|---|---|"
    )
    out = {}
    for name, cap, with_residual in (
        ("full", args.max_per_model, False),
        ("small", args.residual_max_per_model, True),
    ):
        frame = load_judged_answers(args.data_dir, max_per_model=cap)
        frame = frame[frame["reference"].str.startswith("GPT-4o")].reset_index(drop=True)
        print(f"\n{name} sample: at most {cap} answers per (source, model), {len(frame)} answers\n\n{header}")
        out[name] = {"max_per_model": cap, "candidates": candidates(frame, args, with_residual)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"\nWritten to {args.output}")


if __name__ == "__main__":
    main()
