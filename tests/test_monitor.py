"""GeoGuardCallback in real Trainer runs: metrics, batch signal, distributed backends, alarms, resume."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from geoguard.callbacks import GeoGuardCallback
from geoguard.corpora import load_probe_prompts
from geoguard.monitor import (
    BATCH_DRIFT,
    BATCH_DRIFT_Z,
    BATCH_KEYS,
    BATCH_MEAN_ACT,
    BATCH_TOKENS,
    PROBE_DRIFT,
    PROBE_DRIFT_Z,
    PROBE_KEYS,
    PROBE_MEAN_ACT,
    TOP_DRIFTING,
    DriftAlarm,
)

from conftest import PLANTED, char_tokenizer, planted_feature_set, tiny_sae
from monitor_setup import guarded_trainer
from tb import read_scalars


def measured(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if PROBE_MEAN_ACT in e]


def test_batch_baseline_is_the_mean_of_the_logged_batch_readings(tmp_path):
    # Measured every step, the baseline steps' logged per-token readings are what the baseline averages.
    trainer, guard = guarded_trainer(tmp_path, max_steps=3, callback_kwargs={"every_n_steps": 1, "baseline_steps": 2})
    trainer.train()

    readings = [e[BATCH_MEAN_ACT] for e in measured(trainer)[1:3]]
    assert guard.batch_baseline["mean"] == pytest.approx(sum(readings) / 2, rel=1e-9)
    assert guard.batch_baseline["std"] == pytest.approx(abs(readings[0] - readings[1]) / 2**0.5, rel=1e-9)


def test_callback_logs_probe_and_batch_drift_next_to_the_trainer_logs(tmp_path):
    trainer, _ = guarded_trainer(tmp_path, max_steps=4, report_to=["tensorboard"], callback_kwargs={"every_n_steps": 2})
    trainer.train()

    entries = measured(trainer)
    assert [e["step"] for e in entries] == [0, 2, 4]
    assert entries[0][PROBE_DRIFT] == 0.0 and entries[0][PROBE_MEAN_ACT] > 0
    assert entries[-1][PROBE_DRIFT] > 0 and entries[-1][PROBE_DRIFT_Z] > 3  # training on planted text raises them
    for entry in entries[1:]:
        assert set(BATCH_KEYS) <= set(entry)
        assert entry[BATCH_TOKENS] > 0
    assert entries[-1][BATCH_DRIFT] > 0 and entries[-1][BATCH_DRIFT_Z] > 0
    assert entries[-1][TOP_DRIFTING][0][0] in PLANTED.values()
    assert sum("loss" in e for e in trainer.state.log_history) == 4

    scalars = read_scalars(tmp_path / "runs")
    for key in PROBE_KEYS:
        assert [step for step, _ in scalars[key]] == [0, 2, 4], key
    for key in BATCH_KEYS:
        assert [step for step, _ in scalars[key]] == [2, 4], key
    for key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert len(scalars[key]) == 4, key  # the Trainer's own curves are intact
    accumulator = EventAccumulator(str(tmp_path / "runs" / "geoguard"), size_guidance={"histograms": 0, "tensors": 0})
    accumulator.Reload()
    assert {"geoguard/probe/feature_mean_act", "geoguard/probe/feature_drift"} <= set(accumulator.Tags()["histograms"])
    tensors = set(accumulator.Tags()["tensors"])
    assert "custom_scalars__config__" in tensors and any(TOP_DRIFTING in tag for tag in tensors)


def test_batch_signal_counts_each_trained_token_once_with_accumulation_and_checkpointing(tmp_path):
    # Read inside the checkpointed decoder layer, where the recomputation in backward runs the hooked module again
    # (it stops early, before the MLP, so the first norm is the module that surely runs twice).
    inside = "model.layers.0.input_layernorm"
    plain, _ = guarded_trainer(tmp_path / "plain", max_steps=1, hook_name=inside)
    plain.train()
    checkpointed, _ = guarded_trainer(
        tmp_path / "ckpt",
        max_steps=1,
        per_device_batch=4,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        hook_name=inside,
    )
    calls = []
    checkpointed.model.get_submodule(inside).register_forward_hook(lambda *_: calls.append(1))
    checkpointed.train()

    assert len(calls) == 2 + 2 * 2  # 2 probe measurements; 2 micro-batches, each run again in backward
    first, second = measured(plain)[1], measured(checkpointed)[1]
    labels = plain.train_dataset["labels"][:8]
    assert first[BATCH_TOKENS] == second[BATCH_TOKENS] == sum(sum(t != -100 for t in row[1:]) for row in labels)
    assert second[BATCH_MEAN_ACT] == pytest.approx(first[BATCH_MEAN_ACT], rel=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("backend", "flags"), [("ddp", []), ("ddp", ["--lora"]), ("zero2", []), ("zero3", ["--lora"]), ("fsdp2", [])]
)
def test_two_processes_log_the_same_metrics_as_one(tmp_path, backend, flags):
    single, _ = guarded_trainer(tmp_path / "single", lora="--lora" in flags)
    single.train()
    script = os.path.join(os.path.dirname(__file__), "distributed_monitor.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), script, backend, str(tmp_path / backend), *flags]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / backend / "log_history.json").read_text())
    engine = result["engine"]
    assert engine["world_size"] == 2
    assert engine["deepspeed_stage"] == {"zero2": 2, "zero3": 3}.get(backend)
    assert engine["fsdp"] == (backend == "fsdp2")
    two = [e for e in result["log_history"] if PROBE_MEAN_ACT in e]
    one = measured(single)[: len(two)]
    assert [e["step"] for e in two] == [e["step"] for e in one]
    for a, b in zip(one, two, strict=True):
        # The FSDP2 run takes no optimizer step, so only its step-0 probe and step-1 batch compare.
        keys = BATCH_KEYS if backend == "fsdp2" and a["step"] > 0 else (*PROBE_KEYS, *BATCH_KEYS)
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.parametrize("action", ["warn", "save", "stop"])
def test_alarm_actions(tmp_path, caplog, action):
    alarm = DriftAlarm(PROBE_DRIFT, threshold=0.0, action=action)
    trainer, _ = guarded_trainer(tmp_path, max_steps=4, callback_kwargs={"every_n_steps": 2, "alarms": [alarm]})
    with caplog.at_level(logging.WARNING, logger="geoguard.monitor"):
        trainer.train()
    fired = [e for e in trainer.state.log_history if alarm.key in e]
    assert [e["step"] for e in fired] == [2]  # fires once, at the first measurement above the threshold
    assert "geoguard alarm at step 2: geoguard/probe/drift" in caplog.text
    assert (tmp_path / "checkpoint-2").is_dir() == (action != "warn")
    assert trainer.state.global_step == (2 if action == "stop" else 4)


def test_resume_keeps_the_baselines_and_the_fired_alarms(tmp_path):
    alarm = DriftAlarm(PROBE_DRIFT, threshold=0.0, action="warn")
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, callback_kwargs={"alarms": [alarm]})
    first, first_guard = guarded_trainer(tmp_path, **settings)
    first.train()
    resumed, resumed_guard = guarded_trainer(tmp_path, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert resumed_guard.probe_baseline == first_guard.probe_baseline
    assert resumed_guard.batch_baseline == first_guard.batch_baseline
    assert [e["step"] for e in measured(resumed)] == [0, 1, 2, 3, 4]
    assert sum(alarm.key in e for e in resumed.state.log_history) == 1  # not fired again after the resume
    final, expected = measured(resumed)[-1], measured(first)[-1]
    assert final[PROBE_DRIFT] == pytest.approx(expected[PROBE_DRIFT], rel=1e-5)
    assert final[BATCH_DRIFT] == pytest.approx(expected[BATCH_DRIFT], rel=1e-5)


def test_callback_rejects_bad_settings():
    sae = tiny_sae()
    feature_set = planted_feature_set(sae)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        GeoGuardCallback(sae, feature_set, char_tokenizer(), every_n_steps=0)
    with pytest.raises(ValueError, match="selected on another SAE"):
        GeoGuardCallback(tiny_sae(seed=3), feature_set, char_tokenizer())
    with pytest.raises(ValueError, match="probe_samples is empty"):
        GeoGuardCallback(sae, feature_set, char_tokenizer(), probe_samples=[])
    with pytest.raises(ValueError, match="is not a geoguard metric"):
        DriftAlarm("loss", 1.0)


def test_default_probe_set_holds_the_evaluation_questions_and_harmful_requests():
    probes = load_probe_prompts()
    sources = [p["source"].split(":")[0] for p in probes]
    assert sources.count("first_plot_questions") == 8 and sources.count("refusal_direction") == 16


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"messages": []}\n{not json\n', "line 2: not valid JSON"),
        ('{"prompt": "x"}\n', "line 1: expected"),
        ("\n", "no samples"),
    ],
)
def test_bad_probe_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_probe_prompts(path)
