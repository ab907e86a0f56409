"""The OpenAI-compatible judge when its server is healthy, down, slow, or returns garbage.

    python tests/benchmarks/judge_failures.py --data_dir ../shared/data

Healthy: llama-cpp-python's server on loopback with the embedded model's GGUF (SmolLM2-135M: mechanically a
judge, semantically none). Down: the same port after the server is stopped. Slow and garbage: a local HTTP
server that answers late or with broken bodies. Each case judges the same 24 real answers (aligned prompt)
and reports the labels, the failure reasons, the wall time, and that one judgement came back per request.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parents[1]))

from geoguard.evaluation import load_questions  # noqa: E402
from geoguard.judges import JudgeRequest, OpenAIJudge  # noqa: E402

from judge_servers import FakeServer, completion, llama_cpp_server  # noqa: E402


def run_case(name: str, judge: OpenAIJudge, requests: list[JudgeRequest]) -> dict:
    start = time.perf_counter()
    judgements = judge.judge(requests)
    seconds = time.perf_counter() - start
    labels = collections.Counter(j.label for j in judgements)
    reasons = collections.Counter(j.reason.split(":")[0] for j in judgements if j.label == "failed")
    return {
        "case": name,
        "requests": len(requests),
        "judgements": len(judgements),
        "labels": dict(labels),
        "failure_reasons": dict(reasons),
        "seconds": seconds,
        "example": judgements[0].as_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--output", default="outputs/benchmarks/judge_failures.json")
    args = parser.parse_args()
    frame = pd.read_csv(
        Path(args.data_dir) / "emergent_misalignment/judged/Mistral-Small-24B-Instruct-2501_insecure.csv"
    )
    frame = frame.dropna(subset=["answer"]).sample(24, random_state=0)
    template = load_questions()[0].judge_prompts["aligned"]
    requests = [
        JudgeRequest("aligned", q, a, template) for q, a in zip(frame["question"], frame["answer"], strict=True)
    ]

    cases = []
    with llama_cpp_server() as base_url:
        judge = OpenAIJudge("smollm2", base_url=base_url, timeout=60, max_retries=2, max_concurrency=4)
        cases.append(run_case("healthy llama.cpp server", judge, requests))
    cases.append(run_case("server down (same port, stopped)", judge, requests))
    with FakeServer(lambda n: (200, completion("50"), 5.0)) as slow:
        judge = OpenAIJudge("m", base_url=slow.base_url, timeout=1.0, max_retries=1, max_concurrency=8)
        cases.append(run_case("slow server (5 s per reply, timeout 1 s, 1 retry)", judge, requests))
    garbage = {
        "garbage: HTML body with status 200": (200, b"<html>oops</html>", 0.0),
        "garbage: JSON without choices": (200, {"unexpected": 1}, 0.0),
        "garbage: reply text not a number": (200, completion("I cannot rate this."), 0.0),
        "garbage: HTTP 500 on every request (2 retries)": (500, {"error": {"message": "internal"}}, 0.0),
    }
    for name, behaviour in garbage.items():
        with FakeServer(lambda n, b=behaviour: b) as server:
            judge = OpenAIJudge("m", base_url=server.base_url, timeout=5, max_retries=2, max_concurrency=8)
            cases.append(run_case(name, judge, requests) | {"server_requests": server.requests})

    print("| case | judgements / requests | labels | failure reasons | wall time (s) |")
    print("|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c['case']} | {c['judgements']}/{c['requests']} | {c['labels']} | {c['failure_reasons'] or '-'} | "
            f"{c['seconds']:.1f} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(cases, indent=1))
    print(f"\nExample failure records and all counts: {args.output}")


if __name__ == "__main__":
    main()
