"""Rollout throughput: sampling with the SVD adapter (merged weights) against the unwrapped base model.

Both models are SmolLM2-135M-Instruct on CPU and both sample through the trainer's own sampler,
`antipasto_pl.rollout.hf_generate`. Both sample the same prompts from the same seed, `prompts x samples`
rows (default 1 x 8, one GRPO group) of exactly `--max-new-tokens` tokens: the models'
`generation_config.min_new_tokens` is set to the maximum, so EOS cannot end a row early and both produce
the same token count (checked).

The wrapped model is used as the trainer uses it (float32: `merged_forward`): before every adapter round
its `delta_s` get new random values (N(0, delta_scale^2) on every module, as if an optimizer step had
moved them) and `adapter.refresh_merged` folds them into the merged weights, as the trainer does right
after each `optimizer.step()` (so that merge is part of the step's `time/optimizer`, and also serves the
scoring forward). The merge is timed on its own; the table gives the sampling ratio and, for reference,
the ratio with that merge charged to the rollout. `--additive` adds sampling on the wrapped model without
merged weights (`W x + U diag(delta) Vh x` in every layer for every token).

Timings are interleaved (base, adapter, then adapter, base, ...) after a warm-up, to cancel drift on a
shared machine; the median of `--repeats` is reported.

    python benchmarks/rollout_throughput.py [--prompts 1] [--samples 8] [--max-new-tokens 64] [--repeats 5]
        [--warmup 1] [--r-max N] [--delta-scale 0.01] [--additive]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from _common import SMOLLM2, fmt_s, machine_line, median, parse_args, quiet_logs, table, verdict

from antipasto_pl import rollout
from antipasto_pl.adapter import AdapterConfig, adapter_modules, refresh_merged, wrap_model
from antipasto_pl.env.problems import builtin_problems
from antipasto_pl.models import PolicyConfig, load_policy
from antipasto_pl.sequences import chat_prompt
from antipasto_pl.rollout import SamplingConfig, hf_generate

TARGET = 0.95


def load(r_max: int | None, wrap: bool, min_new_tokens: int):
    """The base model, or the wrapped one (zero vectors)."""
    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2))
    if wrap:
        wrap_model(model, AdapterConfig(r_max=r_max))
    model.generation_config.min_new_tokens = min_new_tokens  # no early EOS: same token count for both
    return model, tokenizer


def new_deltas(model, scale: float, seed: int) -> None:
    """Random ``delta_s`` on every module, as after an optimizer step (in place: the merge cache sees it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.copy_(torch.randn(adapter.rank, generator=generator) * scale)


def sample(model, tokenizer, prompts, samples, config, seed) -> tuple[float, int, list[tuple[int, ...]]]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = hf_generate(model, tokenizer, prompts, samples, config)
    elapsed = time.perf_counter() - start
    ids = [c.token_ids for group in out for c in group]
    return elapsed, sum(len(i) for i in ids), ids


@contextlib.contextmanager
def additive_only(model):
    """Sample on the wrapped model without merged weights: no `merged_forward`, and `hf_generate` finds a no-op
    in place of `merged_weights`."""
    original = rollout.merged_weights
    adapters = list(adapter_modules(model).values())
    rollout.merged_weights = lambda model: contextlib.nullcontext()
    for adapter in adapters:
        adapter.merged_forward = False
    try:
        yield
    finally:
        rollout.merged_weights = original
        for adapter in adapters:
            adapter.merged_forward = True


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
    parser.add_argument("--additive", action="store_true",
                        help="also time sampling without merged weights (the adapter term added in every layer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser)
    quiet_logs()

    print(f"rollout throughput, SmolLM2-135M-Instruct on CPU: {machine_line()}")
    base, tokenizer = load(None, False, args.max_new_tokens)
    wrapped, _ = load(args.r_max, True, args.max_new_tokens)
    n_modules = len(adapter_modules(wrapped))
    ranks = sorted({a.rank for a in adapter_modules(wrapped).values()})
    print(f"adapter: {n_modules} modules, ranks {ranks}, delta_s ~ N(0, {args.delta_scale:g}^2)")
    prompts = [chat_prompt(tokenizer, p.prompt()) for p in builtin_problems()[: args.prompts]]
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    rows = args.prompts * args.samples
    expected = rows * args.max_new_tokens
    print(f"{args.prompts} prompt(s) x {args.samples} samples = {rows} rows x {args.max_new_tokens} new tokens; "
          f"warm-up {args.warmup}, then {args.repeats} interleaved repeats")

    variants = {"base": base, "adapter": wrapped}
    if args.additive:
        variants["additive"] = wrapped
    times: dict[str, list[float]] = {name: [] for name in variants}
    merge_times: list[float] = []
    tokens: dict[str, int] = {}
    first_ids: dict[str, list] = {}
    for i in range(args.warmup + args.repeats):
        names = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in names:
            if name == "adapter":  # what the trainer's optimizer step leaves: new vectors, merged
                new_deltas(wrapped, args.delta_scale, args.seed + i)
                start = time.perf_counter()
                refresh_merged(wrapped)
                if i >= args.warmup:
                    merge_times.append(time.perf_counter() - start)
            with additive_only(wrapped) if name == "additive" else contextlib.nullcontext():
                elapsed, n_tokens, ids = sample(variants[name], tokenizer, prompts, args.samples, config, args.seed)
            if n_tokens != expected:
                raise SystemExit(f"{name}: sampled {n_tokens} tokens, expected {expected}; min_new_tokens not honoured")
            tokens[name] = n_tokens
            first_ids.setdefault(name, ids)
            if i >= args.warmup:
                times[name].append(elapsed)

    base_s, adapter_s, merge_s = median(times["base"]), median(times["adapter"]), median(merge_times)
    rows_out = [
        ["base model", fmt_s(times["base"]), expected, f"{expected / base_s:.1f}", "1.000"],
        ["adapter, merged weights", fmt_s(times["adapter"]), expected, f"{expected / adapter_s:.1f}",
         f"{base_s / adapter_s:.3f}"],
        ["merge (once per optimizer step)", fmt_s(merge_times), "", "", f"{merge_s / adapter_s:.1%} of sampling"],
        ["adapter + that merge", f"{adapter_s + merge_s:.3f} s (derived)", expected,
         f"{expected / (adapter_s + merge_s):.1f}", f"{base_s / (adapter_s + merge_s):.3f}"],
    ]
    if args.additive:
        additive_s = median(times["additive"])
        rows_out.append(["adapter, additive (no merge)", fmt_s(times["additive"]), expected,
                         f"{expected / additive_s:.1f}", f"{base_s / additive_s:.3f}"])
    print()
    print(table(rows_out, ["variant", "median time", "tokens", "tokens/s", "ratio vs base"]))
    ratio = base_s / adapter_s
    print(f"\nthroughput ratio adapter/base = {ratio:.3f} ({verdict(ratio, TARGET, True)}); "
          f"merge {merge_s:.3f} s per optimizer step (ratio with it charged to the rollout: "
          f"{base_s / (adapter_s + merge_s):.3f})")
    if args.delta_scale == 0:
        print(f"zero delta_s: same tokens as the base model: {first_ids['adapter'] == first_ids['base']}")

if __name__ == "__main__":
    main()
