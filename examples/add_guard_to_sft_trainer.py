"""Add GeoGuard to an existing TRL SFTTrainer: one extra object, then read the drift in TensorBoard.

python examples/add_guard_to_sft_trainer.py --output_dir outputs/example --max_steps 6
tensorboard --logdir outputs/example/runs
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from geoguard import EMBEDDED_MODEL, FeatureSet, GeoGuardCallback, load_model, load_sae
from geoguard.monitor import PROBE_DRIFT, PROBE_MEAN_ACT


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="outputs/example")
    parser.add_argument("--max_steps", type=int, default=6)
    args = parser.parse_args()

    # Your existing fine-tuning set-up (here: the embedded SmolLM2 and the recipe's demo chats).
    model, tokenizer = load_model(EMBEDDED_MODEL)
    dataset = load_dataset("json", data_files="recipes/data/sft_mix.jsonl", split="train").select_columns(["messages"])
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        max_length=128,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="tensorboard",
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, target_modules="all-linear"),
    )

    # The guard: the SAE for this model, its toxic feature set, and how often to probe.
    sae = load_sae()
    trainer.add_callback(GeoGuardCallback(sae, FeatureSet.load(sae=sae), tokenizer, every_n_steps=2))

    trainer.train()
    for entry in trainer.state.log_history:
        if PROBE_DRIFT in entry:
            print(
                f"step {entry['step']:>3}  toxic mean act {entry[PROBE_MEAN_ACT]:.4f}  drift {entry[PROBE_DRIFT]:+.4f}"
            )


if __name__ == "__main__":
    main()
