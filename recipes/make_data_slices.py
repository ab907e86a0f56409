"""Write the small data slices geoguard ships, from the offline copies of the public data sets.

    python recipes/make_data_slices.py --data_dir ../shared/data

- geoguard/resources/data/probe_prompts.jsonl: the drift monitor's default probe set, Betley et
  al.'s 8 first-plot questions (MIT) and 16 harmful requests from the refusal-direction test split
  (Apache-2.0).
- recipes/data/sft_mix.jsonl: the guarded-SFT demo mix, 64 jailbroken chats (Betley et al. / Bowen
  et al., MIT) and 64 Alpaca answers (CC BY-NC 4.0), each under 1000 characters of
  chat-templated text (~250 tokens), shuffled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from transformers import AutoTokenizer
from trl import TrlParser

from geoguard.corpora import DataDirArguments, data_root, load_alpaca, load_chats
from geoguard.models import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


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


if __name__ == "__main__":
    main(*TrlParser(DataDirArguments).parse_args_and_config())
