"""The wiring: import without side effects, TRL-style configuration, and scalars reaching every reporter."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

import geoguard
from geoguard import GeoGuardConfig, GeoGuardEvalConfig, GeoGuardSAEConfig, get_geoguard_callback
from geoguard.callbacks import GeoGuardCallback
from geoguard.evaluation import EvalSettings, MisalignmentEvaluation, Question, load_questions
from geoguard.judges import Judgement
from geoguard.monitor import PROBE_DRIFT, PROBE_KEYS, PROBE_MEAN_ACT

from conftest import char_tokenizer, planted_feature_set, planted_sae, tiny_llama
from monitor_setup import guarded_trainer

IMPORT_CHECK = """
import sys
import matplotlib
matplotlib.use("svg")
import geoguard
assert "matplotlib.pyplot" not in sys.modules and "torch" not in sys.modules, "import geoguard loaded its API"
for name in geoguard.__all__:  # load every public module, as a user's script would
    getattr(geoguard, name)
print(matplotlib.get_backend(), "openai" in sys.modules, "deepspeed" in sys.modules, "matplotlib.pyplot" in sys.modules)
"""


def test_importing_geoguard_changes_no_global_state_and_loads_no_optional_dependency():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["svg", "False", "False", "False"]


def test_the_guard_dataclasses_parse_next_to_grpo_config_in_one_trl_parser(tmp_path):
    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig, GeoGuardConfig, GeoGuardEvalConfig))
    script, grpo, model, guard, evaluation = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false", "--dataset_name", "data.jsonl"]
        + ["--temperature", "0.7"]
        + ["--geoguard_eval_temperature", "0.2", "--geoguard_every_n_steps", "3", "--geoguard_eval", "true"]
        + ["--geoguard_alarm_metric", "geoguard/probe/drift_z", "--geoguard_alarm_action", "stop"]
    )
    assert grpo.temperature == 0.7 and evaluation.geoguard_eval_temperature == 0.2  # no clash
    assert guard.geoguard_every_n_steps == 3 and guard.alarms()[0].action == "stop"
    assert evaluation.settings().temperature == 0.2 and script.dataset_name == "data.jsonl"


def test_every_config_field_is_prefixed_and_documented():
    for config in (GeoGuardSAEConfig, GeoGuardConfig, GeoGuardEvalConfig):
        for field in dataclasses.fields(config):
            assert field.name.startswith("geoguard_"), field.name
            assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: GeoGuardConfig(geoguard_filter_fraction=1.5), "--geoguard_filter_fraction must be in \\[0, 1\\)"),
        (lambda: GeoGuardConfig(geoguard_alarm_metric="loss"), "is not a geoguard metric"),
        (lambda: GeoGuardEvalConfig(geoguard_judge="openai"), "needs --geoguard_judge_model"),
        (lambda: GeoGuardEvalConfig(geoguard_eval_at_start=True), "needs --geoguard_eval true"),
        (lambda: GeoGuardEvalConfig(geoguard_eval_max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_bad_settings_fail_when_parsed_with_the_field_named(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def test_get_geoguard_callback_builds_the_guard_the_config_describes(tmp_path):
    sae = planted_sae(tiny_llama())
    sae.save_model(str(tmp_path / "sae"))
    planted_feature_set(sae).save(tmp_path / "toxic")
    config = GeoGuardConfig(
        geoguard_sae=str(tmp_path / "sae"),
        geoguard_feature_set=str(tmp_path / "toxic"),
        geoguard_every_n_steps=3,
        geoguard_baseline_steps=4,
        geoguard_alarm_metric=PROBE_DRIFT,
        geoguard_alarm_threshold=0.5,
    )
    guard = get_geoguard_callback(config, char_tokenizer())
    assert isinstance(guard, GeoGuardCallback) and guard.evaluator is None
    assert (guard.every_n_steps, guard.baseline_steps, guard.batch_max_tokens) == (3, 4, 256)
    assert [(a.metric, a.threshold, a.action) for a in guard.alarms] == [(PROBE_DRIFT, 0.5, "warn")]
    assert guard.feature_set.feature_ids == planted_feature_set(sae).feature_ids


class Recorder(TrainerCallback):
    """A reporter: keeps every `logs` it receives, with the step the Trainer's state says."""

    def __init__(self):
        self.received: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.received.append((state.global_step, dict(logs)))


