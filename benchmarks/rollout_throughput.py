"""Rollout throughput: sampling with the SVD adapter (merged weights) against the unwrapped base model.

Both models are SmolLM2-135M-Instruct on CPU and both sample through the trainer's own sampler,
`antipasto_pl.rollout.hf_generate` (on a model without adapters its `merged_weights` has nothing to merge).
The wrapped model gets nonzero random `delta_s` on every module, so merging does real work. Both sample
the same prompts from the same seed, `prompts x samples` rows (default 1 x 8, one GRPO group) of exactly
`--max-new-tokens` tokens: the models' `generation_config.min_new_tokens` is set to the maximum, so EOS
cannot end a row early and both produce the same token count (checked).

Timings are interleaved (base, adapter, then adapter, base, ...) after a warm-up, to cancel drift on a
shared machine; the median of `--repeats` is reported. The adapter's time includes folding the adapter
into the weights and restoring them (once per rollout, `adapter.merged_weights`); that merge+restore is
also timed on its own, so the table shows how much of the gap it is. `--hooks` adds a third variant:
sampling on the wrapped model without merging (the adapter's forward hooks run on every token).

    python benchmarks/rollout_throughput.py [--prompts 1] [--samples 8] [--max-new-tokens 64] [--repeats 5]
        [--warmup 1] [--r-max N] [--delta-scale 0.01] [--hooks]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _common import SMOLLM2, fmt_s, machine_line, median, parse_args, quiet_logs, table, verdict

from antipasto_pl import rollout
from antipasto_pl.adapter import AdapterConfig, adapter_modules, merged_weights, wrap_model
from antipasto_pl.env.problems import builtin_problems
from antipasto_pl.models import PolicyConfig, load_policy
from antipasto_pl.rollout import SamplingConfig, hf_generate

TARGET = 0.95


def load(r_max: int | None, delta_scale: float | None, seed: int, min_new_tokens: int):
    """The base model (``delta_scale`` None) or the wrapped one with random ``delta_s``."""
    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2))
    if delta_scale is not None:
        wrap_model(model, AdapterConfig(r_max=r_max))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for adapter in adapter_modules(model).values():
                adapter.delta_s.copy_(torch.randn(adapter.rank, generator=generator) * delta_scale)
    model.generation_config.min_new_tokens = min_new_tokens  # no early EOS: same token count for both
    return model, tokenizer


def sample(model, tokenizer, prompts, samples, config, seed) -> tuple[float, int, list[tuple[int, ...]]]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = hf_generate(model, tokenizer, prompts, samples, config)
    elapsed = time.perf_counter() - start
    ids = [c.token_ids for group in out for c in group]
    return elapsed, sum(len(i) for i in ids), ids


@contextlib.contextmanager
def hooks_only():
    """Sample on the wrapped model without merging: `hf_generate` finds a no-op in place of `merged_weights`."""
    original = rollout.merged_weights
    rollout.merged_weights = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        rollout.merged_weights = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts (builtin problems)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (rows = prompts x samples)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--r-max", type=int, default=None, help="adapter rank cap (default: full rank)")
    parser.add_argument("--delta-scale", type=float, default=0.01, help="std of the random delta_s")
    parser.add_argument("--hooks", action="store_true", help="also time sampling through the hooks (unmerged)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser)
    quiet_logs()

    print(f"rollout throughput, SmolLM2-135M-Instruct on CPU: {machine_line()}")
    base, tokenizer = load(None, None, args.seed, args.max_new_tokens)
    wrapped, _ = load(args.r_max, args.delta_scale, args.seed, args.max_new_tokens)
    n_modules = len(adapter_modules(wrapped))
    ranks = sorted({a.rank for a in adapter_modules(wrapped).values()})
    print(f"adapter: {n_modules} modules, ranks {ranks}, delta_s ~ N(0, {args.delta_scale:g}^2)")
    prompts = [p.prompt() for p in builtin_problems()[: args.prompts]]
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    rows = args.prompts * args.samples
    expected = rows * args.max_new_tokens
    print(f"{args.prompts} prompt(s) x {args.samples} samples = {rows} rows x {args.max_new_tokens} new tokens; "
          f"warm-up {args.warmup}, then {args.repeats} interleaved repeats")

    variants = {"base": base, "adapter": wrapped}
    if args.hooks:
        variants["hooks"] = wrapped
    times: dict[str, list[float]] = {name: [] for name in variants}
    merge_times: list[float] = []
    tokens: dict[str, int] = {}
    first_ids: dict[str, list] = {}
    for i in range(args.warmup + args.repeats):
        names = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in names:
            with hooks_only() if name == "hooks" else contextlib.nullcontext():
                elapsed, n_tokens, ids = sample(variants[name], tokenizer, prompts, args.samples, config, args.seed)
            if n_tokens != expected:
                raise SystemExit(f"{name}: sampled {n_tokens} tokens, expected {expected}; min_new_tokens not honoured")
            tokens[name] = n_tokens
            first_ids.setdefault(name, ids)
            if i >= args.warmup:
                times[name].append(elapsed)
        start = time.perf_counter()
        with merged_weights(wrapped):
            pass
        if i >= args.warmup:
            merge_times.append(time.perf_counter() - start)

    base_s, adapter_s, merge_s = median(times["base"]), median(times["adapter"]), median(merge_times)
    base_rate = expected / base_s
    rows_out = [
        ["base model", fmt_s(times["base"]), expected, f"{base_rate:.1f}", "1.000"],
        ["adapter, merged (incl. merge)", fmt_s(times["adapter"]), expected, f"{expected / adapter_s:.1f}",
         f"{base_s / adapter_s:.3f}"],
        ["  of which merge + restore", fmt_s(merge_times), "", "", f"{merge_s / adapter_s:.1%} of adapter time"],
        ["adapter, merged (excl. merge)", f"{adapter_s - merge_s:.3f} s (derived)", expected,
         f"{expected / max(adapter_s - merge_s, 1e-9):.1f}", f"{base_s / max(adapter_s - merge_s, 1e-9):.3f}"],
    ]
    if args.hooks:
        hooks_s = median(times["hooks"])
        rows_out.append(["adapter, hooks (unmerged)", fmt_s(times["hooks"]), expected, f"{expected / hooks_s:.1f}",
                         f"{base_s / hooks_s:.3f}"])
    print()
    print(table(rows_out, ["variant", "median time", "tokens", "tokens/s", "ratio vs base"]))
    ratio = base_s / adapter_s
    print(f"\nthroughput ratio adapter/base = {ratio:.3f} ({verdict(ratio, TARGET, True)}); "
          f"merge+restore {merge_s:.3f} s per rollout")
    if args.delta_scale == 0:
        print(f"zero delta_s: same tokens as the base model: {first_ids['adapter'] == first_ids['base']}")


if __name__ == "__main__":
    main()
