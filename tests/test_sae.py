from __future__ import annotations

import pytest
import torch

from geoguard.capture import run_to_hook
from geoguard.sae import EMBEDDED_SAE, check_sae_fits, load_sae

from conftest import tiny_llama, tiny_sae


def test_sae_round_trips_through_sae_lens_disk_format(tmp_path):
    sae = tiny_sae()
    sae.save_model(str(tmp_path))
    loaded = load_sae(str(tmp_path))
    assert type(loaded).__name__ == "TopKSAE"
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_check_sae_fits_returns_the_hook_point():
    point = check_sae_fits(tiny_sae(layer=2), tiny_llama())
    assert (point.module_path, point.layer) == ("model.layers.2", 2)


def test_d_in_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="d_in=32 does not match the model's hidden size 64"):
        check_sae_fits(tiny_sae(d_in=32), tiny_llama())


def test_hook_layer_beyond_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit this model"):
        check_sae_fits(tiny_sae(layer=7), tiny_llama(n_layers=4))


def test_missing_sae_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json missing"):
        load_sae(str(tmp_path))


def test_embedded_sae_fits_the_embedded_model_and_reconstructs_it(embedded):
    model, tokenizer = embedded
    sae = load_sae(EMBEDDED_SAE)
    point = check_sae_fits(sae, model)
    assert (sae.cfg.d_in, sae.cfg.d_sae, point.layer) == (576, 8192, 11)
    ids = tokenizer("The quick brown fox jumps over the lazy dog because it wants to.", return_tensors="pt")
    with torch.no_grad():
        acts = run_to_hook(model, sae.cfg.metadata.hook_name, **ids)[0, 1:]  # drop the attention sink
        recon = sae.decode(sae.encode(acts))
    explained = 1 - (recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert explained > 0.6
