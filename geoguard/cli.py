"""The `geoguard` command line.

    geoguard features --preset toxic --model google/gemma-2-2b --geoguard_sae gemma-scope-2b-pt-res-canonical \
        --geoguard_sae_id layer_12/width_16k/canonical
    geoguard features --target toxic.jsonl --reference benign.jsonl --name toxic --output_dir sets/toxic
    geoguard features --preset toxic --kind directions --output_dir sets/toxic-direction
    geoguard geometry --geoguard_feature_set sets/toxic --sets sets/inducing sets/control --output_dir reports/geometry
    geoguard score --data train.jsonl --output scored.jsonl
    geoguard filter --data train.jsonl --output kept.jsonl --policy top_fraction --fraction 0.5
    geoguard eval --model outputs/sft_guarded --geoguard_judge openai --geoguard_judge_model gpt-4o-2024-08-06
    geoguard judge --data answers.csv --output judged.jsonl [--geoguard_judge learned|sae|hf|openai]

Each subcommand reads its flags (or `--config file.yaml`) with TRL's `TrlParser` into its own dataclass plus
the ones the recipes use (`geoguard.config`: `--geoguard_sae`, `--geoguard_sae_id`, `--geoguard_feature_set`,
and for `eval` and `judge` the `--geoguard_eval_*` and `--geoguard_judge*` settings); `geoguard CMD --help` lists them.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import numpy as np
from datasets import Dataset
from scipy.stats import spearmanr
from trl import TrlParser

from geoguard.capture import resolve_hook_point
from geoguard.config import GeoGuardEvalConfig, GeoGuardSAEConfig, get_evaluation
from geoguard.corpora import load_rows, load_samples, rows_to_samples, subset_indices
from geoguard.data import Span, tokenize_samples
from geoguard.directions import DirectionMethod, direction_composition, find_directions
from geoguard.distributed import process_state
from geoguard.evaluation import EvalResult, load_questions, write_evaluation
from geoguard.features import Contrast, FeatureSet, Pooling, RankBy, find_features
from geoguard.filtering import (
    DropAbovePercentile,
    DropAboveThreshold,
    DropTopFraction,
    FilterResult,
    filter_dataset,
)
from geoguard.geometry import measure_geometry
from geoguard.judges import JudgeRequest
from geoguard.models import EMBEDDED_MODEL, load_model, load_tokenizer
from geoguard.presets import Preset, model_name_of, preset_names, preset_set_dir
from geoguard.report import agreement_sentence, write_feature_set_card, write_geometry_report
from geoguard.sae import load_sae, sae_hook_name
from geoguard.scoring import (
    NEAREST_COLUMN,
    SCORE_COLUMN,
    SampleScores,
    ScoreMethod,
    ScoreSettings,
    ToxicScorer,
    default_score_cache,
    score_dataset,
)
from geoguard.stats import auroc
from geoguard.validation import Valid, at_least, between, check_fields


@dataclass
class ModelArguments:
    model: str = field(
        default=EMBEDDED_MODEL, metadata={"help": "Model name or path (the embedded SmolLM2 by default)."}
    )


@dataclass
class FeaturesArguments(ModelArguments):
    valid: ClassVar[dict[str, Valid]] = {
        "max_samples": at_least(1),
        "k": at_least(1),
        "heldout_fraction": between(0, 1, open_low=True, open_high=True),
        "max_sample_firing": between(0, 1, open_low=True),
        "n_permutations": at_least(1),
        "batch_size": at_least(1),
        "max_length": at_least(1),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "A contrast preset shipped with geoguard (toxic) instead of --target/--reference; without "
            "--output_dir the set goes where `--geoguard_feature_set toxic` finds it for this model and SAE."
        },
    )
    kind: Literal["sae_features", "directions"] = field(
        default="sae_features",
        metadata={
            "help": "sae_features: the top --k SAE features (with a sparse weighted readout); directions: one "
            "residual-space direction at --hook_name (see --direction_method), read without an SAE."
        },
    )
    direction_method: DirectionMethod = field(
        default="probe",
        metadata={
            "help": "directions: probe (logistic regression) or mean_diff (difference of means); both are measured."
        },
    )
    hook_name: str | None = field(
        default=None,
        metadata={"help": "directions: the hook point read (default: the SAE's, e.g. blocks.11.hook_resid_post)."},
    )
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
    heldout_fraction: float = field(
        default=0.3,
        metadata={
            "help": "Share of each side held out of selection.",
        },
    )
    max_sample_firing: float = field(
        default=0.9,
        metadata={
            "help": "Skip features active in more than this share of every side.",
        },
    )
    match_lengths: bool = field(
        default=False, metadata={"help": "Subsample so both sides have the same length histogram."}
    )
    weighted: bool = field(
        default=True,
        metadata={
            "help": "Also fit the set's sparse (L1) logistic readout on the selection rows (one more pass over them); "
            "scores and drift then use it."
        },
    )
    n_permutations: int = field(default=1000, metadata={"help": "Label permutations for held-out p-values."})
    batch_size: int = field(default=16, metadata={"help": "Samples per forward pass."})
    max_length: int = field(
        default=512, metadata={"help": "Tokens per sample; longer ones are cut to it, counted and flagged on the card."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of subsets, splits and permutations."})

    def __post_init__(self):
        check_fields(self)
        if self.preset is not None:
            Preset.load(self.preset)  # an unknown preset fails here, naming the shipped ones
            if self.target or self.reference:
                raise ValueError("Give either --preset or --target/--reference, not both.")
            if self.name == "features":
                self.name = self.preset
        elif not self.target or len(self.target) != len(self.reference):
            raise ValueError(
                f"Give one --reference per --target (got {len(self.target)} target and {len(self.reference)} reference "
                f"sources); each pair is one contrast. Or use a shipped contrast preset: --preset {preset_names()[0]}."
            )
        if len(self.check_target) != len(self.check_reference):
            raise ValueError("Give one --check_reference per --check_target.")
        if not self.output_dir and (self.preset is None or self.kind == "directions"):
            raise ValueError("--output_dir is required: the directory the feature set is written to.")


@dataclass
class GeometryArguments:
    valid: ClassVar[dict[str, Valid]] = {
        "n_null": at_least(1),
        "n_permutations": at_least(1),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    sets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Feature-set directories measured against --geoguard_feature_set (the toxic set); the first is "
            "compared with each other one (inducing, controls...)."
        },
    )
    output_dir: str = field(default="", metadata={"help": "Directory for report.md, geometry.json and the plots."})
    n_null: int = field(default=1000, metadata={"help": "Random sets per null."})
    n_permutations: int = field(default=10000, metadata={"help": "Permutations per set comparison."})
    seed: int = field(default=0, metadata={"help": "Seed of the nulls and permutations."})

    def __post_init__(self):
        check_fields(self)
        if not self.sets or not self.output_dir:
            raise ValueError(
                "geoguard geometry needs --sets DIR [DIR ...] and --output_dir DIR (and --geoguard_feature_set DIR "
                "for a toxic set other than the embedded one)."
            )


def _contrast(args: FeaturesArguments, target: str, reference: str) -> Contrast:
    def load(source: str):
        return load_samples(
            source, split=args.split, text_field=args.text_field, max_samples=args.max_samples, seed=args.seed
        )

    return Contrast(f"{Path(target).stem}_vs_{Path(reference).stem}", load(target), load(reference))


def read_features_inputs(args: FeaturesArguments, sae_args: GeoGuardSAEConfig) -> dict:
    """The contrasts' samples and the SAE, checked (`--k` against the SAE's width)."""
    if args.preset is not None:
        contrasts = Preset.load(args.preset).load_contrasts(args.max_samples, args.seed)
    else:
        contrasts = [_contrast(args, t, r) for t, r in zip(args.target, args.reference, strict=True)]
    checks = [_contrast(args, t, r) for t, r in zip(args.check_target, args.check_reference, strict=True)]
    sae = load_sae(sae_args.geoguard_sae, sae_args.geoguard_sae_id)
    if args.k > sae.cfg.d_sae:
        raise ValueError(f"--k {args.k} exceeds the SAE's {sae.cfg.d_sae} features; choose --k <= {sae.cfg.d_sae}.")
    return {"contrasts": contrasts, "checks": checks, "sae": sae}


def run_features(
    args: FeaturesArguments, sae_args: GeoGuardSAEConfig, *, contrasts, checks, sae, command: str = ""
) -> FeatureSet:
    """`geoguard features`: select a feature set and write it with its card (`command` goes into its provenance)."""
    model, tokenizer = load_model(args.model)
    provenance = {"model": args.model, "sae": sae_args.sae_name, "command": command}
    if args.preset is None:
        provenance |= {"target": args.target, "reference": args.reference}
    else:
        preset = Preset.load(args.preset)
        provenance |= {"preset": preset.name, "preset_fingerprint": preset.fingerprint()}
    output_dir = args.output_dir or preset_set_dir(preset, model_name_of(model), sae)
    common = {
        "span": args.span,
        "heldout_fraction": args.heldout_fraction,
        "match_lengths": args.match_lengths,
        "check_contrasts": checks,
        "n_permutations": args.n_permutations,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "provenance": provenance,
    }
    if args.kind == "directions":
        hook_name = args.hook_name or sae_hook_name(sae)
        try:
            resolve_hook_point(model, hook_name)
        except ValueError as err:  # a bad --hook_name fails before any sample is read, and writes nothing
            print(f"geoguard features: --hook_name: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        feature_set = find_directions(
            model, tokenizer, contrasts, name=args.name, hook_name=hook_name, method=args.direction_method, **common
        )
        if resolve_hook_point(model, hook_name) == resolve_hook_point(model, sae_hook_name(sae)):
            feature_set.summary["composition"] = direction_composition(
                feature_set, sae, model=model, tokenizer=tokenizer
            )
            feature_set.summary["composition_sae"] = sae_args.sae_name
    else:
        feature_set = find_features(
            model,
            tokenizer,
            sae,
            contrasts,
            name=args.name,
            k=args.k,
            pooling=args.pooling,
            rank_by=args.rank_by,
            max_sample_firing=args.max_sample_firing,
            weighted=args.weighted,
            **common,
        )
    feature_set.save(output_dir)
    card = write_feature_set_card(feature_set, output_dir)
    summary = feature_set.summary
    if feature_set.is_directions:
        measured = ", ".join(f"{method} {value:.3f}" for method, value in summary["methods"].items())
        print(f"Direction set {feature_set.name!r}: held-out AUROC {measured} ({args.direction_method} kept)", end="")
    else:
        weighted = f", weighted readout {summary['weighted']['heldout_auroc']:.3f}" if "weighted" in summary else ""
        print(
            f"Feature set {feature_set.name!r}: {len(feature_set.feature_ids)} features, held-out AUROC "
            f"{summary['heldout_auroc']:.3f} (top-k mean){weighted}",
            end="",
        )
    print(f"; written to {output_dir} (card: {card}).")
    if not args.output_dir:
        print(f"--geoguard_feature_set {args.preset} now uses this set for this model and SAE.")
    for warning in feature_set.summary["warnings"]:
        print(f"WARNING: {warning}")
    return feature_set


def read_geometry_inputs(args: GeometryArguments, sae_args: GeoGuardSAEConfig) -> dict:
    """The SAE, the toxic set and the compared sets, each checked to belong to the SAE."""
    sae, toxic = sae_args.load()
    return {"sae": sae, "toxic": toxic, "sets": [FeatureSet.load(path, sae=sae) for path in args.sets]}


def run_geometry(args: GeometryArguments, sae_args: GeoGuardSAEConfig, *, sae, toxic, sets, command: str = "") -> Path:
    """`geoguard geometry`: compare feature sets with the toxic set and write the report (no model needed)."""
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


_WRITERS = {
    ".jsonl": lambda rows, path: rows.to_json(path, lines=True, force_ascii=False),
    ".json": lambda rows, path: rows.to_json(path, lines=True, force_ascii=False),
    ".csv": lambda rows, path: rows.to_csv(path, index=False),
    ".parquet": lambda rows, path: rows.to_parquet(path),
}


@dataclass
class ScoreArguments(ModelArguments):
    valid: ClassVar[dict[str, Valid]] = {
        "max_samples": at_least(1),
        "batch_size": at_least(1),
        "max_length": at_least(1),
        "chunk_size": at_least(1),
        "passage_tokens": at_least(1),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    data: str = field(
        default="", metadata={"help": "Data to score: a JSON/JSONL/CSV/Parquet file, a saved folder or a Hub data set."}
    )
    output: str = field(
        default="",
        metadata={"help": "Where the scored rows go: .jsonl, .json, .csv, .parquet, or a folder (save_to_disk)."},
    )
    method: ScoreMethod = field(
        default=ScoreSettings.method,
        metadata={
            "help": "Score: direct (toxic features' activation), proximity (activation-weighted decoder "
            "similarity to the nearest toxic feature) or subspace (residual's projection onto the toxic span)."
        },
    )
    span: Span = field(
        default="response", metadata={"help": "Tokens scored: response (what training teaches), prompt or all."}
    )
    pooling: Pooling = field(
        default=ScoreSettings.pooling,
        metadata={
            "help": "Per-sample pooling of token values: mean (dilutes a short passage in a long sample), max, "
            "window_mean (the most activating run of --passage_tokens tokens) or topk_mean (the --passage_tokens "
            "most activating tokens)."
        },
    )
    passage_tokens: int = field(
        default=ScoreSettings.passage_tokens, metadata={"help": "Window of window_mean, k of topk_mean."}
    )
    truncate: bool = field(
        default=False,
        metadata={
            "help": "Score only the first --max_length tokens of longer samples (as training at that length sees "
            "them) instead of reading them whole in windows; the cut tokens are counted in the output."
        },
    )
    text_field: str | None = field(default=None, metadata={"help": "Column with plain text (default: detect)."})
    split: str = field(default="train", metadata={"help": "Split of Hub data sets and saved DatasetDicts."})
    max_samples: int | None = field(default=None, metadata={"help": "Score a seeded random subset of this size."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset."})
    batch_size: int = field(default=16, metadata={"help": "Samples per forward pass."})
    max_length: int = field(
        default=ScoreSettings.max_length,
        metadata={"help": "Tokens per forward pass; longer samples are read whole in windows (unless --truncate)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Score cache (default: ~/.cache/geoguard/scores)."})
    no_cache: bool = field(default=False, metadata={"help": "Neither read nor write the score cache."})
    chunk_size: int = field(
        default=256,
        metadata={
            "help": "Samples per cache chunk: the unit of resuming and of splitting across processes.",
        },
    )

    def __post_init__(self):
        check_fields(self)
        if not self.data or not self.output:
            raise ValueError("--data (the data set) and --output (where its rows are written) are required.")
        if Path(self.output).suffix not in ("", *_WRITERS):
            raise ValueError(
                f"--output {self.output}: use a .jsonl, .json, .csv or .parquet file, or a folder name without a suffix."
            )


@dataclass
class FilterArguments(ScoreArguments):
    valid: ClassVar[dict[str, Valid]] = {
        "fraction": between(0, 1),
        "percentile": between(0, 100),
    }
    """The accepted range of each numeric setting, checked by `geoguard.validation.check_fields`."""

    policy: Literal["top_fraction", "threshold", "reference_percentile"] = field(
        default="top_fraction",
        metadata={
            "help": "top_fraction: drop the highest-scoring --fraction (the paper: 0.5); threshold: drop "
            "scores above --threshold; reference_percentile: drop scores above --percentile of the --reference set's."
        },
    )
    fraction: float = field(default=0.5, metadata={"help": "Share dropped by the top_fraction policy."})
    threshold: float | None = field(default=None, metadata={"help": "Score above which the threshold policy drops."})
    reference: str | None = field(default=None, metadata={"help": "Benign data calibrating reference_percentile."})
    percentile: float = field(
        default=95.0,
        metadata={"help": "Percentile of the reference scores used as threshold."},
    )
    dropped: str | None = field(
        default=None, metadata={"help": "Audit file of dropped rows (default: <output>.dropped.jsonl)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.policy == "threshold" and self.threshold is None:
            raise ValueError("--policy threshold needs --threshold VALUE.")
        if self.policy == "reference_percentile" and not self.reference:
            raise ValueError("--policy reference_percentile needs --reference BENIGN_DATA.")


def _score_settings(args: ScoreArguments) -> ScoreSettings:
    return ScoreSettings(
        method=args.method,
        span=args.span,
        pooling=args.pooling,
        passage_tokens=args.passage_tokens,
        max_length=args.max_length,
        truncate=args.truncate,
    )


def _scorer(args: ScoreArguments, sae, feature_set: FeatureSet) -> ToxicScorer:
    device = process_state().device  # each process scores on its own GPU under accelerate launch
    model, tokenizer = load_model(args.model, device=device)
    return ToxicScorer(model, tokenizer, sae.to(device), feature_set, _score_settings(args), batch_size=args.batch_size)


def _load(args: ScoreArguments, source: str) -> tuple[Dataset, list, list[int]]:
    """Rows and samples of `source`, every row of the file checked (errors name it), then the subset drawn;
    also the file's row number (counted from 1) of each kept row."""
    rows = load_rows(source, split=args.split)
    samples = rows_to_samples(rows, text_field=args.text_field, source=source)
    keep = subset_indices(len(rows), args.max_samples, args.seed)
    return rows.select(keep), [samples[i] for i in keep], [i + 1 for i in keep]


