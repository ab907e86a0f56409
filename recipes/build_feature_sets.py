"""Build the feature sets shipped for the embedded SAE and measure the paper's geometry claim on them.

    python recipes/build_feature_sets.py --data_dir ../shared/data

Writes into `geoguard/resources/feature_sets/` (or `--output_dir`):

- `toxic/`: format-matched contrasts only: ToxiGen hate vs neutral sentences, and harmful vs
  harmless requests (both plain one-line instructions). Jailbroken vs Alpaca chats (which differ
  in format) is a check contrast: it measures transfer and never takes part in selection. Every set
  carries its sparse weighted readout.
- `toxic-direction/`: the direction set of the same contrasts (logistic probe on mean-pooled residuals at the
  SAE's layer), with the SAE features it is made of.
- `inducing-insecure/`, `control-secure/`, `control-educational/`: the features of
  insecure.jsonl (induces emergent misalignment), secure.jsonl and educational_insecure.jsonl
  (controls that do not), each against the same Alpaca chats. All tokens count (`span="all"`):
  the educational control differs from insecure only in the user's framing.
- `geometry/`: `report.md`, `geometry.json` and plots: is the inducing set closer to the toxic set
  than the controls?

The sharper, differential version of the geometry question (insecure vs secure code directly)
runs through the CLI; the README gives the commands.

Each set gets a `CARD.md`. Takes about 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import random
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig, TrlParser

from geoguard.config import GeoGuardSAEConfig
from geoguard.corpora import DataDirArguments, data_root, load_alpaca, load_chats, load_instructions, load_toxigen
from geoguard.directions import direction_composition, find_directions
from geoguard.features import EMBEDDED_FEATURE_SETS, Contrast, find_features
from geoguard.geometry import measure_geometry
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.report import write_feature_set_card, write_geometry_report
from geoguard.sae import load_sae, sae_hook_name


@dataclass
class BuildFeatureSetsArguments(DataDirArguments):
    output_dir: str = field(default=str(EMBEDDED_FEATURE_SETS), metadata={"help": "Where the sets are written."})
    n_samples: int = field(
        default=300, metadata={"help": "Samples per side of the data-set contrasts and of the toxic check contrast."}
    )
    k: int = field(default=100, metadata={"help": "Features per set (the paper's top-100)."})
    n_null: int = field(default=1000, metadata={"help": "Random sets per geometry null."})
    batch_size: int = field(default=16, metadata={"help": "Samples per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, splits and nulls."})


def toxic_contrasts(root: Path, n_check: int, rng: random.Random) -> tuple[list[Contrast], list[Contrast]]:
    """Selection contrasts matched in format, and one format-mismatched check contrast."""
    hate, neutral = load_toxigen(root)
    harmful = [c["messages"][0]["content"] for c in load_instructions(root / "harmful" / "harmful_train.json")]
    harmful += [c["messages"][0]["content"] for c in load_instructions(root / "harmful" / "harmful_val.json")]
    harmless = [c["messages"][0]["content"] for c in load_instructions(root / "benign" / "harmless_train.json")]
    jailbroken = load_chats(root / "emergent_misalignment" / "jailbroken.jsonl")
    alpaca = load_alpaca(root / "benign" / "alpaca_en_demo.json")
    selection = [
        Contrast("toxigen_hate_vs_neutral", hate, neutral),
        Contrast("harmful_vs_harmless_requests", harmful, rng.sample(harmless, len(harmful))),
    ]
    checks = [Contrast("jailbroken_vs_alpaca_chats", rng.sample(jailbroken, n_check), rng.sample(alpaca, n_check))]
    return selection, checks


def main(args: BuildFeatureSetsArguments, model_args: ModelConfig, sae_args: GeoGuardSAEConfig) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    root = data_root(args.data_dir)
    out = Path(args.output_dir)
    model_name = model_args.model_name_or_path or EMBEDDED_MODEL
    model, tokenizer = load_model(model_name)
    sae = load_sae(sae_args.geoguard_sae, sae_args.geoguard_sae_id)
    common = {
        "k": args.k,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "provenance": {
            "model": model_name,
            "sae": sae_args.sae_name,
            "command": "python recipes/build_feature_sets.py " + shlex.join(sys.argv[1:]),
        },
    }

    selection, checks = toxic_contrasts(root, args.n_samples, rng)
    toxic = find_features(model, tokenizer, sae, selection, check_contrasts=checks, name="toxic", **common)
    sets = [toxic]
    direction = find_directions(
        model,
        tokenizer,
        selection,
        check_contrasts=checks,
        name="toxic-direction",
        hook_name=sae_hook_name(sae),
        seed=args.seed,
        batch_size=args.batch_size,
        provenance=common["provenance"],
    )
    direction.summary["composition"] = direction_composition(direction, sae, model=model, tokenizer=tokenizer)
    direction.summary["composition_sae"] = common["provenance"]["sae"]
    direction.save(out / direction.name)
    write_feature_set_card(direction, out / direction.name)
    print(f"toxic-direction: held-out AUROC {direction.summary['methods']}")

    em = root / "emergent_misalignment"
    reference = rng.sample(load_alpaca(root / "benign" / "alpaca_en_demo.json"), args.n_samples)
    for name, stem in (
        ("inducing-insecure", "insecure"),
        ("control-secure", "secure"),
        ("control-educational", "educational_insecure"),
    ):
        target = rng.sample(load_chats(em / f"{stem}.jsonl"), args.n_samples)
        contrast = Contrast(f"{stem}_vs_alpaca", target, reference)
        sets.append(find_features(model, tokenizer, sae, contrast, name=name, **common))

    for feature_set in sets:
        feature_set.save(out / feature_set.name)
        write_feature_set_card(feature_set, out / feature_set.name)
        print(
            f"{feature_set.name}: held-out AUROC {feature_set.summary['heldout_auroc']:.3f}, "
            f"{len(feature_set.summary['warnings'])} warning(s)"
        )
    result = measure_geometry(toxic, sets[1:], sae.W_dec, n_null=args.n_null, seed=args.seed)
    report = write_geometry_report(result, out / "geometry")
    for c in result.comparisons:
        print(
            f"{c.a} vs {c.b}: nearest Δ {c.nearest_difference:+.4f} (p = {c.nearest_p:.3g}, d = {c.nearest_cohens_d:+.2f})"
        )
    print(f"Feature sets and geometry report written to {out} ({report}).")


if __name__ == "__main__":
    main(*TrlParser((BuildFeatureSetsArguments, ModelConfig, GeoGuardSAEConfig)).parse_args_and_config())
