"""Import time of geoguard: `import geoguard`, and the first use of its main names, each in fresh processes.

    python tests/benchmarks/import_time.py                          # this checkout
    python tests/benchmarks/import_time.py --checkout /path/to/old  # another checkout, in the same run

Several checkouts alternate round by round, so machine noise hits them alike. Prints the median of each
statement's wall time and writes `outputs/import_time.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STATEMENTS = {
    "import geoguard": "import geoguard",
    "GeoGuardCallback": "from geoguard import GeoGuardCallback",
    "every public name": "import geoguard\nfor name in geoguard.__all__: getattr(geoguard, name)",
}
TIMED = "import time\nstart = time.perf_counter()\n{statement}\nprint(time.perf_counter() - start)"


def seconds(checkout: Path, statement: str) -> float:
    env = os.environ | {"PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    code = TIMED.format(statement=statement)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", default=[], help="another checkout to time (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="outputs/import_time.json")
    args = parser.parse_args()
    checkouts = [Path(__file__).resolve().parents[2], *map(Path, args.checkout)]
    times = {str(c): {name: [] for name in STATEMENTS} for c in checkouts}
    for _ in range(args.rounds):
        for checkout in checkouts:
            for name, statement in STATEMENTS.items():
                times[str(checkout)][name].append(seconds(checkout, statement))
    print(f"| checkout | {' | '.join(STATEMENTS)} |\n|---|{'---|' * len(STATEMENTS)}")
    for checkout, row in times.items():
        print(f"| {checkout} | " + " | ".join(f"{statistics.median(v):.3f} s" for v in row.values()) + " |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
