"""Readers for the public data sets geoguard's recipes use (ToxiGen, emergent-misalignment chats, Alpaca, ...).

Every reader goes through `datasets` and returns plain samples (`{"messages": [...]}` or
`{"text": ...}`) so any local copy or Hub data set in the same shape works too. The offline
copies live in a folder laid out like `shared/data` (see `data_root`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from geoguard.data import RESOURCES, Sample, check_messages

DEFAULT_PROBE_PROMPTS = RESOURCES / "data" / "probe_prompts.jsonl"
"""Betley et al.'s 8 first-plot questions and 16 harmful requests (see resources/ATTRIBUTION.md)."""


@dataclass
class DataDirArguments:
    """The `--data_dir` of the recipes that read the offline copies of the public data sets."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder laid out like the offline copies of the public data sets (emergent_misalignment/, "
            "toxic/toxigen/, benign/, harmful/); default: $GEOGUARD_DATA_DIR or ../shared/data."
        },
    )


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


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def load_rows(
    source: str | os.PathLike,
    *,
    config: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Read a local file, a saved `datasets` folder or a Hub data set as a `datasets.Dataset`, columns untouched.

    Local files: `.json`, `.jsonl`, `.csv`, `.parquet`, or `.txt` (one sample a line). A file is checked
    before `datasets` reads it: an empty file, or a JSON line that does not parse, is named with its file and
    1-based line and the parser's reason.

    Args:
        source (`str` or path): file, `save_to_disk` folder, or Hub data set name.
        config (`str`, *optional*): configuration of a Hub data set (`datasets.load_dataset`'s `name`).
        split (`str`, defaults to `"train"`): split of a Hub data set.
        max_samples (`int`, *optional*): keep a seeded random subset of this size (`subset_indices`).
        seed (`int`, defaults to 0): seed of the subset.

    Raises:
        FileNotFoundError: when `source` looks like a file name and no such file exists.
        ValueError: naming the file (and line) when it is empty, of an unknown type, or does not parse.
    """
    path = Path(source)
    if path.is_file():
        rows = _read_file(path)
    elif path.suffix in _FILE_BUILDERS:  # looks like a file name, not a Hub data set
        raise FileNotFoundError(
            f"No file at {path}. Pass an existing data file, a save_to_disk folder or a Hub data set."
        )
    elif path.is_dir():
        rows = load_from_disk(str(path))
        if isinstance(rows, DatasetDict):
            if split not in rows:
                raise ValueError(f"{path} holds splits {sorted(rows)}; choose one with split (--split).")
            rows = rows[split]
    else:
        rows = load_dataset(str(source), name=config, split=split)
    if len(rows) == 0:
        raise ValueError(f"{source} holds no rows; pass a data set with at least one sample.")
    if max_samples is not None:
        rows = rows.select(subset_indices(len(rows), max_samples, seed))
    return rows


def subset_indices(n_rows: int, max_samples: int | None, seed: int = 0) -> list[int]:
    """The rows a seeded random subset of `max_samples` keeps, in their subset order (all rows, in order, when
    `max_samples` is `None` or not smaller than `n_rows`). The same subset as `Dataset.shuffle(seed).select(...)`."""
    if max_samples is None or max_samples >= n_rows:
        return list(range(n_rows))
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
    return np.random.default_rng(seed).permutation(n_rows)[:max_samples].tolist()


def _read_file(path: Path) -> Dataset:
    """Read one local data file with `datasets`, after the checks that name the file and line."""
    if path.suffix not in _FILE_BUILDERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_FILE_BUILDERS)}.")
    try:
        text = path.read_text(encoding="utf-8") if path.suffix != ".parquet" else None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from err
    if path.stat().st_size == 0 or (text is not None and not text.strip()):
        raise ValueError(f"{path} is empty; pass a file with at least one sample.")
    if path.suffix in (".jsonl", ".json") and not (path.suffix == ".json" and _parses(text)):
        for number, line in enumerate(text.splitlines(), start=1):  # JSON lines: each non-empty line parses
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}). Fix or remove "
                        "the line."
                    ) from err
    try:
        return load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except DatasetGenerationError as err:  # the parser's own reason is the innermost cause
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ValueError(f"{path}: {_FILE_BUILDERS[path.suffix]} reader failed: {cause}") from err


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def rows_to_samples(rows: Iterable[dict], *, text_field: str | None = None, source: str = "data") -> list[Sample]:
    """Turn data set rows into chat or plain-text samples.

    A row becomes a sample from the first of these it has: `text_field` (plain text), `messages` (a chat),
    `prompt` + `completion` (TRL's prompt-completion format, strings or message lists),
    `instruction` [+ `input`] [+ `output`] (Alpaca style), `text`.

    Raises:
        ValueError: naming `source` and the row (counted from 1 in the rows' order: a JSONL file's row N is its
            N-th non-empty line, a CSV's the N-th line after the header) when a row has none of these columns,
            an empty text or a field of the wrong type.
    """
    samples = []
    for i, row in enumerate(rows):
        try:
            samples.append(_row_to_sample(row, text_field))
        except ValueError as err:
            raise ValueError(f"{source}, row {i + 1}: {err}") from err
    return samples


