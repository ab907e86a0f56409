"""Benchmark: what `GeoGuardCallback` adds to a training step, at its default settings.

    python tests/benchmarks/monitor_overhead.py --output_json outputs/bench_monitor_overhead.json

The Trainer picks the device (a GPU when there is one); `--device cpu` or `--device cuda` pins it, and
`--bf16` trains in bf16 mixed precision as on a GPU. On CUDA the step clock waits for the GPU
(`torch.cuda.synchronize`) and the callback's own time is host time (its readout does not wait for the GPU).

LoRA SFT of the embedded model on the shipped demo mix (batch 8, max_length 256, the recipe's
settings), `--steps` optimizer steps per run, runs without and with the callback alternating in one
process (`--rounds` pairs; the data order is the same in every run). A step's time is the interval
between consecutive `on_step_end` events, so the callback's own work at a step (the batch readout
every step, the probe every `every_n_steps`) is inside it; the first step (warm-up) is left out.
Because step times on a shared CPU vary by a few percent, the callback's own time (its step-end work
and the batch readout inside each forward pass) is also timed directly, as a share of the step.
Peak memory is measured per variant in a fresh process: peak RSS (VmHWM, reset after loading) above
the RSS at that point (on CUDA also the peak of allocated GPU memory above what was allocated then);
these runs take min(11, `--steps`) steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
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
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def train(
    guarded: bool, steps: int, output_dir: str, memory: bool = False, device: str = "auto", bf16: bool = False
) -> dict:
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
        bf16=bf16,
        use_cpu=device == "cpu",
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
    on_cuda = trainer.args.device.type == "cuda"
    if memory and on_cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    trainer.train()
    result = {"train_s": time.perf_counter() - start, "step_s": float(np.mean(np.diff(timer.times)))}
    result["callback_s_per_step"] = own["s"] / len(timer.times)
    if memory:
        result["peak_rss_above_base_mb"] = _status_mb("VmHWM") - base
        if on_cuda:
            result["peak_cuda_above_base_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/bench_monitor")
    parser.add_argument("--output_json", default="outputs/bench_monitor_overhead.json")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the Trainer's choice (a GPU if any)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (needs a GPU or a bf16 CPU)")
    parser.add_argument("--memory_of", choices=["plain", "guarded"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu or auto.")
    if args.memory_of is not None:
        result = train(args.memory_of == "guarded", args.steps, args.output_dir, True, args.device, args.bf16)
        print(json.dumps(result))
        return

    rounds = []
    for _ in range(args.rounds):
        plain = train(False, args.steps, args.output_dir, device=args.device, bf16=args.bf16)
        guarded = train(True, args.steps, args.output_dir, device=args.device, bf16=args.bf16)
        rounds.append({"plain_step_s": plain["step_s"], "guarded_step_s": guarded["step_s"]})
        rounds[-1]["callback_s_per_step"] = guarded["callback_s_per_step"]
        rounds[-1]["overhead"] = guarded["step_s"] / plain["step_s"] - 1
        print(json.dumps(rounds[-1]), flush=True)
    memory, cuda_memory = {}, {}
    for variant in ("plain", "guarded"):
        cmd = [sys.executable, __file__, "--memory_of", variant, "--steps", str(min(11, args.steps))]
        cmd += ["--output_dir", args.output_dir, "--device", args.device] + (["--bf16"] if args.bf16 else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        memory[variant] = measured["peak_rss_above_base_mb"]
        if "peak_cuda_above_base_mb" in measured:
            cuda_memory[variant] = measured["peak_cuda_above_base_mb"]

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
    result = {"rounds": rounds, "memory_mb": memory}
    if cuda_memory:
        print(
            f"Peak CUDA memory above base: without {cuda_memory['plain']:.0f} MB, with {cuda_memory['guarded']:.0f} MB "
            f"on {torch.cuda.get_device_name()}"
        )
        result |= {"cuda_memory_mb": cuda_memory, "device_name": torch.cuda.get_device_name(), "bf16": args.bf16}
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
