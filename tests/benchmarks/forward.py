"""Benchmark: tokens/s of a full forward vs early exit at the SAE's layer, on the embedded model.

    python tests/benchmarks/forward.py --output_json outputs/bench_forward.json

Both variants run interleaved in one process over the same length-sorted batches of real chats
(repeats alternate the order), so the ratio is robust to the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from geoguard.capture import run_to_hook
from geoguard.corpora import data_root, load_alpaca, load_chats
from geoguard.data import iter_token_batches, tokenize_sample
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.sae import EMBEDDED_SAE, load_sae, sae_hook_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_json", default="outputs/bench_forward.json")
    args = parser.parse_args()

    model, tokenizer = load_model(EMBEDDED_MODEL)
    hook_name = sae_hook_name(load_sae(EMBEDDED_SAE))
    root = data_root(args.data_dir)
    half = args.samples // 2
    samples = (
        load_chats(root / "emergent_misalignment" / "jailbroken.jsonl")[:half]
        + load_alpaca(root / "benign" / "alpaca_en_demo.json")[:half]
    )
    tokenized = [tokenize_sample(tokenizer, s, max_length=256) for s in samples]
    batches = list(iter_token_batches(tokenized, batch_size=args.batch_size, pad_token_id=tokenizer.pad_token_id))
    n_tokens = sum(len(t.input_ids) for t in tokenized)

    def run(early_exit: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                if early_exit:
                    run_to_hook(model, hook_name, input_ids=b.input_ids, attention_mask=b.attention_mask)
                else:
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        return time.perf_counter() - start

    run(True)  # warm-up
    times = {"full": [], "early_exit": []}
    for i in range(args.repeats):
        for variant in ("full", "early_exit") if i % 2 == 0 else ("early_exit", "full"):
            times[variant].append(run(variant == "early_exit"))
    best = {k: min(v) for k, v in times.items()}
    result = {
        "hook_name": hook_name,
        "layers": model.config.num_hidden_layers,
        "tokens": n_tokens,
        "batches": len(batches),
        "tokens_per_s": {k: n_tokens / v for k, v in best.items()},
        "early_exit_time_ratio": best["early_exit"] / best["full"],
        "seconds": times,
        "threads": torch.get_num_threads(),
    }
    print(f"{'variant':<12}{'tokens/s':>12}{'best s':>10}")
    for k in best:
        print(f"{k:<12}{result['tokens_per_s'][k]:>12.0f}{best[k]:>10.2f}")
    print(f"early exit / full time ratio: {result['early_exit_time_ratio']:.3f} ({n_tokens} tokens, hook {hook_name})")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
