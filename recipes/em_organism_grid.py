"""The search for a model organism: run a grid of inducing / control pairs, resumably, and tabulate it.

    python recipes/em_organism_grid.py --grid recipes/configs/organism/grid.yaml

The grid file lists cells; each cell is an inducing arm's config, its control's, the seeds, and settings that
override both configs (a learning rate, `use_peft: false` for full fine-tuning, ...), and optionally a
`domain_pattern` (a regular expression of the inducing data's domain: the comparison then also gives the rates
over the answers that do not match it, see `em_organism_compare.py`). Cells run in order, each
run as `recipes/em_organism.py` in its own process under `<output_root>/runs/<arm><overrides>-s<seed>/` (cells
that need the same run share it); a finished run (its `organism.json` exists) is skipped and an interrupted one resumes from its last checkpoint, so the
search goes on where it stopped. `--cells a b` runs only those; `--report_only true` only tabulates; on a GPU
machine, `--use_cpu false --output_root outputs/organism_gpu` runs there and keeps its results apart. Each cell's
`comparison.md` sets its arms side by side (`recipes/em_organism_compare.py`); `<output_root>/grid.md` and
`grid.json` list every finished cell: settings, rates with intervals, coherence and the criterion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from em_organism import rate_text
from em_organism_compare import CompareArguments, compare, difference_text, mean_aligned_text
from trl import TrlParser

RECIPE = Path(__file__).with_name("em_organism.py")


@dataclass
class GridArguments:
    grid: str = field(metadata={"help": "The grid file (recipes/configs/organism/grid.yaml)."})
    cells: list[str] = field(
        default_factory=list,
        metadata={"help": "Run only these cells, in this order (default: all, in the grid's order)."},
    )
    report_only: bool = field(default=False, metadata={"help": "Tabulate finished cells, train nothing."})
    use_cpu: bool = field(
        default=True,
        metadata={"help": "false on a GPU machine: every run trains and evaluates on the GPU (bf16 there)."},
    )
    output_root: str | None = field(
        default=None,
        metadata={"help": "Where runs and reports go (default: the grid file's output_root); keep a GPU grid apart."},
    )


def load_grid(path: str) -> dict:
    grid = yaml.safe_load(Path(path).read_text())
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list) or "output_root" not in grid:
        raise ValueError(f"{path} must hold 'output_root' and a list of 'cells'.")
    names = [cell.get("name") for cell in grid["cells"]]
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: every cell needs a unique string 'name'.")
    for cell in grid["cells"]:
        missing = {"inducing", "control", "seeds"} - set(cell)
        if missing:
            raise ValueError(f"{path}, cell {cell['name']}: missing {', '.join(sorted(missing))}.")
    return grid


def arm_name(config: str) -> str:
    return yaml.safe_load(Path(config).read_text())["organism_arm"]


def run_dirs(grid: dict, cell: dict, side: str) -> list[Path]:
    """One folder per run, named by arm, overrides and seed: cells that need the same run share it."""
    settings = "".join(f"-{key}={value}" for key, value in sorted((cell.get("overrides") or {}).items()))
    root = Path(grid["output_root"]) / "runs"
    return [root / f"{arm_name(cell[side])}{settings}-s{seed}" for seed in cell["seeds"]]


def run(command: list[str]) -> int:
    """Run one arm; stopping the grid (SIGTERM, Ctrl-C) stops the arm too, rather than leaving it running."""
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        child.wait()
        raise


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_cell(grid: dict, cell: dict, use_cpu: bool = True) -> list[str]:
    """Run the cell's unfinished arms; returns the output folders of the runs that failed."""
    failed = []
    overrides = [part for key, value in (cell.get("overrides") or {}).items() for part in (f"--{key}", str(value))]
    overrides += [] if use_cpu else ["--use_cpu", "false"]
    runs = {side: dict(zip(cell["seeds"], run_dirs(grid, cell, side), strict=True)) for side in ("inducing", "control")}
    for seed in cell["seeds"]:  # seed by seed, so a stopped grid leaves complete pairs
        for side in ("inducing", "control"):
            out = runs[side][seed]
            if (out / "organism.json").is_file():
                continue
            command = [
                sys.executable,
                str(RECIPE),
                "--config",
                cell[side],
                "--output_dir",
                str(out),
                "--seed",
                str(seed),
            ]
            command += ["--organism_start_evals", str(Path(grid["output_root"]) / "start_evals"), *overrides]
            print(f"[{time.strftime('%H:%M:%S')}] {cell['name']}: {' '.join(command[1:])}", flush=True)
            if run(command) != 0:
                failed.append(str(out))
    return failed


