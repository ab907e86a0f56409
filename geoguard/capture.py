"""Capture the residual stream at an SAE's hook point, whatever wraps the model.

One hook point resolver (`resolve_hook_point`) serves every model geoguard supports: the
decoder-layer stack is found under the wrappers that DDP, DeepSpeed, accelerate and PEFT put
around a model, and the hook name may be a sae-lens / TransformerLens name
(`blocks.12.hook_resid_post`, `blocks.12.hook_resid_pre`), the Hugging Face hook point that newer
SAE configs carry (`model.layers.12`, `model.layers.12.output`, `.input`), or any module path of
the unwrapped model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from geoguard.data import Sample, Span, TokenizedSample, iter_token_batches, tokenize_samples

_TL_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
# HF hook points as SAE configs write them: for the *ForCausalLM ("model.layers.L"), the bare
# *Model ("layers.L") or a multimodal model ("model.language_model.layers.L").
_HF_LAYER = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)(.*)$")
# Decoder-layer list and final norm of each supported layout, relative to the unwrapped causal LM, in lookup order.
_LAYOUTS = (
    ("model.layers", "model.norm"),  # Llama / SmolLM2, Mistral, Qwen2, Gemma 2
    ("model.language_model.layers", "model.language_model.norm"),  # Gemma 3, other *ForConditionalGeneration
    ("transformer.h", "transformer.ln_f"),  # GPT-2
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # Pythia
)


@dataclass(frozen=True)
class HookPoint:
    """Where activations are read: a module of the unwrapped model and the layer it ends.

    Attributes:
        module_path: dotted path of the module inside the unwrapped causal LM.
        layer: index of the decoder layer whose output (or input) is read.
        read_input: read the module's input instead of its output (`.input` hook names).
    """

    module_path: str
    layer: int
    read_input: bool = False


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass right after the hook layer."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the causal LM inside DDP / DeepSpeed / accelerate (`.module`), PEFT and `torch.compile` wrappers.

    PEFT's LoRA layers stay in place inside the returned model, so hooks on it see the adapter's effect.

    Example:
        ```python
        unwrap_model(get_peft_model(model, lora_config)) is model  # True
        ```
    """
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return `(path, layers)` of the decoder-layer stack of any supported causal LM.

    Raises:
        ValueError: when none of the known layouts (`model.layers`, `model.language_model.layers`,
            `transformer.h`, `gpt_neox.layers`) exists in the model.
    """
    model = unwrap_model(model)
    for path, _ in _LAYOUTS:
        module = _get_submodule(model, path)
        if isinstance(module, nn.ModuleList):
            return path, module
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(path for path, _ in _LAYOUTS)}. "
        "Pass a module path as the hook name instead."
    )


def resolve_hook_point(model: nn.Module, hook_name: str) -> HookPoint:
    """Turn a sae-lens, Hugging Face or module-path hook name into a `HookPoint` of `model`.

    Args:
        model (`nn.Module`): the causal LM, possibly wrapped (PEFT, DDP, DeepSpeed, accelerate).
        hook_name (`str`): `blocks.{L}.hook_resid_post` / `hook_resid_pre`,
            `model.layers.{L}[.output|.input]` (also `layers.{L}` and `model.language_model.layers.{L}`),
            or any dotted module path inside a decoder layer.

    Returns:
        `HookPoint` with the module path and layer index.

    Example:
        ```python
        resolve_hook_point(model, "blocks.15.hook_resid_post")  # HookPoint("model.layers.15", 15)
        ```
    """
    base = unwrap_model(model)
    layers_path, layers = decoder_layers(base)
    module_path, read_input = hook_name, False
    if match := _TL_RESID.match(hook_name):
        # resid_pre of layer L is the input of decoder layer L, resid_post its output.
        module_path, read_input = f"{layers_path}.{match.group(1)}", match.group(2) == "pre"
        if int(match.group(1)) >= len(layers):
            raise ValueError(
                f"Hook name {hook_name!r} asks for layer {match.group(1)}, but the model has {len(layers)} layers."
            )
    elif hook_name.endswith(".output"):
        module_path = hook_name.removesuffix(".output")
    elif hook_name.endswith(".input"):
        module_path, read_input = hook_name.removesuffix(".input"), True
    if _get_submodule(base, module_path) is None and (match := _HF_LAYER.match(module_path)):
        module_path = f"{layers_path}.{match.group(1)}{match.group(2)}"
    if _get_submodule(base, module_path) is None:
        raise ValueError(
            f"Hook name {hook_name!r} does not name a module of {type(base).__name__}. Use "
            f"'blocks.L.hook_resid_post' or a module path such as '{layers_path}.0' (layers 0-{len(layers) - 1})."
        )
    layer_match = re.match(rf"^{re.escape(layers_path)}\.(\d+)(\.|$)", module_path)
    if layer_match is None:
        raise ValueError(f"Hook point {module_path!r} is not inside a decoder layer ({layers_path}.N).")
    layer = int(layer_match.group(1))
    if layer >= len(layers):
        raise ValueError(f"Hook name {hook_name!r} asks for layer {layer}, but the model has {len(layers)} layers.")
    return HookPoint(module_path=module_path, layer=layer, read_input=read_input)


@contextmanager
def capture(model: nn.Module, hook_name: str, *, stop: bool = False) -> Iterator[list[torch.Tensor]]:
    """Record the activations at `hook_name` during every forward pass run inside the block.

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        hook_name (`str`): see `resolve_hook_point`.
        stop (`bool`, defaults to `False`): end each forward pass at the hook point (early
            exit) by raising an exception that `run_to_hook` catches; use it through `run_to_hook`.

    Yields:
        A list that receives one `(batch, seq, d_in)` tensor per forward pass. With gradient
        checkpointing, the recomputation in backward appends again: consumers that also run
        backward should read the list before `backward()`.
    """
    point = resolve_hook_point(model, hook_name)
    module = unwrap_model(model).get_submodule(point.module_path)
    records: list[torch.Tensor] = []

    def record(value: torch.Tensor) -> None:
        records.append(value)
        if stop:
            raise _StopForward

    if point.read_input:
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: record(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        # transformers >= 5 decoder layers return a tensor, older versions a tuple.
        handle = module.register_forward_hook(
            lambda _m, _args, output: record(output[0] if isinstance(output, tuple) else output)
        )
    try:
        yield records
    finally:
        handle.remove()


def run_to_hook(model: nn.Module, hook_name: str, *, early_exit: bool = True, **inputs: torch.Tensor) -> torch.Tensor:
    """Run one forward pass and return the activations at `hook_name`, `(batch, seq, d_in)`.

    Args:
        model (`nn.Module`): the model, possibly wrapped.
        hook_name (`str`): see `resolve_hook_point`.
        early_exit (`bool`, defaults to `True`): skip the layers after the hook point, the final
            norm and the LM head; the activations are identical to a full forward pass.
        **inputs: the model's inputs (`input_ids`, `attention_mask`, ...).

    Example:
        ```python
        acts = run_to_hook(model, "blocks.11.hook_resid_post", **tokenizer("Hi", return_tensors="pt"))
        ```
    """
    with capture(model, hook_name, stop=early_exit) as records:
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
    if not records:
        raise RuntimeError(f"The forward pass never reached hook point {hook_name!r}.")
    return records[0]


@dataclass(frozen=True)
class SinkRule:
    """Which tokens count as attention sinks and are left out of SAE training and statistics.

    Position 0 (and a few early tokens) carry norms ~100x the median in most LMs ("attention
    sinks"); left in, they dominate means, variances and SAE reconstruction losses.

    Attributes:
        first_positions: always drop this many leading positions of each sequence.
        norm_ratio: also drop any token whose activation norm exceeds `norm_ratio` times the median
            norm of the batch's kept tokens (0 disables the rule). 10 sits far above the spread of
            ordinary tokens and far below the ~100x of sinks.
    """

    first_positions: int = 1
    norm_ratio: float = 10.0

    def keep_mask(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Return `token_mask` `(batch, seq)` minus the sink tokens of `acts` `(batch, seq, d_in)`."""
        keep = token_mask.bool().clone()
        keep[:, : self.first_positions] = False
        if self.norm_ratio > 0 and keep.any():
            norms = acts.float().norm(dim=-1)  # (batch, seq)
            keep &= norms <= self.norm_ratio * norms[keep].median()
        return keep


@torch.no_grad()
def iter_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample] | Sequence[TokenizedSample],
    hook_name: str,
    *,
    span: Span = "all",
    batch_size: int = 16,
    max_length: int = 512,
    sink_rule: SinkRule | None = SinkRule(),
    early_exit: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Yield `(acts, keep, indices)` per length-sorted batch of samples, without gradients.

    Args:
        model, tokenizer: the model (possibly wrapped) and its tokenizer.
        samples (`list`): chats or plain texts (see `geoguard.data`), or samples already tokenized
            with `tokenize_samples` (then `max_length` does not apply).
        hook_name (`str`): see `resolve_hook_point`.
        span (`Span`, defaults to `"all"`): which tokens `keep` marks: all, prompt or response.
        batch_size (`int`, defaults to 16), max_length (`int`, defaults to 512): batching and truncation.
        sink_rule (`SinkRule`, *optional*, defaults to `SinkRule()`): attention sinks to drop; `None` keeps them.
        early_exit (`bool`, defaults to `True`): stop each forward pass at the hook point.

    Yields:
        `acts` `(batch, seq, d_in)`, `keep` the boolean `(batch, seq)` mask of real tokens in `span`
        that are not sinks, and `indices`, the rows' positions in `samples`.
    """
    if samples and isinstance(samples[0], TokenizedSample):
        tokenized = samples
    else:
        tokenized = tokenize_samples(tokenizer, samples, max_length=max_length)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked anyway
    for batch in iter_token_batches(tokenized, batch_size=batch_size, pad_token_id=pad_id):
        acts = run_to_hook(
            model,
            hook_name,
            early_exit=early_exit,
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
        )
        keep = batch.span_mask(span).to(device)
        if sink_rule is not None:
            keep = sink_rule.keep_mask(acts, keep)
        yield acts, keep, batch.indices


def final_norm(model: nn.Module) -> nn.Module:
    """Return the norm applied before the unembedding (for logit-lens readings of directions)."""
    base = unwrap_model(model)
    for _, path in _LAYOUTS:
        if (module := _get_submodule(base, path)) is not None:
            return module
    raise ValueError(
        f"Cannot find the final norm of {type(base).__name__}: looked for {', '.join(path for _, path in _LAYOUTS)}."
    )


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
