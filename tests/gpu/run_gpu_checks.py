"""GPU checks in one run: the guarded recipe in bf16, a 1-process DDP launch, and the scoring and monitor
benchmarks on CUDA, each timed, with the numbers gathered in one JSON file and one markdown table.

On a machine with a CUDA GPU, from the repository root (sized for about 5 minutes on one H100, an estimate
not yet measured; the run stays inside `--budget_s`, 450 s by default: a step is cut at the budget's end, and
one with under 30 s left is skipped and recorded as skipped):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python tests/gpu/run_gpu_checks.py --data_dir ../shared/data

Steps, each a subprocess with its own timeout (a failing or timed-out step does not stop the others):

1. `sft_bf16`: `accelerate launch --num_processes 1 recipes/sft_guarded.py --config
   recipes/configs/sft_guarded_smollm2.yaml --bf16 true --max_steps 100 --geoguard_eval false`; its key numbers
   are the Trainer's `train_runtime`, `train_steps_per_second` and `train_samples_per_second`.
2. `ddp_1proc`: the same recipe under `accelerate launch --config_file recipes/accelerate/multi_gpu.yaml
   --num_processes 1` (torchrun, a real process group of one), 20 steps.
3. `scoring_cost`: `tests/benchmarks/scoring_cost.py --device cuda` (needs the offline data: `--data_dir`,
   else `$GEOGUARD_DATA_DIR` or ../shared/data); its JSON rows.
4. `monitor_overhead`: `tests/benchmarks/monitor_overhead.py --device cuda --bf16`; step times with and
   without `GeoGuardCallback` and the peak GPU memory.

`accelerate launch` runs as `python -m accelerate.commands.launch` (the same command, found without PATH).

Writes `gpu_checks.json` (GPU name, CUDA, torch / transformers / trl / accelerate versions, and for each step:
command, return code, wall seconds, key numbers, and the tail of its output when it failed) and `gpu_checks.md`
(the same as a table) to `$OUT` when it is set, else to outputs/gpu_checks/ (`--output_json` overrides); the
runs and each step's full log go to `--work_dir` (outputs/gpu_checks/). Exits 1 when a step failed.

Without CUDA it stops with a message. To test this script on a CPU machine, every step at its smallest
size (fp32; the DDP step on one gloo process):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python tests/gpu/run_gpu_checks.py --allow_cpu --smoke
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
RECIPE = ["recipes/sft_guarded.py", "--config", "recipes/configs/sft_guarded_smollm2.yaml"]
TRAIN_KEYS = ("train_runtime", "train_steps_per_second", "train_samples_per_second", "train_loss")
TAIL_CHARS = 4000
MIN_STEP_S = 30  # a step given less than this is skipped: it could not even load the model


class Step(NamedTuple):
    """One check: the command it runs, its own time limit, and how its key numbers are read."""

    name: str
    argv: list[str]
    timeout_s: float
    summarize: Callable[[str], dict]  # the step's output text -> its key numbers


def build_steps(*, on_cuda: bool, smoke: bool, work_dir: Path, data_dir: str | None = None) -> list[Step]:
    """The four checks, sized for a GPU run or (`smoke`) at their smallest.

    Args:
        on_cuda (`bool`): run on the GPU in bf16; else on CPU in fp32 (the DDP step then over gloo).
        smoke (`bool`): the smallest sizes (2 training steps, 2 samples per side), only to test this script.
        work_dir (`Path`): where the runs write their outputs.
        data_dir (`str`, *optional*): the offline data folder for the scoring benchmark.

    Returns:
        The steps in the order they run (the cheapest and most important first).
    """
    sft_steps, ddp_steps = (2, 2) if smoke else (100, 20)
    tiny = ["--per_device_train_batch_size", "2", "--max_length", "64", "--geoguard_every_n_steps", "1"]
    recipe = [*RECIPE, "--geoguard_eval", "false", "--bf16", "true" if on_cuda else "false"] + (tiny if smoke else [])

    sft_dir, ddp_dir = work_dir / "sft_bf16", work_dir / "ddp_1proc"
    sft = [*ACCELERATE, "--num_processes", "1", *recipe, "--output_dir", str(sft_dir), "--max_steps", str(sft_steps)]

    ddp = [*ACCELERATE, "--config_file", "recipes/accelerate/multi_gpu.yaml", "--num_processes", "1"]
    ddp_recipe = [*recipe, "--output_dir", str(ddp_dir), "--max_steps", str(ddp_steps)]
    if not on_cuda:
        # DESIGN.md's `--multi_gpu` CPU launch refuses one process; the config file with use_cpu gives
        # the same torchrun launch, a MULTI_CPU process group of one over gloo.
        ddp += ["--mixed_precision", "no"]
        ddp_recipe += ["--use_cpu", "true"]

    device = "cuda" if on_cuda else "cpu"
    scoring_json = work_dir / "scoring_cost.json"
    scoring = [sys.executable, "tests/benchmarks/scoring_cost.py", "--device", device]
    scoring += ["--output_json", str(scoring_json)] + (["--data_dir", data_dir] if data_dir else [])
    scoring += ["--n", "2", "--batch_size", "2", "--rounds", "1"] if smoke else []

    monitor_json = work_dir / "monitor_overhead.json"
    monitor = [sys.executable, "tests/benchmarks/monitor_overhead.py", "--device", device]
    monitor += ["--output_dir", str(work_dir / "monitor"), "--output_json", str(monitor_json)]
    monitor += ["--bf16"] if on_cuda else []
    monitor += ["--steps", "2", "--rounds", "1"] if smoke else []

    slow = 1 if on_cuda else 4  # a CPU (2 shared cores here) is slower even at the smallest sizes
    return [
        Step("sft_bf16", sft, 240 * slow, parse_train_metrics),
        Step("ddp_1proc", ddp + ddp_recipe, 150 * slow, parse_train_metrics),
        Step("scoring_cost", scoring, 210 * slow, partial(summarize_scoring, scoring_json)),
        Step("monitor_overhead", monitor, 180 * slow, partial(summarize_monitor, monitor_json)),
    ]


def parse_train_metrics(output: str) -> dict:
    """The Trainer's end-of-training metrics from its printed logs (the last `{'train_runtime': ...}` dict).

    Returns:
        `train_runtime` (s), `train_steps_per_second`, `train_samples_per_second`, `train_loss` and `epoch`
        as floats, those that were printed; `{}` when training never finished.
    """
    start = output.rfind("{'train_runtime'")
    if start < 0:
        return {}
    logs = ast.literal_eval(output[start : output.index("}", start) + 1])
    return {key: float(value) for key, value in logs.items() if key in (*TRAIN_KEYS, "epoch")}


def summarize_scoring(path: Path, output: str = "") -> dict:
    """Key numbers of scoring_cost.py's JSON: per kind, seconds, tokens/s and time over a full forward pass."""
    result = json.loads(Path(path).read_text())
    kinds = {}
    for row in result["rows"]:
        kinds[row["kind"]] = {k: row.get(k) for k in ("seconds", "tokens_per_s", "over_full_forward")}
        if "peak_cuda_above_base_mb" in row:
            kinds[row["kind"]]["peak_cuda_above_base_mb"] = row["peak_cuda_above_base_mb"]
    return {"n_tokens": result["n_tokens"], "kinds": kinds}


