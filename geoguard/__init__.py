"""geoguard: guard LLM fine-tuning against emergent misalignment with SAE feature geometry.

The public API, by stage. Importing geoguard loads none of it (and changes no global state): each name is
imported from its module on first use, as `transformers` does.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # load: models, SAEs, data
    "geoguard.models": ["EMBEDDED_MODEL", "load_model"],
    "geoguard.sae": ["EMBEDDED_SAE", "check_sae_fits", "load_sae"],
    "geoguard.corpora": ["load_probe_prompts", "load_rows", "load_samples", "rows_to_samples"],
    "geoguard.capture": ["HookPoint", "SinkRule", "capture", "iter_activations", "resolve_hook_point", "run_to_hook"],
    # discover: feature sets and their geometry
    "geoguard.features": ["Contrast", "FeatureSet", "find_features"],
    "geoguard.presets": ["Preset", "load_feature_set", "preset_names"],
    "geoguard.geometry": ["measure_geometry"],
    # score and filter training data
    "geoguard.scoring": ["SampleScores", "ScoreSettings", "ToxicScorer", "score_dataset"],
    "geoguard.filtering": [
        "DropAbovePercentile",
        "DropAboveThreshold",
        "DropTopFraction",
        "filter_dataset",
        "judge_scores",
        "random_scores",
    ],
    "geoguard.collator": ["GeoGuardCollator"],
    # train: callbacks and their configuration
    "geoguard.monitor": ["DriftAlarm", "DriftMonitorCallback"],
    "geoguard.callbacks": ["GeoGuardCallback", "MisalignmentEvalCallback"],
    "geoguard.config": [
        "GeoGuardConfig",
        "GeoGuardEvalConfig",
        "GeoGuardSAEConfig",
        "get_evaluation",
        "get_geoguard_callback",
        "get_judge",
    ],
    # evaluate: questions, judges, reports
    "geoguard.evaluation": ["EvalSettings", "MisalignmentEvaluation", "load_questions", "write_evaluation"],
    "geoguard.judges": ["HFJudge", "Judgement", "JudgeRequest", "OpenAIJudge", "SAEFeatureJudge"],
    "geoguard.learned_judge": ["EMBEDDED_JUDGE", "LearnedJudge"],
}
_MODULE_OF = {name: module for module, names in _API.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'geoguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
