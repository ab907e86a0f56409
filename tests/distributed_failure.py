"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: rank 1 fails mid-work; each rank records what it raised.

Usage: torchrun --nproc_per_node 2 tests/distributed_failure.py {gather,scoring} OUT_DIR

`gather` fails inside `split_and_gather` (the evaluation's path); `scoring` fails inside `score_dataset` on rank
1's second chunk, with the chunk cache in OUT_DIR/cache. Each rank writes OUT_DIR/rank{r}.json with the error it
raised and the seconds from the start of the call to the raise, then raises it (so torchrun exits non-zero).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from geoguard.distributed import process_state, split_and_gather  # noqa: E402
from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset  # noqa: E402

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama  # noqa: E402

FAILURE = "injected failure on rank 1"


class FailingScorer(ToxicScorer):
    """Fails on its `fail_at`-th chunk (counting from 1) when `fail_at` is set, and scores normally otherwise."""

    def __init__(self, *args, fail_at: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.calls = fail_at, 0

    def score_tokenized(self, tokenized, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError(FAILURE)
        return super().score_tokenized(tokenized, **kwargs)


def fail_in_gather(rank: int, out_dir: Path) -> None:
    def work(share):
        if rank == 1:
            raise ValueError(FAILURE)
        return [item * 2 for item in share]

    split_and_gather(list(range(6)), work)


def fail_in_scoring(rank: int, out_dir: Path) -> None:
    model = tiny_llama()  # seeded: every rank builds the same model, SAE and feature set
    sae = planted_sae(model, align_decoder=True)
    scorer = FailingScorer(
        model, char_tokenizer(), sae, planted_feature_set(sae), ScoreSettings(), fail_at=2 if rank == 1 else None
    )
    samples = planted_texts(9, "".join(PLANTED), seed=1) + planted_texts(8, "", seed=2)
    score_dataset(scorer, samples, cache=out_dir / "cache", chunk_size=3, progress=False)


def main(case: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = process_state().process_index
    start = time.perf_counter()
    try:
        {"gather": fail_in_gather, "scoring": fail_in_scoring}[case](rank, Path(out_dir))
    except Exception as error:
        seconds = time.perf_counter() - start
        record = {"error": f"{type(error).__name__}: {error}", "seconds": seconds}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        # Both ranks record before either exits: torchrun stops the other workers as soon as one exits.
        torch.distributed.barrier()
        raise
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"error": None}))


if __name__ == "__main__":
    main(*sys.argv[1:])
