"""Run by test_evaluation.py: the evaluation under torchrun (2 processes) or alone; each rank writes what it got.

torchrun --nproc_per_node 2 tests/distributed_eval.py OUT_DIR
python tests/distributed_eval.py OUT_DIR single
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from geoguard.distributed import process_state
from geoguard.evaluation import EvalSettings, MisalignmentEvaluation, load_questions
from geoguard.judges import Judgement
from geoguard.models import load_model


class RecordingJudge:
    name, judges_coherence = "recording", True

    def __init__(self):
        self.work: list[str] = []

    def judge(self, requests):
        self.work += [f"{r.metric}:{r.question}" for r in requests]
        return [Judgement("score", 50.0) for _ in requests]


def main(out_dir: str, label: str | None = None) -> None:
    state = process_state()
    model, tokenizer = load_model()
    judge = RecordingJudge()
    settings = EvalSettings(samples_per_question=1, temperature=0, max_new_tokens=6, batch_size=2)
    result = MisalignmentEvaluation(judge, load_questions()[:5], settings).run(model, tokenizer)
    name = label or f"rank{state.process_index}"
    payload = {"answers": result.answers, "overall": result.overall, "work": sorted(judge.work)}
    Path(out_dir, f"{name}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main(*sys.argv[1:])
