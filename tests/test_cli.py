from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoguard.cli import main
from geoguard.corpora import load_rows, load_samples
from geoguard.features import FeatureSet

from conftest import PLANTED, char_tokenizer, planted_feature_set, planted_sae, planted_texts, tiny_llama


@pytest.fixture(scope="module")
def local_model_and_sae(tmp_path_factory):
    """A tiny model, its tokenizer and a planted SAE saved the way users keep them: local directories."""
    root = tmp_path_factory.mktemp("local")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    planted_sae(model).save_model(str(root / "sae"))
    return root


def fails(capsys, argv: list[str]) -> str:
    """Run the command; assert it ends with exit code 2 and one line naming the problem; return that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # above it, at most the progress bars of `datasets`
    assert last.startswith(f"geoguard {argv[0]}: ")
    return last


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_features_and_geometry_commands_end_to_end(local_model_and_sae, tmp_path, capsys):
    root = local_model_and_sae
    common = ["--model", str(root / "model"), "--geoguard_sae", str(root / "sae"), "--n_permutations", "200"]
    target = _write_jsonl(tmp_path / "zqx.jsonl", planted_texts(50, "ZQX", seed=0))
    plain = _write_jsonl(tmp_path / "plain.jsonl", planted_texts(50, "", seed=1))
    (tmp_path / "z.txt").write_text("\n".join(planted_texts(50, "Z", seed=2)))
    main(
        [
            "features",
            "--target",
            target,
            "--reference",
            plain,
            "--name",
            "toxic",
            "--k",
            "3",
            "--output_dir",
            str(tmp_path / "toxic"),
            *common,
        ]
    )
    toxic = FeatureSet.load(tmp_path / "toxic")
    assert set(toxic.feature_ids) == set(PLANTED.values())
    assert toxic.provenance["command"].startswith("geoguard features --target")
    assert "held-out AUROC" in (tmp_path / "toxic" / "CARD.md").read_text()
    for name, source in (("z", str(tmp_path / "z.txt")), ("plain", plain)):
        main(
            [
                "features",
                "--target",
                source,
                "--reference",
                plain if name == "z" else target,
                "--name",
                name,
                "--k",
                "5",
                "--output_dir",
                str(tmp_path / name),
                *common,
            ]
        )
    capsys.readouterr()
    main(
        [
            "geometry",
            "--geoguard_sae",
            str(root / "sae"),
            "--geoguard_feature_set",
            str(tmp_path / "toxic"),
            "--sets",
            str(tmp_path / "z"),
            str(tmp_path / "plain"),
            "--output_dir",
            str(tmp_path / "report"),
            "--n_null",
            "50",
            "--n_permutations",
            "200",
        ]
    )
    out = capsys.readouterr().out
    assert "z vs plain: Δ nearest" in out and (tmp_path / "report" / "report.md").is_file()
    geometry = json.loads((tmp_path / "report" / "geometry.json").read_text())
    assert geometry["sets"][0]["overlap"] == 1  # the Z feature is also a toxic feature


def test_cli_rejects_unpaired_contrasts_and_unknown_commands(capsys):
    argv = ["features", "--target", "a.jsonl", "b.jsonl", "--reference", "c.jsonl", "--output_dir", "x"]
    assert "one --reference per --target" in fails(capsys, argv)
    with pytest.raises(SystemExit):
        main(["nonsense"])
    assert "Commands: features, geometry" in capsys.readouterr().err


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "geoguard"  # from [project.scripts]
    out = subprocess.run([str(script), "features", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--match_lengths" in out.stdout


def test_load_samples_reads_the_common_shapes(tmp_path):
    (tmp_path / "pc.csv").write_text("prompt,completion\nWhat is 2+2?,Four\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    (tmp_path / "lines.txt").write_text("first line\nsecond line\n")
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert load_samples(tmp_path / "pc.csv") == [
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four"}]}
    ]
    assert load_samples(tmp_path / "alpaca.json")[0]["messages"][0]["content"] == "Add\n\n2 and 2"
    assert load_samples(tmp_path / "lines.txt") == [{"text": "first line"}, {"text": "second line"}]
    assert load_samples(tmp_path / "chats.jsonl")[0]["messages"][0]["role"] == "user"
    assert len(load_samples(tmp_path / "lines.txt", max_samples=1)) == 1


def test_load_samples_names_the_bad_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, row 2: 'text' must be a non-empty string"):  # rows count from 1
        load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: none of the columns .*'body'.*--text_field"):
        load_samples(tmp_path / "cols.jsonl")
    assert load_samples(tmp_path / "cols.jsonl", text_field="body") == [{"text": "x"}]
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        (tmp_path / "a.xml").write_text("<a/>")
        load_samples(tmp_path / "a.xml")


def test_score_and_filter_commands_write_scores_kept_rows_and_the_audit(local_model_and_sae, tmp_path, capsys):
    root = local_model_and_sae
    model_dir = root / "model"
    sae = planted_sae(tiny_llama())
    planted_feature_set(sae).save(tmp_path / "toxic")
    rows = [{"id": i, "text": t} for i, t in enumerate(planted_texts(4, "ZQX", seed=0) + planted_texts(4, "", seed=1))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(data), "--model", str(model_dir), "--geoguard_sae", str(root / "sae")]
    common += ["--geoguard_feature_set", str(tmp_path / "toxic"), "--cache_dir", str(tmp_path / "cache")]

    main(["score", *common, "--output", str(tmp_path / "scored.jsonl")])
    scored = load_rows(tmp_path / "scored.jsonl")
    assert list(scored["id"]) == list(range(8))
    assert min(scored["geoguard_score"][:4]) > max(scored["geoguard_score"][4:])
    assert all(n[0] in PLANTED.values() for n in scored["geoguard_nearest"][:4])
    out = capsys.readouterr().out
    assert "Scored 8 rows (direct, response tokens, mean pooling)" in out
    assert "0 rows longer than --max_length 512 tokens were read whole in windows" in out

    # Long rows are read whole in windows, or cut only when asked, and the count says where it is recorded.
    main(["score", *common, "--output", str(tmp_path / "w.jsonl"), "--max_length", "16", "--no_cache"])
    assert "rows longer than --max_length 16 tokens were read whole in windows" in capsys.readouterr().out
    main(["score", *common, "--output", str(tmp_path / "t.jsonl"), "--max_length", "16", "--truncate", "--no_cache"])
    assert "8 rows were cut to --max_length 16 tokens (column geoguard_truncated_tokens" in capsys.readouterr().out
    assert min(load_rows(tmp_path / "t.jsonl")["geoguard_truncated_tokens"]) > 0

    main(["filter", *common, "--output", str(tmp_path / "kept.jsonl"), "--fraction", "0.25"])
    kept = load_rows(tmp_path / "kept.jsonl")
    audit = [json.loads(line) for line in (tmp_path / "kept.jsonl.dropped.jsonl").read_text().splitlines()]
    assert sorted(list(kept["id"]) + [a["sample"]["id"] for a in audit]) == list(range(8))
    assert len(audit) == 2 and all(a["sample"]["id"] < 4 for a in audit)
    assert "Kept 6 of 8 rows (drop the top 25% by score)" in capsys.readouterr().out

    # Calibrated on the benign rows: only rows above their 90th percentile go.
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"text": t}) + "\n" for t in planted_texts(10, "", seed=5)))
    reference = ["--policy", "reference_percentile", "--reference", str(benign), "--percentile", "90"]
    main(["filter", *common, "--output", str(tmp_path / "kept2.jsonl"), *reference])
    assert sorted(load_rows(tmp_path / "kept2.jsonl")["id"])[:4] == [4, 5, 6, 7]


def test_filter_command_names_a_missing_policy_value(tmp_path, capsys):
    argv = ["filter", "--data", "x.jsonl", "--output", str(tmp_path / "k.jsonl"), "--policy", "threshold"]
    assert "--policy threshold needs --threshold" in fails(capsys, argv)


def test_score_command_rejects_a_missing_file_and_a_bad_output_before_loading_a_model(tmp_path, capsys):
    no_model = ["--model", str(tmp_path / "no-model")]
    # A model that does not exist either: the data error must come first.
    argv = ["score", "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "s.jsonl")] + no_model
    assert re.search("No file at .*missing.jsonl", fails(capsys, argv))
    argv = ["score", "--data", "train.jsonl", "--output", str(tmp_path / "scores.txt")]
    assert re.search("--output .*scores.txt: use a .jsonl", fails(capsys, argv))


# ---- bad input fails before any model loads, with the file, line or row named; nothing is written --------------


def _bad_files(tmp_path) -> dict[str, Path]:
    good = [json.dumps({"text": f"sample {i}"}) for i in range(8)]
    files = {
        "malformed": "\n".join(good[:5] + ['{"text": "broken \\x", '] + good[5:]) + "\n",
        "empty": "",
        "no_text": "\n".join(json.dumps({"id": i, "body": "x"}) for i in range(3)) + "\n",
        "no_answer": "\n".join(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "Hi?" * (i + 1)}]
                    + ([{"role": "assistant", "content": "Hello."}] if i != 7 else [])
                }
            )
            for i in range(12)
        )
        + "\n",  # row 8 is a question without an answer
    }
    for name, content in files.items():
        (tmp_path / f"{name}.jsonl").write_text(content)
    return {name: tmp_path / f"{name}.jsonl" for name in files}


@pytest.mark.parametrize(
    ("case", "flags", "message"),
    [
        ("malformed", [], r"malformed.jsonl, line 6: not valid JSON \(Invalid \\escape at column 18\)"),
        ("empty", [], r"empty.jsonl is empty; pass a file with at least one sample"),
        ("no_text", [], r"no_text.jsonl, row 1: none of the columns geoguard reads .*--text_field"),
        ("no_answer", [], r"no_answer.jsonl: Samples at rows \[8\] have no tokens to score in span 'response'"),
        ("good", ["--fraction", "1.5"], r"--fraction must be in \[0, 1\], got 1.5"),
        ("good", ["--max_length", "0"], r"--max_length must be >= 1, got 0"),
        ("good", ["--geoguard_feature_set", "no/such/set"], r"No feature set at no/such/set"),
        ("good", ["--policy", "reference_percentile", "--reference", "missing.jsonl"], r"No file at missing.jsonl"),
    ],
)
def test_bad_input_fails_before_a_model_loads_and_writes_nothing(tmp_path, monkeypatch, capsys, case, flags, message):
    monkeypatch.setattr("geoguard.cli.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    files = _bad_files(tmp_path)
    data = files.get(case) or _write_jsonl(tmp_path / "good.jsonl", ["fine text"] * 3)
    out = tmp_path / "out" / "kept.jsonl"
    err = fails(
        capsys, ["filter", "--data", str(data), "--output", str(out), "--cache_dir", str(tmp_path / "c"), *flags]
    )
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_rows_keep_the_users_numbering_in_a_random_subset(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("geoguard.cli.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = [json.dumps({"text": f"row {i}"}) for i in range(1, 40)] + [json.dumps({"text": ""})]  # row 40 is bad
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    argv = ["score", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "s.jsonl"), "--max_samples", "5"]
    assert "d.jsonl, row 40: 'text' must be a non-empty string" in fails(capsys, argv)


# ---- Ctrl-C: one line saying what was kept and how to resume, exit code 130 ----------------------------------


def test_ctrl_c_while_scoring_keeps_the_finished_chunks_and_says_how_to_resume(local_model_and_sae, tmp_path):
    root = local_model_and_sae
    data = _write_jsonl(tmp_path / "train.jsonl", planted_texts(400, "ZQX", seed=0))
    argv = [sys.executable, "-m", "geoguard.cli", "score", "--data", data, "--output", str(tmp_path / "s.jsonl")]
    argv += ["--model", str(root / "model"), "--geoguard_sae", str(root / "sae"), "--chunk_size", "8"]
    argv += ["--batch_size", "2", "--cache_dir", str(tmp_path / "cache")]
    sae = planted_sae(tiny_llama())
    planted_feature_set(sae).save(tmp_path / "toxic")
    argv += ["--geoguard_feature_set", str(tmp_path / "toxic")]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").rglob("chunk-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith("geoguard score:")] == [
        f"geoguard score: interrupted. The scores of every finished chunk are cached under {tmp_path / 'cache'}; "
        "run the same command again to resume."
    ]
    assert "Traceback" not in err and not (tmp_path / "s.jsonl").exists()
    kept = len(list((tmp_path / "cache").rglob("chunk-*.npz")))
    assert 1 <= kept < 50
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert len(load_rows(tmp_path / "s.jsonl")) == 400


@pytest.mark.parametrize(
    ("command", "patched", "flags"),
    [
        ("features", "geoguard.cli.find_features", ["--target", "T", "--reference", "R", "--output_dir", "OUT"]),
        (
            "eval",
            "geoguard.evaluation.MisalignmentEvaluation.run",
            ["--output_dir", "OUT", "--geoguard_judge", "openai", "--geoguard_judge_model", "m"]
            + ["--geoguard_judge_base_url", "http://127.0.0.1:9/v1"],  # built, never called
        ),
    ],
)
def test_ctrl_c_in_feature_statistics_or_the_evaluation_says_nothing_was_kept(
    local_model_and_sae, tmp_path, monkeypatch, capsys, command, patched, flags
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patched, interrupt)
    root = local_model_and_sae
    data = _write_jsonl(tmp_path / "t.jsonl", planted_texts(10, "ZQX", seed=0))
    flags = [{"T": data, "R": data, "OUT": str(tmp_path / "out")}.get(f, f) for f in flags]
    sae = planted_sae(tiny_llama())
    planted_feature_set(sae).save(tmp_path / "toxic")
    common = ["--model", str(root / "model"), "--geoguard_sae", str(root / "sae")]
    common += ["--geoguard_feature_set", str(tmp_path / "toxic")]
    with pytest.raises(SystemExit) as exit_:
        main([command, *flags, *common])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"geoguard {command}: interrupted. Nothing was written (nothing is cached for this command); run the same "
        "command again to start over."
    )
    assert not (tmp_path / "out").exists()


def test_features_refuses_an_unknown_preset_and_a_bad_direction_hook_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--preset", "hateful", "--output_dir", str(tmp_path / "set")])
    assert exit_info.value.code == 2
    assert "No contrast preset 'hateful'; geoguard ships ['toxic']" in capsys.readouterr().err
    flags = ["--preset", "toxic", "--kind", "directions", "--hook_name", "blocks.99.hook_resid_post"]
    with pytest.raises(SystemExit) as exit_info:
        main(["features", *flags, "--output_dir", str(tmp_path / "set")])
    assert exit_info.value.code == 2
    assert "--hook_name: Hook name 'blocks.99.hook_resid_post' asks for layer 99" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