def _check_scoreable(args: ScoreArguments, source: str, samples: list, row_numbers: list[int], tokenizer) -> None:
    """Every sample has tokens to score in the span (errors name the file's rows)."""
    try:
        _score_settings(args).check_scoreable(tokenize_samples(tokenizer, samples, max_length=None), row_numbers)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


def read_score_inputs(args: ScoreArguments, sae_args: GeoGuardSAEConfig) -> dict:
    """The rows and samples to score (and, for `filter`, the reference samples), the SAE and the feature set;
    files first, then the SAE and feature set, then (with the tokenizer alone) the samples' tokens."""
    _score_settings(args)  # bad settings fail before any file is read
    sources = {"data": (args.data, *_load(args, args.data))}
    if getattr(args, "policy", None) == "reference_percentile":
        sources["reference"] = (args.reference, *_load(args, args.reference))
    sae, feature_set = sae_args.load(model_name=args.model)
    tokenizer = load_tokenizer(args.model)  # the model itself loads after every check
    for source, _, samples, row_numbers in sources.values():
        _check_scoreable(args, source, samples, row_numbers, tokenizer)
    _, rows, samples, _ = sources["data"]
    reference = sources["reference"][2] if "reference" in sources else None
    return {"rows": rows, "samples": samples, "reference": reference, "sae": sae, "feature_set": feature_set}


