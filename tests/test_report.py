from __future__ import annotations

import re

import torch

from geoguard.features import FeatureSet
from geoguard.geometry import measure_geometry
from geoguard.report import escape_markdown, write_feature_set_card, write_geometry_report

HOSTILE = '<script>alert("x")</script> | [click](javascript:alert(1)) ``` **bold**\n# heading &amp;'


def _hostile_set(name: str, ids: list[int], decoder: torch.Tensor) -> FeatureSet:
    k = len(ids)
    return FeatureSet(
        name=name,
        feature_ids=ids,
        hook_name="blocks.0.hook_resid_post",
        d_sae=len(decoder),
        sae_fingerprint="sae",
        stats={"heldout_auroc": [0.7] * k, "q_value": [0.01] * k},
        summary={
            "heldout_auroc": 0.7,
            "n_significant": k,
            "always_on_skipped": 0,
            "warnings": [HOSTILE],
            "contrasts": [
                {
                    "name": HOSTILE,
                    "role": "selection",
                    "n_target": 5,
                    "n_reference": 5,
                    "heldout_auroc": 0.7,
                    "p_value": 0.01,
                    "length_auroc": 0.5,
                }
            ],
        },
        provenance={
            "k": k,
            "rank_by": "auroc",
            "pooling": "mean",
            "span": "all",
            "heldout_fraction": 0.3,
            "model": HOSTILE,
            "sae": "s",
            "command": HOSTILE,
        },
        labels=[
            {
                "top_tokens": [HOSTILE, "|"],
                "examples": [{"text": HOSTILE, "activation": 1.0, "contrast": HOSTILE, "side": "target"}],
            }
        ]
        * k,
        decoder=decoder[ids],
        density=torch.rand(len(decoder)),
    )


def _assert_inert(markdown: str) -> None:
    assert "<script" not in markdown and "](javascript" not in markdown and "```" not in markdown
    assert "\n# heading" not in markdown
    # Every table row keeps its column count: no unescaped pipe came from the data.
    for table in re.findall(r"((?:^\|.*\|$\n?)+)", markdown, flags=re.M):
        rows = table.strip().splitlines()
        counts = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
        assert len(counts) == 1, rows


def test_escape_markdown_makes_hostile_text_inert():
    escaped = escape_markdown(HOSTILE)
    assert escaped.startswith("&lt;script&gt;") and "\\|" in escaped and "\n" not in escaped
    assert "&amp;amp;" in escaped  # an entity in the data is shown, not interpreted


def test_feature_set_card_escapes_data_text(tmp_path):
    decoder = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    card = write_feature_set_card(_hostile_set(HOSTILE, [1, 2, 3], decoder), tmp_path).read_text()
    _assert_inert(card)
    assert card.count("&lt;script&gt;") >= 5  # name, contrast, warning, tokens, example


def test_geometry_report_escapes_names_and_writes_plots(tmp_path):
    decoder = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    toxic = _hostile_set("toxic", list(range(5)), decoder)
    sets = [_hostile_set(HOSTILE, list(range(10, 15)), decoder), _hostile_set("control", list(range(20, 25)), decoder)]
    report = write_geometry_report(measure_geometry(toxic, sets, decoder, n_null=20, n_permutations=50), tmp_path)
    _assert_inert(report.read_text())
    for png in ("similarity_distributions.png", "heatmap.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "geometry.json").is_file()
