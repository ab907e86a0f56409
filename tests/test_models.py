from __future__ import annotations

import pytest
import torch

from geoguard.models import EMBEDDED_MODEL, cache_dir, embedded_gguf_path, embedded_model_dir, load_model


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOGUARD_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert cache_dir().is_dir()


def test_embedded_model_is_converted_once_then_loaded_from_safetensors(embedded, monkeypatch, tmp_path):
    model, tokenizer = embedded
    monkeypatch.setenv("GEOGUARD_CACHE", str(tmp_path / "fresh-cache"))  # a first run on a new machine
    directory = embedded_model_dir()
    assert directory.is_relative_to(tmp_path) and [p.name for p in directory.parent.iterdir()] == [directory.name]
    weights = directory / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_conversion():
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr("geoguard.models.embedded_gguf_path", no_conversion)
    again, _ = load_model(EMBEDDED_MODEL)
    assert weights.stat().st_mtime_ns == stamp
    assert again.config.num_hidden_layers == 30 and again.config.hidden_size == 576
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer("The cat sat on the mat.", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, model(**ids).logits, rtol=0, atol=1e-3)


def test_a_gguf_file_loads_directly_matches_the_cached_copy_and_can_be_saved(embedded, tmp_path):
    model, tokenizer = embedded
    from_gguf, _ = load_model(str(embedded_gguf_path()))
    ids = tokenizer("Hello", return_tensors="pt")
    with torch.no_grad():
        # Same weights; CPU kernels differ in the last bits between loads.
        torch.testing.assert_close(from_gguf(**ids).logits, model(**ids).logits, rtol=0, atol=1e-3)
    assert from_gguf.hf_quantizer is None  # trainable and saveable like any model
    from_gguf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


def test_dtype_option_is_applied(embedded):
    model, _ = load_model(EMBEDDED_MODEL, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name_or_path": "missing/model.gguf"}, FileNotFoundError, "does not exist"),
        ({"dtype": "float17"}, ValueError, "Unknown dtype"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_model(**kwargs)
