"""geoguard.distributed: one process behaves as plain Python; with two, a failure on one rank is raised on all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoguard.distributed import from_main_process, gather_dicts, split_and_gather

FAILURE_SCRIPT = Path(__file__).parent / "distributed_failure.py"
TIME_LIMIT_S = 120  # torchrun start-up and imports take ~10 s; a rank left waiting would take gloo's 30 minutes


def test_one_process_runs_the_work_and_keeps_its_exceptions():
    assert split_and_gather([1, 2, 3], lambda share: [x * 10 for x in share]) == [10, 20, 30]
    assert gather_dicts(lambda: {"a": 1}) == {"a": 1}
    assert from_main_process(lambda: 7) == 7

    def fail(*_):
        raise KeyError("the original")

    for call in (lambda: split_and_gather([1], fail), lambda: gather_dicts(fail), lambda: from_main_process(fail)):
        with pytest.raises(KeyError, match="the original"):
            call()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_failing(case: str, out_dir: Path) -> tuple[subprocess.CompletedProcess, float, list[dict]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(FAILURE_SCRIPT), case]
    command += [str(out_dir)]
    start = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIME_LIMIT_S, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    elapsed = time.monotonic() - start
    records = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return done, elapsed, records


@pytest.mark.parametrize("case", ["gather", "scoring"])
def test_a_failure_on_rank_1_is_raised_on_every_rank(case, tmp_path):
    done, elapsed, records = _run_failing(case, tmp_path)
    assert done.returncode != 0
    assert elapsed < TIME_LIMIT_S
    expected = "RuntimeError: rank 1 failed: ValueError: injected failure on rank 1"
    assert [r["error"] for r in records] == [expected, expected], done.stderr[-3000:]
    # rank 1's traceback keeps its own exception as the cause
    assert "ValueError: injected failure on rank 1" in done.stderr
    if case == "scoring":
        # 17 samples in chunks of 3: rank 0 scored chunks 0, 2, 4; rank 1 scored chunk 1 and failed on chunk 3.
        # Every finished chunk is in the cache, so a rerun resumes from there.
        cached = sorted(p.name for p in (tmp_path / "cache").rglob("chunk-*.npz"))
        assert cached == [f"chunk-{c:06d}.npz" for c in (0, 1, 2, 4)]