TRUNCATED_COLUMN = "geoguard_truncated_tokens"
"""Column `geoguard score --truncate` writes: tokens of each row past --max_length that were not scored."""


def _long_samples(scores: SampleScores, args: ScoreArguments) -> str:
    """One sentence on the samples longer than --max_length: read whole in windows, or cut (and counted where)."""
    if args.truncate:
        cut = int((scores.truncated_tokens > 0).sum())
        return (
            f"{cut} rows were cut to --max_length {args.max_length} tokens (column {TRUNCATED_COLUMN} counts the rest)."
        )
    whole = int((scores.n_windows > 1).sum())
    return f"{whole} rows longer than --max_length {args.max_length} tokens were read whole in windows."


def _score_interrupted(args: ScoreArguments, sae_args: GeoGuardSAEConfig) -> str:
    if args.no_cache:
        return "Nothing was kept (--no_cache); run the command again without --no_cache to make it resumable."
    cache = args.cache_dir or default_score_cache()
    return f"The scores of every finished chunk are cached under {cache}; run the same command again to resume."


def _score(scorer: ToxicScorer, args: ScoreArguments, samples: list) -> SampleScores:
    cache = None if args.no_cache else (args.cache_dir or "default")
    return score_dataset(scorer, samples, cache=cache, chunk_size=args.chunk_size)


