"""Run by test_capture.py in its own process: capture through DeepSpeed ZeRO-2 and ZeRO-3 engines.

Prints one line per (stage, early_exit) with the max difference to a plain model's activations.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from geoguard.capture import run_to_hook, unwrap_model  # noqa: E402

from conftest import tiny_llama  # noqa: E402


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    inputs = {"input_ids": torch.randint(0, 128, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        plain = run_to_hook(tiny_llama(), "blocks.1.hook_resid_post", **inputs)
    for stage in (2, 3):
        model = tiny_llama()
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        }
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        assert unwrap_model(engine) is model
        # A full forward after an early-exited one checks that ZeRO-3's parameter gathering recovers.
        for early_exit in (True, False):
            with torch.no_grad():
                acts = run_to_hook(engine, "blocks.1.hook_resid_post", early_exit=early_exit, **inputs)
            print(f"stage={stage} early_exit={early_exit} max_diff={(acts - plain).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