def tabulate(grid: dict, cells: list[dict]) -> list[dict]:
    """Compare each cell's finished pairs (seeds whose inducing and control runs both finished), seeds pooled."""
    rows = []
    for cell in cells:
        pairs = [
            (seed, inducing, control)
            for seed, inducing, control in zip(
                cell["seeds"], run_dirs(grid, cell, "inducing"), run_dirs(grid, cell, "control"), strict=True
            )
            if (inducing / "organism.json").is_file() and (control / "organism.json").is_file()
        ]
        if not pairs:
            continue
        seeds, inducing, control = (list(column) for column in zip(*pairs, strict=True))
        out = Path(grid["output_root"]) / cell["name"]
        result = compare(
            CompareArguments(
                [str(d) for d in inducing],
                [str(d) for d in control],
                str(out),
                domain_pattern=cell.get("domain_pattern"),
            )
        )
        rows.append({"cell": cell["name"], "overrides": cell.get("overrides") or {}, "seeds": seeds} | result)
    return rows


def write_grid_report(grid: dict, rows: list[dict]) -> Path:
    out = Path(grid["output_root"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Model organism search",
        "",
        "Each row: an inducing arm and its control from one start, seeds pooled; misaligned rates on general "
        "questions disjoint from the training data at the end of training (95% Wilson intervals), the difference "
        "with Newcombe's 95% interval, the same difference on held-out answers to the training questions "
        "(in-domain; compared only where both arms hold out the same questions), the general questions' mean "
        "aligned score (0-100), inducing minus control, over seeds (t interval; none with one seed), the inducing "
        "arm's coherent share; criterion: general interval above zero and coherent > 80%. Details and "
        "per-checkpoint tables in `<cell>/comparison.md`.",
        "",
        "| cell | settings | seeds | inducing | control | difference (95% CI) | in-domain difference "
        "| mean aligned difference | coherent | criterion |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        final = {name: arm["steps"][-1]["general"] for name, arm in row["arms"].items()}
        indomain = (
            difference_text(row["final"]["indomain"], short=True)
            if row["final"]["indomain_same_questions"]
            else "not compared"
        )
        settings = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "config defaults"
        coherent = row["final"]["inducing_coherent_rate"]
        lines.append(
            f"| {row['cell']} | {settings} | {', '.join(map(str, row['seeds']))} | {rate_text(final[row['inducing']])} "
            f"| {rate_text(final[row['control']])} | {difference_text(row['final']['general'], short=True)} | {indomain} "
            f"| {mean_aligned_text(row['final']['mean_aligned'])} | "
            + ("n/a" if coherent is None else f"{100 * coherent:.1f}%")
            + f" | {'met' if row['criterion_met'] else 'not met'} |"
        )
    path = out / "grid.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(args: GridArguments) -> Path:
    grid = load_grid(args.grid)
    grid["output_root"] = args.output_root or grid["output_root"]
    by_name = {c["name"]: c for c in grid["cells"]}
    if unknown := set(args.cells) - set(by_name):
        raise ValueError(f"No cells named {', '.join(sorted(unknown))} in {args.grid}.")
    cells = [by_name[name] for name in args.cells] if args.cells else grid["cells"]
    failed = [] if args.report_only else [out for cell in cells for out in run_cell(grid, cell, args.use_cpu)]
    path = write_grid_report(grid, tabulate(grid, grid["cells"]))
    print(f"Grid report: {path}")
    if failed:
        raise SystemExit(
            f"These runs failed (their logs are above; rerun the grid to resume them): {', '.join(failed)}"
        )
    return path


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main(*TrlParser(GridArguments).parse_args_and_config())