def run_score(
    args: ScoreArguments, sae_args: GeoGuardSAEConfig, *, rows, samples, reference, sae, feature_set, command: str = ""
) -> SampleScores:
    """`geoguard score`: write the rows with `geoguard_score` and `geoguard_nearest` (top toxic feature ids) columns."""
    scores = _score(_scorer(args, sae, feature_set), args, samples)
    if process_state().is_main_process:
        for column in (SCORE_COLUMN, NEAREST_COLUMN):
            if column in rows.column_names:
                rows = rows.remove_columns(column)
        rows = rows.add_column(SCORE_COLUMN, scores.scores.tolist())
        rows = rows.add_column(NEAREST_COLUMN, scores.nearest.tolist())
        if args.truncate:
            rows = rows.remove_columns([c for c in (TRUNCATED_COLUMN,) if c in rows.column_names])
            rows = rows.add_column(TRUNCATED_COLUMN, scores.truncated_tokens.tolist())
        write_rows(rows, args.output)
        q = np.quantile(scores.scores, [0, 0.5, 0.9, 1])
        print(
            f"Scored {len(rows)} rows ({args.method}, {args.span} tokens, {args.pooling} pooling): min {q[0]:.4g}, "
            f"median {q[1]:.4g}, 90th percentile {q[2]:.4g}, max {q[3]:.4g}. {_long_samples(scores, args)} "
            f"Written to {args.output}."
        )
    return scores


