"""Load SAEs through sae-lens and check that an SAE fits the model it will read.

Two ways in, as in sae-lens: `SAE.from_pretrained(release, sae_id)` for published SAEs (Gemma
Scope, Gemma Scope 2, Llama Scope, ...: from the Hub, or offline from the local Hugging Face cache with
`HF_HUB_OFFLINE=1`) and `SAE.load_from_disk(path)` for local ones, including the SAE geoguard ships for its
embedded model (`EMBEDDED_SAE`).

One workaround: sae-lens reads the tensor shapes of Gemma Scope 2 SAEs with HTTP range requests to the Hub,
even when the files are cached, so it fails offline. While geoguard loads a published SAE, those shapes are
read from the file itself instead (`hf_hub_download` gives the cached copy, or downloads the file the loader
downloads next anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from safetensors import safe_open
from torch import nn

from geoguard.capture import HookPoint, resolve_hook_point, unwrap_model
from geoguard.data import RESOURCES

EMBEDDED_SAE = "embedded:smollm2-135m-instruct-l11"
"""Name of the TopK SAE shipped for the embedded model (layer 11 residual stream, 8192 features)."""


def embedded_sae_dir() -> Path:
    """Directory of the shipped SAE (cfg.json, sae_weights.safetensors, CARD.md)."""
    return RESOURCES / "sae" / EMBEDDED_SAE.removeprefix("embedded:")


def load_sae(release_or_path: str = EMBEDDED_SAE, sae_id: str | None = None, *, device: str = "cpu") -> SAE:
    """Load an SAE with sae-lens.

    Args:
        release_or_path (`str`, defaults to `EMBEDDED_SAE`):
            A sae-lens release (with `sae_id`), a local directory written by
            `save_inference_model`, or `EMBEDDED_SAE`.
        sae_id (`str`, *optional*):
            The SAE inside a published release, e.g. `"layer_12/width_16k/canonical"`.
        device (`str`, defaults to `"cpu"`):
            Device for the SAE weights.

    Returns:
        The `sae_lens.SAE` (its class follows the architecture in its config).

    Example:
        ```python
        sae = load_sae()  # the embedded model's SAE
        sae = load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
        ```
    """
    if sae_id is not None:
        return _load_published_sae(release_or_path, sae_id, device)
    path = embedded_sae_dir() if release_or_path == EMBEDDED_SAE else Path(release_or_path)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(
            f"No SAE at {path} (cfg.json missing). Pass a directory written by sae-lens' save_inference_model, "
            "or a published release together with its sae_id."
        )
    return SAE.load_from_disk(str(path), device=device)


def _load_published_sae(release: str, sae_id: str, device: str) -> SAE:
    releases = get_pretrained_saes_directory()
    if release not in releases and "/" not in release:
        raise ValueError(
            f"Unknown SAE release {release!r}: not in sae-lens' registry of published SAEs. Use a release name "
            "from sae-lens' pretrained_saes.yaml (e.g. gemma-scope-2b-pt-res-canonical, gemma-scope-2-270m-pt-res, "
            "llama_scope_lxr_8x), a Hugging Face repo id, or a local SAE directory (without --geoguard_sae_id)."
        )
    if release in releases and sae_id not in releases[release].saes_map:
        ids = list(releases[release].saes_map)
        raise ValueError(
            f"Unknown sae_id {sae_id!r} in release {release!r}, which has {len(ids)} SAEs, e.g. {ids[:5]}. "
            f'List them with: python -c "from sae_lens.loading.pretrained_saes_directory import '
            f"get_pretrained_saes_directory as d; print(list(d()['{release}'].saes_map))\""
        )
    try:
        with _tensor_shapes_from_cached_file():
            return SAE.from_pretrained(release, sae_id, device=device)
    except LocalEntryNotFoundError as err:
        repo = releases[release].repo_id if release in releases else release
        raise FileNotFoundError(
            f"The files of SAE {release}/{sae_id} are not in the local Hugging Face cache and the Hub cannot be "
            f"reached (offline). Download them where the Hub can be reached, e.g. `hf download {repo}`, into the "
            f"cache this machine uses ($HF_HOME), or pass a local SAE directory. ({err})"
        ) from err


def _safetensors_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """sae-lens' `get_safetensors_tensor_shapes`, read from the (cached or downloaded) file instead of HTTP."""
    with safe_open(hf_hub_download(repo_id, filename), framework="pt") as file:
        return {name: list(file.get_slice(name).get_shape()) for name in file.keys()}


@contextlib.contextmanager
def _tensor_shapes_from_cached_file() -> Iterator[None]:
    original = pretrained_sae_loaders.get_safetensors_tensor_shapes
    pretrained_sae_loaders.get_safetensors_tensor_shapes = _safetensors_shapes
    try:
        yield
    finally:
        pretrained_sae_loaders.get_safetensors_tensor_shapes = original


def sae_hook_name(sae: SAE) -> str:
    """Return the hook name an SAE was trained at: its HF hook point if recorded, else its sae-lens hook name."""
    metadata = sae.cfg.metadata
    hook = metadata.get("hf_hook_name") or metadata.get("hook_name")
    if not hook:
        raise ValueError("The SAE's config records no hook_name; pass the hook name explicitly.")
    return hook


def check_sae_fits(sae: SAE, model: nn.Module, hook_name: str | None = None) -> HookPoint:
    """Check that `sae` can read `model` at its hook point and return that hook point.

    Raises:
        ValueError: when the SAE's `d_in` differs from the model's hidden size, or its hook point
            does not exist in the model (e.g. a layer beyond the model's depth).
    """
    base = unwrap_model(model)
    d_model = base.config.get_text_config().hidden_size
    if sae.cfg.d_in != d_model:
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match the model's hidden size {d_model} "
            f"({base.config.model_type}); the SAE was trained on another model. Load the SAE made for this model."
        )
    hook = hook_name or sae_hook_name(sae)
    try:
        return resolve_hook_point(base, hook)
    except ValueError as err:
        raise ValueError(f"SAE hook point {hook!r} does not fit this model: {err}") from err
