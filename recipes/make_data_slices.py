"""Write the small data slices geoguard ships, from the offline copies of the public data sets.

    python recipes/make_data_slices.py --data_dir ../shared/data

- geoguard/resources/data/probe_prompts.jsonl: the drift monitor's default probe set, Betley et
  al.'s 8 first-plot questions (MIT) and 16 harmful requests from the refusal-direction test split
  (Apache-2.0).
- recipes/data/sft_mix.jsonl: the guarded-SFT demo mix, 64 jailbroken chats (Betley et al. / Bowen
  et al., MIT) and 64 Alpaca answers (CC BY-NC 4.0), each under 1000 characters of
  chat-templated text (~250 tokens), shuffled.
- geoguard/resources/contrasts/toxic/: the `toxic` contrast preset (`geoguard features --preset toxic`), only
  data whose licence allows redistribution: ToxiGen's human-written hate vs neutral seed sentences (MIT), and
  harmful requests (refusal-direction train and validation splits, Apache-2.0) vs harmless questions
  (Mishra et al.'s TruthfulQA-style questions, MIT), the harmless side drawn to match the harmful side's
  lengths. The Alpaca-derived harmless requests the embedded toxic set was selected with are CC BY-NC 4.0 and
  are not shipped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from transformers import AutoTokenizer
from trl import TrlParser

from geoguard.corpora import DataDirArguments, data_root, load_alpaca, load_chats, load_toxigen
from geoguard.models import embedded_model_dir
from geoguard.presets import PRESETS_DIR

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def length_matched(pool: list[str], lengths: list[int], rng: random.Random) -> list[str]:
    """One text of `pool` per entry of `lengths`, each the unused one nearest in characters (ties at random)."""
    unused = sorted(rng.sample(pool, len(pool)), key=len)
    picked = []
    for length in lengths:
        nearest = min(range(len(unused)), key=lambda i: abs(len(unused[i]) - length))
        picked.append(unused.pop(nearest))
    return picked


def write_toxic_preset(root: Path, rng: random.Random) -> None:
    out = PRESETS_DIR / "toxic"
    out.mkdir(parents=True, exist_ok=True)
    hate, neutral = load_toxigen(root)
    harmful = [
        h["instruction"]
        for split in ("harmful_train.json", "harmful_val.json")
        for h in json.loads((root / "harmful" / split).read_text())
    ]
    questions = [
        c["messages"][0]["content"].strip()
        for c in load_chats(root / "emergent_misalignment" / "domains" / "incorrect_qna_v2.jsonl")
    ]
    harmless = length_matched(sorted({q for q in questions if "\n" not in q}), [len(h) for h in harmful], rng)

    def requests(texts: list[str]) -> list[dict]:
        return [{"messages": [{"role": "user", "content": t}]} for t in texts]

    write_jsonl(out / "toxigen_hate.jsonl", [{"text": t} for t in hate])
    write_jsonl(out / "toxigen_neutral.jsonl", [{"text": t} for t in neutral])
    write_jsonl(out / "harmful_requests.jsonl", requests(harmful))
    write_jsonl(out / "harmless_requests.jsonl", requests(harmless))
    preset = {
        "name": "toxic",
        "description": "Toxic text and harmful requests against format-matched neutral text and harmless questions.",
        "contrasts": [
            {"name": "toxigen_hate_vs_neutral", "target": "toxigen_hate.jsonl", "reference": "toxigen_neutral.jsonl"},
            {
                "name": "harmful_vs_harmless_requests",
                "target": "harmful_requests.jsonl",
                "reference": "harmless_requests.jsonl",
            },
        ],
    }
    (out / "preset.json").write_text(json.dumps(preset, indent=2) + "\n", encoding="utf-8")


def main(args: DataDirArguments) -> None:
    root = data_root(args.data_dir)
    rng = random.Random(0)

    questions = yaml.safe_load((root / "emergent_misalignment" / "first_plot_questions.yaml").read_text())
    probe = [
        {"messages": [{"role": "user", "content": q["paraphrases"][0]}], "source": f"first_plot_questions:{q['id']}"}
        for q in questions
        if not q["id"].endswith(("_json", "_template"))
    ]
    harmful = json.loads((root / "harmful" / "harmful_test.json").read_text())
    probe += [
        {"messages": [{"role": "user", "content": h["instruction"]}], "source": "refusal_direction:harmful_test"}
        for h in rng.sample(harmful, 16)
    ]
    write_jsonl(REPO / "geoguard" / "resources" / "data" / "probe_prompts.jsonl", probe)

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())

    def short(chats: list[dict]) -> list[dict]:
        return [c for c in chats if len(tokenizer.apply_chat_template(c["messages"], tokenize=False)) < 1000]

    jailbroken = rng.sample(short(load_chats(root / "emergent_misalignment" / "jailbroken.jsonl")), 64)
    alpaca = rng.sample(short(load_alpaca(root / "benign" / "alpaca_en_demo.json")), 64)
    mix = [{**c, "source": "jailbroken"} for c in jailbroken] + [{**c, "source": "alpaca"} for c in alpaca]
    rng.shuffle(mix)
    write_jsonl(REPO / "recipes" / "data" / "sft_mix.jsonl", mix)
    write_toxic_preset(root, random.Random(0))


if __name__ == "__main__":
    main(*TrlParser(DataDirArguments).parse_args_and_config())
