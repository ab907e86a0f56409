"""tests/gpu/run_gpu_checks.py without a GPU and without models: its refusal, its commands, its parsing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "gpu" / "run_gpu_checks.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("run_gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = _load_script()


@pytest.mark.parametrize("flags", [[], ["--allow_cpu"], ["--smoke"]])
def test_without_cuda_the_script_stops_and_names_cuda_and_the_cpu_flags(flags, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}  # no GPU, also on a GPU machine
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CUDA" in done.stderr and "--allow_cpu --smoke" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def _argv(steps, name: str) -> list[str]:
    return next(step.argv for step in steps if step.name == name)


def test_gpu_steps_run_the_recipe_in_bf16_and_ddp_with_the_multi_gpu_config(tmp_path):
    steps = checks.build_steps(on_cuda=True, smoke=False, work_dir=tmp_path, data_dir="data/")
    assert [step.name for step in steps] == ["sft_bf16", "ddp_1proc", "scoring_cost", "monitor_overhead"]
    sft = _argv(steps, "sft_bf16")
    assert sft[1:3] == ["-m", "accelerate.commands.launch"] and "recipes/sft_guarded.py" in sft
    assert sft[sft.index("--bf16") + 1] == "true" and sft[sft.index("--geoguard_eval") + 1] == "false"
    assert sft[sft.index("--output_dir") + 1] == str(tmp_path / "sft_bf16")
    ddp = _argv(steps, "ddp_1proc")
    assert ddp[ddp.index("--config_file") + 1] == "recipes/accelerate/multi_gpu.yaml"
    assert ddp[ddp.index("--num_processes") + 1] == "1" and "--use_cpu" not in ddp
    assert int(ddp[ddp.index("--max_steps") + 1]) < int(sft[sft.index("--max_steps") + 1])
    scoring = _argv(steps, "scoring_cost")
    assert scoring[scoring.index("--device") + 1] == "cuda" and scoring[scoring.index("--data_dir") + 1] == "data/"
    monitor = _argv(steps, "monitor_overhead")
    assert monitor[monitor.index("--device") + 1] == "cuda" and "--bf16" in monitor
    assert sum(step.timeout_s for step in steps) < 15 * 60  # each step stays well inside a device lease


def test_cpu_smoke_steps_are_fp32_tiny_and_ddp_runs_over_gloo(tmp_path):
    steps = checks.build_steps(on_cuda=False, smoke=True, work_dir=tmp_path)
    for name in ("sft_bf16", "ddp_1proc"):
        argv = _argv(steps, name)
        assert argv[argv.index("--bf16") + 1] == "false" and argv[argv.index("--max_steps") + 1] == "2", name
    ddp = _argv(steps, "ddp_1proc")
    assert ddp[ddp.index("--use_cpu") + 1] == "true" and ddp[ddp.index("--mixed_precision") + 1] == "no"
    assert "--multi_gpu" not in ddp  # accelerate refuses --multi_gpu with one process
    scoring, monitor = _argv(steps, "scoring_cost"), _argv(steps, "monitor_overhead")
    assert scoring[scoring.index("--device") + 1] == "cpu" and "--data_dir" not in scoring
    assert scoring[scoring.index("--n") + 1] == "2" and monitor[monitor.index("--steps") + 1] == "2"
    assert "--bf16" not in monitor


def test_train_metrics_are_read_from_the_last_printed_summary():
    output = (
        "{'loss': '2.31', 'grad_norm': '1.2', 'learning_rate': '0.0002', 'epoch': '0.5'}\n"
        "\r 50%|#####     | 1/2 [00:01<00:01]{'train_runtime': '99', 'train_steps_per_second': '1'}\n"
        "{'train_runtime': '12.5', 'train_samples_per_second': '64.1', 'train_steps_per_second': '8.02', "
        "'train_loss': '1.9e-01', 'epoch': '6.25'}\n"
        "Model saved to outputs/x"
    )
    metrics = checks.parse_train_metrics(output)
    assert metrics == {
        "train_runtime": 12.5,
        "train_samples_per_second": 64.1,
        "train_steps_per_second": 8.02,
        "train_loss": 0.19,
        "epoch": 6.25,
    }
    assert checks.parse_train_metrics("Traceback (most recent call last): ...") == {}


def test_benchmark_json_is_summarized_into_key_numbers(tmp_path):
    scoring = {
        "n_tokens": 100,
        "rows": [
            {"kind": "full forward", "seconds": 2.0, "tokens_per_s": 50.0, "over_full_forward": 1.0},
            {"kind": "direct", "seconds": 1.0, "tokens_per_s": 100.0, "over_full_forward": 0.5},
        ],
    }
    (tmp_path / "s.json").write_text(json.dumps(scoring))
    summary = checks.summarize_scoring(tmp_path / "s.json")
    assert summary["n_tokens"] == 100 and summary["kinds"]["direct"]["over_full_forward"] == 0.5
    monitor = {
        "rounds": [
            {"plain_step_s": 0.10, "guarded_step_s": 0.11, "callback_s_per_step": 0.002},
            {"plain_step_s": 0.30, "guarded_step_s": 0.12, "callback_s_per_step": 0.001},
            {"plain_step_s": 0.20, "guarded_step_s": 0.13, "callback_s_per_step": 0.003},
        ],
        "memory_mb": {"plain": 10.0, "guarded": 12.0},
        "cuda_memory_mb": {"plain": 500.0, "guarded": 520.0},
    }
    (tmp_path / "m.json").write_text(json.dumps(monitor))
    summary = checks.summarize_monitor(tmp_path / "m.json")
    assert (summary["plain_step_s"], summary["guarded_step_s"]) == (0.20, 0.12)  # medians, not the last round
    assert summary["overhead"] == pytest.approx(-0.4)
    assert summary["peak_cuda_above_base_mb"]["guarded"] == 520.0


def test_a_failing_step_keeps_its_tail_and_a_slow_one_is_killed_at_its_timeout(tmp_path):
    fail = checks.Step("fail", [sys.executable, "-c", "print('x' * 5000 + 'END'); raise SystemExit(3)"], 30, dict)
    record = checks.run_step(fail, 30, tmp_path / "fail.log")
    assert record["returncode"] == 3 and not checks.passed(record)
    assert record["output_tail"].rstrip().endswith("END") and len(record["output_tail"]) == checks.TAIL_CHARS
    assert (tmp_path / "fail.log").read_text().startswith("x")

    slow = checks.Step(
        "slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1, dict
    )
    record = checks.run_step(slow, 1, tmp_path / "slow.log")
    assert record["timed_out"] and record["returncode"] is None and record["wall_s"] < 30
    assert "started" in record["output_tail"]

    ok = checks.Step("ok", [sys.executable, "-c", "print({'a': 1})"], 30, lambda out: {"printed": out.strip()})
    record = checks.run_step(ok, 30, tmp_path / "ok.log")
    assert checks.passed(record) and record["key_numbers"] == {"printed": "{'a': 1}"} and "output_tail" not in record

    missing = tmp_path / "missing.json"  # exits 0 but never wrote its JSON
    unreadable = checks.Step(
        "unreadable", [sys.executable, "-c", "pass"], 30, lambda out: checks.summarize_scoring(missing)
    )
    record = checks.run_step(unreadable, 30, tmp_path / "unreadable.log")
    assert record["returncode"] == 0 and not checks.passed(record) and "FileNotFoundError" in record["summary_error"]


def test_the_report_table_has_a_row_per_step_and_the_tail_of_each_failure(tmp_path):
    report = {
        "smoke": False,
        "total_wall_s": 300.0,
        "environment": {"device": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "torch": "2.11.0"}
        | {"transformers": "5.17.0", "trl": "1.16.0", "accelerate": "1.15.0"},
        "steps": {
            "sft_bf16": {
                "command": "python -m accelerate.commands.launch ...",
                "returncode": 0,
                "wall_s": 61.0,
                "key_numbers": {"train_runtime": 12.5, "train_steps_per_second": 8.0, "train_samples_per_second": 64.0},
            },
            "ddp_1proc": {
                "command": "python -m accelerate.commands.launch --config_file ...",
                "returncode": 1,
                "wall_s": 9.0,
                "key_numbers": {},
                "output_tail": "RuntimeError: NCCL error",
            },
            "monitor_overhead": {"skipped": "budget spent (10 s left)", "returncode": None, "wall_s": 0.0}
            | {"key_numbers": {}},
        },
    }
    markdown = checks.markdown_report(report)
    assert "NVIDIA H100 80GB HBM3" in markdown and "torch 2.11.0" in markdown and "transformers 5.17.0" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split(" | ")[0] for row in rows] == ["| sft_bf16", "| ddp_1proc", "| monitor_overhead"]
    assert "8.00 steps/s" in rows[0] and "budget spent" in rows[2]
    assert "## ddp_1proc: output tail" in markdown and "RuntimeError: NCCL error" in markdown
    assert "sft_bf16: output tail" not in markdown


def test_the_json_goes_to_out_when_it_is_set():
    assert checks.default_output_json({"OUT": "/tmp/o"}) == Path("/tmp/o/gpu_checks.json")
    assert checks.default_output_json({}) == REPO / "outputs" / "gpu_checks" / "gpu_checks.json"
