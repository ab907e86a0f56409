"""geoguard's settings as flat dataclasses for `TrlParser`, and the helpers that build the guard from them.

Every field is prefixed `geoguard_`, so the dataclasses parse next to `SFTConfig`, `GRPOConfig`, `DPOConfig`,
`ModelConfig` and `ScriptArguments` in one `TrlParser` without a clash, from flags or a `--config x.yaml`:

```python
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser
from geoguard import GeoGuardConfig, GeoGuardEvalConfig, get_geoguard_callback

parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig, GeoGuardConfig, GeoGuardEvalConfig))
script_args, training_args, model_args, guard_args, eval_args = parser.parse_args_and_config()
...
get_geoguard_callback(guard_args, tokenizer, model=model, eval_args=eval_args).add_to(trainer)
```

- `GeoGuardSAEConfig`: which SAE reads the model and which feature set it watches (also what the
  `geoguard` commands read with);
- `GeoGuardConfig`: that, plus the drift monitor, its alarm and the pre-training filter;
- `GeoGuardEvalConfig`: the end-of-run misalignment evaluation and its judge.

The library classes take explicit arguments; these dataclasses only map onto them, and their defaults are the
library's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from sae_lens import SAE
from torch import nn
from transformers import PreTrainedTokenizerBase

from geoguard.callbacks import GeoGuardCallback
from geoguard.corpora import load_probe_prompts
from geoguard.distributed import process_state
from geoguard.evaluation import EvalSettings, MisalignmentEvaluation, load_questions
from geoguard.features import EMBEDDED_TOXIC_SET, FeatureSet
from geoguard.judges import HFJudge, Judge, OpenAIJudge, SAEFeatureJudge
from geoguard.learned_judge import EMBEDDED_JUDGE, LearnedJudge
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.monitor import PROBE_DRIFT_Z, DriftAlarm, DriftMonitorCallback
from geoguard.presets import load_feature_set
from geoguard.sae import EMBEDDED_SAE, load_sae
from geoguard.scoring import ScoreSettings, ToxicScorer
from geoguard.validation import Valid, above, at_least, between, check_fields

_MONITOR = DriftMonitorCallback.__init__.__kwdefaults__  # the monitor's defaults, spelled once in the library


@dataclass
class GeoGuardSAEConfig:
    """Which SAE reads the model, and which of its feature sets geoguard watches."""

    geoguard_sae: str = field(
        default=EMBEDDED_SAE,
        metadata={
            "help": "The SAE: a local sae-lens directory, a sae-lens release (with --geoguard_sae_id, e.g. "
            "gemma-scope-2b-pt-res-canonical), or the one shipped for the embedded model (the default)."
        },
    )
    geoguard_sae_id: str | None = field(
        default=None, metadata={"help": "The SAE inside a sae-lens release, e.g. layer_12/width_16k/canonical."}
    )
    geoguard_feature_set: str = field(
        default=str(EMBEDDED_TOXIC_SET),
        metadata={
            "help": "The feature set watched, scored against and judged with: a directory made by `geoguard "
            "features` on this SAE, or a contrast preset (toxic) selected on the model and SAE at first use and "
            "cached; default: the embedded SAE's toxic set."
        },
    )

    @property
    def sae_name(self) -> str:
        """The SAE as named: `release/sae_id`, a path, or `EMBEDDED_SAE`."""
        return self.geoguard_sae if self.geoguard_sae_id is None else f"{self.geoguard_sae}/{self.geoguard_sae_id}"

    def load(
        self,
        model: nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        model_name: str | None = None,
    ) -> tuple[SAE, FeatureSet]:
        """The SAE and the feature set, checked to belong together. A preset's set is looked up for `model` (or
        `model_name`) and built on `model` at first use (see `geoguard.presets.load_feature_set`)."""
        sae = load_sae(self.geoguard_sae, self.geoguard_sae_id)
        feature_set = load_feature_set(
            self.geoguard_feature_set,
            sae,
            model=model,
            tokenizer=tokenizer,
            model_name=model_name,
            sae_name=self.sae_name,
        )
        return sae, feature_set


@dataclass
class GeoGuardConfig(GeoGuardSAEConfig):
    """The guard: the SAE and feature set, the drift monitor, its alarm, and the filter before training."""

    valid: ClassVar[dict[str, Valid]] = {
        "geoguard_every_n_steps": at_least(1),
        "geoguard_baseline_steps": at_least(2),
        "geoguard_batch_max_tokens": at_least(1),
        "geoguard_filter_fraction": between(0, 1, open_high=True),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    geoguard_probe_path: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file of probe prompts ({'messages': [...]} or {'text': ...} a line); default: Betley et "
            "al.'s 8 free-form questions and 16 harmful requests."
        },
    )
    geoguard_every_n_steps: int = field(
        default=_MONITOR["every_n_steps"],
        metadata={
            "help": "Run the probe and log the drift every N optimizer steps (and at the last step).",
        },
    )
    geoguard_baseline_steps: int = field(
        default=_MONITOR["baseline_steps"],
        metadata={
            "help": "Optimizer steps whose batch readings form the baseline of the batch drift (>= 2).",
        },
    )
    geoguard_batch_max_tokens: int | None = field(
        default=_MONITOR["batch_max_tokens"],
        metadata={
            "help": "Trained tokens read per micro-batch for the batch drift (a random sample bounds the cost).",
        },
    )
    geoguard_alarm_metric: str | None = field(
        default=None,
        metadata={
            "help": f"Metric an alarm watches, e.g. {PROBE_DRIFT_Z} (drift in standard errors) or "
            "geoguard/probe/drift; no alarm when unset."
        },
    )
    geoguard_alarm_threshold: float = field(
        default=DriftAlarm.threshold, metadata={"help": "The alarm fires the first time the metric exceeds this."}
    )
    geoguard_alarm_action: Literal["warn", "save", "stop"] = field(
        default=DriftAlarm.action,
        metadata={"help": "warn: log it; save: also save a checkpoint; stop: save and stop training."},
    )
    geoguard_filter_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Before training, drop this share of the training samples that score closest to the feature "
            "set (the paper drops 0.5); 0 keeps all. Dropped samples go to <output_dir>/geoguard_dropped.jsonl.",
        },
    )

    def __post_init__(self):
        check_fields(self)
        self.alarms()  # a bad metric or action fails at parse time, not at train begin

    def alarms(self) -> list[DriftAlarm]:
        if self.geoguard_alarm_metric is None:
            return []
        return [DriftAlarm(self.geoguard_alarm_metric, self.geoguard_alarm_threshold, self.geoguard_alarm_action)]


@dataclass
class GeoGuardEvalConfig:
    """The end-of-run misalignment evaluation: questions, sampling, and the judge."""

    valid: ClassVar[dict[str, Valid]] = {
        "geoguard_eval_samples_per_question": at_least(1),
        "geoguard_eval_temperature": at_least(0),
        "geoguard_eval_max_new_tokens": at_least(1),
        "geoguard_eval_batch_size": at_least(1),
        "geoguard_judge_timeout": above(0),
        "geoguard_judge_max_retries": at_least(0),
        "geoguard_judge_max_concurrency": at_least(1),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    geoguard_eval: bool = field(
        default=False,
        metadata={
            "help": "At the end of training, save the model, then answer the questions, judge the answers and write "
            "<output_dir>/geoguard_eval/ (geoguard eval always evaluates)."
        },
    )
    geoguard_eval_at_start: bool = field(
        default=False, metadata={"help": "Also evaluate the starting weights and report the change."}
    )
    geoguard_eval_questions: str | None = field(
        default=None,
        metadata={
            "help": "Questions (YAML or JSONL in Betley et al.'s shape); default: their 24 first-plot questions."
        },
    )
    geoguard_eval_samples_per_question: int = field(
        default=EvalSettings.samples_per_question,
        metadata={"help": "Answers sampled per question."},
    )
    geoguard_eval_temperature: float = field(
        default=EvalSettings.temperature,
        metadata={"help": "Sampling temperature of the answers (0: greedy)."},
    )
    geoguard_eval_max_new_tokens: int = field(
        default=EvalSettings.max_new_tokens, metadata={"help": "Longest answer, in tokens."}
    )
    geoguard_eval_batch_size: int = field(
        default=EvalSettings.batch_size,
        metadata={"help": "Prompts answered at once per process."},
    )
    geoguard_eval_seed: int = field(default=EvalSettings.seed, metadata={"help": "Seed of the sampling."})
    geoguard_judge: Literal["learned", "sae", "hf", "openai"] = field(
        default="learned",
        metadata={
            "help": "learned: geoguard's offline judge, a sentence encoder with heads trained on GPT-4o's judgements "
            "(agreement measured on held-out models, see its card; --geoguard_judge_model a folder written by "
            "recipes/train_judge.py, default the shipped one); sae: the feature set's activation on the answer "
            "(aligned only; measured below chance against GPT-4o); hf: a local model (--geoguard_judge_model, default "
            "the embedded one); openai: an OpenAI-compatible endpoint (--geoguard_judge_model, "
            "--geoguard_judge_base_url, key in $OPENAI_API_KEY)."
        },
    )
    geoguard_judge_model: str | None = field(
        default=None,
        metadata={
            "help": "openai: the model's name at the endpoint; hf: a model name or path; learned: a judge folder."
        },
    )
    geoguard_judge_base_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, else OpenAI)."
        },
    )
    geoguard_judge_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the judge's API key (never logged)."}
    )
    geoguard_judge_timeout: float = field(default=60.0, metadata={"help": "Seconds per judge request."})
    geoguard_judge_max_retries: int = field(default=3, metadata={"help": "Retries of a failed judge request."})
    geoguard_judge_max_concurrency: int = field(default=8, metadata={"help": "Judge requests in flight at once."})

    def __post_init__(self):
        check_fields(self)
        if self.geoguard_judge == "openai" and not self.geoguard_judge_model:
            raise ValueError(
                "--geoguard_judge openai needs --geoguard_judge_model NAME (the model's name at the endpoint)."
            )
        if self.geoguard_eval_at_start and not self.geoguard_eval:
            raise ValueError("--geoguard_eval_at_start needs --geoguard_eval true (it reports the change).")
        self.settings()  # bad sampling settings fail at parse time, not after training

    def settings(self) -> EvalSettings:
        return EvalSettings(
            samples_per_question=self.geoguard_eval_samples_per_question,
            temperature=self.geoguard_eval_temperature,
            max_new_tokens=self.geoguard_eval_max_new_tokens,
            batch_size=self.geoguard_eval_batch_size,
            seed=self.geoguard_eval_seed,
        )


def get_judge(
    eval_args: GeoGuardEvalConfig,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sae: SAE | None = None,
    feature_set: FeatureSet | None = None,
) -> Judge:
    """The judge `eval_args` names. The `sae` judge reads answers with `model` / `tokenizer` (the evaluated model),
    `sae` and `feature_set`; the others need none of them."""
    if eval_args.geoguard_judge == "openai":
        return OpenAIJudge(
            eval_args.geoguard_judge_model,
            base_url=eval_args.geoguard_judge_base_url,
            api_key_env=eval_args.geoguard_judge_api_key_env,
            timeout=eval_args.geoguard_judge_timeout,
            max_retries=eval_args.geoguard_judge_max_retries,
            max_concurrency=eval_args.geoguard_judge_max_concurrency,
        )
    if eval_args.geoguard_judge == "learned":
        return LearnedJudge.load(eval_args.geoguard_judge_model or EMBEDDED_JUDGE)
    if eval_args.geoguard_judge == "hf":
        return HFJudge(*load_model(eval_args.geoguard_judge_model or EMBEDDED_MODEL, device=process_state().device))
    if model is None or sae is None or feature_set is None:
        raise ValueError("--geoguard_judge sae reads answers with the evaluated model, its SAE and the feature set.")
    return SAEFeatureJudge.calibrate(ToxicScorer(model, tokenizer, sae, feature_set, ScoreSettings(span="all")))


def get_evaluation(
    eval_args: GeoGuardEvalConfig,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sae: SAE | None = None,
    feature_set: FeatureSet | None = None,
) -> MisalignmentEvaluation:
    """The `MisalignmentEvaluation` `eval_args` describe (questions, sampling, judge; see `get_judge`)."""
    questions = load_questions(eval_args.geoguard_eval_questions) if eval_args.geoguard_eval_questions else None
    return MisalignmentEvaluation(
        get_judge(eval_args, model, tokenizer, sae, feature_set), questions, eval_args.settings()
    )


def get_geoguard_callback(
    guard_args: GeoGuardConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model: nn.Module | None = None,
    eval_args: GeoGuardEvalConfig | None = None,
    sae: SAE | None = None,
    feature_set: FeatureSet | None = None,
) -> GeoGuardCallback:
    """The `GeoGuardCallback` the dataclasses describe, as `trl.get_peft_config` builds a LoRA config.

    Args:
        guard_args (`GeoGuardConfig`): SAE, feature set, monitor and alarm.
        tokenizer (`PreTrainedTokenizerBase`): the trained model's tokenizer.
        model (`nn.Module`, *optional*): the model being trained (the `sae` judge reads answers with it).
        eval_args (`GeoGuardEvalConfig`, *optional*): adds the end-of-run evaluation when `geoguard_eval` is set.
        sae, feature_set (*optional*): already loaded ones (e.g. to score with them too); loaded from
            `guard_args` otherwise.

    Example:
        ```python
        guard = get_geoguard_callback(guard_args, tokenizer, model=model, eval_args=eval_args)
        guard.add_to(trainer)
        ```
    """
    if sae is None or feature_set is None:
        sae, feature_set = guard_args.load(model, tokenizer)
    evaluation = None
    if eval_args is not None and eval_args.geoguard_eval:
        evaluation = get_evaluation(eval_args, model, tokenizer, sae, feature_set)
    probes = load_probe_prompts(guard_args.geoguard_probe_path) if guard_args.geoguard_probe_path else None
    return GeoGuardCallback(
        sae,
        feature_set,
        tokenizer,
        probe_samples=probes,
        every_n_steps=guard_args.geoguard_every_n_steps,
        baseline_steps=guard_args.geoguard_baseline_steps,
        batch_max_tokens=guard_args.geoguard_batch_max_tokens,
        alarms=guard_args.alarms(),
        evaluation=evaluation,
        evaluate_at_start=bool(eval_args and eval_args.geoguard_eval_at_start),
    )
