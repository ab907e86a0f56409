"""Guarded supervised fine-tuning: TRL's SFTTrainer with `GeoGuardCallback` watching toxic-feature drift.

On the embedded default (SmolLM2-135M-Instruct, its shipped SAE and toxic feature set, a LoRA
adapter, the shipped 128-chat demo mix), on a CPU machine in a few minutes:

    accelerate launch recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml
    tensorboard --logdir outputs/sft_guarded/runs

On several GPUs, with one of the accelerate configs in recipes/accelerate/ (DDP, ZeRO-2, ZeRO-3, FSDP2):

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 recipes/sft_guarded.py \
        --config recipes/configs/sft_guarded_smollm2.yaml --bf16 true

With `--geoguard_eval true` the trained model is saved and then evaluated (Betley et al.'s questions; the
judge from `--geoguard_judge learned|sae|hf|openai`, e.g. `--geoguard_judge openai --geoguard_judge_model
gpt-4o-2024-08-06` with the key in $OPENAI_API_KEY); the report is `<output_dir>/geoguard_eval/misalignment_eval.md`.

With `--geoguard_filter_fraction 0.5` the chats closest to the toxic features (the paper's mitigation;
the `direct` score, cached) are dropped before training and listed in `<output_dir>/geoguard_dropped.jsonl`.

The data come through TRL's `ScriptArguments`: `--dataset_name` is a Hub data set or a local file or folder
(`.jsonl`, `.json`, `.csv`, `.parquet`, a `save_to_disk` folder), with `--dataset_config` and
`--dataset_train_split`. Any Hub model, SAE and data work the same way; `--geoguard_feature_set toxic` selects
the toxic feature set on that model and SAE from the contrasts shipped with geoguard on first use (cached), e.g.:

    accelerate launch recipes/sft_guarded.py --config recipes/configs/sft_guarded_smollm2.yaml \
        --model_name_or_path google/gemma-2-2b --geoguard_sae gemma-scope-2b-pt-res-canonical \
        --geoguard_sae_id layer_12/width_16k/canonical --geoguard_feature_set toxic \
        --dataset_name my_data.jsonl
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset
from trl import (
    ModelConfig,
    ScriptArguments,
    SFTConfig,
    SFTTrainer,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)

from geoguard import (
    EMBEDDED_MODEL,
    DropTopFraction,
    GeoGuardConfig,
    GeoGuardEvalConfig,
    ToxicScorer,
    filter_dataset,
    get_geoguard_callback,
    load_model,
    load_rows,
    rows_to_samples,
    score_dataset,
)

DEMO_DATA = Path(__file__).parent / "data" / "sft_mix.jsonl"


def main(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    guard_args: GeoGuardConfig,
    eval_args: GeoGuardEvalConfig,
) -> None:
    if script_args.dataset_name is None:
        raise ValueError(f"Give the training data with --dataset_name (a Hub data set or a file such as {DEMO_DATA}).")
    dataset = load_rows(
        script_args.dataset_name, config=script_args.dataset_config, split=script_args.dataset_train_split
    )
    if "messages" not in dataset.column_names:
        raise ValueError(
            f"{script_args.dataset_name} needs a 'messages' column of chats; it has {dataset.column_names}."
        )
    with training_args.main_process_first(desc="load model"):  # rank 0 converts the embedded model once
        model, tokenizer = load_model(
            model_args.model_name_or_path or EMBEDDED_MODEL,
            dtype=model_args.dtype or "float32",
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            quantization_config=get_quantization_config(model_args),
        )
    # Fails here, before data preparation, when the SAE or the feature set does not fit the model.
    guard = get_geoguard_callback(guard_args, tokenizer, model=model, eval_args=eval_args)
    if guard_args.geoguard_filter_fraction > 0:
        scorer = ToxicScorer(model, tokenizer, guard.sae, guard.feature_set)
        dataset = drop_closest(dataset, scorer, script_args.dataset_name, guard_args, training_args)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset.select_columns(["messages"]),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    guard.add_to(trainer)  # ahead of the reporters: the drift curves reach every one of them
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}; drift curves under {training_args.output_dir}/runs."
        + (
            f" Evaluation: {training_args.output_dir}/geoguard_eval/misalignment_eval.md."
            if eval_args.geoguard_eval
            else ""
        )
    )
    trainer.end()


def drop_closest(
    dataset: Dataset, scorer: ToxicScorer, source: str, guard_args: GeoGuardConfig, training_args: SFTConfig
) -> Dataset:
    """Score every chat with the starting weights and drop the top `geoguard_filter_fraction` (audit on rank 0)."""
    scores = score_dataset(scorer, rows_to_samples(dataset, source=source))
    policy = DropTopFraction(guard_args.geoguard_filter_fraction)
    if training_args.process_index == 0:
        audit = Path(training_args.output_dir) / "geoguard_dropped.jsonl"
        result = filter_dataset(dataset, scores, policy, audit, feature_set=scorer.feature_set)
        print(f"geoguard: kept {len(result.kept)} of {len(dataset)} chats ({result.policy}); dropped ones in {audit}.")
    return dataset.select(np.flatnonzero(~policy.drop_mask(scores.scores)).tolist())


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, GeoGuardConfig, GeoGuardEvalConfig))
    main(*parser.parse_args_and_config())
