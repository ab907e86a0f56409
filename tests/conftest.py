"""Shared test set-up: offline, seeded, and tiny model / SAE builders."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from transformers import AutoModelForCausalLM, LlamaConfig

from geoguard.features import FeatureSet, sae_fingerprint
from geoguard.models import load_model
from geoguard.sae import sae_hook_name


def tiny_llama(n_layers: int = 4, d_model: int = 64, vocab: int = 128, seed: int = 0):
    """A randomly initialised 4-layer Llama small enough for unit tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_sae(d_in: int = 64, d_sae: int = 256, k: int = 8, layer: int = 1, seed: int = 0) -> TopKSAE:
    """A random TopK SAE reading `blocks.{layer}.hook_resid_post`."""
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae


def char_tokenizer():
    """A character-level tokenizer over the tiny model's 128-token vocabulary (no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"<pad>": 0, "<unk>": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (converted from GGUF on first use)."""
    return load_model()


PLANTED = {"Z": 11, "Q": 42, "X": 200}
"""Planted features of `planted_sae`: SAE feature id that fires on each character."""


def planted_sae(model, layer: int = 0, *, align_decoder: bool = False) -> TopKSAE:
    """A `tiny_sae` whose features `PLANTED` fire on the residual of their characters (char tokenizer ids).

    With `align_decoder`, their decoder directions are their characters' directions too (a residual then
    projects onto the planted features' span where the characters occur)."""
    sae = tiny_sae(d_in=model.config.hidden_size, layer=layer)
    embeddings = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        sae.b_dec.zero_()
        for char, feature in PLANTED.items():
            direction = embeddings[ord(char)] / embeddings[ord(char)].norm()
            sae.W_enc[:, feature] = 50 * direction
            sae.b_enc[feature] = -4  # fires on its own character only (activation ~8 there, below 2 elsewhere)
            if align_decoder:
                sae.W_dec[feature] = direction
    return sae


def planted_feature_set(sae) -> FeatureSet:
    """A feature set of the `PLANTED` features of `planted_sae(...)`."""
    ids = list(PLANTED.values())
    return FeatureSet(
        name="planted",
        feature_ids=ids,
        hook_name=sae_hook_name(sae),
        d_sae=sae.cfg.d_sae,
        sae_fingerprint=sae_fingerprint(sae),
        labels=[{"top_tokens": [char], "examples": [{"text": f"a«{char}»"}]} for char in PLANTED],
        decoder=torch.nn.functional.normalize(sae.W_dec[ids].detach(), dim=1),
    )


def planted_texts(n: int, planted: str, seed: int) -> list[str]:
    """`n` random lowercase texts, each with the characters of `planted` inserted twice; without `planted`,
    the same number of random letters instead, so both sides have the same length distribution."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        chars = [rng.choice("abcdefghijklmnop ") for _ in range(rng.randint(20, 40))]
        for char in (planted or "".join(rng.choice("abcdefghijklmnop") for _ in range(3))) * 2:
            chars.insert(rng.randrange(len(chars) + 1), char)
        texts.append("".join(chars))
    return texts
