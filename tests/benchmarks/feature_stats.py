"""Benchmark: throughput and peak memory of feature statistics (`find_features`) on the embedded model.

    python tests/benchmarks/feature_stats.py --output_json outputs/bench_feature_stats.json

Runs `find_features` on jailbroken vs Alpaca chats at several data sizes (100 samples per side
cycled up to the size, so the batches have the same shapes at every size), each in a fresh
process (so peak memory is its own), and in the same process times the early-exit forward pass
alone over the same samples: the ratio says what the SAE and the statistics add. Memory is
reported as peak RSS above the RSS after loading the model and SAE; it must not grow with the
data size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(n: int, data_dir: str | None, batch_size: int) -> dict:
    from geoguard.capture import iter_activations
    from geoguard.corpora import data_root, load_alpaca, load_chats
    from geoguard.data import tokenize_samples
    from geoguard.features import Contrast, find_features
    from geoguard.models import load_model
    from geoguard.sae import load_sae, sae_hook_name

    model, tokenizer = load_model()
    sae = load_sae()
    root = data_root(data_dir)
    # The same 100 samples per side, cycled up to n: every size runs batches of the same shapes, so any
    # growth of peak memory with n comes from the data size itself.
    target = (load_chats(root / "emergent_misalignment" / "jailbroken.jsonl")[:100] * n)[:n]
    reference = (load_alpaca(root / "benign" / "alpaca_en_demo.json")[:100] * n)[:n]
    n_tokens = sum(len(t.input_ids) for t in tokenize_samples(tokenizer, target + reference))
    base_rss = _rss_mb()

    start = time.perf_counter()
    for _ in iter_activations(model, tokenizer, target + reference, sae_hook_name(sae), batch_size=batch_size):
        pass
    forward_s = time.perf_counter() - start

    start = time.perf_counter()
    find_features(
        model, tokenizer, sae, Contrast("bench", target, reference), name="bench", batch_size=batch_size, progress=False
    )
    stats_s = time.perf_counter() - start
    return {
        "samples_per_side": n,
        "tokens": n_tokens,
        "forward_s": forward_s,
        "stats_s": stats_s,
        "stats_tokens_per_s": n_tokens / stats_s,
        "forward_tokens_per_s": n_tokens / forward_s,
        "stats_over_forward": stats_s / forward_s,
        "base_rss_mb": base_rss,
        "peak_rss_above_base_mb": _rss_mb() - base_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="samples per side")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_json", default="outputs/bench_feature_stats.json")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.data_dir, args.batch_size)))
        return

    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--batch_size", str(args.batch_size)]
        cmd += ["--data_dir", args.data_dir] if args.data_dir else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{'samples/side':>12} {'tokens':>8} {'stats tok/s':>12} {'forward tok/s':>14} {'stats/forward':>14} {'peak RSS above base MB':>23}"
    )
    for r in rows:
        print(
            f"{r['samples_per_side']:>12} {r['tokens']:>8} {r['stats_tokens_per_s']:>12.0f} {r['forward_tokens_per_s']:>14.0f} "
            f"{r['stats_over_forward']:>14.2f} {r['peak_rss_above_base_mb']:>23.0f}"
        )
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
