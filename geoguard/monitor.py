"""`DriftMonitorCallback`: watch the toxic features' activation drift during Trainer / TRL fine-tuning.

Two signals, both read by the SAE at its hook point:

- **probe drift**: a fixed probe set (default: Betley et al.'s 8 evaluation questions and 16 harmful
  requests) runs without gradients every `every_n_steps` optimizer steps under the current weights;
  its toxic-feature activation is compared with the step-0 measurement of the same tokens.
- **batch drift**: the toxic features' activation on the tokens being trained on (`labels != -100`),
  read from the training forward pass itself (no extra forward). Gradient accumulation adds up the
  micro-batches of a step; with gradient checkpointing the recomputation in backward is not counted
  twice. Its baseline is the first `baseline_steps` optimizer steps.

Every process computes, the values are reduced across processes (so every rank holds the same
numbers and takes the same alarm decisions) and only the main process writes. The values reach
`state.log_history`, TensorBoard and the Trainer's other reporters as `geoguard.reporting` describes; the
callback recovers its baselines and fired alarms from `log_history` after `resume_from_checkpoint`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from sae_lens import SAE
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments

from geoguard.capture import SinkRule, iter_activations, resolve_hook_point, unwrap_model
from geoguard.corpora import load_probe_prompts
from geoguard.data import Sample
from geoguard.distributed import reduce_across_processes
from geoguard.features import FeatureSet
from geoguard.readout import SetReadout
from geoguard.reporting import ReportingCallback

logger = logging.getLogger(__name__)

PROBE_MEAN_ACT = "geoguard/probe/toxic_mean_act"
PROBE_FIRING_RATE = "geoguard/probe/toxic_firing_rate"
PROBE_PROJECTION = "geoguard/probe/toxic_projection"
PROBE_DRIFT = "geoguard/probe/drift"
PROBE_DRIFT_REL = "geoguard/probe/drift_rel"
PROBE_DRIFT_Z = "geoguard/probe/drift_z"
PROBE_FIRING_DRIFT = "geoguard/probe/firing_rate_drift"
PROBE_KEYS = (
    PROBE_MEAN_ACT,
    PROBE_FIRING_RATE,
    PROBE_PROJECTION,
    PROBE_DRIFT,
    PROBE_DRIFT_REL,
    PROBE_DRIFT_Z,
    PROBE_FIRING_DRIFT,
)
"""Probe metrics, logged at step 0 and every `every_n_steps` steps (TensorBoard tags and `log_history` keys)."""

BATCH_MEAN_ACT = "geoguard/batch/toxic_mean_act"
BATCH_FIRING_RATE = "geoguard/batch/toxic_firing_rate"
BATCH_PROJECTION = "geoguard/batch/toxic_projection"
BATCH_TOKENS = "geoguard/batch/tokens"
BATCH_DRIFT = "geoguard/batch/drift"
BATCH_DRIFT_Z = "geoguard/batch/drift_z"
BATCH_KEYS = (BATCH_MEAN_ACT, BATCH_FIRING_RATE, BATCH_PROJECTION, BATCH_TOKENS, BATCH_DRIFT, BATCH_DRIFT_Z)
"""Batch metrics over the steps since the last measurement; drift and z once the baseline steps are done."""

TOP_DRIFTING = "geoguard/probe/top_drifting"
_PROBE_BASELINE = "geoguard/probe/baseline"  # log_history: per-probe-sample and per-feature step-0 values
_BATCH_BASELINE = "geoguard/batch/baseline"  # log_history: mean and standard deviation of the baseline steps


@dataclass(frozen=True)
class DriftAlarm:
    """Act when a geoguard metric rises above a threshold.

    Attributes:
        metric: a metric key, e.g. `geoguard/probe/drift_z` (a z-score), `geoguard/probe/drift` (absolute) or
            `geoguard/batch/drift_z`.
        threshold: the alarm fires the first time the metric exceeds it (after step 0).
        action: `warn` (log a warning), `save` (also save a checkpoint at that step) or `stop` (save and stop
            training). Every process takes the same decision from the same reduced values.
    """

    metric: str = PROBE_DRIFT_Z
    threshold: float = 4.0
    action: Literal["warn", "save", "stop"] = "warn"

    def __post_init__(self):
        if self.metric not in PROBE_KEYS + BATCH_KEYS:
            raise ValueError(
                f"DriftAlarm metric {self.metric!r} is not a geoguard metric; use one of {PROBE_KEYS + BATCH_KEYS}."
            )
        if self.action not in ("warn", "save", "stop"):
            raise ValueError(f"DriftAlarm action must be 'warn', 'save' or 'stop', got {self.action!r}.")

    @property
    def key(self) -> str:
        """The `log_history` / TensorBoard key recording the metric's value when the alarm fired."""
        return f"geoguard/alarm/{self.metric.removeprefix('geoguard/')}>{self.threshold:g}"


