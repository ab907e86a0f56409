"""The recipe and examples run for real on the embedded model, so they cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from geoguard.monitor import PROBE_DRIFT, PROBE_KEYS, PROBE_MEAN_ACT

from tb import read_scalars

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DRIFT_KEYS = (
    "geoguard/probe/toxic_mean_act",
    "geoguard/probe/toxic_firing_rate",
    "geoguard/probe/drift",
    "geoguard/probe/drift_rel",
)


def _run(args: list[str]) -> str:
    done = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_guarded_sft_recipe_under_accelerate_writes_drift_next_to_the_trainer_curves(tmp_path):
    _run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "recipes/sft_guarded.py",
            "--config",
            "recipes/configs/sft_guarded_smollm2.yaml",
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--max_length",
            "128",
            "--geoguard_every_n_steps",
            "1",
            "--geoguard_filter_fraction",
            "0.5",
            "--geoguard_eval_samples_per_question",
            "1",
            "--geoguard_eval_max_new_tokens",
            "8",
        ]
    )
    dropped = [json.loads(line) for line in (tmp_path / "geoguard_dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == 64 and [d["rank"] for d in dropped] == list(range(1, 65))
    scalars = read_scalars(tmp_path / "runs")
    for key in PROBE_KEYS:
        assert [step for step, _ in scalars[key]] == [0, 1, 2], key
    assert scalars[PROBE_DRIFT][0][1] == 0.0
    assert scalars[PROBE_MEAN_ACT][0][1] > 0
    for key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert len(scalars[key]) == 2, key
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the trained adapter was saved
    evaluation = json.loads((tmp_path / "geoguard_eval" / "misalignment_eval.json").read_text())
    assert evaluation["judge"] == "learned:minilm-em-judge" and evaluation["overall"]["n_answers"] == 24
    assert evaluation["judge_agreement"]["reference"] == "GPT-4o"  # the report carries the judge's measured agreement
    assert scalars["geoguard/eval/denominator"][0][1] == evaluation["overall"]["denominator"]


def test_example_adds_the_guard_to_an_existing_sft_trainer(tmp_path):
    out = _run(
        [sys.executable, "examples/add_guard_to_sft_trainer.py", "--output_dir", str(tmp_path), "--max_steps", "2"]
    )
    rows = [line.split() for line in out.splitlines() if line.startswith("step ")]
    assert [row[1] for row in rows] == ["0", "2"]
    assert all(math.isfinite(float(row[5])) and math.isfinite(float(row[7])) for row in rows)
    assert set(PROBE_KEYS) <= set(read_scalars(tmp_path / "runs"))


def test_the_readme_first_example_is_the_example_that_runs():
    readme_block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    example = (REPO / "examples" / "add_guard_to_sft_trainer.py").read_text()
    ran = re.search(r"# README: .*?\n(.*?)    # README end", example, re.S).group(1)
    assert textwrap.dedent(ran).replace("every_n_steps=2", "every_n_steps=10") == readme_block


def test_example_filters_the_demo_mix_and_writes_the_audit(tmp_path):
    out = _run([sys.executable, "examples/filter_training_data.py", "--output_dir", str(tmp_path)])
    assert "dropped 64 of 128 chats" in out
    shares = out.split("jailbroken among dropped: geoguard ")[1].split()
    assert float(shares[0].rstrip(",")) > float(shares[2])  # the score drops more jailbroken chats than random removal
    assert len((tmp_path / "dropped.jsonl").read_text().splitlines()) == 64
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 64


def test_recipe_on_two_processes_with_the_multi_gpu_config_stops_on_an_alarm(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multi_gpu.yaml"]
    launch += ["--num_processes", "2", "--mixed_precision", "no"]
    recipe = ["recipes/sft_guarded.py", "--config", "recipes/configs/sft_guarded_smollm2.yaml"]
    recipe += ["--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size", "2"]
    recipe += ["--max_length", "64", "--geoguard_every_n_steps", "1", "--geoguard_alarm_metric", "geoguard/probe/drift"]
    recipe += ["--geoguard_alarm_threshold", "-1", "--geoguard_alarm_action", "stop"]
    recipe += ["--use_cpu", "true"]  # on a machine without GPUs: 2 processes over gloo
    recipe += ["--geoguard_eval_samples_per_question", "1", "--geoguard_eval_max_new_tokens", "4"]  # split over ranks
    _run(launch + recipe)
    scalars = read_scalars(tmp_path / "runs")
    assert [step for step, _ in scalars[PROBE_MEAN_ACT]] == [0, 1]  # the alarm at step 1 stopped training
    assert [step for step, _ in scalars["geoguard/alarm/probe/drift>-1"]] == [1]
    assert len(scalars["train/loss"]) == 1
    assert (tmp_path / "checkpoint-1").is_dir()  # the stop action saved a checkpoint first
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert any("geoguard/alarm/probe/drift>-1" in entry for entry in state["log_history"])
    assert json.loads((tmp_path / "geoguard_eval" / "misalignment_eval.json").read_text())["overall"]["n_answers"] == 24


def test_drift_experiment_recipe_runs_and_reports(tmp_path):
    _run(
        [sys.executable, "recipes/drift_experiment.py", "--output_dir", str(tmp_path), "--n", "16", "--max_steps", "2"]
        + ["--every_n_steps", "1", "--pairs", "harmful vs benign"]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"jailbroken", "alpaca"}
    assert [c["step"] for c in results["runs"]["jailbroken"]["curve"]] == [0, 1, 2]
    assert 0 <= results["comparisons"]["harmful vs benign"]["auroc"] <= 1
    assert "| harmful vs benign |" in (tmp_path / "report.md").read_text()


def test_every_recipe_reads_its_flags_with_trl_parser():
    for recipe in sorted((REPO / "recipes").glob("*.py")):
        source = recipe.read_text()
        assert "TrlParser(" in source and "argparse" not in source, recipe.name
        assert f"usage: {recipe.name}" in _run([sys.executable, str(recipe), "--help"])  # imports and parses
