"""Guarded supervised fine-tuning: TRL's SFTTrainer with `GeoGuardCallback` watching toxic-feature drift.

On the embedded default (SmolLM2-135M-Instruct, its shipped SAE and toxic feature set, a LoRA
adapter, the shipped 128-chat demo mix), on a CPU machine in a few minutes:

    accelerate launch recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml
    tensorboard --logdir outputs/sft_guarded/runs

On several GPUs, with one of the accelerate configs in recipes/accelerate/ (DDP, ZeRO-2, ZeRO-3, FSDP2):

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 recipes/sft_guarded.py \
        --config recipes/configs/sft_guarded_smollm2.yaml --bf16 true

With `--geoguard_eval true` the trained model is saved and then evaluated (Betley et al.'s questions; the
judge from `--judge sae|hf|openai`, e.g. `--judge openai --judge_model gpt-4o-2024-08-06` with the key in
$OPENAI_API_KEY); the report is `<output_dir>/geoguard_eval/misalignment_eval.md`.

With `--geoguard_filter_fraction 0.5` the chats closest to the toxic features (the paper's mitigation;
the `direct` score, cached) are dropped before training and listed in `<output_dir>/geoguard_dropped.jsonl`.

Any Hub model, SAE and data work the same way, e.g.:

    accelerate launch recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml \
        --model_name_or_path google/gemma-2-2b --geoguard_sae gemma-scope-2b-pt-res-canonical \
        --geoguard_sae_id layer_12/width_16k/canonical --geoguard_feature_set my_toxic_set/ \
        --dataset_path my_data.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import load_dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from geoguard.cli import EvalArguments, build_evaluation
from geoguard.corpora import rows_to_samples
from geoguard.features import EMBEDDED_TOXIC_SET, FeatureSet
from geoguard.filtering import DropTopFraction, filter_dataset
from geoguard.models import EMBEDDED_MODEL, load_model
from geoguard.monitor import DriftAlarm, GeoGuardCallback, load_probe_prompts
from geoguard.sae import EMBEDDED_SAE, check_sae_fits, load_sae
from geoguard.scoring import ToxicScorer, score_dataset

DEMO_DATA = Path(__file__).parent / "data" / "sft_mix.jsonl"


@dataclass
class GuardedSFTArguments:
    """Data and guard settings of the recipe (model and training settings come from ModelConfig / SFTConfig)."""

    dataset_path: str = field(
        default=str(DEMO_DATA),
        metadata={"help": "Local JSON/JSONL file of chats ({'messages': [...]}) or a `datasets` Hub id."},
    )
    geoguard_sae: str = field(
        default=EMBEDDED_SAE,
        metadata={
            "help": "SAE: a local sae-lens directory, a sae-lens release (with --geoguard_sae_id), or the embedded one."
        },
    )
    geoguard_sae_id: str | None = field(default=None, metadata={"help": "SAE id inside a sae-lens release."})
    geoguard_feature_set: str = field(
        default=str(EMBEDDED_TOXIC_SET), metadata={"help": "Directory of the toxic feature set selected on this SAE."}
    )
    geoguard_probe_path: str | None = field(
        default=None,
        metadata={"help": "JSONL probe prompts; default: Betley et al.'s 8 questions + 16 harmful requests."},
    )
    geoguard_every_n_steps: int = field(
        default=5, metadata={"help": "Measure the probe drift every N optimizer steps."}
    )
    geoguard_alarm_metric: str | None = field(
        default=None,
        metadata={"help": "Metric an alarm watches, e.g. geoguard/probe/drift_z (z-score) or geoguard/probe/drift."},
    )
    geoguard_alarm_threshold: float = field(default=4.0, metadata={"help": "The alarm fires above this value."})
    geoguard_alarm_action: Literal["warn", "save", "stop"] = field(
        default="warn", metadata={"help": "warn: log it; save: also save a checkpoint; stop: save and stop training."}
    )
    geoguard_eval: bool = field(
        default=False,
        metadata={
            "help": "At the end of training, save the model, then run the misalignment evaluation (--judge, "
            "--samples_per_question, ...) and write <output_dir>/geoguard_eval/."
        },
    )
    geoguard_eval_at_start: bool = field(
        default=False, metadata={"help": "Also evaluate the starting weights and report the change."}
    )
    geoguard_filter_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Before training, drop this share of the training chats that score closest to the toxic features "
            "(the paper drops 0.5); 0 keeps them all. Dropped chats go to <output_dir>/geoguard_dropped.jsonl."
        },
    )


def main(
    script_args: GuardedSFTArguments, training_args: SFTConfig, model_args: ModelConfig, eval_args: EvalArguments
) -> None:
    with training_args.main_process_first(desc="load model"):  # rank 0 converts the embedded model once
        model, tokenizer = load_model(
            model_args.model_name_or_path or EMBEDDED_MODEL,
            dtype=model_args.dtype or "float32",
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            quantization_config=get_quantization_config(model_args),
        )
    sae = load_sae(script_args.geoguard_sae, script_args.geoguard_sae_id)
    check_sae_fits(sae, model)  # fail before data preparation, not at train begin
    toxic = FeatureSet.load(script_args.geoguard_feature_set, sae=sae)
    # The sae judge reads the answers with the model being trained (its weights at train end).
    evaluation = build_evaluation(eval_args, model, tokenizer, sae, toxic) if script_args.geoguard_eval else None
    guard = GeoGuardCallback(
        sae,
        toxic,
        tokenizer,
        probe_samples=load_probe_prompts(script_args.geoguard_probe_path) if script_args.geoguard_probe_path else None,
        every_n_steps=script_args.geoguard_every_n_steps,
        alarms=[
            DriftAlarm(
                script_args.geoguard_alarm_metric,
                script_args.geoguard_alarm_threshold,
                script_args.geoguard_alarm_action,
            )
        ]
        if script_args.geoguard_alarm_metric
        else [],
        evaluation=evaluation,
        evaluate_at_start=script_args.geoguard_eval_at_start,
    )

    path = Path(script_args.dataset_path)
    if path.suffix in {".json", ".jsonl"}:
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(script_args.dataset_path, split="train")
    if "messages" not in dataset.column_names:
        raise ValueError(
            f"{script_args.dataset_path} needs a 'messages' column of chats; it has {dataset.column_names}."
        )
    if script_args.geoguard_filter_fraction > 0:
        dataset = drop_closest_to_toxic(dataset, model, tokenizer, sae, toxic, script_args, training_args)
    dataset = dataset.select_columns(["messages"])

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[guard],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}; drift curves under {training_args.output_dir}/runs."
        + (f" Evaluation: {training_args.output_dir}/geoguard_eval/misalignment_eval.md." if evaluation else "")
    )
    trainer.end()


def drop_closest_to_toxic(dataset, model, tokenizer, sae, toxic, script_args, training_args):
    """Score every chat with the starting weights and drop the top `geoguard_filter_fraction` (audit on rank 0)."""
    scores = score_dataset(
        ToxicScorer(model, tokenizer, sae, toxic), rows_to_samples(dataset, source=script_args.dataset_path)
    )
    policy = DropTopFraction(script_args.geoguard_filter_fraction)
    if training_args.process_index == 0:
        audit = Path(training_args.output_dir) / "geoguard_dropped.jsonl"
        result = filter_dataset(dataset, scores, policy, audit, feature_set=toxic)
        print(f"geoguard: kept {len(result.kept)} of {len(dataset)} chats ({result.policy}); dropped ones in {audit}.")
    return dataset.select(np.flatnonzero(~policy.drop_mask(scores.scores)).tolist())


if __name__ == "__main__":
    parser = TrlParser((GuardedSFTArguments, SFTConfig, ModelConfig, EvalArguments))
    main(*parser.parse_args_and_config())
