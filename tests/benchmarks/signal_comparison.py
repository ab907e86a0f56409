"""Benchmark: the top-100 mean, the weighted readout, the directions and the dense probe ceiling, side by side.

    python tests/benchmarks/signal_comparison.py --data_dir ../shared/data --output_json outputs/bench_signals.json

On the embedded model, at the embedded SAE's layer, every signal is fitted on the selection rows of its
contrasts and measured on held-out rows (30% of each side, the same split for every signal):

- *toxic*: selected on the format-matched contrasts ToxiGen hate vs neutral and harmful vs harmless requests
  (the embedded toxic set's), measured on their held-out rows and, as a transfer check never used for fitting,
  on jailbroken vs Alpaca chats;
- *code*: insecure vs secure code (the same coding tasks), answer tokens;
- *misalignment*: read from `recipes/build_misalignment_sets.py`'s report (answering models held out).

Signals: the top-100 SAE features' mean (`find_features`), their sparse L1 logistic readout (`weighted`), the
difference-of-means and logistic-probe directions fitted on the same contrasts (`find_directions`), and the
dense probe ceiling: a logistic probe on mean-pooled residuals fitted on that one contrast's selection rows (for
the transfer check, on its own rows: a format-mismatched contrast, so the ceiling there says how separable the
two sources are, not toxicity). Length alone is shown as the confound check. Writes a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from geoguard.corpora import data_root, load_chats  # noqa: E402
from geoguard.directions import find_directions  # noqa: E402
from geoguard.features import EMBEDDED_FEATURE_SETS, Contrast, find_features  # noqa: E402
from geoguard.models import load_model  # noqa: E402
from geoguard.sae import load_sae, sae_hook_name  # noqa: E402
from recipes.build_feature_sets import toxic_contrasts  # noqa: E402


def measure(model, tokenizer, sae, contrasts, checks, *, span: str, n_permutations: int) -> dict[str, dict]:
    """Per contrast: held-out AUROC of the top-100 mean, the weighted readout, both directions, and length."""
    common = {"span": span, "check_contrasts": checks, "n_permutations": n_permutations, "max_length": 256}
    features = find_features(model, tokenizer, sae, contrasts, name="bench", **common)
    directions = find_directions(model, tokenizer, contrasts, name="bench", hook_name=sae_hook_name(sae), **common)
    rows = {}
    for f_row, d_row in zip(features.summary["contrasts"], directions.summary["contrasts"], strict=True):
        rows[f_row["name"]] = {
            "role": f_row["role"],
            "top100_mean": f_row["heldout_auroc"],
            "weighted": f_row["weighted_heldout_auroc"],
            "direction_mean_diff": d_row["methods"]["mean_diff"],
            "direction_probe": d_row["methods"]["probe"],
            "length": f_row["length_auroc"],
            "n_heldout": [f_row["n_target"], f_row["n_reference"]],
        }
    return rows


def ceiling(model, tokenizer, sae, contrast: Contrast, *, span: str, n_permutations: int) -> float:
    """Held-out AUROC of a logistic probe on mean-pooled residuals fitted on this contrast alone."""
    found = find_directions(
        model, tokenizer, contrast, name="ceiling", hook_name=sae_hook_name(sae), span=span,
        n_permutations=n_permutations, max_length=256,
    )  # fmt: skip
    return found.summary["methods"]["probe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--n_samples", type=int, default=300, help="Samples per side of the chat contrasts.")
    parser.add_argument("--n_permutations", type=int, default=200)
    parser.add_argument(
        "--misalignment_report", default=str(EMBEDDED_FEATURE_SETS / "misalignment-heldout" / "heldout_models.json")
    )
    parser.add_argument("--output_json", default="outputs/bench_signals.json")
    args = parser.parse_args()
    root = data_root(args.data_dir)
    rng = random.Random(0)
    start = time.perf_counter()
    model, tokenizer = load_model()
    sae = load_sae()
    options = {"n_permutations": args.n_permutations}

    selection, checks = toxic_contrasts(root, args.n_samples, rng)
    rows = measure(model, tokenizer, sae, selection, checks, span="all", **options)
    for contrast in [*selection, *checks]:
        rows[contrast.name]["dense_probe_ceiling"] = ceiling(model, tokenizer, sae, contrast, span="all", **options)

    em = root / "emergent_misalignment"
    insecure, secure = load_chats(em / "insecure.jsonl"), load_chats(em / "secure.jsonl")
    picks = rng.sample(range(min(len(insecure), len(secure))), args.n_samples)
    code = Contrast("insecure_vs_secure_code", [insecure[i] for i in picks], [secure[i] for i in picks])
    rows |= measure(model, tokenizer, sae, [code], [], span="response", **options)
    rows[code.name]["dense_probe_ceiling"] = rows[code.name]["direction_probe"]  # one contrast: the same probe

    report = Path(args.misalignment_report)
    if report.is_file():
        auroc = json.loads(report.read_text())["auroc"]
        rows["misaligned_vs_aligned_answers (held-out models)"] = {
            "role": "held-out models",
            "top100_mean": auroc["misalignment set (top-100 mean)"],
            "weighted": auroc["misalignment set (weighted)"],
            "direction_mean_diff": auroc["direction (difference of means)"],
            "direction_probe": auroc["direction (logistic probe; the dense probe)"],
            "dense_probe_ceiling": auroc["direction (logistic probe; the dense probe)"],
            "length": auroc["answer length (characters)"],
            "toxic_set": auroc["toxic set (top-100 mean)"],
        }

    columns = ["top100_mean", "weighted", "direction_mean_diff", "direction_probe", "dense_probe_ceiling", "length"]
    print("| contrast | role | " + " | ".join(columns) + " | best signal − ceiling |")
    print("|---" * (len(columns) + 3) + "|")
    for name, row in rows.items():
        best = max(row["top100_mean"], row["weighted"], row["direction_mean_diff"], row["direction_probe"])
        row["gap_to_ceiling"] = best - row["dense_probe_ceiling"]
        print(
            f"| {name} | {row['role']} | " + " | ".join(f"{row[c]:.3f}" for c in columns)
            + f" | {row['gap_to_ceiling']:+.3f} |"
        )  # fmt: skip
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "n_samples": args.n_samples, "seconds": time.perf_counter() - start}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{time.perf_counter() - start:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
