"""Readers for the public data sets geoguard's recipes use (ToxiGen, emergent-misalignment chats, Alpaca, ...).

Every reader goes through `datasets` and returns plain samples (`{"messages": [...]}` or
`{"text": ...}`) so any local copy or Hub data set in the same shape works too. The offline
copies live in a folder laid out like `shared/data` (see `data_root`).
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import load_dataset

from geoguard.data import Sample


def data_root(path: str | os.PathLike | None = None) -> Path:
    """Return the folder of offline data sets: `path`, else `$GEOGUARD_DATA_DIR`, else `../shared/data`."""
    root = Path(path or os.environ.get("GEOGUARD_DATA_DIR", "../shared/data"))
    if not root.is_dir():
        raise FileNotFoundError(
            f"Data folder {root} not found. Pass --data_dir or set GEOGUARD_DATA_DIR to a folder laid out like "
            "shared/data (emergent_misalignment/, toxic/toxigen/, benign/, harmful/)."
        )
    return root


def load_chats(path: str | os.PathLike, *, drop_system: bool = True) -> list[Sample]:
    """Load a JSONL file of `{"messages": [...]}` chats; system turns are dropped by default."""
    rows = load_dataset("json", data_files=str(path), split="train")
    if "messages" not in rows.column_names:
        raise ValueError(f"{path} has no 'messages' column (columns: {rows.column_names}).")
    return [{"messages": [m for m in row["messages"] if not (drop_system and m["role"] == "system")]} for row in rows]


def load_toxigen(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Return `(hate, neutral)` sentences of ToxiGen's human-written seed files under `root/toxic/toxigen`.

    Both sides are short single sentences about the same target groups: a format-matched contrast.
    """
    base = Path(root) / "toxic" / "toxigen"
    files = sorted(base.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"No ToxiGen files under {base}.")
    sides: dict[str, list[str]] = {"hate": [], "neutral": []}
    for file in files:
        side = file.name.split("_", 1)[0]
        if side in sides:
            lines = (line.strip().lstrip("-").strip() for line in file.read_text(encoding="utf-8").splitlines())
            sides[side].extend(line for line in lines if line)
    return sides["hate"], sides["neutral"]


def load_alpaca(path: str | os.PathLike) -> list[Sample]:
    """Load Alpaca-style `[{"instruction", "input", "output"}]` records as user/assistant chats."""
    rows = load_dataset("json", data_files=str(path), split="train")
    chats = []
    for row in rows:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        chats.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}
        )
    return chats


def load_instructions(path: str | os.PathLike) -> list[Sample]:
    """Load `[{"instruction": ...}]` request lists (harmful/harmless splits) as single-turn user chats."""
    rows = load_dataset("json", data_files=str(path), split="train")
    return [{"messages": [{"role": "user", "content": row["instruction"]}]} for row in rows]
