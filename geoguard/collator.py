"""`GeoGuardCollator`: drop or mask training samples that score above a threshold, batch by batch.

It wraps any data collator (TRL's `DataCollatorForLanguageModeling` included). Each sample's score is
read from a precomputed `geoguard_score` field (see `geoguard.scoring.score_dataset`) or, when the
samples carry none, computed on the fly from their token ids with a `ToxicScorer`.

Filtering the data set beforehand (`geoguard filter`, `filter_dataset`) is the better choice when you
can: batches keep a constant size, every dropped sample is in an audit file, and scoring runs once.
The collator is for data that streams or changes, or to try thresholds without rewriting the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from transformers import Trainer, TrainerCallback

from geoguard.data import TokenizedSample
from geoguard.scoring import SCORE_COLUMN, ToxicScorer

logger = logging.getLogger(__name__)

CollatorMode = Literal["drop", "mask"]
"""`drop` removes flagged samples from the batch (smaller batches); `mask` keeps them with every label set to
-100 (weight 0 in the loss; the batch keeps its size and shapes)."""


class GeoGuardCollator:
    """Wrap a data collator so that samples scoring above `threshold` are dropped or masked.

    In `mask` mode (and in `drop` mode for a batch whose samples are all flagged, which cannot be emptied)
    a flagged sample's `labels` are set to -100 before the base collator runs, so the base collator must
    honour a `labels` field (TRL's does; transformers' `DataCollatorForLanguageModeling` rebuilds labels,
    so use `drop` with it). Fractional weights are not offered: the Trainer's loss takes no per-sample weight.

    `counts` says how many samples were seen, dropped and masked so far, in this process. The dataloader
    collates a batch or two ahead of the step being logged, and dataloader workers (`dataloader_num_workers > 0`)
    keep their own counts. `wrap_trainer` also adds them to the Trainer's logs.

    Args:
        base_collator (`Callable`): the collator to wrap, e.g. `trainer.data_collator`.
        threshold (`float`): samples scoring above it are flagged (e.g. `DropAbovePercentile(benign, 95).threshold`).
        scorer (`ToxicScorer`, *optional*): scores samples without a `geoguard_score` field from their
            `input_ids`; the response span is read from `labels != -100` (or `completion_mask` /
            `assistant_masks`), all tokens otherwise.
        mode (`CollatorMode`, defaults to `"drop"`): `drop` or `mask`.

    Raises:
        ValueError: at the first batch without scores when no scorer was given. A data set with a
            `geoguard_score` column loses it when the Trainer drops unused columns: set
            `remove_unused_columns=False` (TRL's collator reads only the token columns).

    Example:
        ```python
        train = train.add_column("geoguard_score", score_dataset(scorer, samples).scores.tolist())
        trainer = SFTTrainer(model, args=SFTConfig(..., remove_unused_columns=False), train_dataset=train)
        GeoGuardCollator.wrap_trainer(trainer, threshold=0.4)  # or GeoGuardCollator(base_collator, 0.4)
        ```
    """

    def __init__(
        self,
        base_collator: Callable[[list[dict]], Any],
        threshold: float,
        *,
        scorer: ToxicScorer | None = None,
        mode: CollatorMode = "drop",
    ):
        if mode not in ("drop", "mask"):
            raise ValueError(f"mode must be 'drop' or 'mask', got {mode!r}.")
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
        self.base_collator, self.threshold, self.scorer, self.mode = base_collator, threshold, scorer, mode
        self.counts = {"seen": 0, "dropped": 0, "masked": 0}

    def __call__(self, features: list[dict]) -> Any:
        features = [dict(f) for f in features]  # never modify the data set's rows
        flagged = self._scores(features) > self.threshold
        self.counts["seen"] += len(features)
        if self.mode == "drop" and not flagged.all():
            self.counts["dropped"] += int(flagged.sum())
            features = [f for f, flag in zip(features, flagged, strict=True) if not flag]
        else:
            if self.mode == "drop":
                logger.warning(
                    "All %d samples of a batch are flagged; they are masked instead of dropped.", len(flagged)
                )
            for feature, flag in zip(features, flagged, strict=True):
                if flag:
                    feature["labels"] = [-100] * len(feature["input_ids"])
            self.counts["masked"] += int(flagged.sum())
        return self.base_collator(features)

    def _scores(self, features: list[dict]) -> np.ndarray:
        has_score = [SCORE_COLUMN in f for f in features]
        if all(has_score):
            return np.array([f.pop(SCORE_COLUMN) for f in features], dtype=np.float64)
        if any(has_score):
            raise ValueError(
                f"Some samples of the batch have a {SCORE_COLUMN!r} field and some do not; score all of them."
            )
        if self.scorer is None:
            raise ValueError(
                f"The batch's samples have no {SCORE_COLUMN!r} field and GeoGuardCollator has no scorer. Add the "
                f"column with score_dataset (and set remove_unused_columns=False, or the Trainer removes it), or "
                "pass scorer=ToxicScorer(...) to score on the fly."
            )
        return self.scorer.score_tokenized([_tokenized(f) for f in features]).scores.astype(np.float64)

    @classmethod
    def wrap_trainer(
        cls, trainer: Trainer, threshold: float, *, scorer: ToxicScorer | None = None, mode: CollatorMode = "drop"
    ) -> GeoGuardCollator:
        """Wrap `trainer.data_collator` and log the counts as `geoguard/collator/{seen,dropped,masked}`.

        The counts go into the Trainer's logs (`log_history` and every reporter, TensorBoard included).

        Raises:
            ValueError: when the train data set has a `geoguard_score` column that the Trainer would remove
                (`remove_unused_columns=True`) and no scorer is given.
        """
        dataset = trainer.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        if SCORE_COLUMN in columns and trainer.args.remove_unused_columns and scorer is None:
            raise ValueError(
                f"The Trainer would remove the {SCORE_COLUMN!r} column before the collator sees it. Set "
                "remove_unused_columns=False in the training arguments (TRL's collator reads only the token columns)."
            )
        collator = cls(trainer.data_collator, threshold, scorer=scorer, mode=mode)
        trainer.data_collator = collator
        # First in line, so the counts are in `logs` before the reporters (TensorBoard, ...) read them.
        trainer.callback_handler.callbacks.insert(0, _CollatorCountsCallback(collator))
        return collator


class _CollatorCountsCallback(TrainerCallback):
    def __init__(self, collator: GeoGuardCollator):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        counts = {f"geoguard/collator/{key}": value for key, value in self.collator.counts.items()}
        if logs is not None:
            logs.update(counts)
        if state.log_history:  # the Trainer appended a copy of `logs` before calling on_log
            state.log_history[-1].update(counts)


def _tokenized(feature: dict) -> TokenizedSample:
    ids = list(feature["input_ids"])
    if "labels" in feature:
        response = [int(label != -100) for label in feature["labels"]]
    elif "completion_mask" in feature or "assistant_masks" in feature:
        response = list(feature.get("completion_mask", feature.get("assistant_masks")))
    else:
        response = [1] * len(ids)
    return TokenizedSample(ids, response)
