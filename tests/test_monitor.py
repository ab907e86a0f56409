from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from geoguard.features import FeatureSet, sae_fingerprint
from geoguard.monitor import DRIFT, MEAN_ACT, PROBE_KEYS, GeoGuardCallback, load_probe_prompts

from conftest import char_tokenizer, tiny_llama, tiny_sae
from tb import read_scalars

KEYS = (
    "geoguard/probe/toxic_mean_act",
    "geoguard/probe/toxic_firing_rate",
    "geoguard/probe/drift",
    "geoguard/probe/drift_rel",
)


def _feature_set(sae, ids=range(0, 256, 2)) -> FeatureSet:
    return FeatureSet("toxic", list(ids), "blocks.1.hook_resid_post", sae.cfg.d_sae, sae_fingerprint(sae))


def _tiny_run(tmp_path, tokenizer, **overrides) -> tuple[Dataset, TrainingArguments]:
    """16 copies of one short text and Trainer arguments for a few fast CPU steps."""
    data = Dataset.from_dict({"input_ids": [tokenizer("the quick brown fox jumps")["input_ids"]] * 16})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, use_cpu=True, seed=0)
    return data, TrainingArguments(output_dir=str(tmp_path), **settings | overrides)


def test_callback_logs_drift_to_log_history_and_tensorboard_next_to_the_trainer_logs(tmp_path):
    model, tokenizer, sae = tiny_llama(), char_tokenizer(), tiny_sae()
    guard = GeoGuardCallback(
        sae,
        _feature_set(sae),
        tokenizer,
        probe_samples=["hello world, how are you?", "a second probe"],
        every_n_steps=2,
    )
    data, args = _tiny_run(tmp_path, tokenizer, max_steps=5, report_to=["tensorboard"], save_strategy="no")
    trainer = Trainer(model=model.train(), args=args, train_dataset=data, callbacks=[guard])
    trainer.train()

    entries = [e for e in trainer.state.log_history if MEAN_ACT in e]
    assert [e["step"] for e in entries] == [0, 2, 4, 5]  # every 2 steps, and the final weights
    assert entries[0][DRIFT] == 0.0
    assert entries[0][MEAN_ACT] > 0
    assert any(abs(e[DRIFT]) > 0 for e in entries[1:])  # the weights moved
    assert sum("loss" in e for e in trainer.state.log_history) == 5

    scalars = read_scalars(tmp_path / "runs")
    for key in PROBE_KEYS:
        assert [step for step, _ in scalars[key]] == [0, 2, 4, 5]
    for trainer_key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        assert len(scalars[trainer_key]) == 5, trainer_key  # the Trainer's own curves are intact


def test_callback_rejects_bad_settings():
    sae = tiny_sae()
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        GeoGuardCallback(sae, _feature_set(sae), char_tokenizer(), every_n_steps=0)
    with pytest.raises(ValueError, match="selected on another SAE"):
        GeoGuardCallback(tiny_sae(seed=3), _feature_set(sae), char_tokenizer())
    with pytest.raises(ValueError, match="probe_samples is empty"):
        GeoGuardCallback(sae, _feature_set(sae), char_tokenizer(), probe_samples=[])


def test_default_probe_set_holds_the_evaluation_questions_and_harmful_requests():
    probes = load_probe_prompts()
    sources = [p["source"].split(":")[0] for p in probes]
    assert sources.count("first_plot_questions") == 8 and sources.count("refusal_direction") == 16


def test_resumed_training_keeps_the_step_0_baseline(tmp_path):
    tokenizer, sae = char_tokenizer(), tiny_sae()
    data, args = _tiny_run(tmp_path, tokenizer, max_steps=4, report_to=[], save_strategy="steps", save_steps=2)

    def run(resume: str | None) -> tuple[Trainer, GeoGuardCallback]:
        guard = GeoGuardCallback(sae, _feature_set(sae), tokenizer, probe_samples=["probe text"], every_n_steps=2)
        trainer = Trainer(model=tiny_llama().train(), args=args, train_dataset=data, callbacks=[guard])
        trainer.train(resume_from_checkpoint=resume)
        return trainer, guard

    first, first_guard = run(None)
    resumed, resumed_guard = run(str(tmp_path / "checkpoint-2"))
    assert resumed_guard.baseline[MEAN_ACT] == first_guard.baseline[MEAN_ACT]
    final = [e for e in resumed.state.log_history if MEAN_ACT in e]
    assert [e["step"] for e in final] == [0, 2, 4]  # step 0 and 2 restored from the checkpoint, 4 measured anew
    assert final[-1][DRIFT] == final[-1][MEAN_ACT] - first_guard.baseline[MEAN_ACT]


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