def run_filter(
    args: FilterArguments, sae_args: GeoGuardSAEConfig, *, rows, samples, reference, sae, feature_set, command: str = ""
) -> FilterResult | None:
    """`geoguard filter`: score, apply the policy, write the kept rows and the audit file of dropped rows."""
    scorer = _scorer(args, sae, feature_set)
    scores = _score(scorer, args, samples)
    if args.policy == "top_fraction":
        policy = DropTopFraction(args.fraction)
    elif args.policy == "threshold":
        policy = DropAboveThreshold(args.threshold)
    else:
        policy = DropAbovePercentile(_score(scorer, args, reference).scores, args.percentile)
    if not process_state().is_main_process:
        return None
    dropped = args.dropped or f"{args.output.removesuffix('/')}.dropped.jsonl"
    result = filter_dataset(rows, scores, policy, dropped, feature_set=scorer.feature_set)
    write_rows(result.kept, args.output)
    print(
        f"Kept {len(result.kept)} of {len(rows)} rows ({result.policy}); {len(result.dropped_rows)} dropped rows "
        f"with their scores, ranks and nearest toxic features in {result.audit_path}. Kept rows: {args.output}. "
        + _long_samples(scores, args)
    )
    return result


@dataclass
class EvalCommandArguments(ModelArguments):
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the JSON, the report and TensorBoard go."})
    baseline_model: str | None = field(
        default=None,
        metadata={
            "help": "The model before training (e.g. the base model): evaluated the same way, the change reported."
        },
    )


