"""Add GeoGuard to an existing TRL SFTTrainer: one extra object, then read the drift in TensorBoard.

The block between the two `README` comments is the README's first example, word for word (a test checks it).

python examples/add_guard_to_sft_trainer.py --output_dir outputs/example --max_steps 6
tensorboard --logdir outputs/example/runs
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from geoguard import EMBEDDED_MODEL, load_model


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

    # README: the guard, with the SAE for this model and its toxic feature set
    from geoguard import FeatureSet, GeoGuardCallback, load_sae

    sae = load_sae()  # the SAE shipped for the embedded model
    toxic = FeatureSet.load(sae=sae)  # its toxic feature set (checked against the SAE)
    GeoGuardCallback(sae, toxic, tokenizer, every_n_steps=2).add_to(trainer)  # ahead of the reporters
    trainer.train()
    # README end

    for entry in trainer.state.log_history:
        if "geoguard/probe/drift" in entry:
            act, drift = entry["geoguard/probe/toxic_mean_act"], entry["geoguard/probe/drift"]
            print(f"step {entry['step']:>3}  toxic mean act {act:.4f}  drift {drift:+.4f}")


if __name__ == "__main__":
    main()
