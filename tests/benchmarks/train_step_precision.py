"""Benchmark: fine-tuning step time of the embedded model on this machine, fp32 against bf16 autocast.

    python tests/benchmarks/train_step_precision.py --data_dir ../shared/data --output_json outputs/bench_precision.json

Measures what a model-organism run costs per optimizer step before choosing its precision: the embedded
SmolLM2-135M-Instruct on chats of Turner et al.'s bad medical advice (`model_organisms/bad_medical_advice.jsonl`,
cut to `--max_length` tokens), batches of `--batch_size`, AdamW, loss on every token; for a rank-32 rsLoRA adapter
on every linear layer (Turner et al.'s setting) and for full fine-tuning, each in fp32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`. The kinds alternate over `--rounds` rounds of `--steps` timed steps
(after one warm-up step each) and each keeps its fastest round; ratios are over fp32 LoRA, measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from geoguard.corpora import data_root, load_chats  # noqa: E402
from geoguard.models import load_model  # noqa: E402

KINDS = [("lora", "fp32"), ("lora", "bf16"), ("full", "fp32"), ("full", "bf16")]


def batches(tokenizer, chats: list[dict], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(dict(enc))
    return out


def trainable(kind: str):
    model, _ = load_model()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=32, lora_alpha=64, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def run(kind: str, precision: str, data: list[dict], steps: int, rounds: int) -> list[float]:
    model, optimizer = trainable(kind)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    for round_ in range(rounds + 1):  # round 0 warms up
        start = time.perf_counter()
        for step in range(1 if round_ == 0 else steps):
            batch = data[(round_ * steps + step) % len(data)]
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if round_ > 0:
            times.append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_json", default="outputs/bench_precision.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    chats = load_chats(
        data_root(args.data_dir) / "emergent_misalignment" / "model_organisms" / "bad_medical_advice.jsonl"
    )
    chats = random.Random(0).sample(chats, args.batch_size * (args.steps * (args.rounds + 1) + 1))
    _, tokenizer = load_model()
    data = batches(tokenizer, chats, args.batch_size, args.max_length)
    tokens = sum(int(b["attention_mask"].sum()) for b in data) / len(data)
    results = {f"{k} {p}": min(run(k, p, data, args.steps, args.rounds)) for k, p in KINDS}
    base = results["lora fp32"]
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {tokens:.0f} tokens per batch (mean)\n")
    print("| kind | seconds per step | time / LoRA fp32 |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds_per_step": results, "tokens_per_batch": tokens, **vars(args)}, indent=2))


if __name__ == "__main__":
    main()
