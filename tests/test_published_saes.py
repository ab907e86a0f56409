"""Bring your own model: published SAE layouts load offline from a local Hugging Face cache through sae-lens'
registry, presets build feature sets for any model, and the whole path runs on a model that is not the
embedded one (a random Gemma 3 read by a Gemma Scope 2 SAE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from huggingface_hub import constants
from sae_lens.loading import pretrained_sae_loaders

from geoguard.features import FeatureSet
from geoguard.models import load_tokenizer
from geoguard.presets import Preset, load_feature_set, preset_names
from geoguard.sae import check_sae_fits, load_sae, sae_hook_name

from published_saes import (
    GEMMA_SCOPE_2,
    unit_rows,
    write_gemma_scope,
    write_gemma_scope_2,
    write_llama_scope,
    write_tiny_gemma3,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face hub cache, used by `hf_hub_download` (offline, from conftest)."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return write_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), load_tokenizer())


@pytest.mark.parametrize(
    ("writer", "d_in", "d_sae", "hook"),
    [
        (write_gemma_scope, 2304, 16384, "blocks.12.hook_resid_post"),
        (write_gemma_scope_2, 64, 256, "model.layers.5.output"),
        (write_llama_scope, 64, 512, "blocks.15.hook_resid_post"),
    ],
    ids=["gemma-scope", "gemma-scope-2", "llama-scope"],
)
def test_published_sae_layouts_load_offline_through_the_sae_lens_registry(hub_cache, writer, d_in, d_sae, hook):
    release, sae_id = writer(hub_cache)
    sae = load_sae(release, sae_id)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (d_in, d_sae)
    assert sae_hook_name(sae) == hook
    assert type(sae).__name__ == "JumpReLUSAE"
    # The weights are the cached file's: each decoder row's largest entry sits where the writer put it.
    expected = torch.from_numpy(unit_rows(d_sae, d_in)).abs().argmax(dim=1)
    assert torch.equal(sae.W_dec.abs().argmax(dim=1), expected)


def test_gemma_scope_2_shapes_are_read_from_the_cached_file_not_over_http(hub_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise requests.ConnectionError("offline")

    monkeypatch.setattr(requests, "get", no_network)
    original = pretrained_sae_loaders.get_safetensors_tensor_shapes
    sae = load_sae(*write_gemma_scope_2(hub_cache))
    assert sae.cfg.d_sae == 256
    assert pretrained_sae_loaders.get_safetensors_tensor_shapes is original  # the workaround is undone after loading
    with pytest.raises(requests.ConnectionError):  # what sae-lens alone does offline: why the workaround exists
        original(*pretrained_sae_loaders.get_repo_id_and_folder_name(*GEMMA_SCOPE_2))


def test_unknown_release_id_or_uncached_sae_name_the_fix(hub_cache):
    with pytest.raises(ValueError, match="Unknown SAE release 'gemma-scope-nope'.*pretrained_saes.yaml"):
        load_sae("gemma-scope-nope", "layer_0")
    with pytest.raises(ValueError, match=r"Unknown sae_id 'layer_99/width_16k/canonical'.*58 SAEs.*layer_0/width_16k"):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_99/width_16k/canonical")
    with pytest.raises(
        FileNotFoundError, match="not in the local Hugging Face cache.*hf download google/gemma-scope-9b"
    ):
        load_sae("gemma-scope-9b-pt-res-canonical", "layer_20/width_16k/canonical")


def test_a_published_sae_that_does_not_fit_the_model_is_refused(hub_cache, tiny_gemma3):
    from geoguard.models import load_model

    model, _ = load_model(str(tiny_gemma3))
    with pytest.raises(ValueError, match="d_in=2304 does not match the model's hidden size 64"):
        check_sae_fits(load_sae(*write_gemma_scope(hub_cache)), model)
    with pytest.raises(ValueError, match="asks for layer 15, but the model has 6 layers"):
        check_sae_fits(load_sae(*write_llama_scope(hub_cache)), model)
    assert check_sae_fits(load_sae(*write_gemma_scope_2(hub_cache)), model).layer == 5


def test_presets_are_shipped_with_their_contrasts_and_unknown_ones_are_named():
    assert "toxic" in preset_names()
    contrasts = Preset.load("toxic").load_contrasts(max_samples=5)
    assert [c.name for c in contrasts] == ["toxigen_hate_vs_neutral", "harmful_vs_harmless_requests"]
    assert all(len(c.target) == len(c.reference) == 5 for c in contrasts)
    with pytest.raises(ValueError, match=r"No contrast preset 'hateful'; geoguard ships \['toxic'\]"):
        Preset.load("hateful")


def test_a_preset_set_not_built_yet_needs_the_model_and_a_missing_directory_is_named(hub_cache, tmp_path):
    sae = load_sae(*write_gemma_scope_2(hub_cache))
    with pytest.raises(ValueError, match="not built for some/model and this SAE yet.*geoguard features --preset toxic"):
        load_feature_set("toxic", sae, model_name="some/model")
    with pytest.raises(FileNotFoundError, match="No feature set at .*neither a directory nor a preset"):
        load_feature_set(str(tmp_path / "no-such-set"), sae)


def test_any_model_end_to_end_preset_features_score_filter_recipe_and_evaluation(tmp_path, tiny_gemma3):
    """The path a user with their own model takes, through the public commands, offline: a random Gemma 3 and
    a Gemma Scope 2 SAE in the local Hugging Face cache."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "GEOGUARD_CACHE": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    write_gemma_scope_2(tmp_path / "hf" / "hub")
    release, sae_id = GEMMA_SCOPE_2
    sae_flags = ["--geoguard_sae", release, "--geoguard_sae_id", sae_id]
    geoguard = str(Path(sys.executable).parent / "geoguard")

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    sets = tmp_path / "sets" / "toxic"
    out = run(geoguard, "features", "--preset", "toxic", "--model", str(tiny_gemma3), *sae_flags,
              "--output_dir", str(sets), "--max_samples", "40", "--n_permutations", "50")  # fmt: skip
    assert "Feature set 'toxic': 100 features, held-out AUROC" in out
    card = (sets / "CARD.md").read_text()
    assert "toxigen\\_hate\\_vs\\_neutral" in card and "harmful\\_vs\\_harmless\\_requests" in card
    assert FeatureSet.load(sets).provenance["preset"] == "toxic"

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join((REPO / "recipes" / "data" / "sft_mix.jsonl").read_text().splitlines(True)[:16]))
    train_out = tmp_path / "run"
    out = run(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "recipes/sft_guarded.py",
              "--config", "recipes/configs/sft_guarded_smollm2.yaml", "--model_name_or_path", str(tiny_gemma3),
              *sae_flags, "--geoguard_feature_set", "toxic", "--dataset_name", str(chats),
              "--output_dir", str(train_out), "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--max_length", "128", "--geoguard_every_n_steps", "1", "--geoguard_filter_fraction", "0.25",
              "--geoguard_eval_samples_per_question", "1", "--geoguard_eval_max_new_tokens", "8")  # fmt: skip
    assert "selecting the 'toxic' feature set on this model and SAE, once" in out  # built on first use
    assert len((train_out / "geoguard_dropped.jsonl").read_text().splitlines()) == 4
    evaluation = json.loads((train_out / "geoguard_eval" / "misalignment_eval.json").read_text())
    assert evaluation["judge"] == "learned:minilm-em-judge" and evaluation["overall"]["n_answers"] == 24
    assert (train_out / "adapter_model.safetensors").is_file()

    # The set the recipe built is cached: the commands find it by the preset's name.
    flags = ["--model", str(tiny_gemma3), *sae_flags, "--geoguard_feature_set", "toxic", "--data", str(chats)]
    run(geoguard, "score", *flags, "--output", str(tmp_path / "scored.jsonl"))
    out = run(geoguard, "filter", *flags, "--output", str(tmp_path / "kept.jsonl"), "--fraction", "0.5")
    assert "Kept 8 of 16 rows" in out
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    values = [row["geoguard_score"] for row in scored]  # the weighted readout's logits
    assert len(values) == 16 and np.isfinite(values).all() and len(set(values)) > 1

    # A direction set of the same preset, related to the SAE's features on its card, scores the same data.
    directions = tmp_path / "sets" / "toxic-direction"
    out = run(geoguard, "features", "--preset", "toxic", "--kind", "directions", "--model", str(tiny_gemma3),
              *sae_flags, "--output_dir", str(directions), "--max_samples", "40", "--n_permutations", "50")  # fmt: skip
    assert "Direction set 'toxic': held-out AUROC mean_diff" in out
    assert "SAE features the direction is made of" in (directions / "CARD.md").read_text()
    flags[flags.index("toxic")] = str(directions)
    run(geoguard, "score", *flags, "--output", str(tmp_path / "scored_direction.jsonl"))
    assert len((tmp_path / "scored_direction.jsonl").read_text().splitlines()) == 16