def summarize_monitor(path: Path, output: str = "") -> dict:
    """Key numbers of monitor_overhead.py's JSON: median step times without and with the callback, overhead."""
    result = json.loads(Path(path).read_text())
    rounds = result["rounds"]
    plain = sorted(r["plain_step_s"] for r in rounds)[len(rounds) // 2]
    guarded = sorted(r["guarded_step_s"] for r in rounds)[len(rounds) // 2]
    summary = {
        "plain_step_s": plain,
        "guarded_step_s": guarded,
        "overhead": guarded / plain - 1,
        "callback_s_per_step": max(r["callback_s_per_step"] for r in rounds),
        "peak_rss_above_base_mb": result["memory_mb"],
    }
    if "cuda_memory_mb" in result:
        summary["peak_cuda_above_base_mb"] = result["cuda_memory_mb"]
    return summary


def run_step(step: Step, timeout_s: float, log_path: Path) -> dict:
    """Run one step in its own process group, killed with its children (torchrun workers) at `timeout_s`.

    Returns:
        The step's record: `command`, `returncode` (None if it timed out), `wall_s`, `timed_out`, `key_numbers`,
        and `output_tail` when it failed. The full output goes to `log_path`.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    process = subprocess.Popen(
        step.argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timed_out = False
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    wall_s = time.perf_counter() - start
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(output)

    record = {
        "command": " ".join(step.argv).replace(sys.executable, "python"),
        "returncode": None if timed_out else process.returncode,
        "wall_s": round(wall_s, 2),
        "timeout_s": round(timeout_s, 1),
        "timed_out": timed_out,
        "log": str(log_path),
        "key_numbers": {},
    }
    if record["returncode"] == 0:
        try:
            record["key_numbers"] = step.summarize(output)
        except (OSError, ValueError, KeyError, SyntaxError) as error:  # it ran, but its numbers are not readable
            record["summary_error"] = f"{type(error).__name__}: {error}"
    if not passed(record):
        record["output_tail"] = output[-TAIL_CHARS:]
    return record


def passed(record: dict) -> bool:
    """A step passed when it exited 0 in time and its key numbers were read."""
    return record["returncode"] == 0 and "summary_error" not in record


def environment() -> dict:
    """The machine and the versions the numbers belong to."""
    import torch

    info = {"python": platform.python_version(), "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info |= {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for package in ("torch", "transformers", "trl", "accelerate", "peft", "sae-lens", "geoguard"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def _format_numbers(numbers: dict) -> str:
    """A table cell: the numbers a reader looks at first, not the whole record."""
    if "train_steps_per_second" in numbers:
        return (
            f"{numbers['train_steps_per_second']:.2f} steps/s, {numbers.get('train_samples_per_second', 0):.1f} "
            f"samples/s, train_runtime {numbers['train_runtime']:.1f} s"
        )
    if "kinds" in numbers:
        cells = [
            f"{kind}: {k['seconds']:.2f} s ({k['tokens_per_s']:.0f} tok/s, {k['over_full_forward']:.2f}x)"
            for kind, k in numbers["kinds"].items()
        ]
        return f"{numbers['n_tokens']} tokens; " + "; ".join(cells)
    if "overhead" in numbers:
        text = (
            f"step {numbers['plain_step_s']:.3f} s without, {numbers['guarded_step_s']:.3f} s with the callback "
            f"({numbers['overhead']:+.1%})"
        )
        if "peak_cuda_above_base_mb" in numbers:
            cuda = numbers["peak_cuda_above_base_mb"]
            text += f"; peak GPU memory {cuda['plain']:.0f} / {cuda['guarded']:.0f} MB"
        return text
    return ""


def markdown_report(report: dict) -> str:
    """`gpu_checks.md`: the machine, one table row per step, and the output tail of each failed step."""
    env = report["environment"]
    lines = [
        f"# GPU checks{' (smoke sizes)' if report['smoke'] else ''}",
        "",
        f"{env['device']}; CUDA {env.get('cuda', '-')}; torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {env['trl']}, accelerate {env['accelerate']}; total {report['total_wall_s']:.0f} s.",
        "",
        "| step | rc | wall (s) | key numbers | command |",
        "|---|---|---|---|---|",
    ]
    for name, step in report["steps"].items():
        rc = "timeout" if step.get("timed_out") else step["returncode"]
        rc = f"{rc} (numbers unreadable: {step['summary_error']})" if "summary_error" in step else rc
        command = f"`{step['command']}`" if step.get("command") else step.get("skipped", "")
        lines.append(f"| {name} | {rc} | {step['wall_s']:.1f} | {_format_numbers(step['key_numbers'])} | {command} |")
    for name, step in report["steps"].items():
        if step.get("output_tail"):
            lines += ["", f"## {name}: output tail", "", "```", step["output_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def default_output_json(environ: dict) -> Path:
    """`$OUT/gpu_checks.json` when `$OUT` is set, else outputs/gpu_checks/gpu_checks.json."""
    root = Path(environ["OUT"]) if environ.get("OUT") else REPO / "outputs" / "gpu_checks"
    return root / "gpu_checks.json"


def check_device(allow_cpu: bool, smoke: bool) -> bool:
    """Whether CUDA is there; stop with a message when it is not and `--allow_cpu --smoke` was not given."""
    import torch

    if torch.cuda.is_available():
        return True
    if not (allow_cpu and smoke):
        raise SystemExit(
            f"No CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): these checks measure "
            "a GPU. Run them on a machine with a CUDA GPU, or pass --allow_cpu --smoke to test this script on CPU "
            "at the smallest sizes."
        )
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_json", default=None, help="default: $OUT/gpu_checks.json or outputs/gpu_checks/")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "gpu_checks"), help="where the runs write")
    parser.add_argument("--data_dir", default=None, help="offline data for scoring_cost.py (default: its own)")
    parser.add_argument(
        "--budget_s", type=float, default=None, help="wall-clock budget of the whole run (s); 450 on CUDA, 1800 on CPU"
    )
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (by name)")
    parser.add_argument("--allow_cpu", action="store_true", help="with --smoke: run on CPU to test this script")
    parser.add_argument("--smoke", action="store_true", help="every step at its smallest size")
    args = parser.parse_args()
    on_cuda = check_device(args.allow_cpu, args.smoke)

    start = time.perf_counter()
    budget_s = args.budget_s or (450 if on_cuda else 1800)
    work_dir = Path(args.work_dir).resolve()
    output_json = Path(args.output_json) if args.output_json else default_output_json(os.environ)
    steps = build_steps(on_cuda=on_cuda, smoke=args.smoke, work_dir=work_dir, data_dir=args.data_dir)
    if args.only:
        unknown = set(args.only) - {step.name for step in steps}
        if unknown:
            parser.error(f"--only {sorted(unknown)}: the steps are {[step.name for step in steps]}")
        steps = [step for step in steps if step.name in args.only]
    report = {"smoke": args.smoke, "environment": environment(), "budget_s": budget_s, "steps": {}}
    print(f"{report['environment']['device']}: {len(steps)} steps, budget {budget_s:.0f} s", flush=True)

    for i, step in enumerate(steps, 1):
        left = budget_s - (time.perf_counter() - start)
        if left < MIN_STEP_S:
            report["steps"][step.name] = {"skipped": f"budget spent ({left:.0f} s left)", "returncode": None}
            report["steps"][step.name] |= {"wall_s": 0.0, "key_numbers": {}}
            print(f"[{i}/{len(steps)}] {step.name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {step.name}: {' '.join(step.argv)}", flush=True)
        record = run_step(step, min(step.timeout_s, left), work_dir / f"{step.name}.log")
        report["steps"][step.name] = record
        outcome = "timed out" if record["timed_out"] else f"rc {record['returncode']}"
        print(f"    {outcome} in {record['wall_s']:.1f} s {json.dumps(record['key_numbers'])}", flush=True)

    report["total_wall_s"] = round(time.perf_counter() - start, 1)
    report["all_passed"] = all(passed(step) for step in report["steps"].values())
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(report, indent=2))
    markdown = markdown_report(report)
    output_json.with_suffix(".md").write_text(markdown)
    print("\n" + markdown + f"\nWritten: {output_json} and {output_json.with_suffix('.md')}")
    sys.exit(0 if report["all_passed"] else 1)


if __name__ == "__main__":
    main()
