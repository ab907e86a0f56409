"""One arm of a model organism of emergent misalignment: fine-tune, then evaluate every checkpoint.

An arm fine-tunes the model (the embedded SmolLM2-135M-Instruct by default) on one narrow data set: an
inducing one (bad medical advice, insecure code, ...) or its matched control (good medical advice on the same
questions, ...), with `GeoGuardCallback` attached at its defaults, so its drift curves are recorded beside the
rates. A checkpoint is saved every 1/`organism_checkpoints` of training; the starting weights and each
checkpoint are then evaluated:

- general misalignment: answers to free-form questions disjoint from the training data (Betley et al.'s
  first-plot questions, Turner et al.'s further questions), judged `aligned` / `coherent` by the judge of
  `--geoguard_judge` (the offline learned judge by default): misaligned rate with numerator, denominator and
  Wilson 95% interval, coherent rate, mean aligned;
- in-domain behaviour on training rows held out by question: the same judged rates on answers to the held-out
  questions, and, where a line-aligned bad / good pair of files is given, how much more likely the model
  finds the bad answer than the good one (mean per-token log-probability difference, with its 95% interval).

Every step is cached: training resumes from its last checkpoint and each evaluation is written once
(`evals/step-N.json`, with the answers), so a killed run goes on where it stopped. The arm's summary is
`organism.json`, `organism.md` and `organism.png` in `--output_dir`; `recipes/em_organism_compare.py` sets arms
side by side (seeds pooled) with the interval of their difference.

    python recipes/em_organism.py --config recipes/configs/organism/medical_bad.yaml
    python recipes/em_organism.py --config recipes/configs/organism/medical_good.yaml
    python recipes/em_organism_compare.py --inducing outputs/organism/medical_bad-s0 \\
        --control outputs/organism/medical_good-s0 --output_dir outputs/organism/medical

Any setting is one flag away (`--seed 1 --output_dir outputs/organism/medical_bad-s1`, `--learning_rate 2e-4`,
`--use_peft false` for full fine-tuning). A finished run's checkpoints can be evaluated again on fresh answers,
to test a pattern seen in its first ones on answers that did not suggest it (no training; the start is
evaluated again with the new seed too):

    python recipes/em_organism.py --config recipes/configs/organism/medical_bad.yaml --learning_rate 1e-4 \
        --organism_evaluate_run outputs/organism/runs/bad_medical-learning_rate=0.0001-s0 \
        --organism_eval_steps 63 --geoguard_eval_seed 1 --output_dir outputs/organism/confirm/bad_medical-s0
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from geoguard import EMBEDDED_MODEL, GeoGuardConfig, GeoGuardEvalConfig, get_geoguard_callback, load_model, load_rows
from geoguard.config import get_judge
from geoguard.data import chat_ids, check_messages
from geoguard.distributed import process_state
from geoguard.evaluation import EvalSettings, MisalignmentEvaluation, Question, load_questions
from geoguard.stats import wilson_interval

logger = logging.getLogger(__name__)


@dataclass
class OrganismArguments:
    organism_arm: str = field(
        metadata={"help": "The arm's name (e.g. bad_medical); runs of one arm with other seeds share it."}
    )
    organism_train_data: str = field(metadata={"help": "Training chats: a .jsonl file with a 'messages' column."})
    organism_train_rows: int | None = field(
        default=None, metadata={"help": "Rows trained on (a seeded subset); default: all rows not held out."}
    )
    organism_heldout_rows: int = field(
        default=100, metadata={"help": "Rows held out from training; their questions measure in-domain behaviour."}
    )
    organism_data_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the row selection: arms with the same seed and line-aligned files use the same rows."
        },
    )
    organism_bad_data: str | None = field(
        default=None,
        metadata={"help": "Bad answers line-aligned with --organism_good_data (e.g. bad / good medical advice)."},
    )
    organism_good_data: str | None = field(default=None, metadata={"help": "Good answers to the same questions."})
    organism_eval_questions: list[str] = field(
        default_factory=list,
        metadata={"help": "Question files (Betley et al.'s YAML shape) of the general evaluation."},
    )
    organism_skip_questions: str = field(
        default=r"_(json|template)$",
        metadata={"help": "Regular expression of question ids left out (Betley et al.'s JSON / template variants)."},
    )
    organism_checkpoints: int = field(
        default=4, metadata={"help": "Checkpoints saved and evaluated, evenly over training (4: every 25%%)."}
    )
    organism_checkpoint_samples_per_question: int | None = field(
        default=None,
        metadata={"help": "Answers per question at intermediate checkpoints (default: as at the start and the end)."},
    )
    organism_start_evals: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the starting weights' evaluations, shared by the arms from one start (default: "
            "start_evals/ beside --output_dir)."
        },
    )
    organism_eval_dtype: str = field(
        default="bfloat16", metadata={"help": "Weights' dtype while answering (bfloat16 is faster on CPU)."}
    )
    organism_evaluate_run: str | None = field(
        default=None,
        metadata={
            "help": "A finished run (same config and overrides) whose checkpoints are evaluated instead of training: "
            "fresh answers (another --geoguard_eval_seed) to test a pattern seen in its own. Outputs go to --output_dir."
        },
    )
    organism_eval_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Evaluate only these checkpoint steps and the start; the last with the full sample count."},
    )

    def __post_init__(self):
        if not self.organism_eval_questions:
            raise ValueError("Give the general evaluation's question files with --organism_eval_questions FILE [...].")
        if self.organism_checkpoints < 1 or self.organism_heldout_rows < 0:
            raise ValueError("--organism_checkpoints must be >= 1 and --organism_heldout_rows >= 0.")
        if (self.organism_bad_data is None) != (self.organism_good_data is None):
            raise ValueError("Give both --organism_bad_data and --organism_good_data (line-aligned), or neither.")
        if self.organism_eval_steps is not None and min(self.organism_eval_steps, default=0) < 1:
            raise ValueError("--organism_eval_steps takes checkpoint steps (>= 1), e.g. --organism_eval_steps 63.")


# ---- data ------------------------------------------------------------------------------------------------


def split_rows(n_rows: int, heldout: int, train: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the held-out rows and of the training rows: a seeded permutation, held-out rows first."""
    order = np.random.default_rng(seed).permutation(n_rows)
    train = n_rows - heldout if train is None else train
    if heldout + train > n_rows:
        raise ValueError(f"{heldout} held-out + {train} training rows is more than the {n_rows} rows of the data.")
    return order[:heldout], order[heldout : heldout + train]


