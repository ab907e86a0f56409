"""geoguard: guard LLM fine-tuning against emergent misalignment with SAE feature geometry."""

from geoguard.capture import HookPoint, SinkRule, capture, iter_activations, resolve_hook_point, run_to_hook
from geoguard.corpora import load_samples
from geoguard.features import Contrast, FeatureSet, find_features
from geoguard.geometry import measure_geometry
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.monitor import GeoGuardCallback, load_probe_prompts
from geoguard.sae import EMBEDDED_SAE, check_sae_fits, load_sae

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_SAE",
    "Contrast",
    "FeatureSet",
    "GeoGuardCallback",
    "HookPoint",
    "SinkRule",
    "capture",
    "check_sae_fits",
    "find_features",
    "iter_activations",
    "measure_geometry",
    "load_model",
    "load_probe_prompts",
    "load_samples",
    "load_sae",
    "resolve_hook_point",
    "run_to_hook",
]