def read_eval_inputs(args: EvalCommandArguments, sae_args: GeoGuardSAEConfig, eval_args: GeoGuardEvalConfig) -> dict:
    """The questions and the judge (a bad question file or a missing API key fails here); for the `sae` judge,
    which reads answers with the evaluated model, the SAE and the feature set."""
    if eval_args.geoguard_eval_questions:
        load_questions(eval_args.geoguard_eval_questions)
    if eval_args.geoguard_judge == "sae":
        return {"evaluation": None, "sae_and_features": sae_args.load(model_name=args.model)}
    return {"evaluation": get_evaluation(eval_args), "sae_and_features": None}


def run_eval(
    args: EvalCommandArguments,
    sae_args: GeoGuardSAEConfig,
    eval_args: GeoGuardEvalConfig,
    *,
    evaluation,
    sae_and_features,
    command: str = "",
) -> EvalResult:
    """`geoguard eval`: answer the questions with --model, judge, write misalignment_eval.{json,md} and TensorBoard."""
    device = process_state().device
    model, tokenizer = load_model(args.model, device=device)
    if evaluation is None:
        sae, feature_set = sae_and_features
        evaluation = get_evaluation(eval_args, model, tokenizer, sae.to(device), feature_set)
    baseline = None
    if args.baseline_model:
        base_model, base_tokenizer = load_model(args.baseline_model, device=device)
        baseline = evaluation.run(base_model, base_tokenizer, name=args.baseline_model).overall
        del base_model
    result = evaluation.run(model, tokenizer, name=args.model)
    result.baseline = baseline
    if process_state().is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(Path(args.output_dir) / "runs")) as writer:
            paths = write_evaluation(result, args.output_dir, writer=writer)
        o = result.overall
        rate = "n/a" if o["misaligned_rate"] is None else f"{o['misaligned_rate']:.1%}"
        incoherent = "coherence not judged" if o["incoherent"] is None else f"{o['incoherent']} incoherent"
        print(
            f"Misaligned: {rate} ({o['misaligned']}/{o['denominator']}; {o['code']} CODE, {o['refusal']} REFUSAL, "
            f"{o['failed']} failed, {incoherent}; judge {result.judge}). Report: {paths['report']}; "
            f"data: {paths['json']}.\n{agreement_sentence(result.judge_agreement)}"
        )
    return result