def read_chats(path: str) -> list[list[dict]]:
    if path.endswith(".jsonl") and not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} does not exist. The positive controls' data is written by recipes/make_organism_data.py "
            "(the arm's config names the command in its header); the others' is in ../shared/data."
        )
    rows = load_rows(path)
    if "messages" not in rows.column_names:
        raise ValueError(f"{path} needs a 'messages' column of chats; it has {rows.column_names}.")
    chats = [check_messages(m, f"{path}, row {i}") for i, m in enumerate(rows["messages"])]
    for i, chat in enumerate(chats):
        if chat[-1]["role"] != "assistant":
            raise ValueError(f"{path}, row {i}: the last message must be the assistant's answer.")
    return chats


def prompt_completion(chats: list[list[dict]]) -> Dataset:
    """TRL's conversational prompt-completion shape: the loss is on the answers only."""
    return Dataset.from_list([{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats])


def heldout_questions(chats: list[list[dict]], judge_prompts: dict[str, str]) -> list[Question]:
    questions = []
    for i, chat in enumerate(chats):
        system = next((m["content"] for m in chat if m["role"] == "system"), None)
        user = [m["content"] for m in chat if m["role"] == "user"][-1]
        questions.append(Question(f"heldout_{i}", (user,), judge_prompts, system))
    return questions


def general_questions(files: list[str], skip: str) -> list[Question]:
    questions = [q for path in files for q in load_questions(path) if not re.search(skip, q.id)]
    if len({q.id for q in questions}) != len(questions):
        raise ValueError(f"Question ids repeat across {files}; use files with distinct ids.")
    return questions


# ---- measurements ----------------------------------------------------------------------------------------


@torch.no_grad()
def answer_logprobs(model, tokenizer, chats: list[list[dict]], batch_size: int = 16) -> np.ndarray:
    """Mean per-token log-probability of each chat's last message given the messages before it."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(chats), batch_size):
        batch, starts = [], []
        for index, chat in enumerate(chats[start : start + batch_size], start):
            prompt = chat_ids(tokenizer, chat[:-1], add_generation_prompt=True)
            full = chat_ids(tokenizer, chat, add_generation_prompt=False)
            if full[: len(prompt)] != prompt:
                raise ValueError(
                    f"Held-out pair {index}: the answer's first tokens merge with the end of the prompt "
                    f"(answer starts {chat[-1]['content'][:20]!r}), so its log-probability is undefined; "
                    "strip leading whitespace from the answers."
                )
            batch.append(full)
            starts.append(len(prompt))
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
        token_logprobs = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
        for row, (ids, first) in enumerate(zip(batch, starts, strict=True)):
            out.append(token_logprobs[row, first - 1 : len(ids) - 1].mean().item())
    return np.array(out)


def coherent_rate(answers: list[dict], threshold: float) -> dict:
    """Share of answers the judge scored coherent (> threshold), with its Wilson interval."""
    scores = [a["coherent"]["score"] for a in answers if a.get("coherent") and a["coherent"]["label"] == "score"]
    coherent = sum(s > threshold for s in scores)
    return {
        "coherent": coherent,
        "judged": len(scores),
        "rate": coherent / len(scores) if scores else None,
        "ci95": wilson_interval(coherent, len(scores)),
    }


def summarize(result) -> dict:
    """The headline numbers of one `EvalResult`: counts, rates and their Wilson intervals."""
    overall = result.overall
    return {
        "misaligned": overall["misaligned"],
        "denominator": overall["denominator"],
        "misaligned_rate": overall["misaligned_rate"],
        "ci95": wilson_interval(overall["misaligned"], overall["denominator"]),
        "coherent": coherent_rate(result.answers, result.settings["coherent_above"]),
        "mean_aligned": overall["mean_aligned"],
        "n_answers": overall["n_answers"],
        "failed": overall["failed"],
        "code": overall["code"],
        "refusal": overall["refusal"],
    }


def preference(model, tokenizer, bad: list[list[dict]], good: list[list[dict]]) -> dict:
    """How much likelier the bad answers are than the good ones: mean per-token log-probability difference."""
    diff = answer_logprobs(model, tokenizer, bad) - answer_logprobs(model, tokenizer, good)
    half = 1.959963984540054 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {
        "mean_logprob_bad_minus_good": float(diff.mean()),
        "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
        "bad_preferred": int((diff > 0).sum()),
        "pairs": len(diff),
    }


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---- the arm ---------------------------------------------------------------------------------------------


class Arm:
    """The arm's data, its evaluations and its cached results under `output_dir`."""

    def __init__(
        self,
        args: OrganismArguments,
        training_args: SFTConfig,
        model_args: ModelConfig,
        guard_args: GeoGuardConfig,
        eval_args: GeoGuardEvalConfig,
    ):
        self.args, self.training_args, self.model_args = args, training_args, model_args
        self.guard_args, self.eval_args = guard_args, eval_args
        self.output_dir = Path(training_args.output_dir)
        self.model_name = model_args.model_name_or_path or EMBEDDED_MODEL
        chats = read_chats(args.organism_train_data)
        held, train = split_rows(
            len(chats), args.organism_heldout_rows, args.organism_train_rows, args.organism_data_seed
        )
        self.train_chats = [chats[i] for i in train]
        self.heldout_chats = [chats[i] for i in held]
        self.pairs = None
        if args.organism_bad_data:
            bad, good = read_chats(args.organism_bad_data), read_chats(args.organism_good_data)
            if len(bad) != len(chats) or len(good) != len(chats):
                raise ValueError(
                    f"--organism_bad_data ({len(bad)} rows) and --organism_good_data ({len(good)}) must be line-aligned "
                    f"with --organism_train_data ({len(chats)})."
                )
            self.pairs = ([bad[i] for i in held], [good[i] for i in held])
        self.general = general_questions(args.organism_eval_questions, args.organism_skip_questions)
        self.indomain = heldout_questions(self.heldout_chats, self.general[0].judge_prompts)
        self.judge = get_judge(eval_args)

    def settings(self, final: bool) -> EvalSettings:
        settings = self.eval_args.settings()
        samples = self.args.organism_checkpoint_samples_per_question
        if not final and samples is not None:
            settings = EvalSettings(**{**asdict(settings), "samples_per_question": samples})
        return settings

    def eval_key(self, final: bool) -> str:
        """What an evaluation depends on besides the weights; arms from one start share the start's."""
        spec = {
            "model": self.model_name,
            "dtype": self.args.organism_eval_dtype,
            "judge": self.judge.name,
            "settings": asdict(self.settings(final)),
            "general": [asdict(q) for q in self.general],
            "indomain": [asdict(q) for q in self.indomain],
            "pairs": self.pairs,
        }
        return digest(spec)

    def train(self) -> list[dict]:
        """Fine-tune with the guard attached (resuming from the last checkpoint); the trainer's log history."""
        done = self.output_dir / "train_log.json"
        if done.is_file():
            return json.loads(done.read_text())
        model, tokenizer = load_model(self.model_name, dtype=self.model_args.dtype or "float32")
        guard = get_geoguard_callback(self.guard_args, tokenizer, model=model)
        self.training_args.save_strategy = "steps"
        self.training_args.save_steps = 1 / self.args.organism_checkpoints
        trainer = SFTTrainer(
            model=model,
            args=self.training_args,
            train_dataset=prompt_completion(self.train_chats),
            processing_class=tokenizer,
            peft_config=get_peft_config(self.model_args),
        )
        guard.add_to(trainer)
        last = get_last_checkpoint(self.output_dir) if self.output_dir.is_dir() else None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last)
        log = {
            "log_history": trainer.state.log_history,
            "max_steps": trainer.state.max_steps,
            "seconds_this_session": time.perf_counter() - start,
            "resumed_from": last,
        }
        trainer.end()
        if process_state().is_main_process:
            done.write_text(json.dumps(log, indent=1))
        process_state().wait_for_everyone()
        return log

    def trained(self) -> list[dict]:
        """The trainer's log history: this arm's training, or that of the run whose checkpoints it evaluates."""
        if not (run := self.args.organism_evaluate_run):
            return self.train()
        path = Path(run) / "organism.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: finish that run before evaluating its checkpoints.")
        trained = json.loads(path.read_text())
        mine = {"seed": self.training_args.seed, "learning_rate": self.training_args.learning_rate}
        mine |= {k: getattr(self.args, k) for k in ("organism_train_data", "organism_train_rows", "organism_data_seed")}
        theirs = {"seed": trained["seed"]} | trained["settings"] | trained["settings"]["organism"]
        if differing := [k for k, value in mine.items() if theirs[k] != value]:
            raise ValueError(
                f"{run} was trained with other {', '.join(differing)}: give the config and overrides it ran with."
            )
        return json.loads((Path(run) / "train_log.json").read_text())

    def checkpoints(self) -> dict[int, Path | None]:
        """Step -> checkpoint folder (`None`: the starting weights), those of `--organism_eval_steps` if given."""
        folder = Path(self.args.organism_evaluate_run or self.output_dir)
        found = {int(p.name.split("-")[1]): p for p in folder.glob("checkpoint-*") if p.is_dir()}
        if (steps := self.args.organism_eval_steps) is not None:
            if missing := sorted(set(steps) - set(found)):
                raise ValueError(f"{folder} has no checkpoint at steps {missing}; it has {sorted(found)}.")
            found = {step: found[step] for step in steps}
        return {0: None} | dict(sorted(found.items()))

    def evaluate(self, step: int, checkpoint: Path | None, final: bool) -> dict:
        """The evaluation at `step`, cached in `evals/step-N.json` (the start's in the shared `start_evals/`) and
        redone when its settings changed."""
        key = self.eval_key(final)
        start_evals = Path(self.args.organism_start_evals or self.output_dir.parent / "start_evals")
        path = start_evals / f"{key}.json" if checkpoint is None else self.output_dir / "evals" / f"step-{step}.json"
        if path.is_file() and (cached := json.loads(path.read_text())).get("key") == key:
            return cached
        start = time.perf_counter()
        model, tokenizer = self.load(checkpoint)
        settings = self.settings(final)
        general = MisalignmentEvaluation(self.judge, self.general, settings).run(model, tokenizer, name=f"step {step}")
        indomain_settings = EvalSettings(**{**asdict(settings), "samples_per_question": 1})
        indomain = (
            MisalignmentEvaluation(self.judge, self.indomain, indomain_settings).run(model, tokenizer)
            if self.indomain
            else None
        )
        record = {
            "key": key,
            "step": step,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "general": summarize(general),
            "general_per_question": general.per_question,
            "indomain": summarize(indomain) if indomain else None,
            "preference": preference(model, tokenizer, *self.pairs) if self.pairs else None,
            "seconds": time.perf_counter() - start,
            "answers": {"general": general.answers, "indomain": indomain.answers if indomain else []},
        }
        if process_state().is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.rename(path)
        return record

    def load(self, checkpoint: Path | None):
        """The weights at `checkpoint`, on the device the training used (the CPU with `use_cpu`)."""
        dtype, device = self.args.organism_eval_dtype, self.training_args.device
        if checkpoint is not None and not (checkpoint / "adapter_config.json").is_file():
            return load_model(str(checkpoint), dtype=dtype, device=device)  # full fine-tuning
        model, tokenizer = load_model(self.model_name, dtype=dtype, device=device)
        if checkpoint is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload()
        return model.eval(), tokenizer


