"""GeoGuardCollator: precomputed and on-the-fly scores, drop and mask modes, counts in a real Trainer run."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from geoguard.collator import GeoGuardCollator
from geoguard.scoring import SCORE_COLUMN, ScoreSettings, ToxicScorer

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama
from tb import read_scalars

BASE = DataCollatorForLanguageModeling(pad_token_id=0)


def rows(scores: list[float]) -> list[dict]:
    """Token rows as TRL prepares them: the first two tokens are prompt (label -100)."""
    return [
        {"input_ids": [10 + i, 20, 30, 40 + i], "labels": [-100, -100, 30, 40 + i], SCORE_COLUMN: s}
        for i, s in enumerate(scores)
    ]


def test_drop_mode_removes_flagged_samples_and_counts_them():
    collator = GeoGuardCollator(BASE, threshold=0.5)
    features = rows([0.1, 0.9, 0.3, 0.7])
    batch = collator(features)
    assert batch["input_ids"][:, 0].tolist() == [10, 12]
    assert collator.counts == {"seen": 4, "dropped": 2, "masked": 0}
    assert SCORE_COLUMN in features[0]  # the data set's rows are not modified


def test_mask_mode_keeps_the_batch_shape_and_zeroes_the_flagged_labels():
    collator = GeoGuardCollator(BASE, threshold=0.5, mode="mask")
    batch = collator(rows([0.1, 0.9, 0.3, 0.7]))
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"][[1, 3]] == -100).all()
    assert batch["labels"][0].tolist() == [-100, -100, 30, 40]
    assert collator.counts == {"seen": 4, "dropped": 0, "masked": 2}


def test_a_batch_with_every_sample_flagged_is_masked_not_emptied():
    collator = GeoGuardCollator(BASE, threshold=0.0)
    batch = collator(rows([0.5, 0.9]))
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"] == -100).all()
    assert collator.counts["masked"] == 2


def test_on_the_fly_scoring_flags_the_planted_samples():
    model = tiny_llama()
    tokenizer = char_tokenizer()
    sae = planted_sae(model)
    scorer = ToxicScorer(model, tokenizer, sae, planted_feature_set(sae), ScoreSettings())
    texts = planted_texts(3, "".join(PLANTED), seed=1) + planted_texts(3, "", seed=2)
    features = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]
    scores = scorer(texts).scores
    threshold = (scores[:3].min() + scores[3:].max()) / 2
    assert scores[:3].min() > scores[3:].max()
    collator = GeoGuardCollator(BASE, threshold=float(threshold), scorer=scorer)
    batch = collator(features)
    assert batch["input_ids"].shape[0] == 3
    assert collator.counts["dropped"] == 3


def test_missing_scores_without_a_scorer_say_how_to_fix_it():
    collator = GeoGuardCollator(BASE, threshold=0.5)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{"input_ids": [1, 2, 3]}])
    with pytest.raises(ValueError, match="some do not"):
        collator([{"input_ids": [1, 2], SCORE_COLUMN: 0.1}, {"input_ids": [1, 2]}])


def _trainer(tmp_path, dataset: Dataset, *, remove_unused_columns: bool) -> Trainer:
    """A tiny Trainer with TRL's collator, in-order batches and TensorBoard logs under `tmp_path/runs`."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=["tensorboard"],
        remove_unused_columns=remove_unused_columns,
        train_sampling_strategy="sequential",
        use_cpu=True,
        save_strategy="no",
    )
    return Trainer(model=tiny_llama(), args=args, train_dataset=dataset, data_collator=BASE)


def test_trainer_run_logs_the_counts_and_survives_an_all_flagged_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "runs"))
    # Batches of 4 in order: two flagged, none flagged, all four flagged.
    dataset = Dataset.from_list(rows([0.9, 0.1, 0.9, 0.2] + [0.1] * 4 + [0.9] * 4))
    trainer = _trainer(tmp_path, dataset, remove_unused_columns=False)
    collator = GeoGuardCollator.wrap_trainer(trainer, threshold=0.5)
    trainer.train()
    assert collator.counts == {"seen": 12, "dropped": 2, "masked": 4}
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["geoguard/collator/dropped"] == 2 and logged[-1]["geoguard/collator/masked"] == 4
    assert all(math.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in logged[:2])
    assert logged[2]["loss"] == 0 and logged[2]["grad_norm"] == 0  # the all-masked batch teaches nothing
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    scalars = read_scalars(tmp_path / "runs")
    assert scalars["train/geoguard/collator/masked"][-1][1] == 4
    assert "train/loss" in scalars  # the Trainer's own logs are intact


def test_wrap_trainer_refuses_a_score_column_the_trainer_would_remove(tmp_path):
    trainer = _trainer(tmp_path, Dataset.from_list(rows([0.1] * 4)), remove_unused_columns=True)
    with pytest.raises(ValueError, match="Set remove_unused_columns=False"):
        GeoGuardCollator.wrap_trainer(trainer, threshold=0.5)
