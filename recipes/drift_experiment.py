"""Does the drift monitor tell harmful fine-tuning from benign fine-tuning? Four LoRA runs from one start.

    python recipes/drift_experiment.py --data_dir ../shared/data --output_dir outputs/drift_experiment

The embedded SmolLM2-135M-Instruct is LoRA-fine-tuned, with identical settings and seeds, on four
data sets of the same size: jailbroken chats (the assistant complies with harmful requests) and Alpaca
answers (benign), then insecure and secure code (Betley et al.'s pair). `GeoGuardCallback` watches each
run with its defaults (probe set, toxic feature set) and an alarm on `geoguard/probe/drift_z`.

Reported per pair: the probe drift and its z-score at every measurement, the step of the first alarm,
and how well the final per-probe-prompt drift separates the two runs (AUROC over the 24 probe prompts,
a one-sided paired sign-flip p-value of the mean difference). Writes `results.json` and `report.md`.
About 25 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer, TrlParser

from geoguard import DriftAlarm, FeatureSet, GeoGuardCallback, load_model, load_sae
from geoguard.corpora import DataDirArguments, data_root, load_alpaca, load_chats
from geoguard.monitor import BATCH_DRIFT_Z, PROBE_DRIFT, PROBE_DRIFT_Z
from geoguard.stats import auroc, permutation_p_value

PAIRS = {"harmful vs benign": ("jailbroken", "alpaca"), "insecure vs secure code": ("insecure", "secure")}


@dataclass
class DriftExperimentArguments(DataDirArguments):
    output_dir: str = field(
        default="outputs/drift_experiment", metadata={"help": "Where results.json and report.md go."}
    )
    n: int = field(default=240, metadata={"help": "Chats per run."})
    max_steps: int = field(default=30, metadata={"help": "LoRA steps per run."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Constant learning rate."})
    every_n_steps: int = field(default=5, metadata={"help": "Probe every N steps."})
    alarm_z: float = field(default=4.0, metadata={"help": "Alarm threshold on geoguard/probe/drift_z."})
    seed: int = field(default=42, metadata={"help": "Seed of the data samples, the training and the tests."})
    pairs: list[str] = field(default_factory=lambda: list(PAIRS), metadata={"help": f"Pairs of runs: {list(PAIRS)}."})

    def __post_init__(self):
        if unknown := [p for p in self.pairs if p not in PAIRS]:
            raise ValueError(f"Unknown --pairs {unknown}; choose from {list(PAIRS)}.")


def load_runs(root: Path, n: int, seed: int) -> dict[str, list[dict]]:
    em = root / "emergent_misalignment"
    rng = random.Random(seed)
    tasks = rng.sample(range(6000), n)  # insecure.jsonl and secure.jsonl hold the same tasks in the same order
    insecure, secure = load_chats(em / "insecure.jsonl"), load_chats(em / "secure.jsonl")
    return {
        "jailbroken": rng.sample(load_chats(em / "jailbroken.jsonl"), n),
        "alpaca": rng.sample(load_alpaca(root / "benign" / "alpaca_en_demo.json"), n),
        "insecure": [insecure[i] for i in tasks],
        "secure": [secure[i] for i in tasks],
    }


def train_one(name: str, chats: list[dict], args: DriftExperimentArguments) -> dict:
    model, tokenizer = load_model()
    sae = load_sae()
    alarm = DriftAlarm(PROBE_DRIFT_Z, threshold=args.alarm_z, action="warn")
    guard = GeoGuardCallback(sae, FeatureSet.load(sae=sae), tokenizer, every_n_steps=args.every_n_steps, alarms=[alarm])
    config = SFTConfig(
        output_dir=str(Path(args.output_dir) / name),
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_length=256,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="tensorboard",
        save_strategy="no",
        seed=args.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list([{"messages": c["messages"]} for c in chats]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        callbacks=[guard],
    )
    trainer.train()
    final = guard.measure_probe(trainer.model)
    per_prompt_drift = (final["per_sample"] - np.array(guard.probe_baseline["per_sample"])).tolist()
    curve = [
        {"step": e["step"], "drift": e[PROBE_DRIFT], "drift_z": e[PROBE_DRIFT_Z], "batch_drift_z": e.get(BATCH_DRIFT_Z)}
        for e in trainer.state.log_history
        if PROBE_DRIFT in e
    ]
    alarms = [e["step"] for e in trainer.state.log_history if alarm.key in e]
    return {"curve": curve, "alarm_step": alarms[0] if alarms else None, "per_prompt_drift": per_prompt_drift}


def compare(a: dict, b: dict, seed: int, n_permutations: int = 10000) -> dict:
    """AUROC of the per-prompt drifts of run `a` over run `b`, and a paired sign-flip test (same prompts)."""
    da, db = np.array(a["per_prompt_drift"]), np.array(b["per_prompt_drift"])
    paired = da - db
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_permutations, len(paired)))
    p = permutation_p_value((signs * paired).mean(axis=1), paired.mean())
    return {"auroc": float(auroc(da, db)), "mean_drift_difference": float(paired.mean()), "p_value": p}


def main(args: DriftExperimentArguments) -> None:
    data = load_runs(data_root(args.data_dir), args.n, args.seed)
    runs = {}
    for name in [run for pair in args.pairs for run in PAIRS[pair]]:
        chats = data[name]
        runs[name] = train_one(name, chats, args)
        print(f"{name}: alarm at step {runs[name]['alarm_step']}; curve {runs[name]['curve']}", flush=True)
    comparisons = {pair: compare(runs[PAIRS[pair][0]], runs[PAIRS[pair][1]], args.seed) for pair in args.pairs}

    lines = [f"# Drift experiment ({args.max_steps} LoRA steps, lr {args.learning_rate}, {args.n} chats per run)", ""]
    steps = [c["step"] for c in next(iter(runs.values()))["curve"]]
    lines += ["| run | " + " | ".join(f"step {step}" for step in steps) + " | first alarm |"]
    lines += ["|---" * (len(steps) + 2) + "|"]
    for name, run in runs.items():
        cells = [f"{c['drift']:+.4f} (z {c['drift_z']:+.1f})" for c in run["curve"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {run['alarm_step'] or 'none'} |")
    lines += [
        "",
        "| pair | AUROC of per-prompt drift | mean paired drift difference | one-sided p |",
        "|---|---|---|---|",
    ]
    for pair, c in comparisons.items():
        lines.append(f"| {pair} | {c['auroc']:.3f} | {c['mean_drift_difference']:+.4f} | {c['p_value']:.4f} |")
    report = "\n".join(lines) + "\n"
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"args": asdict(args), "runs": runs, "comparisons": comparisons}, indent=2)
    )
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main(*TrlParser(DriftExperimentArguments).parse_args_and_config())
