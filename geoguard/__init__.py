"""geoguard: guard LLM fine-tuning against emergent misalignment with SAE feature geometry."""

from geoguard.capture import HookPoint, SinkRule, capture, iter_activations, resolve_hook_point, run_to_hook
from geoguard.collator import GeoGuardCollator
from geoguard.corpora import load_rows, load_samples
from geoguard.evaluation import EvalSettings, MisalignmentEvaluation, load_questions, write_evaluation
from geoguard.features import Contrast, FeatureSet, find_features
from geoguard.filtering import (
    DropAbovePercentile,
    DropAboveThreshold,
    DropTopFraction,
    filter_dataset,
    judge_scores,
    random_scores,
)
from geoguard.geometry import measure_geometry
from geoguard.judges import HFJudge, Judgement, JudgeRequest, OpenAIJudge, SAEFeatureJudge
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.monitor import DriftAlarm, GeoGuardCallback, load_probe_prompts
from geoguard.sae import EMBEDDED_SAE, check_sae_fits, load_sae
from geoguard.scoring import SampleScores, ScoreSettings, ToxicScorer, score_dataset

__version__ = "0.1.0"

__all__ = [
    "Contrast",
    "DriftAlarm",
    "DropAbovePercentile",
    "DropAboveThreshold",
    "DropTopFraction",
    "EMBEDDED_MODEL",
    "EMBEDDED_SAE",
    "EvalSettings",
    "FeatureSet",
    "GeoGuardCallback",
    "GeoGuardCollator",
    "HFJudge",
    "HookPoint",
    "JudgeRequest",
    "Judgement",
    "MisalignmentEvaluation",
    "OpenAIJudge",
    "SAEFeatureJudge",
    "SampleScores",
    "ScoreSettings",
    "SinkRule",
    "ToxicScorer",
    "capture",
    "check_sae_fits",
    "filter_dataset",
    "find_features",
    "iter_activations",
    "judge_scores",
    "load_model",
    "load_probe_prompts",
    "load_questions",
    "load_rows",
    "load_sae",
    "load_samples",
    "measure_geometry",
    "random_scores",
    "resolve_hook_point",
    "run_to_hook",
    "score_dataset",
    "write_evaluation",
]
