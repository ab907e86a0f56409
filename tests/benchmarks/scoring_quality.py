"""Benchmark: how well each score and pooling separates harmful from benign samples, short or inside long benign
text, and what a 50% drop-top removal takes out.

    python tests/benchmarks/scoring_quality.py --data_dir ../shared/data --output_json outputs/bench_scoring_quality.json

On the embedded model, SAE and toxic feature set (response tokens; a sample longer than 512 tokens is read whole,
in windows), every score is computed for four contrasts, none of which the toxic set was selected on:

- format-matched: harmful vs harmless requests (harmful_test.json vs harmless_val.json; the set was
  selected on the train and val files), and ToxiGen hate vs neutral (the 30% the set held out);
- mixed training sets: jailbroken chats vs Alpaca answers, and insecure vs secure code (the same
  coding tasks, so this one is also matched in format);

and for nine *embedded* contrasts: a harmful request (harmful_test.json) put, as a paragraph, at the start,
middle or end of benign text of 1,000, 4,000 or 16,000 characters (Alpaca answers joined), in place of as
many benign characters, vs the same benign text alone.

The `direct` score is pooled four ways, `mean`, `max`, `window_mean` and `topk_mean`, all from one read of the
model (`ToxicScorer.iter_token_values`, batched as `score_dataset` batches); `proximity` and `subspace` are
scored with the pooling chosen as the default. The passage poolings' `passage_tokens` (4, 8, 16, 32 or 64) and
the default pooling are chosen on a development split that no reported number uses: AdvBench requests (none
of them in the refusal-direction files) vs other harmless_val requests, 100 other jailbroken and Alpaca chats,
and AdvBench requests embedded in benign text made of the other half of the Alpaca answers (see `choose`).

Next to the scores: random scores, token length alone (a high length AUROC means the sides differ in
format), and a bag-of-words classifier (TF-IDF + logistic regression, 5-fold cross-validated *on the
contrast itself*, so a supervised reference the unsupervised scores are not expected to reach).
Then a 50/50 mix of jailbroken and Alpaca chats is filtered with `DropTopFraction(0.5)` by each score,
by random scores (mean over 200 seeds), and by a judge-based filter (`judge_scores` with a
bag-of-words classifier trained on the toxic set's own training data, ToxiGen and the request files).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
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
from geoguard.data import tokenize_samples
from geoguard.features import FeatureSet, TokenPooler, _split
from geoguard.filtering import DropTopFraction, judge_scores, random_scores
from geoguard.models import load_model
from geoguard.sae import load_sae
from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset
from geoguard.stats import auroc

PASSAGE_TOKENS = (4, 8, 16, 32, 64)
CANDIDATES = {"mean": ("mean", 1), "max": ("max", 1)} | {
    f"{pooling} {width}": (pooling, width) for pooling in ("window_mean", "topk_mean") for width in PASSAGE_TOKENS
}
"""Poolings of the direct score, by name: (pooling, passage_tokens)."""
LENGTHS = (1000, 4000, 16000)
POSITIONS = ("start", "middle", "end")


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


def dev_contrasts(root: Path, test: dict, n: int, seed: int) -> dict[str, tuple[list, list, str]]:
    """Short development contrasts, disjoint from the reported ones (chosen on: the passage width, the default)."""
    rng = random.Random(seed + 1)
    used = {json.dumps(s, sort_keys=True) for target, reference, _ in test.values() for s in target + reference}

    def unused(samples: list) -> list:
        return [s for s in samples if json.dumps(s, sort_keys=True) not in used]

    em = root / "emergent_misalignment"
    advbench = advbench_requests(root)
    return {
        "AdvBench vs harmless requests (dev)": (
            [{"text": r} for r in rng.sample(advbench, n)],
            rng.sample(unused(requests(root / "benign" / "harmless_val.json")), n),
            "format-matched",
        ),
        "jailbroken vs Alpaca chats (dev)": (
            rng.sample(unused(load_chats(em / "jailbroken.jsonl")), n),
            rng.sample(unused(load_alpaca(root / "benign" / "alpaca_en_demo.json")), n),
            "mixed (formats differ)",
        ),
    }


def advbench_requests(root: Path) -> list[str]:
    """AdvBench's harmful requests that are in none of the refusal-direction files (the toxic set saw train and val)."""
    seen = set()
    for split in ("train", "val", "test"):
        seen |= {s["text"].strip() for s in requests(root / "harmful" / f"harmful_{split}.json")}
    with open(root / "harmful" / "advbench_harmful_behaviors.csv", newline="") as f:
        return [row["goal"] for row in csv.DictReader(f) if row["goal"].strip() not in seen]


