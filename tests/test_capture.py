from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from geoguard.capture import SinkRule, capture, iter_activations, resolve_hook_point, run_to_hook, unwrap_model

from conftest import tiny_llama

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
ARCHITECTURES = {
    "llama": (LlamaConfig(vocab_size=128, **SMALL), "model.layers"),
    "mistral": (MistralConfig(vocab_size=128, **SMALL), "model.layers"),
    "qwen2": (Qwen2Config(vocab_size=128, **SMALL), "model.layers"),
    "gemma2": (Gemma2Config(vocab_size=128, head_dim=16, **SMALL), "model.layers"),
    "gemma3": (Gemma3TextConfig(vocab_size=128, head_dim=16, **SMALL), "model.layers"),
    "gpt2": (GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4), "transformer.h"),
}


def _inputs(batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 128, (batch, seq)),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_hook_names_resolve_to_the_residual_stream_of_every_architecture(arch):
    config, layers = ARCHITECTURES[arch]
    model = AutoModelForCausalLM.from_config(config).eval()
    inputs = _inputs()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    for hook_name in ("blocks.1.hook_resid_post", f"{layers}.1", f"{layers}.1.output"):
        assert resolve_hook_point(model, hook_name).layer == 1
        with torch.no_grad():
            acts = run_to_hook(model, hook_name, early_exit=False, **inputs)
        torch.testing.assert_close(acts, hidden[2])  # hidden_states[i + 1] is the output of layer i


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_early_exit_gives_the_same_activations_as_a_full_forward(arch):
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[arch][0]).eval()
    inputs = _inputs()
    with torch.no_grad():
        full = run_to_hook(model, "blocks.1.hook_resid_post", early_exit=False, **inputs)
        early = run_to_hook(model, "blocks.1.hook_resid_post", early_exit=True, **inputs)
    torch.testing.assert_close(early, full, rtol=0, atol=0)


def test_early_exit_skips_the_layers_after_the_hook():
    model = tiny_llama()
    calls = []
    model.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        run_to_hook(model, "blocks.1.hook_resid_post", **_inputs())
    assert calls == []


def test_hf_hook_points_of_the_bare_model_and_other_layouts_resolve_on_the_causal_lm():
    llama = tiny_llama()
    # SAE configs write HF hook points for the *ForCausalLM, the bare *Model, or a multimodal model.
    for hook_name in ("model.layers.1.output", "layers.1", "model.language_model.layers.1"):
        assert resolve_hook_point(llama, hook_name).module_path == "model.layers.1", hook_name
    assert resolve_hook_point(llama, "model.layers.1.mlp").layer == 1
    gpt2 = AutoModelForCausalLM.from_config(ARCHITECTURES["gpt2"][0])
    assert resolve_hook_point(gpt2, "model.layers.2").module_path == "transformer.h.2"


@pytest.mark.parametrize("hook_name", ["blocks.2.hook_resid_pre", "model.layers.2.input"])
@pytest.mark.parametrize("early_exit", [False, True])
def test_resid_pre_and_input_hooks_read_the_input_of_the_layer(hook_name, early_exit):
    model = tiny_llama()
    inputs = _inputs()
    point = resolve_hook_point(model, hook_name)
    assert point.read_input and point.layer == 2
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        torch.testing.assert_close(run_to_hook(model, hook_name, early_exit=early_exit, **inputs), hidden[2])


def test_padded_batches_give_the_same_activations_as_single_samples():
    model = tiny_llama()
    long, short = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :5] = long[0], short[0]
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        batched = run_to_hook(model, "blocks.3.hook_resid_post", input_ids=batch, attention_mask=mask)
        alone = run_to_hook(model, "blocks.3.hook_resid_post", input_ids=short, attention_mask=torch.ones(1, 5))
    torch.testing.assert_close(batched[1, :5], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "hook_name, message",
    [
        ("blocks.9.hook_resid_post", "asks for layer 9, but the model has 4 layers"),
        ("model.norm", "not inside a decoder layer"),
        ("nope", "does not name"),
    ],
)
def test_bad_hook_names_fail_with_a_clear_message(hook_name, message):
    with pytest.raises(ValueError, match=message):
        resolve_hook_point(tiny_llama(), hook_name)


def test_peft_wrapped_model_matches_plain_before_training_and_differs_after_a_lora_step():
    model = tiny_llama()
    inputs = _inputs()
    with torch.no_grad():
        plain = run_to_hook(model, "blocks.2.hook_resid_post", **inputs).clone()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=True)
    )
    assert unwrap_model(peft_model) is model
    with torch.no_grad():
        torch.testing.assert_close(run_to_hook(peft_model, "blocks.2.hook_resid_post", **inputs), plain)

    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        after = run_to_hook(peft_model, "blocks.2.hook_resid_post", **inputs)
        with peft_model.disable_adapter():
            base = run_to_hook(peft_model, "blocks.2.hook_resid_post", **inputs)
    assert (after - plain).abs().max() > 1e-4
    torch.testing.assert_close(base, plain)


def test_capture_sees_through_ddp(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_llama()
        inputs = _inputs()
        with torch.no_grad():
            plain = run_to_hook(model, "blocks.1.hook_resid_post", **inputs).clone()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            assert unwrap_model(ddp) is model
            torch.testing.assert_close(run_to_hook(ddp, "blocks.1.hook_resid_post", **inputs), plain)
    finally:
        torch.distributed.destroy_process_group()


def test_capture_records_every_forward_pass_inside_the_block():
    model = tiny_llama()
    with torch.no_grad(), capture(model, "blocks.0.hook_resid_post") as records:
        model(**_inputs())
        model(**_inputs(batch=3))
    assert [r.shape[0] for r in records] == [2, 3]


def test_sink_rule_drops_first_positions_padding_and_extreme_norm_tokens():
    acts = torch.ones(2, 5, 4)
    acts[1, 3] *= 1000  # an attention-sink-like token
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    keep = SinkRule(first_positions=1, norm_ratio=10.0).keep_mask(acts, mask)
    assert keep.tolist() == [[False, True, True, True, False], [False, True, True, False, True]]
    assert SinkRule(first_positions=0, norm_ratio=0).keep_mask(acts, mask).tolist() == mask.bool().tolist()


def test_chat_samples_mark_prompt_and_response_tokens(embedded):
    model, tokenizer = embedded
    chat = {
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello there, friend!"}]
    }
    ((acts, keep_resp, _),) = iter_activations(
        model, tokenizer, [chat], "blocks.3.hook_resid_post", span="response", sink_rule=None
    )
    ((_, keep_prompt, _),) = iter_activations(
        model, tokenizer, [chat], "blocks.3.hook_resid_post", span="prompt", sink_rule=None
    )
    ids = tokenizer.apply_chat_template(chat["messages"], tokenize=True)["input_ids"]
    response_text = tokenizer.decode([t for t, r in zip(ids, keep_resp[0].tolist(), strict=True) if r])
    assert "Hello there, friend!" in response_text and "Say hi." not in response_text
    assert (keep_resp[0] ^ keep_prompt[0]).all()
    assert acts.shape == (1, len(ids), model.config.hidden_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_capture_sees_through_deepspeed_zero2_and_zero3_engines():
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    script = os.path.join(os.path.dirname(__file__), "deepspeed_capture.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("stage=")]
    assert len(lines) == 4
    assert all(line.endswith("max_diff=0") for line in lines), lines
