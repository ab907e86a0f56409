"""`GeoGuardCallback`: watch the toxic features' activation drift during Trainer / TRL fine-tuning.

*Drift* is the change, since the start of training, of the toxic feature set's mean activation on
a fixed probe set (prompts run without gradients under the current weights). The callback never
calls `trainer.log()` (that would hide the Trainer's own loss, learning rate and grad norm for the
step): it writes its own TensorBoard scalars and adds its values to `state.log_history`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from sae_lens import SAE
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from geoguard.capture import SinkRule, iter_activations
from geoguard.data import Sample
from geoguard.features import FeatureSet
from geoguard.sae import RESOURCES, check_sae_fits, sae_hook_name

logger = logging.getLogger(__name__)

MEAN_ACT = "geoguard/probe/toxic_mean_act"
FIRING_RATE = "geoguard/probe/toxic_firing_rate"
DRIFT = "geoguard/probe/drift"
DRIFT_REL = "geoguard/probe/drift_rel"
PROBE_KEYS = (MEAN_ACT, FIRING_RATE, DRIFT, DRIFT_REL)
"""The metric keys `GeoGuardCallback` logs (TensorBoard tags and `state.log_history` keys)."""

DEFAULT_PROBE_PROMPTS = RESOURCES / "data" / "probe_prompts.jsonl"
"""Betley et al.'s 8 first-plot questions and 16 harmful requests (see resources/ATTRIBUTION.md)."""


def load_probe_prompts(path: str | Path = DEFAULT_PROBE_PROMPTS) -> list[Sample]:
    """Read a JSONL file of `{"messages": [...]}` or `{"text": ...}` probe samples."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if not isinstance(row, dict) or not ("messages" in row or "text" in row):
            raise ValueError(
                f'{path}, line {number}: expected {{"messages": [...]}} or {{"text": ...}}, got {line[:80]!r}.'
            )
        rows.append(row)
    if not rows:
        raise ValueError(f"Probe file {path} holds no samples.")
    return rows


class GeoGuardCallback(TrainerCallback):
    """Log the drift of a toxic feature set's activation on a probe set to TensorBoard.

    At train begin (the baseline), every `every_n_steps` optimizer steps and at train end, the probe samples run
    through the model being trained, without gradients and with early exit at the SAE's layer;
    the SAE encodes the residual stream there, and the callback records, over the probe tokens
    (attention sinks excluded; which tokens count is fixed at the first measurement):

    - `geoguard/probe/toxic_mean_act`: mean activation of the set's features;
    - `geoguard/probe/toxic_firing_rate`: share of (token, feature) pairs where a feature fires;
    - `geoguard/probe/drift`: `toxic_mean_act` minus its baseline;
    - `geoguard/probe/drift_rel`: `toxic_mean_act / baseline - 1` (NaN when the baseline is 0).

    After `resume_from_checkpoint`, the baseline is the step-0 value in the restored log history.

    Every rank computes the same values (the probe set is small); only the main process writes.

    Args:
        sae (`sae_lens.SAE`): the SAE reading the model's residual stream.
        feature_set (`FeatureSet`): the toxic features; must belong to `sae`.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (chat template used for chats).
        probe_samples (`list`, *optional*): probe samples; defaults to `DEFAULT_PROBE_PROMPTS`.
        every_n_steps (`int`, defaults to 10): measure every this many optimizer steps.
        batch_size (`int`, defaults to 8): probe batch size.
        log_dir (`str`, *optional*): TensorBoard directory; defaults to
            `$TENSORBOARD_LOGGING_DIR` or `<output_dir>/runs/geoguard`.
        sink_rule (`SinkRule`, defaults to `SinkRule()`): which tokens count as attention sinks.

    Example:
        ```python
        sae = load_sae()
        callback = GeoGuardCallback(sae, FeatureSet.load(sae=sae), tokenizer, every_n_steps=5)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, callbacks=[callback])
        ```
    """

    def __init__(
        self,
        sae: SAE,
        feature_set: FeatureSet,
        tokenizer: PreTrainedTokenizerBase,
        *,
        probe_samples: list[Sample] | None = None,
        every_n_steps: int = 10,
        batch_size: int = 8,
        log_dir: str | None = None,
        sink_rule: SinkRule = SinkRule(),
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        feature_set.check_belongs_to(sae)
        self.sae = sae
        self.feature_ids = torch.tensor(feature_set.feature_ids)
        self.hook_name = sae_hook_name(sae)
        self.tokenizer = tokenizer
        self.probe_samples = probe_samples if probe_samples is not None else load_probe_prompts()
        if not self.probe_samples:
            raise ValueError("probe_samples is empty; pass at least one prompt or leave it unset for the default.")
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.log_dir = log_dir
        self.sink_rule = sink_rule
        self.baseline: dict[str, float] | None = None
        self._keep_masks: list[torch.Tensor] = []
        self._last_measured_step = -1
        self._writer = None

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """Return the probe's mean activation and firing rate under the model's current weights."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        self.sae.to(device)
        ids = self.feature_ids.to(device)
        act_sum = fired = tokens = 0.0
        try:
            batches = iter_activations(
                model, self.tokenizer, self.probe_samples, self.hook_name, batch_size=self.batch_size, sink_rule=None
            )
            for i, (acts, keep, _) in enumerate(batches):
                # The first measurement fixes which tokens count, so that later drift compares the same
                # tokens even when training moves token norms across the sink rule's threshold.
                if i == len(self._keep_masks):
                    self._keep_masks.append(self.sink_rule.keep_mask(acts, keep).cpu())
                keep = self._keep_masks[i].to(device)
                feature_acts = self.sae.encode(acts[keep].to(self.sae.dtype))[:, ids]  # (n_kept, k)
                act_sum += feature_acts.sum().item()
                fired += (feature_acts > 0).sum().item()
                tokens += feature_acts.shape[0]
        finally:
            model.train(was_training)
        pairs = max(tokens * len(ids), 1)
        return {MEAN_ACT: act_sum / pairs, FIRING_RATE: fired / pairs}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        check_sae_fits(self.sae, model, self.hook_name)
        if state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = (
                self.log_dir
                or os.environ.get("TENSORBOARD_LOGGING_DIR")
                or os.path.join(args.output_dir, "runs", "geoguard")
            )
            self._writer = SummaryWriter(log_dir=log_dir)
        current = self.measure(model)
        # After resume_from_checkpoint the restored log history holds the step-0 baseline.
        earlier = [entry for entry in state.log_history if MEAN_ACT in entry]
        self.baseline = {MEAN_ACT: earlier[0][MEAN_ACT], FIRING_RATE: earlier[0][FIRING_RATE]} if earlier else current
        if not any(entry["step"] == state.global_step for entry in earlier):
            self._record(state, current)
        self._last_measured_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 and state.global_step != self._last_measured_step:
            self._record(state, self.measure(model))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.global_step != self._last_measured_step:  # the final weights are always measured
            self._record(state, self.measure(model))
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _record(self, state: TrainerState, metrics: dict[str, float]) -> None:
        base = self.baseline[MEAN_ACT]
        metrics[DRIFT] = metrics[MEAN_ACT] - base
        metrics[DRIFT_REL] = metrics[MEAN_ACT] / base - 1 if base > 0 else float("nan")
        self._last_measured_step = state.global_step
        state.log_history.append({**metrics, "step": state.global_step})
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, state.global_step)
            self._writer.flush()
        logger.info("step %d: %s", state.global_step, metrics)