class _BatchTap:
    """Hooks that add up the toxic readout of the tokens trained on, from the training forward pass itself."""

    def __init__(
        self, model: nn.Module, hook_name: str, readout: SetReadout, sink_rule: SinkRule, max_tokens: int | None
    ):
        self.readout, self.sink_rule, self.max_tokens = readout, sink_rule, max_tokens
        # set-value sum, firing (token, feature) pairs, projection sum, tokens, (token, feature) pairs; kept on
        # the model's device so that reading a micro-batch never waits for the GPU
        self.sums: torch.Tensor | float = 0.0
        self._mask: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(0)
        base = unwrap_model(model)
        layer = base.get_submodule(resolve_hook_point(base, hook_name).module_path)
        self._handles = [
            base.register_forward_pre_hook(self._enter, with_kwargs=True),
            base.register_forward_hook(self._leave, always_call=True),
            layer.register_forward_hook(self._read),
        ]

    def _enter(self, module: nn.Module, args, kwargs) -> None:
        # Only the model's own forward pass counts: gradient checkpointing re-runs the layer in backward,
        # outside it, and probe measurements run in eval mode.
        if not module.training:
            self._mask = None
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        mask = kwargs.get("attention_mask")
        mask = torch.ones(shape, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask.bool()
        labels = kwargs.get("labels")
        if labels is not None and labels.shape == mask.shape:
            mask = mask & (labels != -100)  # the tokens being taught
        self._mask = mask

    def _leave(self, module, args, output) -> None:
        self._mask = None

    def _read(self, module, args, output) -> None:
        if self._mask is None:
            return
        acts = output[0] if isinstance(output, tuple) else output  # (batch, seq, d_in)
        keep = self.sink_rule.keep_mask(acts.detach(), self._mask.to(acts.device))
        x = acts.detach()[keep]  # (n_kept, d_in)
        if self.max_tokens is not None and x.shape[0] > self.max_tokens:  # an unbiased sample bounds the cost
            x = x[torch.randperm(x.shape[0], generator=self._generator)[: self.max_tokens].to(x.device)]
        toxic, projection = self.readout.unit_values(x), self.readout.projection(x)  # (n, k), (n,)
        counts = torch.tensor([x.shape[0], toxic.numel()], dtype=torch.float64, device=toxic.device)
        readings = torch.stack([self.readout.token_scores(toxic).sum(), (toxic > 0).sum(), projection.sum()]).double()
        self.sums = self.sums + torch.cat([readings, counts])

    def take(self) -> torch.Tensor:
        """The sums since the last call, on the CPU (zeros when no training token was read)."""
        sums, self.sums = self.sums, 0.0
        return sums.cpu() if isinstance(sums, torch.Tensor) else torch.zeros(5, dtype=torch.float64)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class DriftMonitorCallback(ReportingCallback):
    """Log the drift of a toxic feature set's activation, on a probe set and on the training batches.

    Metrics (`state.log_history` keys and TensorBoard tags), measured at train begin (step 0, the baseline),
    every `every_n_steps` optimizer steps and at the last step:

    - `geoguard/probe/toxic_mean_act`, `toxic_firing_rate`: the set's value per probe token (`SetReadout.
      token_scores`: its weighted readout's sum of feature activations, the features' mean without weights, a
      direction set's projection minus its offset), and the share of (token, unit) pairs where a unit fires;
    - `geoguard/probe/toxic_projection`: mean norm of the residual's projection onto the span of the set's
      decoder directions (or of its directions);
    - `geoguard/probe/drift` (`toxic_mean_act` minus step 0), `drift_rel` (relative), `firing_rate_drift`, and
      `drift_z`: the drift in standard errors of the step-0 mean over the probe samples;
    - `geoguard/batch/...`: the same readings on the tokens trained on since the last measurement (`tokens`
      counts them), with `drift` and `drift_z` against the first `baseline_steps` steps (`drift_z` in units of
      the step-to-step standard deviation of those steps, so batch-to-batch variation reads as |z| < ~2);
    - `geoguard/probe/top_drifting`: the features whose probe activation rose most, with their labels
      (TensorBoard text); histograms of per-feature activation and drift; a custom-scalars layout.

    Args:
        sae (`sae_lens.SAE`): the SAE reading the model's residual stream (`None` with a direction set).
        feature_set (`FeatureSet`): the toxic features (must belong to `sae`) or a direction set.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (chat template used for chats).
        probe_samples (`list`, *optional*): probe samples; defaults to `geoguard.corpora.DEFAULT_PROBE_PROMPTS`.
        every_n_steps (`int`, defaults to 10): measure every this many optimizer steps.
        alarms (`list[DriftAlarm]`, *optional*): thresholds and the action each takes.
        baseline_steps (`int`, defaults to 5): optimizer steps whose batch readings form the batch baseline.
        batch_max_tokens (`int`, *optional*, defaults to 256): tokens sampled per micro-batch for the batch
            signal (an unbiased sample that bounds its cost); `None` reads all of them.
        batch_size (`int`, defaults to 8): probe batch size.
        n_top_features (`int`, defaults to 5): drifting features listed per measurement.
        log_dir (`str`, *optional*): TensorBoard directory; defaults to `$TENSORBOARD_LOGGING_DIR` or
            `<output_dir>/runs/geoguard`.
        sink_rule (`SinkRule`, defaults to `SinkRule()`): which tokens count as attention sinks.

    Example:
        ```python
        sae = load_sae()
        monitor = DriftMonitorCallback(sae, FeatureSet.load(sae=sae), tokenizer, alarms=[DriftAlarm(action="stop")])
        trainer = SFTTrainer(model=model, args=config, train_dataset=data)
        monitor.add_to(trainer)  # ahead of the reporters: the curves reach TensorBoard, wandb, ...
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
        alarms: list[DriftAlarm] | tuple[DriftAlarm, ...] = (),
        baseline_steps: int = 5,
        batch_max_tokens: int | None = 256,
        batch_size: int = 8,
        n_top_features: int = 5,
        log_dir: str | None = None,
        sink_rule: SinkRule = SinkRule(),
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if baseline_steps < 2:
            raise ValueError(f"baseline_steps must be >= 2 (a spread needs two steps), got {baseline_steps}.")
        if batch_max_tokens is not None and batch_max_tokens < 1:
            raise ValueError(f"batch_max_tokens must be >= 1 or None, got {batch_max_tokens}.")
        self.readout = SetReadout(feature_set, sae)
        super().__init__(log_dir)
        self.sae, self.feature_set, self.tokenizer = sae, feature_set, tokenizer
        self.hook_name = self.readout.hook_name
        self.probe_samples = probe_samples if probe_samples is not None else load_probe_prompts()
        if not self.probe_samples:
            raise ValueError("probe_samples is empty; pass at least one prompt or leave it unset for the default.")
        self.every_n_steps, self.alarms, self.baseline_steps = every_n_steps, list(alarms), baseline_steps
        self.batch_max_tokens, self.batch_size, self.n_top_features = batch_max_tokens, batch_size, n_top_features
        self.sink_rule = sink_rule
        self.probe_baseline: dict[str, list[float]] | None = None
        self.batch_baseline: dict[str, float] | None = None
        self.fired: set[str] = set()
        self._batch_steps: list[float] = []  # per-step batch mean activation until the baseline is set
        self._window = torch.zeros(5, dtype=torch.float64)
        self._keep_masks: list[torch.Tensor] = []
        self._last_measured_step = -1
        self._tap: _BatchTap | None = None

    # ---- measurements -------------------------------------------------------------------------------

    @torch.no_grad()
    def measure_probe(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-probe-sample and per-feature mean activation, firing and projection under the current weights.

        Every process runs the whole probe set (it is small, and sharded models need every process in
        each forward pass); the values are then averaged across processes so that all hold the same.
        """
        was_training = model.training
        model.eval()
        n, k = len(self.probe_samples), len(self.feature_set.feature_ids)
        per_sample, tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        per_feature = torch.zeros(k, dtype=torch.float64)
        fired = projection = 0.0
        try:
            batches = iter_activations(
                model, self.tokenizer, self.probe_samples, self.hook_name, batch_size=self.batch_size, sink_rule=None
            )
            for i, (acts, keep, indices) in enumerate(batches):
                # The first measurement fixes which tokens count, so that later drift compares the same tokens
                # even when training moves token norms across the sink rule's threshold.
                if i == len(self._keep_masks):
                    self._keep_masks.append(self.sink_rule.keep_mask(acts, keep).cpu())
                keep = self._keep_masks[i].to(acts.device)
                toxic, norms = self.readout.unit_values(acts[keep]), self.readout.projection(acts[keep])
                rows = torch.tensor(indices)[keep.nonzero()[:, 0].cpu()]
                per_sample.index_add_(0, rows, self.readout.token_scores(toxic).double().cpu())
                tokens.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
                per_feature += toxic.sum(dim=0).double().cpu()
                fired += (toxic > 0).sum().item()
                projection += norms.sum().item()
        finally:
            model.train(was_training)
        n_tokens = tokens.sum().clamp(min=1)
        flat = torch.cat(
            [
                per_sample / tokens.clamp(min=1),
                per_feature / n_tokens,
                torch.tensor([fired / (n_tokens * k), projection / n_tokens]),
            ]
        )
        flat = reduce_across_processes(flat, "mean")
        return {
            "per_sample": flat[:n],
            "per_feature": flat[n : n + k],
            "firing": flat[n + k],
            "projection": flat[n + k + 1],
        }

    def _probe_metrics(self, reading: dict[str, torch.Tensor]) -> dict[str, float]:
        per_sample = reading["per_sample"]
        base_sample = torch.tensor(self.probe_baseline["per_sample"], dtype=torch.float64)
        mean, base = per_sample.mean().item(), base_sample.mean().item()
        standard_error = (
            base_sample.std().item() / math.sqrt(len(base_sample)) if len(base_sample) > 1 else float("nan")
        )
        drift = mean - base
        return {
            PROBE_MEAN_ACT: mean,
            PROBE_FIRING_RATE: reading["firing"].item(),
            PROBE_PROJECTION: reading["projection"].item(),
            PROBE_DRIFT: drift,
            PROBE_DRIFT_REL: mean / base - 1 if base > 0 else float("nan"),
            PROBE_DRIFT_Z: drift / standard_error if standard_error > 0 else float("nan"),
            PROBE_FIRING_DRIFT: reading["firing"].item() - self.probe_baseline["firing"],
        }

    def _batch_metrics(self) -> dict[str, float]:
        sums, self._window = self._window, torch.zeros_like(self._window)
        act, fired, projection, tokens, pairs = sums.tolist()
        if tokens == 0:
            return {}
        metrics = {
            BATCH_MEAN_ACT: act / tokens,  # the set's per-token value (the features' mean without weights)
            BATCH_FIRING_RATE: fired / pairs,
            BATCH_PROJECTION: projection / tokens,
            BATCH_TOKENS: tokens,
        }
        if self.batch_baseline is not None:
            drift = metrics[BATCH_MEAN_ACT] - self.batch_baseline["mean"]
            metrics[BATCH_DRIFT] = drift
            metrics[BATCH_DRIFT_Z] = (
                drift / self.batch_baseline["std"] if self.batch_baseline["std"] > 0 else float("nan")
            )
        return metrics

    # ---- Trainer events -----------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self.readout.check_fits(model)
        self.readout.to(next(model.parameters()).device)
        self.open_reports(args, state)
        if self.writer is not None:
            self.writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
        self._restore(state)
        reading = self.measure_probe(model)
        if self.probe_baseline is None:
            self.probe_baseline = {
                "per_sample": reading["per_sample"].tolist(),
                "per_feature": reading["per_feature"].tolist(),
                "firing": reading["firing"].item(),
            }
            state.log_history.append({_PROBE_BASELINE: self.probe_baseline, "step": state.global_step})
        if not any(PROBE_MEAN_ACT in e and e["step"] == state.global_step for e in state.log_history):
            self._record(state, control, self._probe_metrics(reading), reading)
        self._last_measured_step = state.global_step
        self._tap = _BatchTap(model, self.hook_name, self.readout, self.sink_rule, self.batch_max_tokens)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        step_sums = reduce_across_processes(self._tap.take(), "sum")
        self._window += step_sums
        if self.batch_baseline is None and step_sums[3] > 0:
            self._batch_steps.append((step_sums[0] / step_sums[3]).item())  # per token, as BATCH_MEAN_ACT
            if len(self._batch_steps) == self.baseline_steps:
                values = torch.tensor(self._batch_steps, dtype=torch.float64)
                self.batch_baseline = {"mean": values.mean().item(), "std": values.std().item()}
                state.log_history.append({_BATCH_BASELINE: self.batch_baseline, "step": state.global_step})
        # The last step is always measured (the flow callback, first in line, has set should_training_stop).
        due = state.global_step % self.every_n_steps == 0 or control.should_training_stop
        if due and state.global_step != self._last_measured_step:
            self._measure_and_record(state, control, model)
        self.flush_reports(args, state, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.global_step != self._last_measured_step:  # training ended another way: measure the final weights
            self._measure_and_record(state, control, model)
            self.flush_reports(args, state, control)
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self.close_reports()

    def _measure_and_record(self, state: TrainerState, control: TrainerControl, model: nn.Module) -> None:
        reading = self.measure_probe(model)
        self._record(state, control, self._probe_metrics(reading) | self._batch_metrics(), reading)

    def _record(self, state: TrainerState, control: TrainerControl, metrics: dict[str, float], reading) -> None:
        self._last_measured_step = step = state.global_step
        drift = torch.tensor(reading["per_feature"].tolist()) - torch.tensor(self.probe_baseline["per_feature"])
        top = drift.topk(min(self.n_top_features, len(drift)))
        ids = self.feature_set.feature_ids
        top_drifting = [[ids[i], round(d, 6)] for i, d in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
        entry = {**metrics, TOP_DRIFTING: top_drifting}
        if step > 0:
            entry |= self._check_alarms(metrics, control, step)
        self.report(state, entry, step)
        if self.writer is not None:
            self.writer.add_histogram("geoguard/probe/feature_mean_act", reading["per_feature"].float(), step)
            self.writer.add_histogram("geoguard/probe/feature_drift", drift, step)
            self.writer.add_text(TOP_DRIFTING, self._top_drifting_table(top_drifting), step)
            self.writer.flush()
        logger.info("step %d: %s", step, metrics)

    def _check_alarms(self, metrics: dict[str, float], control: TrainerControl, step: int) -> dict[str, float]:
        fired = {}
        for alarm in self.alarms:
            value = metrics.get(alarm.metric)
            if alarm.key in self.fired or value is None or not value > alarm.threshold:
                continue
            self.fired.add(alarm.key)
            fired[alarm.key] = value
            logger.warning(
                "geoguard alarm at step %d: %s = %.4g exceeds %.4g (action: %s).",
                step,
                alarm.metric,
                value,
                alarm.threshold,
                alarm.action,
            )
            if alarm.action in ("save", "stop"):
                control.should_save = True
            if alarm.action == "stop":
                control.should_training_stop = True
        return fired

    def _restore(self, state: TrainerState) -> None:
        """After `resume_from_checkpoint`, take the baselines and fired alarms from the restored log history."""
        for entry in state.log_history:
            if _PROBE_BASELINE in entry:
                self.probe_baseline = entry[_PROBE_BASELINE]
            if _BATCH_BASELINE in entry:
                self.batch_baseline = entry[_BATCH_BASELINE]
            self.fired |= {key for key in entry if key.startswith("geoguard/alarm/")}

    def _top_drifting_table(self, top_drifting: list[list]) -> str:
        labels = self.feature_set.short_labels(max_chars=60)
        rows = ["| feature | drift | top snippet |", "|---|---|---|"]
        for feature, value in top_drifting:
            snippet = labels.get(feature, "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {feature} | {value:+.4g} | {snippet} |")
        return "\n".join(rows)


CUSTOM_SCALARS_LAYOUT = {
    "geoguard drift": {
        "toxic activation (probe vs batch)": ["Multiline", [PROBE_MEAN_ACT, BATCH_MEAN_ACT]],
        "drift": ["Multiline", [PROBE_DRIFT, BATCH_DRIFT]],
        "drift z-score": ["Multiline", [PROBE_DRIFT_Z, BATCH_DRIFT_Z]],
        "firing rate": ["Multiline", [PROBE_FIRING_RATE, BATCH_FIRING_RATE]],
        "toxic-subspace projection": ["Multiline", [PROBE_PROJECTION, BATCH_PROJECTION]],
        "alarms": ["Multiline", [r"geoguard/alarm/.*"]],
    },
    "training": {"loss": ["Multiline", [r"train/loss"]], "learning rate": ["Multiline", [r"train/learning_rate"]]},
}
"""The TensorBoard custom-scalars layout: drift curves grouped so the drift reads at a glance."""