@dataclass
class JudgeCommandArguments(ModelArguments):
    data: str = field(
        default="",
        metadata={
            "help": "(question, answer) rows to judge: CSV, JSON/JSONL, Parquet, a saved folder, or an evaluation's "
            "misalignment_eval.json."
        },
    )
    output: str = field(
        default="", metadata={"help": "Where the judged rows go: .jsonl, .json, .csv, .parquet, or a folder."}
    )
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer (e.g. response)."})

    def __post_init__(self):
        if not self.data or not self.output:
            raise ValueError("--data (the answers) and --output (where the judged rows are written) are required.")
        if Path(self.output).suffix not in ("", *_WRITERS):
            raise ValueError(
                f"--output {self.output}: use a .jsonl, .json, .csv or .parquet file, or a folder name without a suffix."
            )


JUDGE_COLUMNS = (
    "geoguard_aligned",
    "geoguard_aligned_label",
    "geoguard_coherent",
    "geoguard_coherent_label",
    "geoguard_judge_reason",
    "geoguard_judge",
)


def read_answer_rows(args: JudgeCommandArguments) -> tuple[Dataset, list[str]]:
    """The rows to judge, and per row the problem that keeps it from being judged ('' when none).

    An evaluation's `misalignment_eval.json` gives its answers, with the judge's earlier scores as `aligned` and
    `coherent` columns. A missing column fails here; a row with an empty question or answer is judged as failed.
    """
    path = Path(args.data)
    evaluation = None
    if path.suffix == ".json" and path.is_file():
        try:
            evaluation = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            evaluation = None  # JSON lines: load_rows reads (and checks) them
    if isinstance(evaluation, dict) and isinstance(evaluation.get("answers"), list):
        rows = Dataset.from_list(
            [
                {k: v for k, v in a.items() if k not in ("aligned", "coherent")}
                | {m: (a.get(m) or {}).get("score") for m in ("aligned", "coherent")}
                for a in evaluation["answers"]
            ]
        )
    else:
        rows = load_rows(args.data)
    missing = [c for c in (args.question_column, args.answer_column) if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"{args.data} has no column {', '.join(map(repr, missing))} (columns: {', '.join(rows.column_names)}); "
            "name them with --question_column / --answer_column."
        )
    problems = [
        ""
        if isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()
        else f"no {'question' if not (isinstance(q, str) and q.strip()) else 'answer'} text"
        for q, a in zip(rows[args.question_column], rows[args.answer_column], strict=True)
    ]
    return rows, problems


def read_judge_inputs(args: JudgeCommandArguments, sae_args: GeoGuardSAEConfig, eval_args: GeoGuardEvalConfig) -> dict:
    rows, problems = read_answer_rows(args)
    inputs = read_eval_inputs(EvalCommandArguments(model=args.model), sae_args, eval_args)
    return {"rows": rows, "problems": problems, **inputs}


def run_judge(
    args: JudgeCommandArguments,
    sae_args: GeoGuardSAEConfig,
    eval_args: GeoGuardEvalConfig,
    *,
    rows: Dataset,
    problems: list[str],
    evaluation,
    sae_and_features,
    command: str = "",
) -> Dataset:
    """`geoguard judge`: judge saved answers with any judge; every row comes out, failures recorded as failed."""
    if evaluation is None:
        model, tokenizer = load_model(args.model)
        evaluation = get_evaluation(eval_args, model, tokenizer, *sae_and_features)
    judge, template = evaluation.judge, evaluation.questions[0].judge_prompts
    metrics = ("aligned", "coherent") if evaluation.judges_coherence else ("aligned",)
    todo = [i for i, problem in enumerate(problems) if not problem]
    questions, answers = rows[args.question_column], rows[args.answer_column]  # whole columns: one read each
    requests = [JudgeRequest(m, questions[i], answers[i], template[m]) for i in todo for m in metrics]
    judged = evaluation.judge_all(requests)
    out: dict[str, list] = {c: [None] * len(rows) for c in JUDGE_COLUMNS}
    for i, problem in enumerate(problems):
        if problem:
            out["geoguard_aligned_label"][i] = out["geoguard_coherent_label"][i] = "failed"
            out["geoguard_judge_reason"][i] = problem
    for n, i in enumerate(todo):
        reasons = []
        for j, m in enumerate(metrics):
            judgement = judged[n * len(metrics) + j]
            out[f"geoguard_{m}"][i], out[f"geoguard_{m}_label"][i] = judgement.score, judgement.label
            reasons.append(f"{m}: {judgement.reason}")
        out["geoguard_judge_reason"][i] = "; ".join(reasons)
    out["geoguard_judge"] = [judge.name] * len(rows)
    result = rows
    for column, values in out.items():
        result = result.remove_columns([column]) if column in result.column_names else result
        result = result.add_column(column, values)
    write_rows(result, args.output)
    labels = Counter(out["geoguard_aligned_label"])
    bad = [f"{i + 1}: {p}" for i, p in enumerate(problems) if p]
    print(
        f"Judged {len(rows)} rows with {judge.name} into {args.output}: "
        + ", ".join(f"{n} {label}" for label, n in sorted(labels.items()))
        + (
            f". Rows not judged (recorded as failed, 1-based): {'; '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "")
            if bad
            else ""
        )
        + f".\n{agreement_sentence(getattr(judge, 'agreement', None))}"
        + _agreement_with_columns(rows, out)
    )
    return result


