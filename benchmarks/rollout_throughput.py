"""Rollout throughput: the fast sampler (`rollout.KVCacheSampler`) against the reference `hf_generate`, and the
SVD adapter (merged weights) against the unwrapped base model.

SmolLM2-135M-Instruct on CPU. Every variant samples the same prompts from the same seed, for each shape
`prompts x samples` in `--shapes` (default 1x8: one GRPO group of 8; 2x2: the CPU preset's step, 2 prompts x 2
student samples), rows of exactly `--max-new-tokens` tokens: `SamplingConfig.ignore_eos` gives EOS probability 0,
so every variant produces the same token count (checked). Variants:

* `hf, base model`: `hf_generate` on the unwrapped model;
* `hf, adapter`: `hf_generate` on the wrapped model as the trainer uses it (float32: `merged_forward`);
* `fast, adapter`: `KVCacheSampler` on the same wrapped model, exact (`weights: policy`): on a CPU it samples a
  float32 copy of the merged weights prepacked for oneDNN (`rollout.PackedLinear`), refreshed inside the timed call
  after every change of the vectors;
* `fast bf16, adapter`: `KVCacheSampler(weights="bfloat16")` (opt-in): the same with a bfloat16 copy (an
  approximate sampler: the trainer corrects its samples with importance weights);
* `fast unpacked, adapter` (with `--unpacked`): `KVCacheSampler(prepack=False)`, exact on the policy itself.

Before every adapter round the wrapped model's `delta_s` get new random values (N(0, delta_scale^2) on every
module, as if an optimizer step had moved them) and `adapter.refresh_merged` folds them into the merged weights,
as the trainer does right after each `optimizer.step()`; that merge is timed on its own. `--additive` adds
`hf_generate` on the wrapped model without merged weights (`W x + U diag(delta) Vh x` in every layer).

Timings are interleaved (variants in order, then reversed, ...) after a warm-up, to cancel drift on a shared
machine; the median of `--repeats` is reported. Targets: fast / hf >= 2 (tokens/s, both on the adapter; met if
either fast variant meets it),
adapter / base >= 0.95 (hf_generate).

    python benchmarks/rollout_throughput.py [--shapes 1x8 2x2] [--max-new-tokens 64] [--repeats 5]
        [--warmup 1] [--r-max N] [--delta-scale 0.01] [--additive] [--unpacked]
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
from antipasto_pl.rollout import KVCacheSampler, SamplingConfig, hf_generate

ADAPTER_TARGET = 0.95  # adapter / base, hf_generate
FAST_TARGET = 2.0  # fast / hf, on the adapter


def load(r_max: int | None, wrap: bool):
    """The base model, or the wrapped one (zero vectors)."""
    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2))
    if wrap:
        wrap_model(model, AdapterConfig(r_max=r_max))
    return model, tokenizer


def new_deltas(model, scale: float, seed: int) -> None:
    """Random ``delta_s`` on every module, as after an optimizer step (in place: the merge cache sees it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.copy_(torch.randn(adapter.rank, generator=generator) * scale)


def sample(sampler, model, tokenizer, prompts, samples, config, seed) -> tuple[float, int, list[tuple[int, ...]]]:
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = sampler(model, tokenizer, prompts, samples, config)
    elapsed = time.perf_counter() - start
    ids = [c.token_ids for group in out for c in group]
    return elapsed, sum(len(i) for i in ids), ids


@contextlib.contextmanager
def additive_only(model):
    """Sample on the wrapped model without merged weights: no `merged_forward`, and the sampler finds a no-op
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
    parser.add_argument("--shapes", nargs="+", default=["1x8", "2x2"],
                        help="PROMPTSxSAMPLES per rollout (rows = prompts x samples)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--r-max", type=int, default=None, help="adapter rank cap (default: full rank)")
    parser.add_argument("--delta-scale", type=float, default=0.01, help="std of the random delta_s")
    parser.add_argument("--additive", action="store_true",
                        help="also time hf_generate without merged weights (the adapter term added in every layer)")
    parser.add_argument("--unpacked", action="store_true",
                        help="also time the exact fast sampler on the policy itself (no prepacked copy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser)
    quiet_logs()

    print(f"rollout throughput, SmolLM2-135M-Instruct on CPU: {machine_line()}")
    base, tokenizer = load(None, False)
    wrapped, _ = load(args.r_max, True)
    n_modules = len(adapter_modules(wrapped))
    ranks = sorted({a.rank for a in adapter_modules(wrapped).values()})
    print(f"adapter: {n_modules} modules, ranks {ranks}, delta_s ~ N(0, {args.delta_scale:g}^2)")
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, ignore_eos=True)
    variants = {"hf, base model": (hf_generate, base), "hf, adapter": (hf_generate, wrapped),
                "fast, adapter": (KVCacheSampler(), wrapped),
                "fast bf16, adapter": (KVCacheSampler(weights="bfloat16"), wrapped)}
    if args.unpacked:
        variants["fast unpacked, adapter"] = (KVCacheSampler(prepack=False), wrapped)
    if args.additive:
        variants["hf, adapter, additive"] = (hf_generate, wrapped)
    summary = []
    for shape in args.shapes:
        n_prompts, n_samples = (int(x) for x in shape.split("x"))
        prompts = [chat_prompt(tokenizer, p.prompt()) for p in builtin_problems()[:n_prompts]]
        rows = n_prompts * n_samples
        expected = rows * args.max_new_tokens
        print(f"\n== {n_prompts} prompt(s) x {n_samples} samples = {rows} rows x {args.max_new_tokens} new tokens "
              f"(prompts of {[len(tokenizer(p)['input_ids']) for p in prompts]} tokens); warm-up {args.warmup}, "
              f"then {args.repeats} interleaved repeats ==")
        times: dict[str, list[float]] = {name: [] for name in variants}
        merge_times: list[float] = []
        for i in range(args.warmup + args.repeats):
            names = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in names:
                sampler, model = variants[name]
                if model is wrapped:  # what the trainer's optimizer step leaves: new vectors, merged
                    new_deltas(wrapped, args.delta_scale, args.seed + i)
                    start = time.perf_counter()
                    refresh_merged(wrapped)
                    if i >= args.warmup and name == "hf, adapter":
                        merge_times.append(time.perf_counter() - start)
                with additive_only(wrapped) if name.endswith("additive") else contextlib.nullcontext():
                    elapsed, n_tokens, _ = sample(sampler, model, tokenizer, prompts, n_samples, config, args.seed)
                if n_tokens != expected:
                    raise SystemExit(f"{name}: sampled {n_tokens} tokens, expected {expected}; ignore_eos not honoured")
                if i >= args.warmup:
                    times[name].append(elapsed)
        seconds = {name: median(values) for name, values in times.items()}
        base_s, hf_s = seconds["hf, base model"], seconds["hf, adapter"]
        fast_s, bf16_s = seconds["fast, adapter"], seconds["fast bf16, adapter"]
        table_rows = [[name, fmt_s(times[name]), expected, f"{expected / seconds[name]:.1f}",
                       f"{hf_s / seconds[name]:.3f}", f"{base_s / seconds[name]:.3f}"] for name in variants]
        table_rows.append(["merge (once per optimizer step)", fmt_s(merge_times), "", "", "", ""])
        print(table(table_rows, ["variant", "median time", "tokens", "tokens/s", "vs hf adapter", "vs hf base"]))
        summary.append((shape, rows, expected / hf_s, expected / fast_s, expected / bf16_s, base_s / hf_s))
    print("\nsummary (tokens/s):")
    print(table([[shape, rows, f"{hf:.1f}", f"{fast:.1f}", f"{fast / hf:.2f} ({verdict(fast / hf, FAST_TARGET, True)})",
                  f"{bf16:.1f}", f"{bf16 / hf:.2f} ({verdict(bf16 / hf, FAST_TARGET, True)})",
                  f"{adapter:.3f} ({verdict(adapter, ADAPTER_TARGET, True)})"]
                 for shape, rows, hf, fast, bf16, adapter in summary],
                ["shape", "rows", "hf", "fast", "fast / hf", "fast bf16", "fast bf16 / hf", "adapter / base (hf)"]))


if __name__ == "__main__":
    main()