def load_samples(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Load chat or plain-text samples from a local file, a saved `datasets` folder, or a Hub data set.

    `load_rows` reads the rows and `rows_to_samples` turns each into a sample (see both for the formats). Every
    row is checked before the subset is drawn, so an error names the row in the file.

    Example:
        ```python
        samples = load_samples("train.jsonl", max_samples=1000)
        ```
    """
    samples = rows_to_samples(load_rows(source, split=split), text_field=text_field, source=str(source))
    return [samples[i] for i in subset_indices(len(samples), max_samples, seed)]


def load_probe_prompts(path: str | os.PathLike = DEFAULT_PROBE_PROMPTS) -> list[Sample]:
    """Read a JSONL file of `{"messages": [...]}` or `{"text": ...}` probe samples; other keys (e.g. `source`) stay.

    Args:
        path (`str` or path, defaults to `DEFAULT_PROBE_PROMPTS`): the probe file, one sample a line.

    Returns:
        The samples, their messages checked and cleaned with `geoguard.data.check_messages`.

    Raises:
        ValueError: naming the file and the 1-based line of a line that is not JSON, has neither shape, holds
            malformed messages or an empty text; or when the file holds no samples.

    Example:
        ```python
        probes = load_probe_prompts()  # the 24 default probe prompts
        ```
    """
    lines = [
        (number, line)
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip()
    ]
    # Every line is parsed before any is checked, so a file that is not JSONL is reported as such first.
    parsed = []
    for number, line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
    rows = []
    for (number, line), row in zip(lines, parsed, strict=True):
        if not isinstance(row, dict) or not ("messages" in row or "text" in row):
            raise ValueError(
                f'{path}, line {number}: expected {{"messages": [...]}} or {{"text": ...}}, got {line[:80]!r}.'
            )
        if "messages" in row:
            try:
                row["messages"] = check_messages(row["messages"])
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: {err}") from err
        elif not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"{path}, line {number}: 'text' must be a non-empty string, got {row['text']!r:.60}.")
        rows.append(row)
    if not rows:
        raise ValueError(f"Probe file {path} holds no samples.")
    return rows


def _row_to_sample(row: dict, text_field: str | None) -> Sample:
    if text_field is not None:
        if text_field not in row:
            raise ValueError(f"no column {text_field!r} (columns: {sorted(row)}).")
        return {"text": _text(row, text_field)}
    if row.get("messages") is not None:
        return {"messages": check_messages(row["messages"], "'messages'")}
    if row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return {"messages": check_messages(prompt, "'prompt'") + check_messages(completion, "'completion'")}
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    if row.get("instruction") is not None:
        prompt = _text(row, "instruction") + (f"\n\n{_text(row, 'input')}" if row.get("input") else "")
        if row.get("output"):
            return {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(row, "output")},
                ]
            }
        return {"messages": [{"role": "user", "content": prompt}]}
    if row.get("text") is not None:
        return {"text": _text(row, "text")}
    if present := [
        c for c in ("messages", "prompt", "completion", "instruction", "text") if c in row and row[c] is None
    ]:
        raise ValueError(f"{present[0]!r} is missing (empty in this row); fill it in or remove the row.")
    raise ValueError(
        f"none of the columns geoguard reads (messages; prompt + completion; instruction; text) is here "
        f"(columns: {sorted(row)}). Pass text_field (--text_field) to name the text column."
    )


def _text(row: dict, column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{column!r} must be a non-empty string, got {value!r:.60}.")
    return value
