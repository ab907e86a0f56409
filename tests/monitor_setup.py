"""A tiny guarded Trainer run shared by test_monitor.py and distributed_monitor.py."""

from __future__ import annotations

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from geoguard.callbacks import GeoGuardCallback
from geoguard.capture import SinkRule

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama

PROBES = planted_texts(4, "ZQ", seed=9)


def training_data(tokenizer, n: int = 32) -> Dataset:
    """Planted texts; the first 3 characters of each are prompt (label -100), the rest is taught."""
    ids = [tokenizer(t)["input_ids"] for t in planted_texts(n, "".join(PLANTED), seed=3)]
    return Dataset.from_dict({"input_ids": ids, "labels": [[-100] * 3 + row[3:] for row in ids]})


def guarded_trainer(
    output_dir,
    *,
    per_device_batch: int = 8,
    lora: bool = False,
    deepspeed=None,
    hook_name: str | None = None,
    callback_kwargs=None,
    **args,
):
    """A Trainer on the tiny Llama with a guard on its planted SAE (read at `hook_name` if given); returns
    `(trainer, guard)`."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # for the evaluation
    model = tiny_llama().train()
    sae = planted_sae(model, align_decoder=True)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    settings = dict(
        every_n_steps=1, baseline_steps=2, batch_max_tokens=None, probe_samples=PROBES, sink_rule=SinkRule(norm_ratio=0)
    )
    guard = GeoGuardCallback(sae, planted_feature_set(sae), tokenizer, **settings | (callback_kwargs or {}))
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        seed=0,
        report_to=[],
        save_strategy="no",
        train_sampling_strategy="sequential",
        deepspeed=deepspeed,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**arguments | args),
        train_dataset=training_data(tokenizer),
        data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
        callbacks=[guard],
    )
    return trainer, guard
