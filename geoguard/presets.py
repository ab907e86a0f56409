"""Contrast presets: contrast data shipped with geoguard, and the feature sets they give on any model and SAE.

A *preset* is a folder of `geoguard/resources/contrasts/` with a `preset.json` (its contrasts, each a target
and a reference file) and the data files, all under licences that allow redistribution (see
`resources/ATTRIBUTION.md`). `geoguard features --preset toxic` and `--geoguard_feature_set toxic` select the
preset's feature set on the model and SAE at hand; the set is cached under `<geoguard cache>/feature_sets/`,
keyed by the model, the SAE's decoder fingerprint and the preset data's hash, so it is built once.

```python
sae = load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
toxic = load_feature_set("toxic", sae, model=model, tokenizer=tokenizer)  # built on first use, then cached
```
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sae_lens import SAE
from torch import nn
from transformers import PreTrainedTokenizerBase

from geoguard.capture import unwrap_model
from geoguard.corpora import load_samples
from geoguard.data import RESOURCES
from geoguard.distributed import process_state
from geoguard.features import Contrast, FeatureSet, find_features, sae_fingerprint
from geoguard.models import cache_dir, model_id
from geoguard.report import write_feature_set_card

PRESETS_DIR = RESOURCES / "contrasts"
"""The shipped presets, one folder each (`toxic/`)."""


def preset_names() -> list[str]:
    """Names of the shipped presets, e.g. `["toxic"]`."""
    return sorted(path.parent.name for path in PRESETS_DIR.glob("*/preset.json"))


@dataclass
class Preset:
    """A shipped set of contrasts for one concept.

    Attributes:
        name: the concept, also the name of the feature sets built from it (`"toxic"`).
        description: one line on what the contrasts hold.
        path: the preset's folder.
        contrasts: `{"name", "target", "reference"}` per contrast, files relative to `path`.
    """

    name: str
    description: str
    path: Path
    contrasts: list[dict[str, str]]

    @classmethod
    def load(cls, name: str) -> Preset:
        """The shipped preset `name`; `ValueError` naming the shipped ones when there is none."""
        file = PRESETS_DIR / name / "preset.json"
        if not file.is_file():
            raise ValueError(
                f"No contrast preset {name!r}; geoguard ships {preset_names()}. For another concept give your own "
                "contrast: geoguard features --target concept.jsonl --reference neutral.jsonl --name NAME."
            )
        spec = json.loads(file.read_text(encoding="utf-8"))
        return cls(spec["name"], spec["description"], file.parent, spec["contrasts"])

    def load_contrasts(self, max_samples: int | None = None, seed: int = 0) -> list[Contrast]:
        """The preset's contrasts, each side optionally a random subset of `max_samples`."""

        def side(file: str) -> list:
            return load_samples(str(self.path / file), max_samples=max_samples, seed=seed)

        return [Contrast(c["name"], side(c["target"]), side(c["reference"])) for c in self.contrasts]

    def fingerprint(self) -> str:
        """A short hash of the preset's files: a cached set is rebuilt when the shipped data change."""
        digest = hashlib.sha256()
        for file in sorted(self.path.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        return digest.hexdigest()[:12]


def model_name_of(model: nn.Module) -> str:
    """The name or path a model was loaded from (`config.name_or_path`; `load_model` makes a path absolute)."""
    return model_id(unwrap_model(model).config.name_or_path or type(unwrap_model(model)).__name__)


def preset_set_dir(preset: Preset, model_name: str, sae: SAE) -> Path:
    """Where the preset's feature set for this model and SAE is cached."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip("-.")[-80:]
    return (
        cache_dir() / "feature_sets" / preset.name / f"{slug}--sae-{sae_fingerprint(sae)}--data-{preset.fingerprint()}"
    )


def build_preset_feature_set(
    preset: Preset,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    output_dir: str | Path,
    *,
    sae_name: str,
    max_samples: int | None = None,
    command: str = "",
    **find_kwargs,
) -> FeatureSet:
    """Select the preset's feature set on `model` and `sae` and write it, with its card, to `output_dir`.

    Args:
        preset (`Preset`): the contrasts.
        model, tokenizer, sae: the model and the SAE that reads it.
        output_dir (`str` or `Path`): where the set and its `CARD.md` go.
        sae_name (`str`): how the SAE was named (release/sae_id or path), for the provenance.
        max_samples (`int`, *optional*): a random subset per side (all samples by default).
        command (`str`): the command that built it, for the provenance.
        **find_kwargs: passed to `find_features` (`k`, `pooling`, `batch_size`, `seed`, ...).
    """
    seed = find_kwargs.get("seed", 0)
    feature_set = find_features(
        model,
        tokenizer,
        sae,
        preset.load_contrasts(max_samples, seed),
        name=preset.name,
        provenance={
            "model": model_name_of(model),
            "sae": sae_name,
            "preset": preset.name,
            "preset_fingerprint": preset.fingerprint(),
            "command": command,
        },
        **find_kwargs,
    )
    feature_set.save(output_dir)
    write_feature_set_card(feature_set, output_dir)
    return feature_set


def load_feature_set(
    name_or_path: str | Path,
    sae: SAE,
    *,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_name: str | None = None,
    sae_name: str = "",
) -> FeatureSet:
    """A feature set directory, or a preset's set for the model and `sae` (built on first use, then cached).

    Args:
        name_or_path (`str` or `Path`): a directory written by `geoguard features`, or a preset name (`"toxic"`).
        sae (`SAE`): the SAE the set must belong to.
        model, tokenizer (*optional*): the model the preset's set is built on when it is not cached yet.
        model_name (`str`, *optional*): the model's name, to find a cached preset set without the model
            (default: the name `model` was loaded with).
        sae_name (`str`): how the SAE was named, for a new set's provenance.

    With several processes the main process builds the set while the others wait, then all load it.

    Raises:
        FileNotFoundError: when `name_or_path` is neither a feature set directory nor a preset.
        ValueError: when the set belongs to another SAE, or a preset's set is not built and no model is given.
    """
    path = Path(name_or_path)
    if path.is_dir() or str(name_or_path) not in preset_names():
        if not path.is_dir():
            raise FileNotFoundError(
                f"No feature set at {name_or_path}: neither a directory nor a preset ({', '.join(preset_names())}). "
                "Pass a directory written by `geoguard features`, or a preset name to build one for this model."
            )
        return FeatureSet.load(path, sae=sae)
    preset = Preset.load(str(name_or_path))
    if model_name is None and model is None:
        raise ValueError(f"The preset {preset.name!r} is selected per model: pass the model or its name.")
    out = preset_set_dir(preset, model_id(model_name) if model_name else model_name_of(model), sae)
    if model is None and not (out / "feature_set.json").is_file():
        raise ValueError(
            f"The {preset.name!r} feature set is not built for {model_name} and this SAE yet. Build it once with "
            f"`geoguard features --preset {preset.name} --model {model_name} --geoguard_sae ... [--geoguard_sae_id ...]` "
            "(the recipe builds it by itself)."
        )
    with process_state().main_process_first():
        if not (out / "feature_set.json").is_file() and process_state().is_main_process:
            print(f"geoguard: selecting the {preset.name!r} feature set on this model and SAE, once; cached in {out}.")
            partial = out.with_name(f"{out.name}.partial-{os.getpid()}")  # a killed build leaves no half set
            build_preset_feature_set(preset, model, tokenizer, sae, partial, sae_name=sae_name)
            if (out / "feature_set.json").is_file():  # another job built it meanwhile
                shutil.rmtree(partial)
            else:
                shutil.rmtree(out, ignore_errors=True)
                os.replace(partial, out)
    return FeatureSet.load(out, sae=sae)
