"""The SVD adapter on real tiny transformers models (DESIGN section 2)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import TINY_NAMES, tiny_policy, token_batch
from torch.func import functional_call
from transformers import BertConfig, BertLMHeadModel

from antipasto_pl.adapter import (
    AdapterConfig,
    SVDAdapter,
    adapter_modules,
    adapter_parameters,
    load_adapter,
    merged_weights,
    quarantine_ablated,
    reference_policy,
    save_adapter,
    svd_factors,
    wrap_model,
)


def randomise(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            a.delta_s.copy_(torch.randn(a.rank, generator=gen) * scale)
            a.delta_s_hack.copy_(torch.randn(a.rank, generator=gen) * scale)


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "svd_adapter" not in k}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TINY_NAMES)
def test_zero_adapter_is_bit_identical(name: str, dtype: str) -> None:
    model, _ = tiny_policy(name, dtype, wrap=False)
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
        wrap_model(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    randomise(model)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, before)  # the adapter does act


@pytest.mark.parametrize("name", TINY_NAMES)
def test_wraps_every_target_and_only_adapter_vectors_train(name: str, caplog: pytest.LogCaptureFixture) -> None:
    model, _ = tiny_policy(name, wrap=False)
    expected = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in AdapterConfig().target_modules
    ]
    with caplog.at_level(logging.INFO, logger="antipasto_pl.adapter"):
        summary = wrap_model(model)
    assert list(adapter_modules(model)) == expected
    assert not any("embed" in n or "lm_head" in n for n in adapter_modules(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.svd_adapter.{v}" for n in expected for v in ("delta_s", "delta_s_hack")]
    ranks = sum(min(m.weight.shape) for n, m in model.named_modules() if n in expected)
    assert summary.n_modules == len(expected) and summary.n_trainable == 2 * ranks
    assert f"wrapped {len(expected)} modules, {2 * ranks} trainable parameters" in caplog.text
    if name == "tiny-qwen3_5":
        kinds = {n.rsplit(".", 1)[-1] for n in expected}
        assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"} <= kinds


def test_r_max_keeps_top_singular_axes() -> None:
    model, _ = tiny_policy(r_max=5)
    linears = dict(model.named_modules())
    for name, a in adapter_modules(model).items():
        weight = linears[name].weight.detach()
        assert a.rank == 5
        core = a.U.T @ weight @ a.Vh.T  # = diag(top-5 singular values)
        top = torch.linalg.svdvals(weight)[:5]
        torch.testing.assert_close(core, torch.diag(top), atol=1e-4, rtol=1e-4)


def test_gradcheck_on_plain_linear() -> None:
    linear = torch.nn.Linear(6, 4, dtype=torch.float64)
    u, vh, key = svd_factors(linear.weight, None, None)
    linear.svd_adapter = SVDAdapter(u, vh, key).double()
    from antipasto_pl.adapter import _adapter_hook

    linear.register_forward_hook(_adapter_hook)
    x = torch.randn(3, 6, dtype=torch.float64)

    def f(delta_s: torch.Tensor, delta_s_hack: torch.Tensor) -> torch.Tensor:
        params = {"svd_adapter.delta_s": delta_s, "svd_adapter.delta_s_hack": delta_s_hack}
        return functional_call(linear, params, (x,))

    inputs = (torch.randn(4, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("target", ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"])
def test_gradcheck_on_gated_deltanet_projection(target: str) -> None:
    model, _ = tiny_policy("tiny-qwen3_5", "float64")
    name = f"model.layers.0.linear_attn.{target}"
    projection = model.get_submodule(name)
    captured = []
    handle = projection.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(token_batch(1, 5))
    handle.remove()
    rank = adapter_modules(model)[name].rank
    gen = torch.Generator().manual_seed(0)
    inputs = tuple((0.1 * torch.randn(rank, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(2))

    def projection_output(delta_s: torch.Tensor, delta_s_hack: torch.Tensor) -> torch.Tensor:
        params = {"svd_adapter.delta_s": delta_s, "svd_adapter.delta_s_hack": delta_s_hack}
        return functional_call(projection, params, (captured[0],))

    assert torch.autograd.gradcheck(projection_output, inputs)

    # Through the whole hybrid model too; its gated delta rule and gated norm compute in
    # float32 internally, so finite differences need a larger step and tolerance there.
    def logits(delta_s: torch.Tensor, delta_s_hack: torch.Tensor) -> torch.Tensor:
        params = {f"{name}.svd_adapter.delta_s": delta_s, f"{name}.svd_adapter.delta_s_hack": delta_s_hack}
        return functional_call(model, params, (token_batch(1, 5),)).logits[0, -1, :8]

    assert torch.autograd.gradcheck(logits, inputs, eps=1e-3, atol=1e-4, rtol=1e-2)


def test_reference_context_is_the_base_model_and_restores() -> None:
    model, _ = tiny_policy(wrap=False)
    ids = token_batch()
    with torch.no_grad():
        base = model(ids).logits
        wrap_model(model)
        randomise(model)
        adapted = model(ids).logits
        with reference_policy(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, adapted)
        with pytest.raises(RuntimeError, match="boom"):
            with reference_policy(model):
                raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, adapted)


def test_quarantine_ablation_zeroes_only_delta_s_hack() -> None:
    model, _ = tiny_policy()
    randomise(model)
    ids = token_batch()
    with torch.no_grad():
        with quarantine_ablated(model):
            ablated = model(ids).logits
        full = model(ids).logits
        hack_values = {n: a.delta_s_hack.clone() for n, a in adapter_modules(model).items()}
        for a in adapter_modules(model).values():
            a.delta_s_hack.zero_()
        assert torch.equal(model(ids).logits, ablated)
        for n, a in adapter_modules(model).items():
            a.delta_s_hack.copy_(hack_values[n])
        with pytest.raises(ValueError):
            with quarantine_ablated(model):
                raise ValueError
        assert torch.equal(model(ids).logits, full)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_merged_weights_match_hooks_and_restore_exactly(name: str) -> None:
    model, _ = tiny_policy(name)
    randomise(model)
    ids = token_batch()
    weights = base_weights(model)
    with torch.no_grad():
        hooked = model(ids).logits
        with merged_weights(model):
            merged = model(ids).logits
            assert not torch.equal(model.state_dict()[next(iter(adapter_modules(model))) + ".weight"],
                                   weights[next(iter(adapter_modules(model))) + ".weight"])
        with quarantine_ablated(model):
            ablated_hooked = model(ids).logits
            with merged_weights(model):
                ablated_merged = model(ids).logits
        with pytest.raises(KeyError):
            with merged_weights(model):
                raise KeyError("fail inside")
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ablated_merged, ablated_hooked, atol=1e-4, rtol=1e-4)
    after = base_weights(model)
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hooked)


def test_factors_are_non_persistent_and_cached_by_weight_hash(tmp_path) -> None:
    model, _ = tiny_policy(cache_dir=str(tmp_path))
    state = model.state_dict()
    assert not any(k.endswith((".U", ".Vh")) for k in state)
    assert sum(k.endswith(".delta_s") for k in state) == len(adapter_modules(model))
    files = sorted((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == len(adapter_modules(model))
    # same weights -> same cache entries, factors equal to a fresh SVD
    again, _ = tiny_policy(cache_dir=str(tmp_path))
    assert sorted((tmp_path / "svd").glob("*.safetensors")) == files
    for (n, a), b in zip(adapter_modules(model).items(), adapter_modules(again).values()):
        assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh)
    # a changed weight cannot hit a stale entry
    other, _ = tiny_policy(seed=1, cache_dir=str(tmp_path))
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 2 * len(files)
    assert {a.weight_hash for a in other_adapters(other)}.isdisjoint({a.weight_hash for a in other_adapters(model)})


def other_adapters(model: torch.nn.Module) -> list[SVDAdapter]:
    return list(adapter_modules(model).values())


def test_adapter_state_roundtrip(tmp_path) -> None:
    model, _ = tiny_policy()
    randomise(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh, _ = tiny_policy()
    load_adapter(fresh, path)
    for p, q in zip(adapter_parameters(model), adapter_parameters(fresh)):
        assert torch.equal(p, q)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize(
    ("seed", "adapter", "message"),
    [
        (0, dict(target_modules=["q_proj", "v_proj"]), r"unexpected module 'model\.layers\.0\.self_attn\.k_proj'"),
        (0, dict(r_max=4), r"module 'model\.layers\.0\.self_attn\.q_proj' has rank 64 there, but the model's adapter has rank 4"),
        (3, {}, r"module 'model\.layers\.0\.self_attn\.q_proj' was trained on a base weight with hash"),
    ],
)
def test_mismatched_adapter_fails_naming_module(tmp_path, seed: int, adapter: dict, message: str) -> None:
    model, _ = tiny_policy()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    target, _ = tiny_policy(seed=seed, **adapter)
    with pytest.raises(ValueError, match=message):
        load_adapter(target, path)
    with pytest.raises(ValueError, match=r"missing module 'model\.layers\.0\.self_attn\.k_proj'"):
        save_adapter(tiny_policy(target_modules=["q_proj"])[0], path)
        load_adapter(model, path)


def test_not_an_adapter_file(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    model, _ = tiny_policy()
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors adapter file"):
        load_adapter(model, bad)


def test_encoder_model_is_rejected() -> None:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    bert = BertLMHeadModel(config)
    with pytest.raises(ValueError, match=r"BertLMHeadModel \(model_type 'bert'\) is an encoder.*decoder-only causal LM"):
        wrap_model(bert)


def test_wrapping_twice_and_unmatched_targets_fail() -> None:
    model, _ = tiny_policy()
    with pytest.raises(RuntimeError, match="already carries SVD adapters"):
        wrap_model(model)
    plain, _ = tiny_policy(wrap=False)
    with pytest.raises(ValueError, match=r"no nn.Linear in LlamaForCausalLM is named like .*'c_attn'"):
        wrap_model(plain, AdapterConfig(target_modules=["c_attn"]))
