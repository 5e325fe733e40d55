"""The SVD adapter on real tiny transformers models (docs/design.md section 2)."""

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
    attach_adapter,
    load_adapter,
    merged_state_dict,
    merged_weights,
    quarantine_ablated,
    reference_policy,
    refresh_merged,
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


@pytest.mark.parametrize("merged_forward", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_on_plain_linear(merged_forward: bool, bias: bool) -> None:
    linear = torch.nn.Linear(6, 4, bias=bias, dtype=torch.float64)
    linear.requires_grad_(False)
    u, vh, key = svd_factors(linear.weight, None, None)
    attach_adapter(linear, SVDAdapter(u, vh, key, merged_forward).double())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, delta_s: torch.Tensor, delta_s_hack: torch.Tensor) -> torch.Tensor:
        # gradcheck perturbs its inputs through ``.data``, which the merge cache cannot see: merge afresh.
        linear.svd_adapter.drop_merged()
        params = {"svd_adapter.delta_s": delta_s, "svd_adapter.delta_s_hack": delta_s_hack}
        return functional_call(linear, params, (x,))

    inputs = (x, torch.randn(4, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs)


def test_attach_adapter_names_a_layer_it_cannot_wrap() -> None:
    class Specialised(torch.nn.Linear):
        pass

    layer = Specialised(4, 4)
    u, vh, key = svd_factors(layer.weight, None, None)
    with pytest.raises(TypeError, match="plain torch.nn.Linear.*Specialised"):
        attach_adapter(layer, SVDAdapter(u, vh, key))


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


def adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    for p in adapter_parameters(model):
        p.grad = None
    logits = model(ids).logits
    (logits.square().mean() + logits[:, -1].logsumexp(-1).sum()).backward()
    return torch.cat([p.grad for p in adapter_parameters(model)])


@pytest.mark.parametrize("name", TINY_NAMES)
def test_merged_forward_matches_the_additive_forward_and_its_gradients(name: str) -> None:
    merged, _ = tiny_policy(name)  # float32: merged forward by default
    additive, _ = tiny_policy(name, merged_forward=False)
    assert all(a.merged_forward for a in adapter_modules(merged).values())
    assert not any(a.merged_forward for a in adapter_modules(additive).values())
    randomise(merged)
    randomise(additive)
    ids = token_batch()
    torch.testing.assert_close(merged(ids).logits, additive(ids).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter_grads(merged, ids), adapter_grads(additive, ids), atol=1e-6, rtol=1e-4)
    for contexts in (quarantine_ablated, reference_policy):
        with torch.no_grad(), contexts(merged), contexts(additive):
            torch.testing.assert_close(merged(ids).logits, additive(ids).logits, atol=1e-5, rtol=1e-4)


def test_merged_weight_follows_every_change_of_the_vectors() -> None:
    model, _ = tiny_policy()
    additive, _ = tiny_policy(merged_forward=False)
    ids = token_batch()
    weights = base_weights(model)

    def agree() -> None:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, additive(ids).logits, atol=1e-5, rtol=1e-4)

    randomise(model)  # copy_
    randomise(additive)
    agree()
    optimizers = [torch.optim.AdamW(adapter_parameters(m), lr=0.05) for m in (model, additive)]
    for m, optimizer in zip((model, additive), optimizers):
        m(ids).logits.square().mean().backward()
        optimizer.step()
    refresh_merged(model)
    agree()
    with torch.no_grad():  # an in-place edit of one vector of one layer, through torch ops
        for m in (model, additive):
            next(iter(adapter_modules(m).values())).delta_s_hack.mul_(-3.0)
    agree()
    with quarantine_ablated(model), quarantine_ablated(additive):
        agree()
    agree()
    with torch.inference_mode():  # a merge made in inference mode still serves training forwards
        with quarantine_ablated(model):
            model(ids)
    adapter_grads(model, ids)
    after = base_weights(model)
    assert all(torch.equal(after[k], weights[k]) for k in weights)  # W itself is never written


@pytest.mark.parametrize("name", TINY_NAMES)
def test_sampling_context_merges_lower_precision_layers_and_drops_them_after(name: str) -> None:
    model, _ = tiny_policy(name, "bfloat16")
    adapters = list(adapter_modules(model).values())
    assert not any(a.merged_forward for a in adapters)  # additive training forward below float32
    randomise(model, scale=0.05)
    ids = token_batch()
    weights = base_weights(model)
    with torch.no_grad():
        additive = model(ids).logits
        with quarantine_ablated(model):
            ablated_additive = model(ids).logits
            with merged_weights(model):
                ablated_merged = model(ids).logits
        with merged_weights(model):
            merged = model(ids).logits
            assert all(a._merged is not None for a in adapters)
        assert all(a._merged is None for a in adapters)
        with pytest.raises(KeyError):
            with merged_weights(model):
                raise KeyError("fail inside")
        assert not any(a.sampling for a in adapters) and all(a._merged is None for a in adapters)
        assert torch.equal(model(ids).logits, additive)
    # bfloat16: the merged weights are rounded, so the logits agree only roughly.
    torch.testing.assert_close(merged.float(), additive.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(ablated_merged.float(), ablated_additive.float(), atol=0.1, rtol=0.05)
    assert not torch.equal(merged, ablated_merged)
    after = base_weights(model)
    assert all(torch.equal(after[k], weights[k]) for k in weights)


def test_merged_state_dict_is_a_plain_model_of_the_merged_weights() -> None:
    model, _ = tiny_policy()
    randomise(model)
    plain, _ = tiny_policy(wrap=False)
    ids = token_batch()
    with quarantine_ablated(model):
        plain.load_state_dict(merged_state_dict(model))
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_factors_are_non_persistent_and_cached_by_weight_hash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ANTIPASTO_CACHE", str(tmp_path))
    model, _ = tiny_policy()
    state = model.state_dict()
    assert not any(k.endswith((".U", ".Vh")) for k in state)
    assert sum(k.endswith(".delta_s") for k in state) == len(adapter_modules(model))
    files = sorted((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == len(adapter_modules(model))
    # same weights -> same cache entries, factors equal to a fresh SVD
    again, _ = tiny_policy()
    assert sorted((tmp_path / "svd").glob("*.safetensors")) == files
    for (n, a), b in zip(adapter_modules(model).items(), adapter_modules(again).values()):
        assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh)
    # a changed weight cannot hit a stale entry
    other, _ = tiny_policy(seed=1)
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


def test_merged_forward_trains_under_autocast() -> None:
    """float32 weights under bfloat16 autocast: the merged Function's backward meets lower-precision dy."""
    merged, _ = tiny_policy()
    additive, _ = tiny_policy(merged_forward=False)
    grads = []
    for model in (merged, additive):
        randomise(model, scale=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(token_batch()).logits
        logits.float().square().mean().backward()
        grads.append(torch.cat([p.grad for p in adapter_parameters(model)]))
    assert grads[0].dtype == torch.float32
    assert torch.linalg.vector_norm(grads[0] - grads[1]) < 0.05 * torch.linalg.vector_norm(grads[1])
