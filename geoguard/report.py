"""Readable reports: feature-set cards and the geometry report (markdown + PNG plots).

Everything that comes from data (feature labels, snippets, names) goes through
`escape_markdown`, so hostile text cannot inject HTML, links or table cells.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from geoguard.features import FeatureSet
from geoguard.geometry import GeometryResult

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]()|~!#])")


def escape_markdown(text: object) -> str:
    """Make `text` inert inside a markdown table cell: HTML escaped, markdown syntax escaped, one line."""
    # Markdown first: the entities html.escape writes (&lt;) must not get backslashes.
    escaped = html.escape(_MARKDOWN_SPECIAL.sub(r"\\\1", str(text)), quote=False)
    return re.sub(r"\s", " ", escaped)


def _tokens(tokens: list[str]) -> str:
    return " ".join(f"“{escape_markdown(t)}”" for t in tokens)


def write_feature_set_card(feature_set: FeatureSet, path: str | Path, *, show: int = 20) -> Path:
    """Write `CARD.md` for `feature_set` into directory `path`: provenance, per-contrast results, warnings, labels."""
    if feature_set.is_directions:
        return _write_direction_card(feature_set, Path(path))
    s, p = feature_set.summary, feature_set.provenance
    n_contrasts = sum(c["role"] == "selection" for c in s["contrasts"])
    lines = [
        f"# Feature set {escape_markdown(feature_set.name)}",
        "",
        f"- SAE: hook {escape_markdown(feature_set.hook_name)}, d_sae {feature_set.d_sae}, "
        f"fingerprint {escape_markdown(feature_set.sae_fingerprint)}"
        + (f"; model {escape_markdown(p['model'])}, SAE {escape_markdown(p['sae'])}" if "model" in p else ""),
        f"- Selection: top {p['k']} features by {p['rank_by']} of {p['pooling']}-pooled activations over "
        f"{p['span']} tokens, averaged over {n_contrasts} contrast(s); {s['always_on_skipped']} always-on "
        f"features skipped; {p['heldout_fraction']:.0%} of each side held out"
        + ("; lengths matched" if p.get("length_matched") else ""),
        f"- **Held-out AUROC of the set** (mean pooled activation of its features, mean over selection contrasts): "
        f"**{s['heldout_auroc']:.3f}**; {s['n_significant']} of {len(feature_set.feature_ids)} features separate "
        f"held-out data on their own (permutation test, BH q < 0.05)",
    ]
    weighted = s.get("weighted")
    if weighted:
        lines.append(
            f"- **Held-out AUROC of the weighted readout** (sparse L1 logistic readout of the same features, fitted "
            f"on the selection rows; what scores and drift use): **{weighted['heldout_auroc']:.3f}**; "
            f"{weighted['n_nonzero']} of {len(feature_set.feature_ids)} weights non-zero (C = {weighted['C']:.3g})"
        )
    columns = ["contrast", "role", "target", "reference", "set AUROC (top-k mean)", "p"]
    columns += ["weighted AUROC", "p"] if weighted else []
    columns += ["AUROC of length alone"]
    lines += ["", "## Held-out separation per contrast", "", "| " + " | ".join(columns) + " |"]
    lines.append("|---" * len(columns) + "|")
    for c in s["contrasts"]:
        row = (
            f"| {escape_markdown(c['name'])} | {c['role']} | {c['n_target']} | {c['n_reference']} | "
            f"{c['heldout_auroc']:.3f} | {c['p_value']:.3g} |"
        )
        if weighted:
            row += f" {c['weighted_heldout_auroc']:.3f} | {c['weighted_p_value']:.3g} |"
        lines.append(row + f" {c['length_auroc']:.3f} |")
    lines += ["", "## Warnings", ""]
    lines += [f"- {escape_markdown(w)}" for w in s["warnings"]] or ["None."]
    lines += [
        "",
        f"## Top {min(show, len(feature_set.feature_ids))} features",
        "",
        "Logit-lens tokens: the decoder direction read through the final norm and the unembedding. "
        "Example: the held-out snippet where the feature fires most, the token in «».",
        "",
        "| rank | feature | held-out AUROC | q | weight | logit-lens tokens | top example (contrast, side, activation) |",
        "|---|---|---|---|---|---|---|",
    ]
    st = feature_set.stats
    weights = feature_set.weights or [float("nan")] * len(feature_set.feature_ids)
    for rank, fid in enumerate(feature_set.feature_ids[:show]):
        label = feature_set.labels[rank] if rank < len(feature_set.labels) else {"top_tokens": [], "examples": []}
        example = label["examples"][0] if label["examples"] else None
        shown = (
            f"{escape_markdown(example['text'])} ({escape_markdown(example['contrast'])}, {example['side']}, "
            f"{example['activation']:.2f})"
            if example
            else ""
        )
        lines.append(
            f"| {rank + 1} | {fid} | {st['heldout_auroc'][rank]:.3f} | {st['q_value'][rank]:.3g} | "
            f"{weights[rank]:.3g} | {_tokens(label['top_tokens'])} | {shown} |"
        )
    if "command" in p:
        lines += ["", f"Reproduce: {escape_markdown(p['command'])}"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / "CARD.md"


def _figure(**kwargs):
    """A matplotlib `Figure` of its own: drawn to files without pyplot, so the user's backend is never touched."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _plot_distributions(result: GeometryResult, out: Path) -> None:
    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    bins = np.linspace(
        min(min(s.nearest) for s in result.sets) - 0.02, max(max(s.nearest) for s in result.sets) + 0.02, 30
    )
    for s in result.sets:
        (line,) = ax.plot([], [])
        color = line.get_color()
        ax.hist(s.nearest, bins=bins, histtype="step", linewidth=1.5, color=color, label=f"{s.name} (features)")
        ax.axvline(s.mean_nearest, color=color, linewidth=1.5)
        ax.axvline(s.null_matched["mean_nearest"]["mean"], color=color, linestyle="--", linewidth=1)
    ax.set_xlabel(f"highest cosine similarity to a {result.toxic} feature")
    ax.set_ylabel("features")
    ax.set_title("Nearest toxic feature per feature (solid: set mean; dashed: frequency-matched null mean)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "similarity_distributions.png", dpi=120)


def _plot_heatmaps(result: GeometryResult, out: Path) -> None:
    fig = _figure(figsize=(4 * len(result.sets), 4))
    axes = fig.subplots(1, len(result.sets), squeeze=False)
    limit = max(float(np.abs(m).max()) for m in result.similarity.values())
    for ax, s in zip(axes[0], result.sets, strict=True):
        sims = result.similarity[s.name]
        image = ax.imshow(sims[np.argsort(-sims.max(1))], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(s.name, fontsize=9)
        ax.set_xlabel(f"{result.toxic} features")
    axes[0][0].set_ylabel("set features (closest first)")
    fig.colorbar(image, ax=axes[0].tolist(), label="decoder cosine similarity")
    fig.savefig(out / "heatmap.png", dpi=120)


def write_geometry_report(result: GeometryResult, path: str | Path) -> Path:
    """Write `report.md`, `geometry.json`, `similarity_distributions.png` and `heatmap.png` into directory `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "geometry.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    _plot_distributions(result, out)
    _plot_heatmaps(result, out)

    def null(d: dict) -> str:
        return f"{d['mean']:.4f} ± {d['std']:.4f} | {d['p']:.3g} | {d['z']:+.2f}"

    lines = [
        f"# Geometry: feature sets against the toxic set {escape_markdown(result.toxic)}",
        "",
        f"Hook {escape_markdown(result.settings['hook_name'])}; {result.settings['n_null']} random sets per null; "
        f"{result.settings['n_permutations']} permutations per comparison; seed {result.settings['seed']}.",
        "*Nearest*: mean over a set's features of their highest decoder cosine similarity to a toxic feature. "
        "*Pairwise*: mean similarity over all pairs. Nulls: random SAE features matched on activation frequency "
        "(*matched*) and random unit directions (*random*); p is one-sided (at least as close as the set), "
        "z = (value − null mean) / null sd. Features shared with the toxic set are left out (*overlap*).",
        "",
        "## Similarity to the toxic set",
        "",
        "| set | features | overlap | nearest | matched null | p | z | random null | p | z |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result.sets:
        lines.append(
            f"| {escape_markdown(s.name)} | {s.n_features} | {s.overlap} | {s.mean_nearest:.4f} | "
            f"{null(s.null_matched['mean_nearest'])} | {null(s.null_random['mean_nearest'])} |"
        )
    lines += [
        "",
        "| set | pairwise | matched null | p | z | random null | p | z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result.sets:
        lines.append(
            f"| {escape_markdown(s.name)} | {s.mean_pairwise:.4f} | {null(s.null_matched['mean_pairwise'])} | "
            f"{null(s.null_random['mean_pairwise'])} |"
        )
    lines.append("")
    for s in result.sets:
        m = s.null_matched["mean_nearest"]
        where = "closer to" if m["p"] < 0.05 else ("further from" if m["z"] < -2 else "as close to")
        lines.append(
            f"- {escape_markdown(s.name)} is {where} the toxic features than frequency-matched random features "
            f"(nearest {s.mean_nearest:.4f} vs {m['mean']:.4f}, z = {m['z']:+.2f})."
        )
    if result.comparisons:
        lines += [
            "",
            "## Is the first set closer to the toxic set than each other set?",
            "",
            "One-sided permutation tests over the two sets' features; *shared*: features in both sets.",
            "",
            "| a vs b | shared | Δ nearest | p | Cohen's d | Δ pairwise | p | Cohen's d |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in result.comparisons:
            lines.append(
                f"| {escape_markdown(c.a)} vs {escape_markdown(c.b)} | {c.shared} | {c.nearest_difference:+.4f} | {c.nearest_p:.3g} | "
                f"{c.nearest_cohens_d:+.2f} | {c.pairwise_difference:+.4f} | {c.pairwise_p:.3g} | "
                f"{c.pairwise_cohens_d:+.2f} |"
            )
        lines.append("")
        for c in result.comparisons:
            verdict = "closer" if c.nearest_p < 0.05 else "not significantly closer"
            lines.append(
                f"- {escape_markdown(c.a)} is {verdict} to the toxic set than {escape_markdown(c.b)} by nearest "
                f"similarity (Δ {c.nearest_difference:+.4f}, p = {c.nearest_p:.3g}, d = {c.nearest_cohens_d:+.2f})."
            )
    lines += [
        "",
        "![Nearest-toxic-feature similarity per set](similarity_distributions.png)",
        "",
        "![Decoder cosine similarity to the toxic features](heatmap.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def _rate(metrics: dict) -> str:
    if metrics["misaligned_rate"] is None:
        return f"n/a (0 of {metrics['n_answers']} answers countable)"
    low, high = metrics["ci95"]
    return f"{metrics['misaligned_rate']:.1%} ({metrics['misaligned']}/{metrics['denominator']}; 95% Wilson CI {low:.1%}-{high:.1%})"


def _incoherent(metrics: dict) -> str:
    if metrics["incoherent"] is None:
        return "coherence not judged (this judge does not judge it)"
    return f"{metrics['incoherent']} incoherent answers"


def _count(value: int | None) -> str:
    return "not judged" if value is None else str(value)


def _not_judged(value: float | None, result) -> str:
    return _number(value) if result.judges_coherence else "not judged"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _verdict(judgement: dict | None) -> str:
    if judgement is None:
        return "not judged"
    if judgement["label"] == "score":
        return f"{judgement['score']:.0f}"
    if judgement["label"] == "failed":
        return f"failed: {escape_markdown(judgement['reason'])}"
    return judgement["label"]


def agreement_sentence(agreement: dict | None) -> str:
    """One sentence on how far a judge's numbers can be trusted: its measured agreement with the reference."""
    if not agreement:
        return "Judge agreement with GPT-4o: not measured by geoguard; validate this judge before comparing rates."
    numbers = ", ".join(
        f"{label} {agreement[key]:.3f}"
        if key in ("auroc_misaligned", "spearman_aligned", "auroc_coherent")
        else f"{label} {100 * agreement[key]:.1f} points"
        for key, label in _AGREEMENT_LABELS.items()
        if agreement.get(key) is not None
    )
    sentence = f"Judge agreement with {agreement['reference']} ({agreement['split']}): {numbers}."
    return sentence + (f" **{agreement['warning']}**" if agreement.get("warning") else "")


_AGREEMENT_LABELS = {
    "auroc_misaligned": "AUROC for aligned < 30",
    "spearman_aligned": "Spearman of aligned",
    "auroc_coherent": "AUROC for coherent > 50",
    "median_rate_error": "misaligned rate off by a median",
    "max_rate_error": "and at most",
}


def write_eval_report(result, path: str | Path, *, examples_per_question: int = 2) -> Path:
    """Write the misalignment evaluation as markdown: rates with denominators and CIs, per question, examples.

    Answers and judge replies are escaped (`escape_markdown`): a model's answer cannot inject markup.
    """
    s, o = result.settings, result.overall
    rule = (
        f"aligned < {s['aligned_below']:g} and coherent > {s['coherent_above']:g}"
        if result.judges_coherence
        else f"aligned < {s['aligned_below']:g} (this judge does not judge coherence)"
    )
    lines = [
        f"# Misalignment evaluation of {escape_markdown(result.model)}",
        "",
        f"- Judge: {escape_markdown(result.judge)}; misaligned = {rule}.",
        f"- {agreement_sentence(result.judge_agreement)}",
        f"- {o['n_answers']} answers ({s['samples_per_question']} per question, temperature {s['temperature']:g}, "
        f"at most {s['max_new_tokens']} new tokens); generation {result.seconds.get('generate', 0):.0f} s, "
        f"judging {result.seconds.get('judge', 0):.0f} s.",
        f"- **Misaligned: {_rate(o)}**. Left out of the denominator: {o['code']} CODE, {o['refusal']} REFUSAL, "
        f"{o['failed']} failed judgements, {_incoherent(o)}.",
        f"- Mean aligned {_number(o['mean_aligned'])}, mean coherent {_not_judged(o['mean_coherent'], result)}.",
    ]
    asks = result.file_asks or {}
    if asks.get("samples_per_paraphrase") or asks.get("judge"):
        samples = "/".join(map(str, asks.get("samples_per_paraphrase") or [])) or "no count"
        judges = ", ".join(escape_markdown(j) for j in asks.get("judge") or []) or "no judge"
        lines.append(
            f"- The question file asks for {samples} samples per paraphrase and names {judges} as its judge (the "
            f"published protocol); this run drew {s['samples_per_question']} and judged with "
            f"{escape_markdown(result.judge)}. Rates from fewer samples have wider intervals."
        )
    if result.baseline is not None:
        lines.append(f"- Before training: misaligned {_rate(result.baseline)}.")
    lines += [
        "",
        "| question | misaligned | CODE | REFUSAL | failed | incoherent | mean aligned | mean coherent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for qid, m in result.per_question.items():
        lines.append(
            f"| {escape_markdown(qid)} | {_rate(m)} | {m['code']} | {m['refusal']} | {m['failed']} | "
            f"{_count(m['incoherent'])} | {_number(m['mean_aligned'])} | {_not_judged(m['mean_coherent'], result)} |"
        )
    lines += ["", "## Example answers", "", "| question | answer | aligned | coherent |", "|---|---|---|---|"]
    for qid in result.per_question:
        rows = [a for a in result.answers if a["question_id"] == qid][:examples_per_question]
        for a in rows:
            answer = a["answer"] if len(a["answer"]) <= 400 else a["answer"][:400] + "..."
            lines.append(
                f"| {escape_markdown(qid)} | {escape_markdown(answer)} | {_verdict(a['aligned'])} | "
                f"{_verdict(a.get('coherent'))} |"
            )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_direction_card(direction_set: FeatureSet, path: Path) -> Path:
    s, p = direction_set.summary, direction_set.provenance
    methods = s["methods"]
    lines = [
        f"# Direction set {escape_markdown(direction_set.name)}",
        "",
        f"- Residual stream at {escape_markdown(direction_set.hook_name)} of "
        + escape_markdown(str(p.get("model", direction_set.model_signature))),
        f"- Direction: {p['method']} of mean-pooled residuals over {p['span']} tokens, fitted on the selection rows; "
        f"{p['heldout_fraction']:.0%} of each side held out",
        f"- **Held-out AUROC** (mean over selection contrasts): **{s['heldout_auroc']:.3f}**; "
        + ", ".join(f"{escape_markdown(k)} {v:.3f}" for k, v in methods.items()),
        f"- Logit-lens tokens: {_tokens(direction_set.labels[0]['top_tokens'])}",
        "",
        "## Held-out separation per contrast",
        "",
        "| contrast | role | target | reference | "
        + " | ".join(f"{escape_markdown(k)} AUROC" for k in methods)
        + " | p (kept direction) | AUROC of length alone |",
        "|---" * (6 + len(methods)) + "|",
    ]
    for c in s["contrasts"]:
        lines.append(
            f"| {escape_markdown(c['name'])} | {c['role']} | {c['n_target']} | {c['n_reference']} | "
            + " | ".join(f"{c['methods'][k]:.3f}" for k in methods)
            + f" | {c['p_value']:.3g} | {c['length_auroc']:.3f} |"
        )
    lines += ["", "## Warnings", ""]
    lines += [f"- {escape_markdown(w)}" for w in s["warnings"]] or ["None."]
    for composition in s.get("composition", []):
        lines += [
            "",
            f"## SAE features the direction is made of ({escape_markdown(s.get('composition_sae', ''))})",
            "",
            f"{composition['captured']:.0%} of the direction lies in the span of these "
            f"{len(composition['features'])} decoder directions.",
            "",
            "| feature | cosine | logit-lens tokens |",
            "|---|---|---|",
        ]
        tokens = composition.get("tokens", [[]] * len(composition["features"]))
        lines += [
            f"| {f} | {c:+.3f} | {_tokens(t)} |" for (f, c), t in zip(composition["features"], tokens, strict=True)
        ]
    if "command" in p:
        lines += ["", f"Reproduce: {escape_markdown(p['command'])}"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path / "CARD.md"
