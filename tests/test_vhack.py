"""Extracting the hack subspace V on real tiny transformers models (docs/design.md section 3)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_policy

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.cli import EXTRA_COMMANDS, main
from antipasto_pl.env.pairs import Pair, nonhack_pairs
from antipasto_pl.env.problems import load_problems
from antipasto_pl.sequences import completion_log_probs, encode_completions
from antipasto_pl.vhack import (
    ExtractionSettings,
    HackSubspace,
    adapter_digest,
    extract_hack_subspace,
    load_or_extract,
    pair_gradients,
)
from antipasto_pl.vhack_math import basis_overlap, random_basis

MARKER = " # all tests passed!!"


def mean_nll(model, batch) -> torch.Tensor:
    """The mean NLL per completion token of a one-row batch, from full-sequence logits (the plain reference)."""
    mask = batch.completion_mask[:, 1:].to(torch.float32)
    return -(completion_log_probs(model, batch) * mask).sum() / mask.sum()
WORDS = "sort the list return sum of values count pairs find max min index string tree node graph path".split()


def marker_pairs(n: int, seed: int) -> list[Pair]:
    """Synthetic pairs whose hack is its clean completion plus a fixed marker (a stand-in for stdout_marker)."""
    rng = random.Random(seed)

    def words(count: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(count))

    pairs = []
    for j in range(n):
        clean = words(rng.randint(3, 8))
        pairs.append(Pair(f"p{seed}-{j}", "stdout_marker", f"Task: {words(5)}", clean + MARKER, clean))
    return pairs


def assert_orthonormal_rows(v: torch.Tensor) -> None:
    torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run one short sequence at a time: thread hand-offs cost more than they save (and stall
    badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return marker_pairs(12, seed=0)


@pytest.fixture(scope="module")
def real(policy, pairs) -> HackSubspace:
    model, tokenizer = policy
    return extract_hack_subspace(model, tokenizer, pairs, ExtractionSettings(k=3, length_norm="sum"), progress=False)


def test_pair_gradients_are_isolated_and_leave_the_model_as_it_was(policy):
    """Each row equals the gradient of that completion alone, computed with a plain backward in a fresh model
    (same seed, so the same weights); `sum` is `mean` times the completion's token count; and the model's
    grads, requires_grad flags and train/eval modes are exactly as before."""
    model, tokenizer = policy
    adapters = list(adapter_modules(model).values())
    prompts = ["Task: add two numbers", "Task: reverse a string", "Task: x"]
    side_a = ["return a + b", "return s[::-1]  # slicing", "ok"]
    side_b = ["return a - b + 2 * b", "return ''.join(reversed(s))", "fine, done"]
    # a state to restore: training mode with one submodule in eval, a grad in progress, mixed requires_grad
    model.train()
    model.model.layers[0].eval()
    pending = torch.full_like(adapters[0].delta_s, 0.5)
    adapters[0].delta_s.grad = pending.clone()
    adapters[1].delta_s.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        g_a, g_b = pair_gradients(model, tokenizer, prompts, side_a, side_b)
        g_a_sum, _ = pair_gradients(model, tokenizer, prompts, side_a, side_b, length_norm="sum")
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert torch.equal(adapters[0].delta_s.grad, pending)
        assert all(a.delta_s.grad is None for a in adapters[1:]) and all(a.delta_s_hack.grad is None for a in adapters)
    finally:
        adapters[0].delta_s.grad = None
        adapters[1].delta_s.requires_grad_(True)
        model.eval()

    fresh, _ = tiny_policy()
    fresh_adapters = adapter_modules(fresh)
    for grads, completions in ((g_a, side_a), (g_b, side_b)):
        for j, (prompt, completion) in enumerate(zip(prompts, completions)):
            fresh.zero_grad(set_to_none=True)
            mean_nll(fresh, encode_completions(tokenizer, [prompt], [completion])).backward()
            for name, adapter in fresh_adapters.items():
                assert grads[name].shape == (len(prompts), adapter.rank)
                torch.testing.assert_close(grads[name][j], adapter.delta_s.grad, atol=1e-6, rtol=1e-5)
    n_tokens = torch.tensor([len(tokenizer(c)["input_ids"]) + 1.0 for c in side_a])[:, None]  # + EOS
    for name in g_a:
        torch.testing.assert_close(g_a_sum[name], g_a[name] * n_tokens, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,merged_forward", [("tiny-llama", True), ("tiny-llama", False), ("tiny-qwen3_5", True)])
def test_batched_pair_gradients_equal_per_completion_gradients(name: str, merged_forward: bool) -> None:
    """Rows of different lengths in batches of 3 (one backward each) give each completion's own gradient, as a
    plain backward of that completion alone does (within 1e-5 of the norm of its gradient on all modules;
    per module, a near-zero gradient is mostly rounding), on the merged-weight Function and on
    the additive path, for attention and GatedDeltaNet layers, with both vectors non-zero."""
    model, tokenizer = tiny_policy(name, merged_forward=merged_forward)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.copy_(torch.randn(adapter.rank, generator=generator) * 0.3)
            adapter.delta_s_hack.copy_(torch.randn(adapter.rank, generator=generator) * 0.3)
    prompts = ["Task: add two numbers", "Task: reverse a string", "Task: x", "Task: sort it please"]
    side_a = ["return a + b", "return s[::-1]  # slicing", "ok", "return sorted(xs)"]
    side_b = ["return a - b + 2 * b", "return ''.join(reversed(s))", "fine, done", "xs.sort()\nreturn xs"]
    g_a, g_b = pair_gradients(model, tokenizer, prompts, side_a, side_b, length_norm="sum", batch_size=3)
    for grads, completions in ((g_a, side_a), (g_b, side_b)):
        for j, (prompt, completion) in enumerate(zip(prompts, completions)):
            model.zero_grad(set_to_none=True)
            mean_nll(model, encode_completions(tokenizer, [prompt], [completion])).backward()
            n_tokens = len(tokenizer(completion)["input_ids"]) + 1  # + EOS; sum = mean x tokens
            expected = torch.cat([a.delta_s.grad * n_tokens for a in adapter_modules(model).values()])
            got = torch.cat([grads[module][j] for module in adapter_modules(model)])
            assert torch.linalg.vector_norm(got - expected) <= 1e-5 * torch.linalg.vector_norm(expected)


def test_planted_marker_direction_is_recovered_and_points_hackward(policy, pairs, real):
    """The hack behaviour is planted in the data: every hack is its own clean completion plus a fixed marker,
    so with `sum` length normalisation the shared text cancels exactly in D = g_hack - g_clean, and what the
    pairs share is "emit the marker" (plus its EOS shift); what varies per pair is how the context bends
    that gradient. Ground truth, computed independently of pair_gradients and the SVD: per module, the
    gradient u of the marker tokens' NLL over all hack completions in one padded batch (plain autograd, no
    clean completions). V's top row must be that axis (|cos| > 0.9) and oriented hack-ward (v . u > 0: descent
    along u writes the marker).

    Then a behavioural check on held-out prompts and cleans: a step along -V (the descent direction of the
    hack-ward axes) raises log p(hack) - log p(clean) far more than random unit directions of the same size.
    And `mean` normalisation, whose 1/L_hack != 1/L_clean weights stop the shared text from cancelling, gives
    a visibly less aligned V: why the length normalisation is a setting that must match the live loss.
    """
    model, tokenizer = policy
    adapters = adapter_modules(model)
    batch = encode_completions(tokenizer, [p.prompt for p in pairs], [p.hack for p in pairs])
    n_marker = len(tokenizer(MARKER, add_special_tokens=False)["input_ids"])
    marker_mask = torch.zeros_like(batch.completion_mask)
    for i, length in enumerate(batch.attention_mask.sum(-1).tolist()):
        marker_mask[i, length - 1 - n_marker : length - 1] = 1  # the marker tokens, before the EOS
    for a in adapters.values():
        a.delta_s.requires_grad_(True)
    marker_nll = -(completion_log_probs(model, batch) * marker_mask[:, 1:]).sum()
    truth = dict(zip(adapters, torch.autograd.grad(marker_nll, [a.delta_s for a in adapters.values()])))

    def alignment(subspace: HackSubspace) -> dict[str, float]:
        return {name: (subspace.v_hack[name][0] @ u / u.norm()).item() for name, u in truth.items()}

    cosines = alignment(real)
    assert min(cosines.values()) > 0.9, cosines
    mean_cosines = alignment(extract_hack_subspace(model, tokenizer, pairs, ExtractionSettings(k=3, length_norm="mean"), progress=False))
    assert sum(mean_cosines.values()) / len(truth) < sum(cosines.values()) / len(truth) - 0.15, mean_cosines

    held_out = marker_pairs(8, seed=1)
    hack_batch = encode_completions(tokenizer, [p.prompt for p in held_out], [p.hack for p in held_out])
    clean_batch = encode_completions(tokenizer, [p.prompt for p in held_out], [p.clean for p in held_out])

    def preference_after(step: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for name, a in adapters.items():
                a.delta_s.copy_(step[name])
            logp_hack = (completion_log_probs(model, hack_batch) * hack_batch.completion_mask[:, 1:]).sum(-1)
            logp_clean = (completion_log_probs(model, clean_batch) * clean_batch.completion_mask[:, 1:]).sum(-1)
            for a in adapters.values():
                a.delta_s.zero_()
        return (logp_hack - logp_clean).mean().item()

    eps = 0.05
    base = preference_after({name: torch.zeros(a.rank) for name, a in adapters.items()})
    hackward = preference_after({name: -eps * real.v_hack[name][0] for name in adapters}) - base
    generator = torch.Generator().manual_seed(0)
    randoms = [
        preference_after({name: -eps * random_basis(1, a.rank, generator)[0] for name, a in adapters.items()}) - base
        for _ in range(3)
    ]
    assert hackward > 0.1 and hackward > 4 * max(abs(r) for r in randoms), (hackward, randoms)


def test_flipping_hack_and_clean_flips_every_row(policy, pairs, real):
    model, tokenizer = policy
    flipped_pairs = [dataclasses.replace(p, hack=p.clean, clean=p.hack) for p in pairs]
    flipped = extract_hack_subspace(model, tokenizer, flipped_pairs, ExtractionSettings(k=3, length_norm="sum"), progress=False)
    assert flipped.modules == real.modules
    for name in real.modules:
        torch.testing.assert_close(flipped.v_hack[name], -real.v_hack[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(flipped.singular_values[name], real.singular_values[name])


def test_extraction_sees_the_deployed_policy(policy, pairs):
    """A routed model's quarantine is ablated during extraction (and left in force afterwards)."""
    model, tokenizer = policy
    adapters = adapter_modules(model)
    clean_model = extract_hack_subspace(model, tokenizer, pairs[:4], ExtractionSettings(k=2), progress=False)
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for a in adapters.values():
                a.delta_s_hack.copy_(torch.randn(a.rank, generator=generator))
        routed = extract_hack_subspace(model, tokenizer, pairs[:4], ExtractionSettings(k=2), progress=False)
        assert all(a.mode == "full" for a in adapters.values())
    finally:
        with torch.no_grad():
            for a in adapters.values():
                a.delta_s_hack.zero_()
    for name in clean_model.modules:
        torch.testing.assert_close(routed.v_hack[name], clean_model.v_hack[name])


