"""Benchmark: what `GeoGuardCallback` adds to a training step, at its default settings.

    python tests/benchmarks/monitor_overhead.py --output_json outputs/bench_monitor_overhead.json

LoRA SFT of the embedded model on the shipped demo mix (batch 8, max_length 256, the recipe's
settings), `--steps` optimizer steps per run, runs without and with the callback alternating in one
process (`--rounds` pairs; the data order is the same in every run). A step's time is the interval
between consecutive `on_step_end` events, so the callback's own work at a step (the batch readout
every step, the probe every `every_n_steps`) is inside it; the first step (warm-up) is left out.
Because step times on a shared CPU vary by a few percent, the callback's own time (its step-end work
and the batch readout inside each forward pass) is also timed directly, as a share of the step.
Peak memory is measured per variant in a fresh process: peak RSS (VmHWM, reset after loading) above
the RSS at that point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from geoguard import monitor

REPO = Path(__file__).resolve().parents[2]


def _timed(fn, total: dict):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total["s"] += time.perf_counter() - start

    return wrapper


_BATCH_READ = monitor._BatchTap._read


class StepTimer(TrainerCallback):
    """Records the time of every `on_step_end`; added last, so other callbacks' work at a step counts."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def train(guarded: bool, steps: int, output_dir: str, memory: bool = False) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from geoguard import FeatureSet, GeoGuardCallback, load_model, load_sae

    model, tokenizer = load_model()
    data = load_dataset("json", data_files=str(REPO / "recipes" / "data" / "sft_mix.jsonl"), split="train")
    config = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=2e-4,
        max_length=256,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=42,
        disable_tqdm=True,
    )
    timer = StepTimer()
    callbacks, own = [], {"s": 0.0}
    if guarded:
        sae = load_sae()
        guard = GeoGuardCallback(sae, FeatureSet.load(sae=sae), tokenizer, log_dir=f"{output_dir}/runs")
        # The callback's own time: its step-end work (reduction, probe) and the batch readout in each forward.
        guard.on_step_end = _timed(guard.on_step_end, own)
        monitor._BatchTap._read = _timed(_BATCH_READ, own)
        callbacks.append(guard)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data.select_columns(["messages"]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        callbacks=[*callbacks, timer],
    )
    if memory:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to now: loading does not count
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    trainer.train()
    result = {"train_s": time.perf_counter() - start, "step_s": float(np.mean(np.diff(timer.times)))}
    result["callback_s_per_step"] = own["s"] / len(timer.times)
    if memory:
        result["peak_rss_above_base_mb"] = _status_mb("VmHWM") - base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/bench_monitor")
    parser.add_argument("--output_json", default="outputs/bench_monitor_overhead.json")
    parser.add_argument("--memory_of", choices=["plain", "guarded"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of is not None:
        print(json.dumps(train(args.memory_of == "guarded", args.steps, args.output_dir, memory=True)))
        return

    rounds = []
    for _ in range(args.rounds):
        plain = train(False, args.steps, args.output_dir)
        guarded = train(True, args.steps, args.output_dir)
        rounds.append({"plain_step_s": plain["step_s"], "guarded_step_s": guarded["step_s"]})
        rounds[-1]["callback_s_per_step"] = guarded["callback_s_per_step"]
        rounds[-1]["overhead"] = guarded["step_s"] / plain["step_s"] - 1
        print(json.dumps(rounds[-1]), flush=True)
    memory = {}
    for variant in ("plain", "guarded"):
        cmd = [sys.executable, __file__, "--memory_of", variant, "--steps", "11", "--output_dir", args.output_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])["peak_rss_above_base_mb"]

    plain_s = float(np.median([r["plain_step_s"] for r in rounds]))
    guarded_s = float(np.median([r["guarded_step_s"] for r in rounds]))
    print(f"\n{args.steps} steps per run (first step left out), {args.rounds} rounds, defaults: every_n_steps=10\n")
    print("| round | step without (s) | step with (s) | overhead | callback's own time per step (s) | own / step |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        own = r["callback_s_per_step"]
        print(
            f"| {i} | {r['plain_step_s']:.3f} | {r['guarded_step_s']:.3f} | {r['overhead']:+.1%} | {own:.4f} | "
            f"{own / r['plain_step_s']:.2%} |"
        )
    print(f"| median | {plain_s:.3f} | {guarded_s:.3f} | {guarded_s / plain_s - 1:+.1%} | | |")
    print(
        f"\nPeak RSS above base: without {memory['plain']:.0f} MB, with {memory['guarded']:.0f} MB "
        f"(the callback adds {memory['guarded'] - memory['plain']:+.0f} MB)"
    )
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps({"rounds": rounds, "memory_mb": memory}, indent=2))


if __name__ == "__main__":
    main()
