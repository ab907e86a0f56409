"""geoguard: guard LLM fine-tuning against emergent misalignment with SAE feature geometry."""

from geoguard.capture import HookPoint, SinkRule, capture, iter_activations, resolve_hook_point, run_to_hook
from geoguard.collator import GeoGuardCollator
from geoguard.corpora import load_rows, load_samples
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
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.monitor import DriftAlarm, GeoGuardCallback, load_probe_prompts
from geoguard.sae import EMBEDDED_SAE, check_sae_fits, load_sae
from geoguard.scoring import SampleScores, ScoreSettings, ToxicScorer, score_dataset

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_SAE",
    "Contrast",
    "DriftAlarm",
    "DropAbovePercentile",
    "DropAboveThreshold",
    "DropTopFraction",
    "FeatureSet",
    "GeoGuardCallback",
    "GeoGuardCollator",
    "HookPoint",
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
    "load_rows",
    "load_sae",
    "load_samples",
    "measure_geometry",
    "random_scores",
    "resolve_hook_point",
    "run_to_hook",
    "score_dataset",
]
