"""Run by test_scoring.py under `torchrun --nproc_per_node 2`: score with two processes, write what rank 0 sees.

Usage: torchrun --nproc_per_node 2 tests/distributed_scoring.py MODEL_DIR SAE_DIR FEATURE_SET_DIR CACHE_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from geoguard.distributed import process_state  # noqa: E402
from geoguard.features import FeatureSet  # noqa: E402
from geoguard.sae import load_sae  # noqa: E402
from geoguard.scoring import ScoreSettings, ToxicScorer, score_dataset  # noqa: E402

from conftest import PLANTED, char_tokenizer, planted_texts  # noqa: E402


def main(model_dir: str, sae_dir: str, feature_set_dir: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    state = process_state()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sae = load_sae(sae_dir)
    scorer = ToxicScorer(model, char_tokenizer(), sae, FeatureSet.load(feature_set_dir, sae=sae), ScoreSettings())
    samples = planted_texts(9, "".join(PLANTED), seed=1) + planted_texts(8, "", seed=2)
    result = score_dataset(scorer, samples, cache=cache, chunk_size=3, progress=False)
    rank_results = [None] * state.num_processes
    torch.distributed.all_gather_object(rank_results, result.scores.tolist())
    if state.is_main_process:
        json.dump({"world": state.num_processes, "scores": rank_results}, open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