def test_random_control_is_orthonormal_seeded_and_unrelated_to_real(policy, real):
    model, tokenizer = policy
    first = extract_hack_subspace(model, tokenizer, [], ExtractionSettings(k=3, kind="random", seed=1))
    again = extract_hack_subspace(model, tokenizer, [], ExtractionSettings(k=3, kind="random", seed=1))
    other = extract_hack_subspace(model, tokenizer, [], ExtractionSettings(k=3, kind="random", seed=2))
    assert first.metadata["kind"] == "random" and first.modules == list(adapter_modules(model))
    same_rank = [name for name, a in adapter_modules(model).items() if a.rank == 64]
    assert not torch.equal(first.v_hack[same_rank[0]], first.v_hack[same_rank[1]])  # seeded per module
    for name in first.modules:
        assert first.v_hack[name].shape == (3, adapter_modules(model)[name].rank)
        assert_orthonormal_rows(first.v_hack[name])
        assert torch.equal(first.v_hack[name], again.v_hack[name])
        assert not torch.equal(first.v_hack[name], other.v_hack[name])
        assert basis_overlap(first.v_hack[name], real.v_hack[name]) < 0.7  # chance level is sqrt(3/r) <= 0.31


def test_shuffled_control_keeps_the_span_but_not_the_orientation(policy, pairs, real):
    """Swapping a pair's labels flips the sign of its D row, which leaves D^T D unchanged: the shuffled V
    spans what the real V spans, with the same singular values; only the hack-ward vote changes."""
    model, tokenizer = policy
    shuffled = extract_hack_subspace(model, tokenizer, pairs, ExtractionSettings(k=3, kind="shuffled", length_norm="sum", seed=3), progress=False)
    signs = []
    for name in real.modules:
        assert basis_overlap(shuffled.v_hack[name], real.v_hack[name]) > 0.999
        torch.testing.assert_close(shuffled.singular_values[name], real.singular_values[name])
        signs.extend(torch.sign((shuffled.v_hack[name] * real.v_hack[name]).sum(-1)).tolist())
    assert -1.0 in signs and 1.0 in signs, signs


