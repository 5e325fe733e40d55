"""Sampler backends: the fast decode loop against the ``hf_generate`` reference, its log-probs against the
trainer's own scoring, determinism, stop strings, and the fallback for caches that are not keys and values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import tiny_policy
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from antipasto_pl.adapter import adapter_modules, merged_state_dict
from antipasto_pl.cli import AntipastoCLI
from antipasto_pl.grpo import warp_logits
from antipasto_pl.rollout import HFGenerate, KVCacheSampler, PackedLinear, SamplingConfig, hf_generate
from antipasto_pl.sequences import group_batch, group_log_probs, scored_group

# Contexts of different lengths, so the fast backend's cache is left-padded and masked.
CONTEXTS = ["def add(a, b):\n", "Write a function that reverses a list.\n```python\n", "x = "]
KV_MODELS = ["tiny-llama", "tiny-qwen3"]
SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def moved_policy(name: str):
    """A wrapped tiny model whose adapter is not zero, so sampling runs on merged weights that differ from W."""
    model, tokenizer = tiny_policy(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.copy_(torch.randn(adapter.rank, generator=generator) * 0.5)
    return model, tokenizer


def ids(groups) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in group] for group in groups]


def assert_same_greedy(fast, reference) -> None:
    assert ids(fast) == ids(reference)
    for ref_group, fast_group in zip(reference, fast):
        for ref, got in zip(ref_group, fast_group):
            assert got.text == ref.text
            torch.testing.assert_close(torch.tensor(got.log_probs), torch.tensor(ref.log_probs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("name", KV_MODELS)
def test_greedy_decoding_gives_the_tokens_and_log_probs_of_hf_generate(name: str, prepack: bool) -> None:
    model, tokenizer = moved_policy(name)
    config = SamplingConfig(max_new_tokens=20, temperature=0)
    assert_same_greedy(KVCacheSampler(prepack=prepack)(model, tokenizer, CONTEXTS, 2, config),
                       hf_generate(model, tokenizer, CONTEXTS, 2, config))


def test_the_prepacked_exact_copy_follows_an_optimizer_step() -> None:
    """The exact sampler's prepacked float32 copy (on a CPU) is refreshed when the vectors change in place, as
    an optimizer step changes them: greedy decoding stays hf_generate's on the policy itself."""
    model, tokenizer = moved_policy("tiny-llama")
    sampler, config = KVCacheSampler(), SamplingConfig(max_new_tokens=12, temperature=0)
    assert_same_greedy(sampler(model, tokenizer, CONTEXTS, 1, config), hf_generate(model, tokenizer, CONTEXTS, 1, config))
    copy = sampler._copy.model
    assert {p.dtype for p in copy.parameters()} == {torch.float32}
    assert isinstance(copy.get_submodule(next(iter(adapter_modules(model)))), PackedLinear)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.mul_(-3.0)
    assert_same_greedy(sampler(model, tokenizer, CONTEXTS, 1, config), hf_generate(model, tokenizer, CONTEXTS, 1, config))
    assert sampler._copy.model is copy


@pytest.mark.parametrize("name", KV_MODELS)
def test_sampled_log_probs_match_the_trainers_scoring(name: str) -> None:
    """At temperature 1 and top_p 1 the sampled distribution is the policy: the log-probs the sampler reports
    for its tokens are those the loss computes (``group_log_probs``, the trainer's scoring path)."""
    model, tokenizer = moved_policy(name)
    torch.manual_seed(0)
    groups = KVCacheSampler()(model, tokenizer, CONTEXTS, 3, SamplingConfig(max_new_tokens=16))
    for context, group in zip(CONTEXTS, groups):
        batch = group_batch(tokenizer(context, add_special_tokens=False)["input_ids"],
                            [c.token_ids for c in group], tokenizer.pad_token_id)
        with torch.no_grad():
            scored = group_log_probs(model, batch)
        for row, completion in enumerate(group):
            assert len(completion.log_probs) == len(completion.token_ids) > 0
            torch.testing.assert_close(torch.tensor(completion.log_probs), scored[row, : len(completion.token_ids)],
                                       atol=1e-4, rtol=0)