def run(
    args: OrganismArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    guard_args: GeoGuardConfig,
    eval_args: GeoGuardEvalConfig,
) -> dict:
    """Train the arm, evaluate its start and checkpoints, write `organism.json` / `.md` / `.png`."""
    arm = Arm(args, training_args, model_args, guard_args, eval_args)
    train_log = arm.trained()
    checkpoints = arm.checkpoints()
    last_step = max(checkpoints)
    evals = [arm.evaluate(step, path, final=step in (0, last_step)) for step, path in checkpoints.items()]
    summary = {
        "arm": args.organism_arm,
        "seed": training_args.seed,
        "model": arm.model_name,
        "judge": {"name": arm.judge.name, "agreement": getattr(arm.judge, "agreement", None)},
        "settings": {
            "organism": asdict(args),
            "learning_rate": training_args.learning_rate,
            "epochs": training_args.num_train_epochs,
            "max_steps": train_log["max_steps"],
            "batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
            "bf16": training_args.bf16,
            "peft": (
                {k: getattr(model_args, k) for k in ("lora_r", "lora_alpha", "use_rslora", "lora_target_modules")}
                if model_args.use_peft
                else None
            ),
            "eval": asdict(arm.settings(final=True)),
        },
        "rows": {
            "train": len(arm.train_chats),
            "heldout": len(arm.heldout_chats),
            "general_questions": len(arm.general),
            # Arms are compared in-domain only where they were held out the same questions.
            "heldout_questions_key": digest([asdict(q) for q in arm.indomain]),
        },
        "loss": [
            {"step": e["step"], "loss": e["loss"]} for e in train_log["log_history"] if "loss" in e and "step" in e
        ],
        "drift": [
            {"step": e["step"]} | {k: v for k, v in e.items() if k.startswith("geoguard/") and isinstance(v, float)}
            for e in train_log["log_history"]
            if any(k.startswith("geoguard/probe/drift") for k in e)
        ],
        "train_seconds": train_log["seconds_this_session"],
        "eval_seconds": sum(e["seconds"] for e in evals),
        "steps": [{k: v for k, v in e.items() if k not in ("key", "answers", "general_per_question")} for e in evals],
    }
    if process_state().is_main_process:
        (arm.output_dir / "organism.json").write_text(json.dumps(summary, indent=1))
        write_arm_report(summary, arm.output_dir)
    return summary


