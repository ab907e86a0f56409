"""The end-of-run evaluation callback, and `GeoGuardCallback`: drift monitoring plus, optionally, that evaluation.

One callback per job, as TRL keeps `WinRateCallback` apart from logging: `DriftMonitorCallback`
(`geoguard.monitor`) watches the drift, `MisalignmentEvalCallback` saves the trained model and then evaluates
it. `GeoGuardCallback` is the one a user adds to a trainer; it is the drift monitor, with the evaluation
composed in when one is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sae_lens import SAE
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from geoguard.distributed import process_state
from geoguard.evaluation import MisalignmentEvaluation, eval_scalars, write_evaluation
from geoguard.features import FeatureSet
from geoguard.monitor import DriftMonitorCallback
from geoguard.reporting import ReportingCallback

logger = logging.getLogger(__name__)

EVAL_ERROR = "geoguard/eval/error"
"""`log_history` key recording why an evaluation run by `MisalignmentEvalCallback` failed."""


class MisalignmentEvalCallback(ReportingCallback):
    """At train end, save the trained model (or adapter) and tokenizer to `output_dir`, then evaluate it.

    The save comes first, so an evaluation that fails loses nothing; a failure is logged and recorded as
    `geoguard/eval/error` in `log_history`, and training still ends normally. Results go to
    `<output_dir>/geoguard_eval/` (`misalignment_eval.json`, `misalignment_eval.md`), `log_history` and the
    reporters (`geoguard/eval/...`). Every process takes part (each generates and judges its share).

    Args:
        evaluation (`MisalignmentEvaluation`): questions, judge and settings.
        tokenizer (`PreTrainedTokenizerBase`): the trained model's tokenizer (saved with it).
        evaluate_at_start (`bool`, defaults to `False`): also evaluate the starting weights at train begin and
            report the change.
        log_dir (`str`, *optional*): TensorBoard directory (see `ReportingCallback`).

    Example:
        ```python
        evaluation = MisalignmentEvaluation(OpenAIJudge("gpt-4o-2024-08-06"))
        MisalignmentEvalCallback(evaluation, tokenizer).add_to(trainer)
        ```
    """

    def __init__(
        self,
        evaluation: MisalignmentEvaluation,
        tokenizer: PreTrainedTokenizerBase,
        *,
        evaluate_at_start: bool = False,
        log_dir: str | None = None,
    ):
        super().__init__(log_dir)
        self.evaluation, self.tokenizer, self.evaluate_at_start = evaluation, tokenizer, evaluate_at_start
        self.start_evaluation: dict | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if is_deepspeed_zero3_enabled() or args.fsdp:
            raise ValueError(
                "The end-of-run evaluation generates with the full model, which ZeRO-3 and FSDP shard; run "
                "`geoguard eval --model <output_dir>` after training instead of evaluating in the callback."
            )
        self.open_reports(args, state)
        if self.evaluate_at_start and self.start_evaluation is None:
            self.start_evaluation = self.evaluation.run(model, self.tokenizer, name="start").overall

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        output_dir = Path(args.output_dir)
        model = _unwrap_distributed(model)
        if state.is_world_process_zero:
            model.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)
            logger.info("geoguard: trained model saved to %s before the misalignment evaluation", output_dir)
        process_state().wait_for_everyone()
        try:
            result = self.evaluation.run(model, self.tokenizer, name=str(output_dir))
        except Exception as err:  # the model is saved; the run must end normally and say what went wrong
            logger.exception("geoguard: the misalignment evaluation failed; the trained model is in %s", output_dir)
            state.log_history.append({EVAL_ERROR: f"{type(err).__name__}: {err}", "step": state.global_step})
            self.close_reports()
            return
        result.baseline = self.start_evaluation
        if state.is_world_process_zero:
            paths = write_evaluation(result, output_dir / "geoguard_eval")
            logger.info("geoguard: misalignment evaluation written to %s", paths["report"])
        self.report(state, eval_scalars(result), state.global_step)
        self.flush_reports(args, state, control)
        self.close_reports()


def _unwrap_distributed(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed wrappers (`.module`); a PEFT model stays one, so its adapter is saved."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


class GeoGuardCallback(DriftMonitorCallback):
    """The guard a user adds to a trainer: drift monitoring, and the end-of-run evaluation when given one.

    Takes every argument of `DriftMonitorCallback` (drift monitoring), plus:

    Args:
        evaluation (`MisalignmentEvaluation`, *optional*): run at train end by a `MisalignmentEvalCallback`
            (the trained model is saved first).
        evaluate_at_start (`bool`, defaults to `False`): also evaluate the starting weights and report the change.

    Example:
        ```python
        sae = load_sae()
        guard = GeoGuardCallback(sae, FeatureSet.load(sae=sae), tokenizer, alarms=[DriftAlarm(action="stop")])
        trainer = SFTTrainer(model=model, args=config, train_dataset=data)
        guard.add_to(trainer)  # or trainer.add_callback(guard): then TensorBoard and log_history only
        ```
    """

    def __init__(
        self,
        sae: SAE,
        feature_set: FeatureSet,
        tokenizer: PreTrainedTokenizerBase,
        *,
        evaluation: MisalignmentEvaluation | None = None,
        evaluate_at_start: bool = False,
        **monitor_kwargs,
    ):
        if evaluate_at_start and evaluation is None:
            raise ValueError("evaluate_at_start=True needs an evaluation (evaluation=MisalignmentEvaluation(judge)).")
        super().__init__(sae, feature_set, tokenizer, **monitor_kwargs)
        self.evaluator = (
            MisalignmentEvalCallback(
                evaluation, tokenizer, evaluate_at_start=evaluate_at_start, log_dir=monitor_kwargs.get("log_dir")
            )
            if evaluation is not None
            else None
        )

    def add_to(self, trainer) -> GeoGuardCallback:
        super().add_to(trainer)
        if self.evaluator is not None:
            self.evaluator._trainer = trainer  # reports through the same trainer, from inside this callback
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluator is not None:  # refuses ZeRO-3 / FSDP before any measurement
            self.evaluator.on_train_begin(args, state, control, **kwargs)
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        if self.evaluator is not None:
            self.evaluator.on_train_end(args, state, control, **kwargs)