def scored(model, tokenizer, context: str, group, warp):
    """The trainer's scoring of a group's completions: (log-probs, log-probs under the warped distribution)."""
    batch = group_batch(tokenizer(context, add_special_tokens=False)["input_ids"], [c.token_ids for c in group],
                        tokenizer.pad_token_id)
    with torch.no_grad():
        return scored_group(model, batch, warp=warp)


def test_warped_log_probs_match_the_trainers_scoring_of_the_sampled_distribution() -> None:
    """At temperature 0.8 and top_p 0.9 the exact backend reports log-probs under the warped distribution; the
    trainer's ``scored_group`` recomputes the same numbers from its own logits (the numerator of the importance
    weights)."""
    model, tokenizer = moved_policy("tiny-llama")
    torch.manual_seed(0)
    groups = KVCacheSampler()(model, tokenizer, CONTEXTS, 3, SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.9))
    for context, group in zip(CONTEXTS, groups):
        _, warped = scored(model, tokenizer, context, group, (0.8, 0.9))
        for row, completion in enumerate(group):
            torch.testing.assert_close(torch.tensor(completion.log_probs), warped[row, : len(completion.token_ids)],
                                       atol=1e-4, rtol=0)


def test_bfloat16_weights_sample_from_a_refreshed_bfloat16_copy() -> None:
    """``weights: bfloat16`` on a float32 policy: not exact (the trainer must weight its tokens), the log-probs it
    reports are its bfloat16 copy's (within bfloat16 kernels' noise) and measurably not the policy's, and the copy
    follows the vectors when an optimizer step moves them."""
    model, tokenizer = moved_policy("tiny-llama")
    sampler = KVCacheSampler(weights="bfloat16")
    assert not sampler.samples_exactly(model) and KVCacheSampler().samples_exactly(model)
    config = SamplingConfig(max_new_tokens=16, temperature=0.8)
    torch.manual_seed(0)
    groups = sampler(model, tokenizer, CONTEXTS, 3, config)
    copy = sampler._copy.model
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    gaps = []
    for context, group in zip(CONTEXTS, groups):
        _, own = scored(copy, tokenizer, context, group, (0.8, 1.0))
        _, policy = scored(model, tokenizer, context, group, (0.8, 1.0))
        for row, completion in enumerate(group):
            reported = torch.tensor(completion.log_probs)
            torch.testing.assert_close(reported, own[row, : len(reported)], atol=2e-2, rtol=0)
            gaps.append((reported - policy[row, : len(reported)]).abs().max().item())
    assert max(gaps) > 1e-4
    name = next(iter(adapter_modules(model)))
    with torch.no_grad():
        adapter_modules(model)[name].delta_s.add_(0.5)
    sampler(model, tokenizer, CONTEXTS[:1], 1, config)
    merged = merged_state_dict(model)[f"{name}.weight"].to(torch.bfloat16)
    assert torch.equal(copy.get_parameter(f"{name}.weight"), merged)
    # On a CPU the copy multiplies with prepacked weights: the repacked product is the new weight's.
    linear = copy.get_submodule(name)
    assert isinstance(linear, PackedLinear)
    x = torch.randn(3, linear.in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, merged, linear.bias), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_multiplies_as_its_linear_and_follows_a_repack(dtype: torch.dtype) -> None:
    """``PackedLinear`` keeps the Linear's parameters (a tied weight stays tied) and its products, for any batch
    shape; after a change of the weight, ``pack`` makes the products the new weight's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, dtype=dtype)
    packed = PackedLinear.replacing(linear)
    assert packed.weight is linear.weight and list(packed.state_dict()) == ["weight", "bias"]
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for shape in [(48,), (3, 48), (2, 5, 48)]:
        x = torch.randn(shape, dtype=dtype)
        torch.testing.assert_close(packed(x), linear(x), **tolerance)
    with torch.no_grad():
        linear.weight.mul_(-2.0)
    x = torch.randn(4, 48, dtype=dtype)
    assert not torch.allclose(packed(x), linear(x), **tolerance)  # stale until repacked
    packed.pack()
    torch.testing.assert_close(packed(x), linear(x), **tolerance)


def test_a_bad_weights_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="KVCacheSampler weights must be 'policy' or 'bfloat16', got 'int4'"):
        KVCacheSampler(weights="int4")


def test_warped_logits_are_hfs_temperature_then_top_p() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)):
        expected = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(warp_logits(logits, temperature, top_p), expected)


@pytest.mark.parametrize("sampler", [KVCacheSampler(), KVCacheSampler(prepack=False),
                                     KVCacheSampler(weights="bfloat16"), HFGenerate()],
                         ids=["kv_cache", "kv_cache_unpacked", "kv_cache_bf16", "hf_generate"])
def test_the_same_seed_gives_the_same_samples(sampler) -> None:
    model, tokenizer = moved_policy("tiny-llama")
    config = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95)

    def draw(seed: int):
        torch.manual_seed(seed)
        return sampler(model, tokenizer, CONTEXTS, 2, config)

    first = draw(0)
    assert draw(0) == first
    assert ids(draw(1)) != ids(first)


@pytest.mark.parametrize("name", KV_MODELS)
def test_stop_strings_end_rows_where_the_text_completes_them(name: str) -> None:
    """A stop spanning two tokens (the text of two consecutive tokens of one row's greedy completion, neither
    holding it alone): that row ends right after it, keeps it, and the other rows are unchanged, in both
    backends (the fast one drops the stopped row from its batch mid-rollout)."""
    model, tokenizer = moved_policy(name)
    config = SamplingConfig(max_new_tokens=24, temperature=0)
    free = hf_generate(model, tokenizer, CONTEXTS, 1, config)
    row = free[1][0].token_ids
    stop = next(text for k in range(6, len(row) - 2) if "\ufffd" not in (text := tokenizer.decode(row[k:k + 2]))
                and all(text not in tokenizer.decode(row[j:j + 1]) for j in (k, k + 1)))
    stopped = SamplingConfig(max_new_tokens=24, temperature=0, stop=[stop])
    for sampler in (hf_generate, KVCacheSampler()):
        groups = sampler(model, tokenizer, CONTEXTS, 1, stopped)
        for free_group, group in zip(free, groups):
            completion, full = group[0], free_group[0]
            end = full.text.find(stop)
            expected = full.text if end < 0 else full.text[: end + len(stop)]
            assert completion.text == expected
            assert completion.token_ids == full.token_ids[: len(completion.token_ids)]
            assert len(completion.log_probs) == len(completion.token_ids)
        assert groups[1][0].text.endswith(stop)


def test_ignore_eos_gives_full_length_rows() -> None:
    model, tokenizer = moved_policy("tiny-llama")
    config = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    for sampler in (hf_generate, KVCacheSampler()):
        torch.manual_seed(0)
        rows = [c for group in sampler(model, tokenizer, CONTEXTS, 4, config) for c in group]
        assert all(len(c.token_ids) == 12 and tokenizer.eos_token_id not in c.token_ids for c in rows)


def test_linear_attention_falls_back_to_hf_generate(caplog: pytest.LogCaptureFixture) -> None:
    """Qwen3.5's GatedDeltaNet state is no key/value cache: the fast backend says so once and samples what
    hf_generate samples."""
    model, tokenizer = moved_policy("tiny-qwen3_5")
    config = SamplingConfig(max_new_tokens=10)
    sampler = KVCacheSampler()
    with caplog.at_level(logging.INFO, logger="antipasto_pl.rollout"):
        torch.manual_seed(0)
        got = sampler(model, tokenizer, CONTEXTS, 2, config)
        sampler(model, tokenizer, CONTEXTS, 1, config)
    assert [r.getMessage() for r in caplog.records if "hf_generate instead" in r.getMessage()] == [
        "KVCacheSampler: qwen3_5_text caches more than plain keys and values (e.g. a linear-attention state); "
        "sampling it with hf_generate instead"
    ]
    torch.manual_seed(0)
    assert got == hf_generate(model, tokenizer, CONTEXTS, 2, config)


@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
def test_the_sampler_is_chosen_in_the_config() -> None:
    default = AntipastoCLI(args=["--config", SMOKE], run=False)
    assert isinstance(default.model.sampler, KVCacheSampler)
    chosen = AntipastoCLI(args=["--config", SMOKE, "--model.sampler", "antipasto_pl.rollout.HFGenerate"], run=False)
    assert isinstance(chosen.model.sampler, HFGenerate)
