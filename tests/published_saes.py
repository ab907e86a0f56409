"""Published SAEs laid out in a local Hugging Face cache, offline: the file layouts and names of Gemma Scope,
Gemma Scope 2 and Llama Scope, with random weights, found by sae-lens through its own registry.

Each writer takes the hub cache folder (`$HF_HOME/hub`) and writes what `hf_hub_download` finds there with
`HF_HUB_OFFLINE=1`: `models--ORG--NAME/refs/main` naming a commit, and the files under `snapshots/COMMIT/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name
from safetensors.torch import save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"

GEMMA_SCOPE = ("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
GEMMA_SCOPE_2 = ("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium")
LLAMA_SCOPE = ("llama_scope_lxr_8x", "l15r_8x")


def hub_file(hub_cache: Path, repo_id: str, filename: str) -> Path:
    """The path `hf_hub_download(repo_id, filename)` resolves to offline, its folders created."""
    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    path = repo / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def unit_rows(n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """`(n_rows, n_cols)` random unit rows, each one signed entry, so a full-width SAE compresses to kilobytes."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_rows, n_cols), dtype=np.float32)
    rows[np.arange(n_rows), rng.integers(0, n_cols, n_rows)] = rng.choice([-1.0, 1.0], n_rows)
    return rows


def write_gemma_scope(hub_cache: Path) -> tuple[str, str]:
    """Gemma Scope (Gemma 2): `params.npz` at the release's folder. sae-lens takes d_in (2304) and d_sae (16k)
    from the repo and folder names, so the arrays have the published shapes (sparse, compressed)."""
    repo_id, folder = get_repo_id_and_folder_name(*GEMMA_SCOPE)
    w_dec = unit_rows(16384, 2304)
    np.savez_compressed(
        hub_file(hub_cache, repo_id, f"{folder}/params.npz"),
        W_enc=np.ascontiguousarray(w_dec.T),
        W_dec=w_dec,
        b_enc=np.zeros(16384, np.float32),
        b_dec=np.zeros(2304, np.float32),
        threshold=np.full(16384, 0.1, np.float32),
    )
    return GEMMA_SCOPE


def write_gemma_scope_2(hub_cache: Path, d_in: int = 64, d_sae: int = 256) -> tuple[str, str]:
    """Gemma Scope 2 (Gemma 3): `config.json` and `params.safetensors`; sae-lens reads d_in and d_sae from the
    tensor shapes, so the SAE can be as small as the model it reads."""
    repo_id, folder = get_repo_id_and_folder_name(*GEMMA_SCOPE_2)
    layer = int(GEMMA_SCOPE_2[1].split("_")[1])
    config = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": f"model.layers.{layer}.output",
        "width": d_sae,
        "l0": 60,
    }
    hub_file(hub_cache, repo_id, f"{folder}/config.json").write_text(json.dumps(config))
    w_dec = torch.from_numpy(unit_rows(d_sae, d_in)) + 0.05 * torch.randn(d_sae, d_in)
    save_file(
        {
            "w_enc": w_dec.T.contiguous(),
            "w_dec": w_dec,
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_in),
            "threshold": torch.full((d_sae,), 0.05),
        },
        hub_file(hub_cache, repo_id, f"{folder}/params.safetensors"),
    )
    return GEMMA_SCOPE_2


def write_llama_scope(hub_cache: Path, d_in: int = 64, d_sae: int = 512) -> tuple[str, str]:
    """Llama Scope (Llama 3.1 8B): `hyperparams.json` and `checkpoints/final.safetensors` (encoder / decoder as
    `nn.Linear` weights); d_in and d_sae come from the hyperparameters."""
    repo_id, folder = get_repo_id_and_folder_name(*LLAMA_SCOPE)
    hyperparams = {
        "d_model": d_in,
        "d_sae": d_sae,
        "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post",
        "jump_relu_threshold": 0.5,
        "dataset_average_activation_norm": {"in": 8.0, "out": 8.0},
        "act_fn": "jumprelu",
        "top_k": 50,
    }
    hub_file(hub_cache, repo_id, f"{folder}/hyperparams.json").write_text(json.dumps(hyperparams))
    decoder = torch.from_numpy(unit_rows(d_sae, d_in))  # (d_sae, d_in)
    save_file(
        {
            "encoder.weight": decoder.contiguous(),  # (d_sae, d_in)
            "encoder.bias": torch.zeros(d_sae),
            "decoder.weight": decoder.T.contiguous(),  # (d_in, d_sae)
            "decoder.bias": torch.zeros(d_in),
        },
        hub_file(hub_cache, repo_id, f"{folder}/checkpoints/final.safetensors"),
    )
    return LLAMA_SCOPE


def write_tiny_gemma3(path: Path, tokenizer, d_model: int = 64, n_layers: int = 6) -> Path:
    """A random Gemma 3 text model (the architecture Gemma Scope 2 reads) saved to `path` with `tokenizer`."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        sliding_window=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
