"""Benchmark: how well each score separates harmful from benign samples, and what a 50% drop-top removal takes out.

    python tests/benchmarks/scoring_quality.py --data_dir ../shared/data --output_json outputs/bench_scoring_quality.json

On the embedded model, SAE and toxic feature set, every score (`proximity`, `direct`, `subspace`;
response tokens, mean pooling) is computed for four contrasts, none of which the toxic set was
selected on:

- format-matched: harmful vs harmless requests (harmful_test.json vs harmless_val.json; the set was
  selected on the train files), and ToxiGen hate vs neutral (the 30% the set held out);
- mixed training sets: jailbroken chats vs Alpaca answers, and insecure vs secure code (the same
  coding tasks, so this one is also matched in format).

Next to the scores: random scores, token length alone (a high length AUROC means the sides differ in
format), and a bag-of-words classifier (TF-IDF + logistic regression, 5-fold cross-validated *on the
contrast itself*, so a supervised reference the unsupervised scores are not expected to reach).
Then a 50/50 mix of jailbroken and Alpaca chats is filtered with `DropTopFraction(0.5)` by each score,
by random scores (mean over 200 seeds), and by a judge-based filter (`judge_scores` with a
bag-of-words classifier trained on the toxic set's own training data, ToxiGen and the request files).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline

from geoguard.corpora import data_root, load_alpaca, load_chats, load_instructions, load_toxigen
from geoguard.features import FeatureSet, _split
from geoguard.filtering import DropTopFraction, judge_scores, random_scores
from geoguard.models import load_model
from geoguard.sae import load_sae
from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset
from geoguard.stats import auroc

METHODS = ("proximity", "direct", "subspace")


def response_text(sample) -> str:
    """The text a score reads with span='response': the final assistant message, or the plain text."""
    if isinstance(sample, dict) and "messages" in sample:
        return sample["messages"][-1]["content"]
    return sample["text"] if isinstance(sample, dict) else sample


def requests(path: Path) -> list[dict]:
    return [{"text": chat["messages"][0]["content"]} for chat in load_instructions(path)]


def contrasts(root: Path, n: int, seed: int) -> dict[str, tuple[list, list, str]]:
    rng = random.Random(seed)
    hate, neutral = load_toxigen(root)
    # The held-out 30% of the toxic set's ToxiGen contrast: find_features(seed=0) split it first, target then reference.
    split_rng = random.Random(0)
    _, hate_held = _split("toxigen", "target", list(range(len(hate))), 0.3, split_rng)
    _, neutral_held = _split("toxigen", "reference", list(range(len(neutral))), 0.3, split_rng)
    harmful = requests(root / "harmful" / "harmful_test.json")
    harmless = rng.sample(requests(root / "benign" / "harmless_val.json"), len(harmful))
    em = root / "emergent_misalignment"
    tasks = rng.sample(range(6000), n)  # insecure.jsonl and secure.jsonl hold the same tasks in the same order
    insecure, secure = load_chats(em / "insecure.jsonl"), load_chats(em / "secure.jsonl")
    return {
        "harmful vs harmless requests": (harmful, harmless, "format-matched"),
        "ToxiGen hate vs neutral (held out)": (
            [{"text": hate[i]} for i in hate_held],
            [{"text": neutral[i]} for i in neutral_held],
            "format-matched",
        ),
        "jailbroken vs Alpaca chats": (
            rng.sample(load_chats(em / "jailbroken.jsonl"), n),
            rng.sample(load_alpaca(root / "benign" / "alpaca_en_demo.json"), n),
            "mixed (formats differ)",
        ),
        "insecure vs secure code": ([insecure[i] for i in tasks], [secure[i] for i in tasks], "mixed (same tasks)"),
    }


def bag_of_words():
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2), LogisticRegression(max_iter=2000, C=4.0))


def cross_validated_bow(target: list, reference: list, seed: int) -> np.ndarray:
    texts = [response_text(s) for s in target + reference]
    labels = np.r_[np.ones(len(target)), np.zeros(len(reference))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(bag_of_words(), texts, labels, cv=folds, method="predict_proba")[:, 1]


def removal(scores: np.ndarray, harmful: np.ndarray, fraction: float = 0.5) -> dict:
    dropped = DropTopFraction(fraction).drop_mask(scores)
    hits = (dropped & harmful).sum()
    return {"precision": float(hits / dropped.sum()), "recall": float(hits / harmful.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--n", type=int, default=200, help="samples per side of the two chat contrasts")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--cache_dir", default="outputs/bench_score_cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default="outputs/bench_scoring_quality.json")
    args = parser.parse_args()

    root = data_root(args.data_dir)
    model, tokenizer = load_model()
    sae = load_sae()
    toxic = FeatureSet.load(sae=sae)
    scorers = {
        m: ToxicScorer(model, tokenizer, sae, toxic, ScoreSettings(method=m), batch_size=args.batch_size)
        for m in METHODS
    }

    table, all_scores = {}, {}
    data = contrasts(root, args.n, args.seed)
    for name, (target, reference, kind) in data.items():
        row = {"kind": kind, "n_target": len(target), "n_reference": len(reference)}
        for method, scorer in scorers.items():
            start = time.perf_counter()
            result = score_dataset(scorer, target + reference, cache=args.cache_dir, progress=False)
            row[method] = float(auroc(result.scores[: len(target)], result.scores[len(target) :]))
            row[f"{method}_seconds"] = time.perf_counter() - start
            all_scores[(name, method)] = result.scores
        row["length"] = float(auroc(result.n_tokens[: len(target)], result.n_tokens[len(target) :]))
        row["random"] = float(auroc(*np.split(random_scores(len(target) + len(reference), args.seed), [len(target)])))
        bow = cross_validated_bow(target, reference, args.seed)
        row["bag_of_words_cv"] = float(auroc(bow[: len(target)], bow[len(target) :]))
        table[name] = row
        print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # Removal: a 50/50 mix of jailbroken (harmful) and Alpaca (benign) chats, drop the top 50%.
    mix = "jailbroken vs Alpaca chats"
    n = table[mix]["n_target"]
    harmful = np.r_[np.ones(n, bool), np.zeros(table[mix]["n_reference"], bool)]
    removals = {m: removal(all_scores[(mix, m)], harmful) for m in METHODS}
    randoms = [removal(random_scores(len(harmful), seed), harmful) for seed in range(200)]
    removals["random (mean of 200 seeds)"] = {
        k: float(np.mean([r[k] for r in randoms])) for k in ("precision", "recall")
    }
    hate, neutral = load_toxigen(root)
    judge_target = hate + [s["text"] for s in requests(root / "harmful" / "harmful_train.json")]
    judge_reference = neutral + [s["text"] for s in requests(root / "benign" / "harmless_train.json")[:300]]
    judge = bag_of_words().fit(judge_target + judge_reference, [1] * len(judge_target) + [0] * len(judge_reference))
    judged = judge_scores(
        [{"text": response_text(s)} for s in data[mix][0] + data[mix][1]],
        lambda text: float(judge.predict_proba([text])[0, 1]),
    )
    removals["judge: bag-of-words trained on the toxic set's data"] = removal(judged, harmful)

    print(
        "\n| contrast | kind | "
        + " | ".join(METHODS)
        + " | random | length alone | bag-of-words (CV on the contrast) |"
    )
    print("|---" * (len(METHODS) + 5) + "|")
    for name, row in table.items():
        cells = [f"{row[m]:.3f}" for m in (*METHODS, "random", "length", "bag_of_words_cv")]
        print(f"| {name} ({row['n_target']}+{row['n_reference']}) | {row['kind']} | " + " | ".join(cells) + " |")
    print(f"\nDrop the top 50% of a 50/50 mix ({n} jailbroken + {n} Alpaca chats):\n")
    print("| score | precision (harmful share of dropped) | recall (share of harmful dropped) |\n|---|---|---|")
    for name, r in removals.items():
        print(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} |")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps({"auroc": table, "removal": removals}, indent=2))


if __name__ == "__main__":
    main()
