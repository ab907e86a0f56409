"""The one place geoguard learns which process it is, splits work across processes and gathers it (accelerate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce

T = TypeVar("T")
R = TypeVar("R")


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


def my_share(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every `num_processes`-th item from its rank (balanced for sorted work)."""
    state = process_state()
    return list(items[state.process_index :: state.num_processes])


def split_and_gather(items: Sequence[T], work: Callable[[list[T]], list[R]]) -> list[R]:
    """Run `work` on this process's share of `items` and return all results, in the items' order, on every process.

    `work` maps a list of items to a list of results of the same length. Every process must call this.
    """
    state = process_state()
    if state.num_processes == 1:
        return work(list(items))
    share = my_share(range(len(items)))
    done = work([items[i] for i in share])
    gathered = gather_object([(i, result) for i, result in zip(share, done, strict=True)])
    return [result for _, result in sorted(gathered, key=lambda pair: pair[0])]


def gather_dicts(part: dict) -> dict:
    """Merge every process's dict into one, on every process (keys must not collide)."""
    if process_state().num_processes == 1:
        return dict(part)
    return {key: value for parts in gather_object([part]) for key, value in parts.items()}


def from_main_process(make: Callable[[], T]) -> T:
    """Evaluate `make()` on the main process only and hand its result to every process."""
    state = process_state()
    if state.num_processes == 1:
        return make()
    return broadcast_object_list([make() if state.is_main_process else None])[0]