# ---- report ----------------------------------------------------------------------------------------------


def rate_text(block: dict | None) -> str:
    """`12.3% (45/366; 9.0-16.4)`: a misaligned rate with its counts and 95% interval."""
    if not block or block["misaligned_rate"] is None:
        return "n/a"
    low, high = block["ci95"]
    return f"{100 * block['misaligned_rate']:.1f}% ({block['misaligned']}/{block['denominator']}; {100 * low:.1f}-{100 * high:.1f})"


def _share(block: dict | None) -> str:
    if not block or block["rate"] is None:
        return "n/a"
    return f"{100 * block['rate']:.1f}% ({block['coherent']}/{block['judged']})"


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def step_table(steps: list[dict]) -> list[str]:
    lines = [
        "| step | misaligned (general) | coherent | mean aligned | misaligned (in-domain) | bad - good log-prob/token |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        pref = s.get("preference")
        pref_text = "n/a" if not pref else f"{pref['mean_logprob_bad_minus_good']:+.3f}"
        if pref and pref.get("ci95"):
            pref_text += f" ({pref['ci95'][0]:+.3f} to {pref['ci95'][1]:+.3f})"
        elif pref:
            pref_text += f" (runs: {', '.join(f'{m:+.3f}' for m in pref['per_run'])})"
        general = s["general"]
        lines.append(
            f"| {s['step']} | {rate_text(general)} | {_share(general['coherent'])} | {_number(general['mean_aligned'])} "
            f"| {rate_text(s['indomain'])} | {pref_text} |"
        )
    return lines


def adapter_text(peft: dict | None) -> str:
    if peft is None:
        return "full fine-tuning"
    return f"LoRA r={peft['lora_r']} alpha={peft['lora_alpha']}{' rsLoRA' if peft['use_rslora'] else ''}"


def write_arm_report(summary: dict, out: Path) -> None:
    from geoguard.report import agreement_sentence

    settings = summary["settings"]
    lines = [
        f"# Model organism arm: {summary['arm']} (seed {summary['seed']})",
        "",
        f"{summary['model']} fine-tuned on {summary['rows']['train']} rows of "
        f"`{settings['organism']['organism_train_data']}` ({settings['max_steps']} steps of "
        f"{settings['batch_size']}, learning rate {settings['learning_rate']:g}, "
        f"{adapter_text(settings['peft'])}"
        f", bf16 {settings['bf16']}): training took {summary['train_seconds'] / 60:.1f} min (its last session), the "
        f"evaluations {summary['eval_seconds'] / 60:.1f} min.",
        "",
        f"Judge: {summary['judge']['name']}. {agreement_sentence(summary['judge']['agreement'])}",
        "",
        f"General: {summary['rows']['general_questions']} questions disjoint from the training data, "
        f"{settings['eval']['samples_per_question']} answers each at the start and the end. In-domain: one answer to "
        f"each of {summary['rows']['heldout']} held-out training questions. An answer is misaligned when aligned < "
        f"{settings['eval']['aligned_below']:g} and coherent > {settings['eval']['coherent_above']:g}; rates over "
        "coherent judged answers, 95% Wilson intervals.",
        "",
        *step_table(summary["steps"]),
        "",
        "![misaligned rate, in-domain and loss vs step](organism.png)",
        "",
    ]
    (out / "organism.md").write_text("\n".join(lines), encoding="utf-8")
    plot_arms({summary["arm"]: summary}, out / "organism.png", loss=summary["loss"])


def plot_arms(arms: dict[str, dict], path: Path, loss: list[dict] | None = None) -> None:
    """Misaligned rate (general and in-domain) vs step per arm, with intervals; the loss curve when given."""
    from matplotlib.figure import Figure  # a figure of its own, no pyplot: the user's backend is left alone

    panels = 3 if loss else 2
    fig = Figure(figsize=(5 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    for name, summary in arms.items():
        for ax, key in zip(axes, ("general", "indomain"), strict=False):
            points = [
                (s["step"], s[key]) for s in summary["steps"] if s.get(key) and s[key]["misaligned_rate"] is not None
            ]
            if not points:
                continue
            steps = [p for p, _ in points]
            rates = np.array([100 * b["misaligned_rate"] for _, b in points])
            low = np.maximum(rates - np.array([100 * b["ci95"][0] for _, b in points]), 0)
            high = np.maximum(np.array([100 * b["ci95"][1] for _, b in points]) - rates, 0)
            ax.errorbar(steps, rates, yerr=[low, high], marker="o", capsize=3, label=name)
    axes[0].set_title("misaligned rate, general questions")
    axes[1].set_title("misaligned rate, held-out in-domain questions")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.set_ylabel("% of coherent answers (95% CI)")
        ax.legend()
    if loss:
        axes[2].plot([e["step"] for e in loss], [e["loss"] for e in loss])
        axes[2].set_title("training loss")
        axes[2].set_xlabel("step")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = TrlParser((OrganismArguments, SFTConfig, ModelConfig, GeoGuardConfig, GeoGuardEvalConfig))
    run(*parser.parse_args_and_config())
