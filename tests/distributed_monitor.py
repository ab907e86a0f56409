"""Run by test_monitor.py: a tiny Trainer run with GeoGuardCallback under torchrun, on one backend.

Usage: torchrun --nproc_per_node N tests/distributed_monitor.py BACKEND OUTPUT_DIR [--lora]
BACKEND is `ddp`, `zero2`, `zero3`, `fsdp2` (one step, see `first_step_under_fsdp2`) or `single`. Rank 0 writes the log history and what
wrapped the model to OUTPUT_DIR/log_history.json. Each rank takes 8 / N samples a step, so every backend trains on the same
8 samples per step.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from monitor_setup import guarded_trainer  # noqa: E402


def main(backend: str, output_dir: str, *flags: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = None
    if backend.startswith("zero"):
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": int(backend[-1])},
        }
    trainer, guard = guarded_trainer(
        output_dir, per_device_batch=8 // world, lora="--lora" in flags, deepspeed=deepspeed
    )
    if backend == "fsdp2":
        first_step_under_fsdp2(trainer, guard, world)
    else:
        trainer.train()
    if trainer.is_world_process_zero():
        engine = {
            "world_size": trainer.args.world_size,
            "deepspeed_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None,
            "fsdp": trainer.is_fsdp_enabled,
            "wrapped": type(trainer.model_wrapped).__name__,
        }
        with open(os.path.join(output_dir, "log_history.json"), "w") as out:
            json.dump({"engine": engine, "log_history": trainer.state.log_history}, out)


def first_step_under_fsdp2(trainer, guard, world: int) -> None:
    """accelerate runs FSDP on GPUs only, so on CPU the model is sharded with torch's `fully_shard` (FSDP2) and
    the Trainer's events are called by hand for one training step."""
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    model = trainer.model
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = trainer.is_world_process_zero()
    guard.on_train_begin(trainer.args, state, control, model=model)
    rank, per_rank = trainer.args.process_index, 8 // world
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rank * per_rank, (rank + 1) * per_rank)])
    model(**batch).loss.backward()
    state.global_step = 1
    guard.on_step_end(trainer.args, state, control, model=model)
    guard.on_train_end(trainer.args, state, control, model=model)
    trainer.state = state
    trainer.is_fsdp_enabled = type(model).__name__.startswith("FSDP")


if __name__ == "__main__":
    main(*sys.argv[1:])