def test_added_with_add_to_the_guard_reaches_every_reporter_and_keeps_the_trainer_logs(tmp_path):
    trainer, guard = guarded_trainer(tmp_path, max_steps=4, callback_kwargs={"every_n_steps": 2})
    trainer.remove_callback(guard)
    recorder = Recorder()
    trainer.add_callback(recorder)
    guard.add_to(trainer)
    trainer.train()

    measured = {e["step"]: e for e in trainer.state.log_history if PROBE_MEAN_ACT in e}
    reported = {step: logs for step, logs in recorder.received if PROBE_MEAN_ACT in logs}
    assert sorted(reported) == sorted(measured) == [0, 2, 4]
    for step, logs in reported.items():
        assert set(PROBE_KEYS) <= set(logs)
        assert logs[PROBE_DRIFT] == pytest.approx(measured[step][PROBE_DRIFT])
    trainer_logs = [step for step, logs in recorder.received if "loss" in logs]
    assert trainer_logs == [1, 2, 3, 4]  # the Trainer's own loss, learning rate and grad norm at every step
    assert all("grad_norm" in logs and PROBE_MEAN_ACT not in logs for _, logs in recorder.received if "loss" in logs)


def test_added_as_a_plain_callback_the_guard_says_which_reporters_it_cannot_reach(tmp_path, caplog):
    trainer, _ = guarded_trainer(tmp_path, max_steps=1, report_to=["tensorboard"])
    trainer.args.report_to = ["tensorboard", "wandb"]  # as configured; wandb itself is not installed here
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "to send its values to wandb as well, add it with `callback.add_to(trainer)`" in caplog.text


class FixedJudge:
    name, judges_coherence = "fixed", True

    def judge(self, requests):
        return [Judgement("score", 10.0 if r.metric == "aligned" else 90.0) for r in requests]


def test_the_end_of_run_evaluation_reaches_the_reporters_before_they_close(tmp_path):
    questions = [Question("planted", ("ZQ",), load_questions()[0].judge_prompts)]
    evaluation = MisalignmentEvaluation(FixedJudge(), questions, EvalSettings(samples_per_question=2, max_new_tokens=4))
    trainer, guard = guarded_trainer(tmp_path, callback_kwargs={"evaluation": evaluation})
    trainer.remove_callback(guard)
    recorder = Recorder()
    trainer.add_callback(recorder)
    guard.add_to(trainer)
    trainer.train()
    evaluated = [(step, logs) for step, logs in recorder.received if "geoguard/eval/misaligned_rate" in logs]
    assert [step for step, _ in evaluated] == [3]
    assert evaluated[0][1]["geoguard/eval/misaligned_rate"] == 1.0  # aligned 10, coherent 90: all misaligned


def test_the_package_has_no_import_cycles_and_no_hidden_imports_of_its_own_modules():
    package = Path(geoguard.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {node for node in tree.body if isinstance(node, ast.ImportFrom)}
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        own = [node for node in imports if node.module.startswith("geoguard.")]
        assert all(node in top for node in own), f"{path.name} imports a geoguard module inside a function"
        graph[path.stem] = {node.module.removeprefix("geoguard.") for node in own}
    visiting, done = set(), set()

    def visit(module, chain):
        assert module not in visiting, f"import cycle: {' -> '.join(chain + [module])}"
        if module in done:
            return
        visiting.add(module)
        for dependency in graph.get(module, ()):
            visit(dependency, chain + [module])
        visiting.remove(module)
        done.add(module)

    for module in graph:
        visit(module, [])
