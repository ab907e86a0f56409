"""The `geoguard` command line.

    geoguard features --target toxic.jsonl --reference benign.jsonl --name toxic --output_dir sets/toxic
    geoguard geometry --toxic sets/toxic --sets sets/inducing sets/control --output_dir reports/geometry

Each subcommand reads its flags (or `--config file.yaml`) into one dataclass; `geoguard CMD --help`
lists them.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from geoguard.corpora import load_samples
from geoguard.data import Span
from geoguard.features import Contrast, FeatureSet, Pooling, RankBy, find_features
from geoguard.geometry import measure_geometry
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.report import write_feature_set_card, write_geometry_report
from geoguard.sae import EMBEDDED_SAE, load_sae


@dataclass
class ModelAndSAEArguments:
    model: str = field(
        default=EMBEDDED_MODEL, metadata={"help": "Model name or path (the embedded SmolLM2 by default)."}
    )
    sae: str = field(default=EMBEDDED_SAE, metadata={"help": "SAE directory, or a sae-lens release (with --sae_id)."})
    sae_id: str | None = field(
        default=None, metadata={"help": "SAE id inside a sae-lens release, e.g. layer_12/width_16k/canonical."}
    )


@dataclass
class FeaturesArguments(ModelAndSAEArguments):
    target: list[str] = field(
        default_factory=list,
        metadata={"help": "Target-side data (file, saved folder or Hub name), one per contrast, e.g. toxic.jsonl."},
    )
    reference: list[str] = field(
        default_factory=list, metadata={"help": "Reference-side data, paired in order with --target."}
    )
    output_dir: str = field(default="", metadata={"help": "Directory the feature set and its CARD.md are written to."})
    name: str = field(default="features", metadata={"help": "Name of the feature set, e.g. toxic."})
    check_target: list[str] = field(
        default_factory=list, metadata={"help": "Target side of check contrasts: measured, never used for selection."}
    )
    check_reference: list[str] = field(default_factory=list, metadata={"help": "Reference side of check contrasts."})
    text_field: str | None = field(default=None, metadata={"help": "Column with plain text (default: detect)."})
    split: str = field(default="train", metadata={"help": "Split of Hub data sets."})
    max_samples: int | None = field(default=None, metadata={"help": "Random subset per data source."})
    k: int = field(default=100, metadata={"help": "Features in the set (the paper's top-100)."})
    span: Span = field(default="all", metadata={"help": "Tokens used: all, prompt or response."})
    pooling: Pooling = field(default="mean", metadata={"help": "Per-sample pooling: mean (length-normalised) or max."})
    rank_by: RankBy = field(default="auroc", metadata={"help": "Selection statistic: auroc or smd."})
    heldout_fraction: float = field(default=0.3, metadata={"help": "Share of each side held out of selection."})
    max_sample_firing: float = field(
        default=0.9, metadata={"help": "Skip features active in more than this share of every side."}
    )
    match_lengths: bool = field(
        default=False, metadata={"help": "Subsample so both sides have the same length histogram."}
    )
    n_permutations: int = field(default=1000, metadata={"help": "Label permutations for held-out p-values."})
    batch_size: int = field(default=16, metadata={"help": "Samples per forward pass."})
    max_length: int = field(default=512, metadata={"help": "Tokens per sample (longer ones are truncated)."})
    seed: int = field(default=0, metadata={"help": "Seed of subsets, splits and permutations."})

    def __post_init__(self):
        if not self.target or len(self.target) != len(self.reference):
            raise ValueError(
                f"Give one --reference per --target (got {len(self.target)} target and {len(self.reference)} reference "
                "sources); each pair is one contrast."
            )
        if len(self.check_target) != len(self.check_reference):
            raise ValueError("Give one --check_reference per --check_target.")
        if not self.output_dir:
            raise ValueError("--output_dir is required: the directory the feature set is written to.")


@dataclass
class GeometryArguments(ModelAndSAEArguments):
    toxic: str = field(default="", metadata={"help": "Directory of the toxic feature set."})
    sets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Feature-set directories; the first is compared with each other one (inducing, controls...)."
        },
    )
    output_dir: str = field(default="", metadata={"help": "Directory for report.md, geometry.json and the plots."})
    n_null: int = field(default=1000, metadata={"help": "Random sets per null."})
    n_permutations: int = field(default=10000, metadata={"help": "Permutations per set comparison."})
    seed: int = field(default=0, metadata={"help": "Seed of the nulls and permutations."})

    def __post_init__(self):
        if not self.toxic or not self.sets or not self.output_dir:
            raise ValueError("geoguard geometry needs --toxic DIR, --sets DIR [DIR ...] and --output_dir DIR.")


def _contrast(args: FeaturesArguments, target: str, reference: str) -> Contrast:
    def load(source: str):
        return load_samples(
            source, split=args.split, text_field=args.text_field, max_samples=args.max_samples, seed=args.seed
        )

    return Contrast(f"{Path(target).stem}_vs_{Path(reference).stem}", load(target), load(reference))


def run_features(args: FeaturesArguments, command: str = "") -> FeatureSet:
    """`geoguard features`: select a feature set and write it with its card (`command` goes into its provenance)."""
    contrasts = [_contrast(args, t, r) for t, r in zip(args.target, args.reference, strict=True)]
    checks = [_contrast(args, t, r) for t, r in zip(args.check_target, args.check_reference, strict=True)]
    model, tokenizer = load_model(args.model)
    sae = load_sae(args.sae, args.sae_id)
    feature_set = find_features(
        model,
        tokenizer,
        sae,
        contrasts,
        name=args.name,
        k=args.k,
        span=args.span,
        pooling=args.pooling,
        rank_by=args.rank_by,
        heldout_fraction=args.heldout_fraction,
        max_sample_firing=args.max_sample_firing,
        match_lengths=args.match_lengths,
        check_contrasts=checks,
        n_permutations=args.n_permutations,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        provenance={
            "model": args.model,
            "sae": args.sae if args.sae_id is None else f"{args.sae}/{args.sae_id}",
            "target": args.target,
            "reference": args.reference,
            "command": command,
        },
    )
    feature_set.save(args.output_dir)
    card = write_feature_set_card(feature_set, args.output_dir)
    print(
        f"Feature set {feature_set.name!r}: {len(feature_set.feature_ids)} features, held-out AUROC "
        f"{feature_set.summary['heldout_auroc']:.3f}; written to {args.output_dir} (card: {card})."
    )
    for warning in feature_set.summary["warnings"]:
        print(f"WARNING: {warning}")
    return feature_set


def run_geometry(args: GeometryArguments, command: str = "") -> Path:
    """`geoguard geometry`: compare feature sets with the toxic set and write the report (`command` is unused;
    every subcommand takes it)."""
    sae = load_sae(args.sae, args.sae_id)
    toxic = FeatureSet.load(args.toxic, sae=sae)
    sets = [FeatureSet.load(path, sae=sae) for path in args.sets]
    result = measure_geometry(
        toxic, sets, sae.W_dec, n_null=args.n_null, n_permutations=args.n_permutations, seed=args.seed
    )
    report = write_geometry_report(result, args.output_dir)
    for s in result.sets:
        m = s.null_matched["mean_nearest"]
        print(
            f"{s.name}: nearest {s.mean_nearest:.4f} (matched null {m['mean']:.4f} ± {m['std']:.4f}, p = {m['p']:.3g})"
        )
    for c in result.comparisons:
        print(
            f"{c.a} vs {c.b}: Δ nearest {c.nearest_difference:+.4f}, p = {c.nearest_p:.3g}, d = {c.nearest_cohens_d:+.2f}"
        )
    print(f"Report: {report}")
    return report


COMMANDS = {"features": (FeaturesArguments, run_features), "geometry": (GeometryArguments, run_geometry)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\nCommands: " + ", ".join(COMMANDS), file=sys.stderr)
        raise SystemExit(2)
    arguments, run = COMMANDS[argv[0]]
    parser = TrlParser(arguments, prog=f"geoguard {argv[0]}")
    (args,) = parser.parse_args_and_config(argv[1:])
    run(args, "geoguard " + shlex.join(argv))


if __name__ == "__main__":
    main()