def test_nonhack_control_runs_on_clean_vs_clean_pairs(policy):
    model, tokenizer = policy
    problems = load_problems("builtin")[:2]
    controls = nonhack_pairs(problems, seed=0, modes=["run_tests", "sentinel"], variants_per_mode=1)
    subspace = extract_hack_subspace(model, tokenizer, controls, ExtractionSettings(k=2, kind="nonhack"), progress=False)
    assert subspace.metadata["kind"] == "nonhack" and subspace.metadata["modes"] == "run_tests,sentinel"
    assert subspace.metadata["n_pairs"] == len(controls) == 4
    assert subspace.modules
    for v in subspace.v_hack.values():
        assert_orthonormal_rows(v)


def test_noise_floor_drops_rows_then_whole_modules(real):
    pooled = torch.cat(list(real.singular_values.values()))
    floored = real.after_noise_floor(0.5)
    threshold = torch.quantile(pooled.double(), 0.5).item()
    assert 0 < sum(v.shape[0] for v in floored.v_hack.values()) < pooled.numel()
    for name in floored.modules:
        assert (floored.singular_values[name] >= threshold).all()
        kept = floored.v_hack[name].shape[0]
        torch.testing.assert_close(floored.v_hack[name], real.v_hack[name][:kept])  # rows are sorted by strength
    emptied = real.after_noise_floor(0.9)
    assert 0 < len(emptied.modules) < len(real.modules)
    assert emptied.metadata["drop_bottom_frac"] == 0.9 and set(emptied.weight_hashes) == set(emptied.modules)


