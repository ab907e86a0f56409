"""The one place geoguard learns which process it is and reduces values across processes (accelerate)."""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import reduce


def process_state() -> PartialState:
    """accelerate's process state, set up for CPU-only machines too.

    accelerate treats a process started by `torchrun` / `accelerate launch` on a machine without an
    accelerator as a single process unless told it runs on CPU; `cpu=True` then gives `MULTI_CPU` over gloo.
    When an `Accelerator` or a Trainer already set the state up, that state is returned unchanged.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def reduce_across_processes(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Sum (or average, `reduction="mean"`) a tensor over all processes; every process must call it.

    A single process gets a copy back. The tensor travels on the process's device (NCCL needs GPU tensors)
    and comes back on the device it came from.
    """
    state = process_state()
    if state.num_processes == 1:
        return tensor.clone()
    return reduce(tensor.to(state.device), reduction=reduction).to(tensor.device)
