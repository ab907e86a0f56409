"""The one place geoguard learns which process it is: accelerate's `PartialState`, CPU runs included."""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's process state, set up for CPU-only machines too.

    accelerate treats a process started by `torchrun` / `accelerate launch` on a machine without an
    accelerator as a single process unless told it runs on CPU; `cpu=True` then gives `MULTI_CPU` over gloo.
    When an `Accelerator` or a Trainer already set the state up, that state is returned unchanged.
    """
    return PartialState(cpu=not torch.cuda.is_available())
