"""Drop the training chats closest to the toxic features before fine-tuning, and see what was dropped.

    python examples/filter_training_data.py --output_dir outputs/filter_example

Scores the shipped demo mix (64 jailbroken + 64 Alpaca chats, `recipes/data/sft_mix.jsonl`) with the
embedded model, SAE and toxic feature set, drops the closest 50% (the paper's setting), writes the kept
chats and the audit file of dropped ones, and compares with random removal at the same budget.
The command-line equivalent: `geoguard filter --data recipes/data/sft_mix.jsonl --output kept.jsonl`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from geoguard import (
    DropTopFraction,
    FeatureSet,
    ToxicScorer,
    filter_dataset,
    load_model,
    load_rows,
    load_sae,
    random_scores,
    rows_to_samples,
    score_dataset,
)

DEMO_MIX = Path(__file__).resolve().parent.parent / "recipes" / "data" / "sft_mix.jsonl"


def main(output_dir: str) -> None:
    model, tokenizer = load_model()
    sae = load_sae()
    toxic = FeatureSet.load(sae=sae)
    rows = load_rows(DEMO_MIX)
    scores = score_dataset(
        ToxicScorer(model, tokenizer, sae, toxic), rows_to_samples(rows), cache=Path(output_dir) / "cache"
    )

    result = filter_dataset(rows, scores, DropTopFraction(0.5), Path(output_dir) / "dropped.jsonl", feature_set=toxic)
    result.kept.to_json(Path(output_dir) / "kept.jsonl", lines=True)
    jailbroken = np.array(rows["source"]) == "jailbroken"
    random_drop = DropTopFraction(0.5).drop_mask(random_scores(len(rows)))
    print(f"dropped {len(result.dropped_rows)} of {len(rows)} chats; audit: {result.audit_path}")
    print(
        f"jailbroken among dropped: geoguard {jailbroken[result.dropped_rows].mean():.2f}, random {jailbroken[random_drop].mean():.2f}"
    )
    first = json.loads(result.audit_path.read_text().splitlines()[0])
    print(
        f"rank 1: score {first['score']:.3f}, source {first['sample']['source']}, nearest toxic feature {first['nearest_toxic_features'][0]}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/filter_example")
    main(parser.parse_args().output_dir)