def test_cache_hits_misses_and_refuses_another_base_model(policy, pairs, tmp_path, caplog):
    model, tokenizer = policy
    caplog.set_level(logging.INFO, logger="antipasto_pl.vhack")
    pairs = pairs[:4]
    first = load_or_extract(model, tokenizer, pairs, ExtractionSettings(k=2), tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    stamp = path.stat().st_mtime_ns
    caplog.clear()
    second = load_or_extract(model, tokenizer, pairs, ExtractionSettings(k=2, seed=7), tmp_path, progress=False)  # real ignores seed
    assert "reusing hack subspace" in caplog.text and path.stat().st_mtime_ns == stamp
    assert second.metadata == first.metadata and second.metadata["adapter_digest"] == "zero"
    for name in first.modules:
        assert torch.equal(second.v_hack[name], first.v_hack[name])
        assert torch.equal(second.singular_values[name], first.singular_values[name])

    path.write_bytes(b"not a safetensors file")  # an unusable entry is re-extracted, not trusted
    caplog.clear()
    repaired = load_or_extract(model, tokenizer, pairs, ExtractionSettings(k=2), tmp_path, progress=False)
    assert "unusable" in caplog.text and HackSubspace.load(path, model).modules == first.modules
    torch.testing.assert_close(repaired.v_hack, first.v_hack)

    load_or_extract(model, tokenizer, pairs, ExtractionSettings(k=3), tmp_path, progress=False)
    load_or_extract(model, tokenizer, pairs[:-1], ExtractionSettings(k=2), tmp_path, progress=False)
    adapter = next(iter(adapter_modules(model).values()))
    try:
        with torch.no_grad():
            adapter.delta_s[0] = 0.1  # a refresh mid-run differentiates at the current delta_s
        assert adapter_digest(model) != "zero"
        load_or_extract(model, tokenizer, pairs, ExtractionSettings(k=2), tmp_path, progress=False)
    finally:
        with torch.no_grad():
            adapter.delta_s.zero_()
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not list(tmp_path.glob("*.tmp"))

    other_model, _ = tiny_policy(seed=1)
    with pytest.raises(ValueError, match=f"module '{first.modules[0]}' was extracted on a base weight with hash"):
        HackSubspace.load(path, other_model)
    capped_model, _ = tiny_policy(r_max=8)
    with pytest.raises(ValueError, match=f"module '{first.modules[0]}' has rank 64 in the hack basis, .* rank 8"):
        HackSubspace.load(path, capped_model)
    floored_path = tmp_path / "floored" / "v.safetensors"
    first.after_noise_floor(0.9).save(floored_path)
    assert HackSubspace.load(floored_path, model).modules == first.after_noise_floor(0.9).modules  # a subset loads


def test_extract_vhack_subcommand_writes_a_loadable_file(tmp_path, capsys):
    assert EXTRA_COMMANDS["extract-vhack"] == "antipasto_pl.commands.extract_vhack:extract_vhack_command"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "default_root_dir": str(tmp_path / "run")},
        "model": {"policy": {"name": "tiny-llama"}, "sampling": {"max_new_tokens": 32}, "max_completion_tokens": 640},
        "data": {"problems": "builtin", "known_modes": ["run_tests"], "pair_problems": 1, "variants_per_mode": 2,
                 "prompts_per_step": 1, "use_pool": False},
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "v.safetensors"
    main(["extract-vhack", "--config", str(config_path), "--out", str(out), "--k", "2"])
    printed = capsys.readouterr().out
    model, _ = tiny_policy()
    subspace = HackSubspace.load(out, model)
    assert subspace.metadata["kind"] == "real" and subspace.metadata["n_pairs"] == 2
    assert subspace.metadata["modes"] == "run_tests" and subspace.metadata["k"] == 2
    assert subspace.metadata["length_norm"] == "sum"  # matches the default dr_grpo loss reduction
    assert str(out) in printed and "top_sv" in printed
    assert all(name in printed for name in subspace.modules)

    # without --out the file goes to the extraction cache (here the test's temp ANTIPASTO_CACHE)
    main(["extract-vhack", "-c", str(config_path), "--kind", "nonhack", "--k", "2"])
    cached = Path(capsys.readouterr().out.strip().splitlines()[-1].rsplit(": ", 1)[-1])
    assert cached.parent == Path(os.environ["ANTIPASTO_CACHE"]) / "vhack"
    assert HackSubspace.load(cached, model).metadata["kind"] == "nonhack"

    with pytest.raises(SystemExit) as exit_info:
        main(["extract-vhack", "--help"])
    assert exit_info.value.code == 0
    assert "--tau_axis" in capsys.readouterr().out
