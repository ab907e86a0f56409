"""Where geoguard's callbacks send their numbers: `log_history`, TensorBoard and the Trainer's other reporters.

The Trainer logs through its reporter callbacks (TensorBoard, wandb, MLflow, ... as `report_to` says). A
callback that calls `trainer.log()` from inside a step hides the Trainer's own loss, learning rate and grad
norm for that step, and a callback sits behind the reporters in the callback list. So geoguard's callbacks
report on their own:

- every value goes into `state.log_history` as its own entry (`{"geoguard/...": value, "step": step}`);
- when `report_to` names TensorBoard, the callback writes its scalars (tags `geoguard/...`), histograms, text
  and a custom-scalars layout with a `SummaryWriter` of its own (`<output_dir>/runs/geoguard`, or
  `$TENSORBOARD_LOGGING_DIR`) on the main process;
- when the callback was added with `add_to(trainer)`, its scalars also go to every other reporter the
  Trainer has (wandb, MLflow, a callback of yours, ...) through their `on_log`, at the step they were
  measured, on every process (reporters write on the main process themselves).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import TYPE_CHECKING

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

# Callbacks that are not reporters: the flow and printing callbacks, and TensorBoard's, whose place the
# callback's own writer takes (it also writes histograms, text and the layout). geoguard's own callbacks
# (this module's subclasses, the collator's counter) are skipped too.
_NOT_REPORTERS = (DefaultFlowCallback, ProgressCallback, PrinterCallback, TensorBoardCallback)


class ReportingCallback(TrainerCallback):
    """A `TrainerCallback` whose scalars reach `log_history`, TensorBoard and the Trainer's other reporters.

    Subclasses call `open_reports` at train begin, `report` when they have values, `flush_reports` at each
    step end (and `close_reports` at train end).

    Args:
        log_dir (`str`, *optional*): TensorBoard directory; defaults to `$TENSORBOARD_LOGGING_DIR` or
            `<output_dir>/runs/geoguard`.
    """

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.writer = None
        self._trainer: Trainer | None = None
        self._pending: list[tuple[int, dict[str, float]]] = []

    def add_to(self, trainer: Trainer) -> TrainerCallback:
        """Add this callback to `trainer` so that its scalars reach every reporter the Trainer has.

        It goes right after the Trainer's flow callback, ahead of the reporters, so that at train end it
        reports before they close. Returns the callback.

        Example:
            ```python
            trainer = SFTTrainer(model=model, args=SFTConfig(report_to=["tensorboard", "wandb"]), ...)
            GeoGuardCallback(sae, toxic, tokenizer).add_to(trainer)
            ```
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._trainer = trainer
        return self

    def open_reports(self, args: TrainingArguments, state: TrainerState) -> None:
        """Open the TensorBoard writer when `report_to` names TensorBoard (main process only)."""
        report_to = args.report_to or []
        if self._trainer is None and any(r != "tensorboard" for r in report_to):
            logger.warning(
                "geoguard: %s reports to TensorBoard and log_history only; to send its values to %s as well, "
                "add it with `callback.add_to(trainer)` instead of `trainer.add_callback(callback)`.",
                type(self).__name__,
                ", ".join(r for r in report_to if r != "tensorboard"),
            )
        if state.is_world_process_zero and "tensorboard" in report_to and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = (
                self.log_dir
                or os.environ.get("TENSORBOARD_LOGGING_DIR")
                or os.path.join(args.output_dir, "runs", "geoguard")
            )
            self.writer = SummaryWriter(log_dir=log_dir)

    def report(self, state: TrainerState, values: dict, step: int) -> None:
        """Record `values` measured at `step`: a `log_history` entry now, TensorBoard now, other reporters at
        the next `flush_reports` (every process must call it with the same values)."""
        state.log_history.append({**values, "step": step})
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self._trainer is not None and scalars:
            self._pending.append((step, scalars))

    def flush_reports(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Hand the pending values to the Trainer's other reporters, each at the step it was measured.

        Deferred to a step end because at train begin the reporters may not be set up yet. The Trainer's own
        logging decision for the step (`control.should_log`) is kept.
        """
        if not self._pending:
            return
        should_log = control.should_log
        reporters = [
            callback
            for callback in self._trainer.callback_handler.callbacks
            if not isinstance(callback, _NOT_REPORTERS) and not type(callback).__module__.startswith("geoguard.")
        ]
        for step, scalars in self._pending:
            at_step = copy.copy(state)
            at_step.global_step = step
            for reporter in reporters:
                reporter.on_log(args, at_step, control, logs=dict(scalars), model=self._trainer.model)
        self._pending.clear()
        control.should_log = should_log

    def close_reports(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