def benign_text(answers: list[str], length: int, rng: random.Random) -> str:
    """Alpaca answers in random order, joined by blank lines, cut to about `length` characters at a space."""
    text = ""
    for i in rng.sample(range(len(answers)), len(answers)):
        text += ("\n\n" if text else "") + answers[i]
        if len(text) > length:
            break
    return text[:length].rsplit(" ", 1)[0]


def embed(request: str, benign: str, position: str) -> str:
    """`request` as a paragraph at the start, middle or end of `benign`, in place of as many benign characters."""
    room = len(request) + 2
    if position == "start":
        return request + "\n\n" + benign[room:].split(" ", 1)[-1]
    if position == "end":
        return benign[: len(benign) - room].rsplit(" ", 1)[0] + "\n\n" + request
    cut = (len(benign) - room) // 2
    return benign[:cut].rsplit(" ", 1)[0] + "\n\n" + request + "\n\n" + benign[cut + room :].split(" ", 1)[-1]


def embedded_contrasts(
    requests_: list[str], answers: list[str], n_per_length: dict[int, int], seed: int, tag: str = ""
) -> dict[str, tuple[list, list, str]]:
    """Each request in its own benign text at each position, vs the same benign texts alone."""
    rng = random.Random(seed)
    out = {}
    for length, n in n_per_length.items():
        benign = [benign_text(answers, length, rng) for _ in range(n)]
        for position in POSITIONS:
            out[f"request at the {position} of {length:,} benign chars{tag}"] = (
                [{"text": embed(r, b, position)} for r, b in zip(requests_, benign, strict=False)],
                [{"text": b} for b in benign],
                "embedded",
            )
    return out


def pooled_direct_scores(scorer: ToxicScorer, samples: list, cache_dir: str) -> dict[str, np.ndarray]:
    """The direct score of each sample under every pooling of `CANDIDATES`, and its token count, from one read.

    Samples are chunked and batched as `score_dataset` does (longest first, chunks of 256), so the mean pooling
    here equals `score_dataset`'s; the result is cached under the scorer's cache key.
    """
    tokenized = tokenize_samples(scorer.tokenizer, samples, max_length=None)
    # "set-score": the pooled values are the set's score (`readout.score`), not the features' mean as before.
    key = hashlib.sha256((scorer.cache_key(tokenized) + json.dumps(CANDIDATES) + "set-score").encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"poolings-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return dict(data)
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i].input_ids))
    out = {name: np.zeros(len(samples), np.float32) for name in CANDIDATES} | {"n_tokens": np.zeros(len(samples))}
    for start in range(0, len(order), 256):
        chunk = order[start : start + 256]
        poolers = {
            name: TokenPooler(len(chunk), p, passage_tokens=w, passage_score=scorer.readout.token_scores)
            for name, (p, w) in CANDIDATES.items()
        }
        for rows, (acts,) in scorer.iter_token_values([tokenized[i] for i in chunk]):
            for pooler in poolers.values():
                pooler.add(acts, rows)
        for name, pooler in poolers.items():
            out[name][chunk] = scorer.readout.score(pooler.result()).numpy()  # the set's score, as score_dataset's
        out["n_tokens"][chunk] = poolers["mean"].n_tokens.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def score_contrasts(scorer: ToxicScorer, data: dict, cache_dir: str) -> dict[str, dict[str, np.ndarray]]:
    """`pooled_direct_scores` of every contrast's target + reference, each distinct sample read once."""
    unique = {}
    for target, reference, _ in data.values():
        for sample in target + reference:
            unique.setdefault(json.dumps(sample, sort_keys=True), sample)
    index = {key: i for i, key in enumerate(unique)}
    scores = pooled_direct_scores(scorer, list(unique.values()), cache_dir)
    out = {}
    for name, (target, reference, _) in data.items():
        rows = [index[json.dumps(s, sort_keys=True)] for s in target + reference]
        out[name] = {k: v[rows] for k, v in scores.items()}
    return out


