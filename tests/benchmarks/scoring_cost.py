"""Benchmark: what scoring costs next to a full forward pass over the same samples, and its peak memory.

    python tests/benchmarks/scoring_cost.py --data_dir ../shared/data --output_json outputs/bench_scoring_cost.json

With `--device cuda` the model and the SAE run on the GPU (fp32, as on CPU); timings then wait for the GPU
(`torch.cuda.synchronize`) before the clock is read.

On the embedded model, a 50/50 mix of jailbroken and Alpaca chats is run, in one process and in
alternating rounds (the machines are noisy; each kind keeps its fastest round):

- `full forward`: the model's own forward pass (logits included) over the same length-sorted batches;
- `early-exit forward`: the forward pass stopped at the SAE's layer (the floor for any score);
- each score method through `score_dataset` with the cache off; `direct` also with a weighted set (the toxic
  features with a sparse readout's weights) and with a direction set (one residual-space direction, no SAE);
  the values of the weights and of the direction do not change the cost, so fixed random ones stand in;
- a second `score_dataset` call with the cache on (a cache hit).

Ratios are times over the full forward pass. Peak memory is measured per kind in a fresh process: the
peak RSS (VmHWM, reset after loading the model and the SAE) above the RSS at that moment, and on CUDA also
the peak of allocated GPU memory above what the model and the SAE hold.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KINDS = (
    "full forward",
    "early-exit forward",
    "proximity",
    "direct",
    "direct, weighted set",
    "direct, direction set",
    "subspace",
)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only).")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so loading the model does not count as the peak."""
    Path("/proc/self/clear_refs").write_text("5")


def _synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a clock read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def setup(data_dir: str | None, n: int, batch_size: int, device: str = "cpu"):
    from geoguard.corpora import data_root, load_alpaca, load_chats
    from geoguard.data import tokenize_samples
    from geoguard.features import FeatureSet
    from geoguard.models import load_model
    from geoguard.sae import load_sae

    root = data_root(data_dir)
    rng = random.Random(0)
    samples = rng.sample(load_chats(root / "emergent_misalignment" / "jailbroken.jsonl"), n)
    samples += rng.sample(load_alpaca(root / "benign" / "alpaca_en_demo.json"), n)
    model, tokenizer = load_model(device=device)
    sae = load_sae(device=device)
    tokenized = tokenize_samples(tokenizer, samples)
    return model, tokenizer, sae, FeatureSet.load(sae=sae), samples, tokenized


def run_kind(kind: str, parts, batch_size: int, cache=None) -> float:
    """Seconds for one pass of `kind` over the samples."""
    from geoguard.capture import iter_activations
    from geoguard.data import iter_token_batches
    from geoguard.sae import sae_hook_name
    from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset

    model, tokenizer, sae, toxic, samples, tokenized = parts
    _synchronize(model.device)
    start = time.perf_counter()
    if kind == "full forward":
        with torch.no_grad():
            for batch in iter_token_batches(tokenized, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id):
                ids, mask = batch.input_ids.to(model.device), batch.attention_mask.to(model.device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    elif kind == "early-exit forward":
        for _ in iter_activations(model, tokenizer, tokenized, sae_hook_name(sae), batch_size=batch_size):
            pass
    else:
        method, _, variant = kind.partition(", ")
        scorer = ToxicScorer(
            model, tokenizer, sae, _variant(toxic, variant, model), ScoreSettings(method=method), batch_size=batch_size
        )
        score_dataset(scorer, samples, cache=cache, progress=False)
    _synchronize(model.device)
    return time.perf_counter() - start


def _variant(toxic, variant: str, model):
    """The toxic set, the same features with (fixed random) weights, or a (fixed random) direction set."""
    from geoguard.features import FeatureSet, model_signature

    generator = torch.Generator().manual_seed(0)
    if variant == "weighted set":
        return FeatureSet(
            **{**toxic.__dict__, "weights": torch.randn(len(toxic.feature_ids), generator=generator).tolist()}
        )
    if variant == "direction set":
        direction = torch.nn.functional.normalize(torch.randn(1, toxic.decoder.shape[1], generator=generator), dim=1)
        return FeatureSet(
            name="direction", feature_ids=[0], hook_name=toxic.hook_name, d_sae=0, sae_fingerprint="",
            kind="directions", offsets=[0.0], model_signature=model_signature(model), decoder=direction,
        )  # fmt: skip
    return toxic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--n", type=int, default=60, help="samples per side of the mix")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output_json", default="outputs/bench_scoring_cost.json")
    parser.add_argument("--device", default="cpu", help="where the model and the SAE run: cpu, cuda, cuda:1, ...")
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu.")

    parts = setup(args.data_dir, args.n, args.batch_size, args.device)
    if args.memory_of is not None:
        _reset_peak_rss()
        base = _status_mb("VmRSS")
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
            cuda_base = torch.cuda.memory_allocated(args.device)
        run_kind(args.memory_of, parts, args.batch_size)
        memory = {"peak_rss_above_base_mb": _status_mb("VmHWM") - base}
        if on_cuda:
            memory["peak_cuda_above_base_mb"] = (torch.cuda.max_memory_allocated(args.device) - cuda_base) / 2**20
        print(json.dumps(memory))
        return

    n_tokens = sum(len(t.input_ids) for t in parts[5])
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            times[kind].append(run_kind(kind, parts, args.batch_size))
    best = {kind: min(t) for kind, t in times.items()}
    with tempfile.TemporaryDirectory() as cache:
        run_kind("direct", parts, args.batch_size, cache=cache)
        best["direct, cache hit"] = run_kind("direct", parts, args.batch_size, cache=cache)

    rows = []
    for kind, seconds in best.items():
        memory = cuda_memory = None
        if kind in KINDS:
            cmd = [
                sys.executable,
                __file__,
                "--memory_of",
                kind,
                "--n",
                str(args.n),
                "--batch_size",
                str(args.batch_size),
                "--device",
                args.device,
            ]
            cmd += ["--data_dir", args.data_dir] if args.data_dir else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            memory, cuda_memory = measured["peak_rss_above_base_mb"], measured.get("peak_cuda_above_base_mb")
        rows.append(
            {
                "kind": kind,
                "seconds": seconds,
                "tokens_per_s": n_tokens / seconds,
                "over_full_forward": seconds / best["full forward"],
                "peak_rss_above_base_mb": memory,
            }
        )
        if on_cuda:
            rows[-1]["peak_cuda_above_base_mb"] = cuda_memory
    on = f", on {torch.cuda.get_device_name(args.device)}" if on_cuda else ""
    print(f"{2 * args.n} samples, {n_tokens} tokens, batch size {args.batch_size}, best of {args.rounds} rounds{on}\n")
    cuda_column = (" peak CUDA above base (MB) |", "---|") if on_cuda else ("", "")
    print(f"| kind | seconds | tokens/s | time / full forward | peak RSS above base (MB) |{cuda_column[0]}")
    print(f"|---|---|---|---|---|{cuda_column[1]}")
    for r in rows:
        memory = "" if r["peak_rss_above_base_mb"] is None else f"{r['peak_rss_above_base_mb']:.0f}"
        line = (
            f"| {r['kind']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['over_full_forward']:.3f} | {memory} |"
        )
        if on_cuda:
            line += "" if r["peak_cuda_above_base_mb"] is None else f" {r['peak_cuda_above_base_mb']:.0f}"
            line += " |"
        print(line)
    result = {"n_tokens": n_tokens, "times": times, "rows": rows}
    if on_cuda:
        result |= {"device": args.device, "device_name": torch.cuda.get_device_name(args.device)}
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
