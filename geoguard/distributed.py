"""The one place geoguard learns which process it is, splits work across processes and gathers it (accelerate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")


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

    Every process must call this. With several processes, an exception raised by `work` on any of them is
    raised on all of them, right after the gather, as `RuntimeError("rank 1 failed: ValueError: ...")` (on the
    failing rank chained to its own exception), so no process is left waiting and all of them take the same
    path afterwards. A single process runs `work` on all items, and its exceptions propagate unchanged.

    Args:
        items (`Sequence`): the work, in the order of the results.
        work (`Callable[[list], list]`): maps a list of items to a list of results of the same length.

    Returns:
        `list`: the results of all items, in their order.

    Example:
        ```python
        answers = split_and_gather(prompts, lambda share: generate_answers(model, tokenizer, share, settings))
        ```
    """
    state = process_state()
    if state.num_processes == 1:
        return work(list(items))
    share = my_share(range(len(items)))
    parts = _gather_or_raise(lambda: list(zip(share, work([items[i] for i in share]), strict=True)))
    return [result for _, result in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


def gather_dicts(make: Callable[[], dict[K, V]]) -> dict[K, V]:
    """Run `make` on every process and merge the dicts they return into one, on every process.

    Every process must call this; keys must not collide. Exceptions from `make` are handled as in
    `split_and_gather`: with several processes, a failure on any process is raised on all of them.

    Args:
        make (`Callable[[], dict]`): this process's work; returns its part of the result.

    Returns:
        `dict`: the union of every process's part.

    Example:
        ```python
        scores = gather_dicts(lambda: {c: score(chunks[c]) for c in my_share(range(len(chunks)))})
        ```
    """
    if process_state().num_processes == 1:
        return dict(make())
    return {key: value for part in _gather_or_raise(make) for key, value in part.items()}


def from_main_process(make: Callable[[], T]) -> T:
    """Evaluate `make()` on the main process only and hand its result to every process.

    Every process must call this. With several processes, an exception raised by `make` on the main process is
    raised on every process, as in `split_and_gather`.

    Args:
        make (`Callable[[], T]`): the work, run on the main process only.

    Returns:
        The main process's `make()`.

    Example:
        ```python
        missing = from_main_process(lambda: store.missing(n_chunks))
        ```
    """
    state = process_state()
    if state.num_processes == 1:
        return make()
    outcome, error = _attempt(make) if state.is_main_process else (_Outcome(None, None), None)
    outcome = broadcast_object_list([outcome])[0]
    _raise_failures([outcome], error)
    return outcome.value


class _Outcome(NamedTuple):
    """What one process sends to the others: its result, or what went wrong."""

    value: Any
    failure: str | None  # "ValueError: message" when the work raised


def _attempt(make: Callable[[], Any]) -> tuple[_Outcome, Exception | None]:
    try:
        return _Outcome(make(), None), None
    except Exception as error:  # not swallowed: `_raise_failures` raises it on every process
        return _Outcome(None, f"{type(error).__name__}: {error}"), error


def _raise_failures(outcomes: list[_Outcome], own_error: Exception | None) -> None:
    """Raise the same error on every process when any of `outcomes` (indexed by rank) is a failure.

    One exception type on every rank keeps them on the same path: a handler that catches the error on one rank
    catches it on all, so they meet again at the same collective.
    """
    failures = [f"rank {rank} failed: {o.failure}" for rank, o in enumerate(outcomes) if o.failure is not None]
    if failures:
        raise RuntimeError("; ".join(failures)) from own_error


def _gather_or_raise(make: Callable[[], R]) -> list[R]:
    """Every process's `make()`, indexed by rank, or the failures of any, raised on every process."""
    outcome, error = _attempt(make)
    outcomes = gather_object([outcome])
    _raise_failures(outcomes, error)
    return [o.value for o in outcomes]