def aurocs(scores: dict[str, np.ndarray], n_target: int) -> dict[str, float]:
    return {name: float(auroc(v[:n_target], v[n_target:])) for name, v in scores.items()}


def bag_of_words():
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2), LogisticRegression(max_iter=2000, C=4.0))


def cross_validated_bow(target: list, reference: list, seed: int) -> np.ndarray:
    texts = [response_text(s) for s in target + reference]
    labels = np.r_[np.ones(len(target)), np.zeros(len(reference))]
    folds = StratifiedKFold(min(5, len(target), len(reference)), shuffle=True, random_state=seed)
    return cross_val_predict(bag_of_words(), texts, labels, cv=folds, method="predict_proba")[:, 1]


def removal(scores: np.ndarray, harmful: np.ndarray, fraction: float = 0.5) -> dict:
    dropped = DropTopFraction(fraction).drop_mask(scores)
    hits = (dropped & harmful).sum()
    return {"precision": float(hits / dropped.sum()), "recall": float(hits / harmful.sum())}


def choose(dev: dict[str, dict[str, float]], max_loss: float = 0.02) -> tuple[dict[str, float], str, str, str]:
    """Each candidate's criterion on the development contrasts, the best width of each passage pooling, the default.

    The criterion is the mean of two means, of the AUROC over the short development contrasts and over the embedded
    ones. The default is the candidate with the best criterion among those that lose at most `max_loss` AUROC
    against `mean` on every short development contrast (a pooling must not cost the short, realistic samples
    what it gains on long ones): `mean` when none qualifies.
    """
    short = [name for name in dev if "benign chars" not in name]
    embedded = [name for name in dev if "benign chars" in name]
    criterion = {
        c: float(np.mean([np.mean([dev[n][c] for n in short]), np.mean([dev[n][c] for n in embedded])]))
        for c in CANDIDATES
    }
    window = max((c for c in CANDIDATES if c.startswith("window_mean")), key=criterion.get)
    topk = max((c for c in CANDIDATES if c.startswith("topk_mean")), key=criterion.get)
    allowed = [c for c in ("mean", "max", window, topk) if all(dev[n][c] >= dev[n]["mean"] - max_loss for n in short)]
    return criterion, window, topk, max(allowed, key=criterion.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--n", type=int, default=200, help="samples per side of the two chat contrasts")
    parser.add_argument("--embedded_n", type=int, default=24, help="requests per embedded contrast (half at 16,000)")
    parser.add_argument("--dev_n", type=int, default=100, help="samples per side of the short development contrasts")
    parser.add_argument("--dev_embedded_n", type=int, default=12, help="requests per embedded development contrast")
    parser.add_argument("--methods", default="proximity,subspace", help="scores besides direct (default pooling)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--cache_dir", default="outputs/bench_score_cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default="outputs/bench_scoring_quality.json")
    args = parser.parse_args()
    began = time.perf_counter()

    root = data_root(args.data_dir)
    model, tokenizer = load_model()
    sae = load_sae()
    toxic = FeatureSet.load(sae=sae)
    # Pooling does not change what the model reads: one scorer gives the token values every pooling pools (its
    # pooling is set only to keep the cache key independent of the default).
    token_settings = ScoreSettings(method="direct", pooling="mean")
    direct = ToxicScorer(model, tokenizer, sae, toxic, token_settings, batch_size=args.batch_size)

    data = contrasts(root, args.n, args.seed)
    answers = [chat["messages"][-1]["content"] for chat in load_alpaca(root / "benign" / "alpaca_en_demo.json")]
    per_length = {length: args.embedded_n // (2 if length > 4000 else 1) for length in LENGTHS}
    dev_per_length = {length: args.dev_embedded_n // (2 if length > 4000 else 1) for length in LENGTHS}
    test_requests = [s["text"] for s in requests(root / "harmful" / "harmful_test.json")]
    embedded = embedded_contrasts(test_requests, answers[0::2], per_length, args.seed)
    dev = dev_contrasts(root, data, args.dev_n, args.seed)
    dev |= embedded_contrasts(
        random.Random(args.seed).sample(advbench_requests(root), args.dev_embedded_n),
        answers[1::2],
        dev_per_length,
        args.seed + 1,
        tag=" (dev)",
    )

    # 1. Choose the passage widths and the default pooling on the development contrasts.
    dev_scores = score_contrasts(direct, dev, args.cache_dir)
    dev_auroc = {name: aurocs(dev_scores[name], len(dev[name][0])) for name in dev}
    criterion, window, topk, default = choose(dev_auroc)
    print(f"development split: best {window}, best {topk}, default {default} ({time.perf_counter() - began:.0f} s)")
    shown = ("mean", "max", window, topk)
    print("\n| development contrast | " + " | ".join(shown) + " |\n" + "|---" * (len(shown) + 1) + "|")
    for name, row in dev_auroc.items():
        print(
            f"| {name} ({len(dev[name][0])}+{len(dev[name][1])}) | " + " | ".join(f"{row[c]:.3f}" for c in shown) + " |"
        )
    print("| criterion | " + " | ".join(f"{criterion[c]:.3f}" for c in shown) + " |\n", flush=True)
    default_pooling, default_width = CANDIDATES[default]

    # 2. Reported contrasts: direct under each pooling; the other scores with the default pooling.
    methods = [m for m in args.methods.split(",") if m]
    settings = {m: ScoreSettings(method=m, pooling=default_pooling, passage_tokens=default_width) for m in methods}
    table, all_scores = {}, {}
    reported = data | embedded
    test_scores = score_contrasts(direct, reported, args.cache_dir)
    for name, (target, reference, kind) in reported.items():
        row = {"kind": kind, "n_target": len(target), "n_reference": len(reference)}
        row |= {f"direct {c}": v for c, v in aurocs(test_scores[name], len(target)).items() if c in shown}
        for c in shown:
            all_scores[(name, f"direct {c}")] = test_scores[name][c]
        if name in data:
            for method, method_settings in settings.items():
                scorer = ToxicScorer(model, tokenizer, sae, toxic, method_settings, batch_size=args.batch_size)
                result = score_dataset(scorer, target + reference, cache=args.cache_dir, progress=False)
                row[method] = float(auroc(result.scores[: len(target)], result.scores[len(target) :]))
                all_scores[(name, method)] = result.scores
        n_tokens = test_scores[name]["n_tokens"]
        row["length"] = float(auroc(n_tokens[: len(target)], n_tokens[len(target) :]))
        row["random"] = float(auroc(*np.split(random_scores(len(target) + len(reference), args.seed), [len(target)])))
        if kind != "embedded":  # each embedded benign text is on both sides: a fold would learn its twin's label
            bow = cross_validated_bow(target, reference, args.seed)
            row["bag_of_words_cv"] = float(auroc(bow[: len(target)], bow[len(target) :]))
        table[name] = row
        print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # Removal: a 50/50 mix of jailbroken (harmful) and Alpaca (benign) chats, drop the top 50%.
    mix = "jailbroken vs Alpaca chats"
    n = table[mix]["n_target"]
    harmful = np.r_[np.ones(n, bool), np.zeros(table[mix]["n_reference"], bool)]
    scored = [f"direct {c}" for c in shown] + [f"{m} ({default})" for m in methods]
    removals = {s: removal(all_scores[(mix, s.split(" (")[0])], harmful) for s in scored}
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

    columns = [f"direct {c}" for c in shown] + methods + ["random", "length", "bag_of_words_cv"]
    print(f"\nAUROC; {', '.join(methods) or 'no other score'} with the default pooling ({default}):\n")
    print("| contrast | kind | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, row in table.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in columns]
        print(f"| {name} ({row['n_target']}+{row['n_reference']}) | {row['kind']} | " + " | ".join(cells) + " |")
    print(f"\nDrop the top 50% of a 50/50 mix ({n} jailbroken + {n} Alpaca chats):\n")
    print("| score | precision (harmful share of dropped) | recall (share of harmful dropped) |\n|---|---|---|")
    for name, r in removals.items():
        print(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} |")
    seconds = time.perf_counter() - began
    print(f"\nwall time {seconds:.0f} s")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(
        json.dumps(
            {
                "development": {"auroc": dev_auroc, "criterion": criterion, "chosen": [window, topk, default]},
                "auroc": table,
                "removal": removals,
                "seconds": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