def _agreement_with_columns(rows: Dataset, out: dict[str, list]) -> str:
    """When the rows carry another judge's numeric `aligned` scores, how this judge agrees with them."""
    if "aligned" not in rows.column_names:
        return ""
    pairs = [
        (float(ref), score)
        for ref, score in zip(rows["aligned"], out["geoguard_aligned"], strict=True)
        if isinstance(ref, (int, float)) and ref == ref and score is not None
    ]
    if len(pairs) < 3:
        return ""
    reference, judged = np.array(pairs).T
    low = reference < 30
    auroc_text = f"{auroc(100 - judged[low], 100 - judged[~low]):.3f}" if 0 < low.sum() < len(low) else "n/a"
    rho = spearmanr(judged, reference).statistic
    return (
        f"\nAgainst the rows' own aligned column ({len(pairs)} rows scored by both): AUROC for aligned < 30 "
        f"{auroc_text}, Spearman {rho:.3f}."
    )


def write_rows(rows: Dataset, path: str) -> None:
    """Write rows by the file suffix: .jsonl / .json (JSON lines), .csv, .parquet, or a `save_to_disk` folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _WRITERS.get(Path(path).suffix, lambda rows, path: rows.save_to_disk(path))(rows, path)


class Command(NamedTuple):
    """A subcommand: its settings, what it reads and checks before any model loads, the run, and what an
    interruption (Ctrl-C) leaves behind."""

    settings: tuple[type, ...]
    read_inputs: Callable[..., dict]
    run: Callable[..., object]
    interrupted: Callable[..., str]


def _nothing_kept(*settings) -> str:
    return "Nothing was written (nothing is cached for this command); run the same command again to start over."


COMMANDS = {
    "features": Command((FeaturesArguments, GeoGuardSAEConfig), read_features_inputs, run_features, _nothing_kept),
    "geometry": Command((GeometryArguments, GeoGuardSAEConfig), read_geometry_inputs, run_geometry, _nothing_kept),
    "score": Command((ScoreArguments, GeoGuardSAEConfig), read_score_inputs, run_score, _score_interrupted),
    "filter": Command((FilterArguments, GeoGuardSAEConfig), read_score_inputs, run_filter, _score_interrupted),
    "eval": Command(
        (EvalCommandArguments, GeoGuardSAEConfig, GeoGuardEvalConfig), read_eval_inputs, run_eval, _nothing_kept
    ),
    "judge": Command(
        (JudgeCommandArguments, GeoGuardSAEConfig, GeoGuardEvalConfig), read_judge_inputs, run_judge, _nothing_kept
    ),
}


def main(argv: list[str] | None = None) -> None:
    """Run a `geoguard` subcommand. Every command goes the same way: parse and check the settings, read and
    check the input data, and only then load a model. A bad setting or input ends the command with one line
    naming it and exit code 2; Ctrl-C ends it with one line saying what was kept, and exit code 130."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\nCommands: " + ", ".join(COMMANDS), file=sys.stderr)
        raise SystemExit(2)
    name, command = argv[0], COMMANDS[argv[0]]
    try:
        settings = TrlParser(command.settings, prog=f"geoguard {name}").parse_args_and_config(argv[1:])
        inputs = command.read_inputs(*settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"geoguard {name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"geoguard {name}: interrupted before any work; nothing was written.", file=sys.stderr)
        raise SystemExit(130) from None
    try:
        # Nothing is returned: the console script passes a return value to sys.exit, which would print it and exit 1.
        command.run(*settings, **inputs, command="geoguard " + shlex.join(argv))
    except KeyboardInterrupt:
        print(f"geoguard {name}: interrupted. {command.interrupted(*settings)}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
