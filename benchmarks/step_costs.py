"""What a GRPO step of this trainer spends besides sampling: diagnostics, projection, grading; plus V extraction
time and peak memory. SmolLM2-135M-Instruct on CPU, configured like configs/cpu.yaml (G=4 with mix_ratio 0.5,
so 2 student samples + 2 teacher-pool completions per prompt, 2 prompts per step, 128 new tokens) unless the
flags say otherwise. Four parts, each printed as a table (`--parts` picks some):

steps        real optimizer steps under the Lightning Trainer (timing Callback on on_train_batch_start/end)
             with the projection callback (erase, random k=4 V set through ProjectionConfig) timed inside
             the step: `HackProjection.on_before_optimizer_step` plus its optimizer post-step hook (the
             update-leak measurement), against the whole step (target: at most 2%). The same steps give the
             grading share: the module's `time/grade` log when it has one, else the time inside
             `ExperienceBuilder.grade`, against the whole step; `time/generate` and `time/backward`
             (or the time inside `generate` / `backward_groups`) are shown beside it.
diagnostics  the student/teacher gradient split (`GradParts`) against the same rows scored without it. The
             module splits by scoring the students' micro-batches and calling backward, cloning every
             `delta_s.grad`, then scoring the teachers' micro-batches (the teacher part is the difference).
             Its cost is the clone + subtract and, mostly, the rows being scored in per-source micro-batches:
             a group's teachers cannot share its students' micro-batch, so with shared-prompt scoring each
             such group runs its prompt once more (one more forward/backward in any case). Each
             step here scores its rows twice with the module's own `backward_groups`, interleaved: as the
             trainer does (split), and with the teacher samples relabelled as students for the call so the
             module scores every row in shared micro-batches and clones once (unsplit; the teacher part is
             then zero). step with split = measured step - unsplit backward; step without = measured step -
             split backward. Target: with/without <= 1.1. The clone + subtract alone is timed separately.
extraction   the pair gradients V is extracted from (`vhack.pair_gradients`) on SmolLM2 (full rank) with the 24
             pairs configs/cpu.yaml extracts from (pair_problems 2 x variants_per_mode 2 x 6 modes,
             `AntipastoDataModule.detector_pairs`), length_norm sum (the one matching dr_grpo): batched
             (`--extraction-batch` completions per backward, per-row probes) against one completion per
             forward and backward (batch 1), interleaved; target batch-1 / batched >= 3, and the largest
             difference between the two, relative to the norm of a completion's gradient on all modules.
             Then the ceiling of any exact per-completion method over batch 1, from counted FLOPs (the
             prompts' forwards are all that completions can share), the pass's FLOP rate against a plain
             linear's, and the most a factored product could save (`print_extraction_ceiling`).
memory       peak RSS of one training step (forward + backward of 8 rows, then an AdamW step) in a fresh
             subprocess per variant: the base model fine-tuned in full (gradients on every weight), the wrapped
             model at full rank, the wrapped model with r_max=64. Reported: RSS once loaded (weights, plus U/Vh
             for the wrapped model) and the peak over the step, with the ratio wrapped / base.

    python benchmarks/step_costs.py [--parts steps diagnostics extraction memory] [--repeats 3] [--warmup 1]
        [--group-size 4] [--mix-ratio 0.5] [--prompts-per-step 2] [--max-new-tokens 128]
        [--intervention erase] [--r-max-small 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from _antipasto_run import StepTimer, fit, make_data, make_module
from _common import (
    SMOLLM2,
    fmt_s,
    machine_line,
    median,
    parse_args,
    peak_rss_mb,
    quiet_logs,
    reset_peak_rss,
    rss_mb,
    table,
    timed,
    verdict,
)

from antipasto_pl.adapter import AdapterConfig, adapter_modules, wrap_model
from antipasto_pl.experience import STUDENT, TEACHER, frozen_log_probs
from antipasto_pl.module import AntipastoModule
from antipasto_pl.projection import HackProjection

PARTS = ("steps", "diagnostics", "extraction", "memory")


# --- steps: projection overhead and grading share -------------------------------------------------------------


class ProjectionTimer(L.Callback):
    """Times the HackProjection callback's work inside each step (its hook and its optimizer post-step hook)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.per_step: list[float] = []
        self.found = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, HackProjection):
                callback.on_before_optimizer_step = timed(callback.on_before_optimizer_step, self.calls)
                callback._after_step = timed(callback._after_step, self.calls)
                self.found = True

    def on_train_batch_start(self, *args) -> None:
        self.calls.clear()

    def on_train_batch_end(self, *args) -> None:
        self.per_step.append(sum(self.calls))


class StepItems(L.Callback):
    """The (problem, completion) items each step graded, to grade them again, synchronously, afterwards."""

    def __init__(self) -> None:
        self.items: list[list[tuple]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.items.append([(g.problem, s.text) for g in pl_module.last_groups for s in g.samples])


def part_steps(args: argparse.Namespace) -> None:
    from antipasto_pl.env.grader import Grader

    print(f"\n== steps: projection overhead and grading share (G={args.group_size}, mix_ratio {args.mix_ratio}, "
          f"P={args.prompts_per_step}, {args.max_new_tokens} new tokens, projection {args.intervention}, k=4) ==")
    module = make_module(args.group_size, args.mix_ratio, args.max_new_tokens, intervention=args.intervention)
    timer, projection, items = StepTimer(), ProjectionTimer(), StepItems()
    timer.wrap_pieces(module)
    data = make_data(args.prompts_per_step, use_pool=args.mix_ratio > 0)
    fit(module, data, args.warmup + args.repeats, [timer, projection, items], seed=args.seed)
    w = args.warmup
    steps, proj = timer.times[w:], projection.per_step[w:]
    logged, pieces = timer.logged[w:], timer.pieces[w:]
    if not projection.found:
        print("HackProjection callback not found in the trainer's callbacks; projection not measured")

    # The same completions graded again, synchronously, by a fresh Grader: grading's cost if nothing hid it.
    with Grader(max_workers=module.hparams.grader_workers) as grader:
        grader.grade_batch(items.items[0][:1])  # start the sandbox fork server outside the timing
        sync = []
        for step_items in items.items[w:]:
            start = time.perf_counter()
            grader.grade_batch(step_items)
            sync.append(time.perf_counter() - start)

    def row(label: str, values: list[float], digits: str = ".1%") -> list[str]:
        return [label, fmt_s(values), format(median([v / s for v, s in zip(values, steps)]), digits)]

    rows = [["whole step (Callback: on_train_batch_start -> end)", fmt_s(steps), "100%"]]
    keys = sorted({k for m in logged for k in m if k.startswith("time/")})  # the module's own stage timings
    rows += [row(f"logged {k}", [m.get(k, 0.0) for m in logged]) for k in keys]
    grade_keys = [k for k in keys if "grade" in k]
    rows += [row(f"time inside {name}()", [p.get(name, 0.0) for p in pieces]) for name in pieces[0]] if pieces else []
    rows.append(row("grading the step's completions again, synchronously", sync))
    rows.append(row("projection callback (hook + post-step hook)", proj, ".2%"))
    print(table(rows, ["per step", "median time", "share of step (median)"]))
    print(f"active groups per step: {[m.get('train/active_groups') for m in logged]}; "
          f"completions graded per step: {[len(i) for i in items.items[w:]]}")
    proj_share = median([p / s for p, s in zip(proj, steps)])
    blocking = median([sum(m.get(k, 0.0) for k in grade_keys) / s for m, s in zip(logged, steps)])
    source = " + ".join(grade_keys)
    print(f"projection overhead {proj_share:.2%} of the step ({verdict(proj_share, 0.02, False)}); grading: "
          f"{blocking:.1%} of the step waiting on it ({source}), "
          f"{median([g / s for g, s in zip(sync, steps)]):.1%} if it ran synchronously")
    del module
    gc.collect()


# --- diagnostics: the GradParts split -------------------------------------------------------------------------


class SplitCost(AntipastoModule):
    """A training step that scores its rows twice, split by source (as the trainer does) and unsplit, timing both
    with the module's own ``backward_groups``; then takes the optimizer step on the last gradient."""

    split_s: list[float]
    unsplit_s: list[float]

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        build, device = self.experience, self.device
        groups = build.generate(self.model, batch, self.global_step)
        build.grade(groups)
        self.last_groups = groups
        split = {source: build.micro_batches(groups, source, device) for source in (STUDENT, TEACHER)}
        teachers = [s for g in groups for s in g.samples if s.source == TEACHER]
        for sample in teachers:  # every row scored as one source: shared micro-batches, one clone
            sample.source = STUDENT
        try:
            unsplit = {STUDENT: build.micro_batches(groups, STUDENT, device), TEACHER: []}
        finally:
            for sample in teachers:
                sample.source = TEACHER
        variants = {"split": split, "unsplit": unsplit}
        order = ["split", "unsplit"] if batch_idx % 2 == 0 else ["unsplit", "split"]
        loss = torch.zeros(())
        for name in order:
            chunks = variants[name]
            frozen = {source: frozen_log_probs(self.model, c, self.hparams.ppo_epochs > 1, self.hparams.beta > 0)
                      for source, c in chunks.items()}
            optimizer.zero_grad(set_to_none=False)
            start = time.perf_counter()
            loss = self._step_loss = self.backward_groups(chunks, frozen, len(batch))
            (self.split_s if name == "split" else self.unsplit_s).append(time.perf_counter() - start)
        self.rows_per_source = {s: sum(x.source == s for g in groups if g.active for x in g.samples)
                                for s in (STUDENT, TEACHER)}
        self.chunks = {name: sum(len(v[s]) for s in (STUDENT, TEACHER)) for name, v in variants.items()}
        optimizer.step()
        return loss


def clone_subtract_s(module: AntipastoModule, repeats: int = 20) -> float:
    """The split's bookkeeping alone: clone every delta_s gradient, then subtract it from the total."""
    adapters = adapter_modules(module.model)
    for a in adapters.values():
        if a.delta_s.grad is None:
            a.delta_s.grad = torch.randn_like(a.delta_s)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        student = {n: a.delta_s.grad.detach().clone() for n, a in adapters.items()}
        {n: a.delta_s.grad - student[n] for n, a in adapters.items()}
        times.append(time.perf_counter() - start)
    return median(times)


def part_diagnostics(args: argparse.Namespace) -> None:
    print(f"\n== diagnostics: student/teacher gradient split (GradParts) vs the same rows unsplit "
          f"(G={args.group_size}, mix_ratio {args.mix_ratio}, P={args.prompts_per_step}) ==")
    if args.mix_ratio == 0:
        print("mix_ratio 0: no teacher rows, the split costs only the clone; nothing to compare")
    module = make_module(args.group_size, args.mix_ratio, args.max_new_tokens, intervention=args.intervention,
                         cls=SplitCost)
    module.split_s, module.unsplit_s = [], []
    timer = StepTimer()
    fit(module, make_data(args.prompts_per_step, use_pool=args.mix_ratio > 0), args.warmup + args.repeats, [timer],
        seed=args.seed)
    w = args.warmup
    steps, split, unsplit = timer.times[w:], module.split_s[w:], module.unsplit_s[w:]
    with_split = [s - u for s, u in zip(steps, unsplit)]
    without = [s - sp for s, sp in zip(steps, split)]
    ratios = [a / b for a, b in zip(with_split, without)]
    bwd_ratios = [a / b for a, b in zip(split, unsplit)]
    clone_s = clone_subtract_s(module)
    rows = [
        ["backward, split by source (as trained)", fmt_s(split), f"{median(bwd_ratios):.3f}"],
        ["backward, unsplit (same rows)", fmt_s(unsplit), "1.000"],
        ["step with diagnostics (derived)", fmt_s(with_split), f"{median(ratios):.3f}"],
        ["step without diagnostics (derived)", fmt_s(without), "1.000"],
        ["clone + subtract of every delta_s grad", f"{clone_s * 1e3:.2f} ms", ""],
    ]
    print(table(rows, ["", "median time", "ratio"]))
    print(f"rows per source {module.rows_per_source}, micro-batches split/unsplit {module.chunks} "
          f"(micro_batch_size {module.hparams.micro_batch_size})")
    print(f"step with / without diagnostics = {median(ratios):.3f} ({verdict(median(ratios), 1.1, False)})")
    del module
    gc.collect()


# --- extraction -----------------------------------------------------------------------------------------------


def part_extraction(args: argparse.Namespace) -> None:
    from antipasto_pl.models import PolicyConfig, load_policy
    from antipasto_pl.sequences import completion_token_ids
    from antipasto_pl.vhack import pair_gradients

    data = make_data(args.prompts_per_step, use_pool=False)
    data.setup("fit")
    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2))
    wrap_model(model, AdapterConfig())
    # The pairs a run with this completion budget extracts from (longer ones are left out, never cut).
    fits = lambda text: len(completion_token_ids(tokenizer, text)) <= args.max_new_tokens  # noqa: E731
    pairs = [p for p in data.detector_pairs("real") if fits(p.hack) and fits(p.clean)]
    print(f"\n== extraction: pair_gradients on SmolLM2, {len(pairs)} pairs ({len({p.mode for p in pairs})} modes), "
          f"length_norm sum, completions <= {args.max_new_tokens} tokens, batch {args.extraction_batch} vs 1, "
          f"{args.extraction_repeats} interleaved repeats ==")
    texts = [p.prompt for p in pairs], [p.hack for p in pairs], [p.clean for p in pairs]
    prefills = [p.prefill for p in pairs]
    times: dict[int, list[float]] = {1: [], args.extraction_batch: []}
    grads = {}
    for i in range(args.extraction_repeats):
        for size in (list(times) if i % 2 == 0 else list(reversed(times))):
            start = time.perf_counter()
            grads[size] = pair_gradients(model, tokenizer, *texts, length_norm="sum", prefills=prefills,
                                         batch_size=size)
            times[size].append(time.perf_counter() - start)
    # Each completion's gradient on all modules: (n, sum of ranks) per side.
    one_row, batched_row = ([torch.cat(list(grads[size][side].values()), dim=-1) for side in (0, 1)]
                            for size in (1, args.extraction_batch))
    worst = max(float(torch.linalg.vector_norm(b - a, dim=-1).div(torch.linalg.vector_norm(a, dim=-1)).max())
                for a, b in zip(one_row, batched_row))
    one, batched = median(times[1]), median(times[args.extraction_batch])
    rows = [[f"batch {size}" + (" (per completion)" if size == 1 else ""), fmt_s(values),
             f"{median(values) / (2 * len(pairs)) * 1e3:.0f} ms"] for size, values in times.items()]
    print(table(rows, ["pair_gradients", "wall time", "per completion"]))
    print(f"\nspeed-up per-completion / batched = {one / batched:.2f} ({verdict(one / batched, 3.0, True)}); "
          f"largest difference {worst:.2e} of a completion's gradient norm")
    print_extraction_ceiling(model, tokenizer, texts, prefills, one)
    del model
    gc.collect()


def linear_rate(x: torch.Tensor, weight: torch.Tensor, seconds: float = 2.0) -> float:
    """FLOP/s of ``linear(x, weight)`` repeated for about ``seconds``, after a warm-up."""
    with torch.no_grad():
        for _ in range(3):
            torch.nn.functional.linear(x, weight)
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            torch.nn.functional.linear(x, weight)
            reps += 1
    return 2 * x.shape[0] * weight.numel() * reps / (time.perf_counter() - start)


def print_extraction_ceiling(model: torch.nn.Module, tokenizer, texts: tuple[list[str], ...], prefills: list[str],
                             wall_s: float) -> None:
    """How much faster any exact per-completion method could be than batch 1, from counted work, not guessed.

    Each completion's gradient needs its own backward through its prompt, so the most a method can share is the
    prompt's forward (counted here by `FlopCounterMode`, with grad on, so with the `Vh x` products backward keeps).
    The batch-1 pass's FLOP rate is set against a plain `linear` of the model's largest adapted shape at one and
    at eight rows' median length, the faster of the two: as fast as these cores multiply. An adapted layer could also do its products through
    the factors (`r (d_in + d_out)` each way, full rank only) instead of through `W_eff` plus one factor; the
    third factor bounds that gain as if every FLOP were such a product. The ceiling is the three together."""
    from torch.utils.flop_counter import FlopCounterMode

    from antipasto_pl.sequences import completion_token_ids, prompt_token_ids
    from antipasto_pl.vhack import pair_gradients

    prompts, hacks, cleans = texts
    with FlopCounterMode(display=False) as counter:
        pair_gradients(model, tokenizer, prompts, hacks, cleans, length_norm="sum", prefills=prefills, batch_size=1)
    total = counter.get_total_flops()
    prompt_ids = [torch.tensor(prompt_token_ids(tokenizer, p, f)) for p, f in zip(prompts, prefills)]
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        for ids in prompt_ids:
            model(input_ids=ids[None], logits_to_keep=1)
    prompt_forward = 2 * counter.get_total_flops()  # each prompt serves both sides of its pair
    # Adapted shapes (d_out, d_in) and ranks, from the factors: U (d_out, r), Vh (r, d_in).
    shapes = [(a.U.shape[0], a.Vh.shape[1], a.rank) for a in adapter_modules(model).values()]
    d_out, d_in, _ = max(shapes, key=lambda shape: shape[0] * shape[1])
    weight = torch.randn(d_out, d_in)
    tokens = round(median([len(ids) + len(completion_token_ids(tokenizer, c)) for side in (hacks, cleans)
                           for ids, c in zip(prompt_ids, side)]))
    matmul_rate, rows = max((linear_rate(torch.randn(rows, d_in), weight), rows) for rows in (tokens, 8 * tokens))
    # Per token, through W_eff (+ Vh x forward, + U^T dy backward) against through U and Vh alone.
    merged_way = sum(2 * o * i + r * (i + o) for o, i, r in shapes)
    factored_way = sum(2 * r * (i + o) for o, i, r in shapes)
    share, rate = total / (total - prompt_forward), matmul_rate / (total / wall_s)
    factored = merged_way / factored_way
    print(f"batch 1 work: {total / 1e12:.2f} TFLOP ({total / 2 / len(prompts) / 1e9:.1f} GFLOP per completion), "
          f"prompt forwards {prompt_forward / total:.0%} of it; rate {total / wall_s / 1e9:.0f} GFLOP/s against "
          f"{matmul_rate / 1e9:.0f} GFLOP/s for one linear ({rows}, {d_in}) x ({d_out}, {d_in})")
    print(f"ceiling for exact per-completion gradients: prompt forward shared {share:.2f}x * matmul rate "
          f"{rate:.2f}x * factored products {factored:.2f}x = {share * rate * factored:.2f}x "
          f"({verdict(share * rate * factored, 3.0, True)})")


# --- memory ---------------------------------------------------------------------------------------------------


def memory_child(variant: str, rows: int, tokens: int, r_max_small: int) -> None:
    """One training step's peak RSS, printed as one JSON line (run in a fresh process per variant)."""
    import ctypes

    from antipasto_pl.env.grader import as_completion
    from antipasto_pl.env.problems import builtin_problems
    from antipasto_pl.models import PolicyConfig, load_policy
    from antipasto_pl.sequences import completion_log_probs, encode_completions

    quiet_logs()
    torch.manual_seed(0)
    report = {"variant": variant, "rss_imports_mb": rss_mb()}
    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2))
    if variant == "base":
        model.requires_grad_(True)
    else:
        wrap_model(model, AdapterConfig(r_max=None if variant == "full" else r_max_small))
    with torch.no_grad():  # weights and U/Vh may be mmapped from safetensors: make them resident now
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    report["trainable"] = sum(p.numel() for p in params)
    report["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    report["buffers_mb"] = sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20
    problems = builtin_problems()[:rows]
    batch = encode_completions(tokenizer, [p.prompt() for p in problems],
                               [as_completion(p.canonical_solution) * 4 for p in problems], tokens)
    report["batch_shape"] = list(batch.input_ids.shape)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    gc.collect()
    try:  # hand memory freed while loading (e.g. a computed SVD) back to the OS before the step
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    report["rss_loaded_mb"] = rss_mb()
    report["peak_load_mb"] = peak_rss_mb()
    report["peak_reset"] = reset_peak_rss()
    mask = batch.completion_mask[:, 1:].float()
    loss = -(completion_log_probs(model, batch) * mask).sum() / mask.sum()
    loss.backward()
    report["peak_fwd_bwd_mb"] = peak_rss_mb()
    optimizer.step()
    report["peak_step_mb"] = peak_rss_mb()
    merged = [a._merged for a in adapter_modules(model).values() if a._merged is not None]
    report["merged_mb"] = sum(m.numel() * m.element_size() for m in merged) / 2**20
    print(json.dumps(report))


def part_memory(args: argparse.Namespace) -> None:
    print(f"\n== memory: peak RSS of one training step ({args.memory_rows} rows, completions <= "
          f"{args.max_new_tokens} tokens; forward + backward, then AdamW), a fresh process per variant ==")
    results = {}
    for variant in ("base", "full", "rmax"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant,
               "--memory-rows", str(args.memory_rows), "--max-new-tokens", str(args.max_new_tokens),
               "--r-max-small", str(args.r_max_small)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"memory child {variant} failed (exit {out.returncode})")
        results[variant] = json.loads(lines[-1])
    names = {"base": "base model, full fine-tune", "full": "wrapped, full rank",
             "rmax": f"wrapped, r_max={args.r_max_small}"}
    base = results["base"]
    rows = []
    for variant, r in results.items():
        rows.append([names[variant], f"{r['trainable']:,}", f"{r['buffers_mb']:.0f}", f"{r['merged_mb']:.0f}",
                     f"{r['rss_loaded_mb']:.0f}",
                     f"{r['peak_fwd_bwd_mb']:.0f}", f"{r['peak_step_mb']:.0f}",
                     f"{r['peak_step_mb'] - r['rss_loaded_mb']:.0f}",
                     f"{r['peak_step_mb'] / base['peak_step_mb']:.2f}"])
    print(table(rows, ["variant", "trainable params", "U/Vh (MiB)", "merged W (MiB)", "RSS loaded", "peak fwd+bwd",
                       "peak step", "step over loaded", "peak step / base"]))
    reset = all(r["peak_reset"] for r in results.values())
    print(f"MiB; batch {base['batch_shape']}; weights {base['weights_mb']:.0f} MiB; imports alone "
          f"{base['rss_imports_mb']:.0f} MiB; peaks are the high-water mark "
          f"{'reset once loaded (/proc/self/clear_refs)' if reset else 'since process start (reset unsupported)'}")
    for variant in ("full", "rmax"):
        print(f"{names[variant]} / base: peak {results[variant]['peak_step_mb'] / base['peak_step_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per step-timing part")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--extraction-repeats", type=int, default=1)
    parser.add_argument("--extraction-batch", type=int, default=8, help="completions per backward, batched")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--mix-ratio", type=float, default=0.5)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--intervention", choices=["none", "erase", "route"], default="erase")
    parser.add_argument("--memory-rows", type=int, default=8)
    parser.add_argument("--r-max-small", type=int, default=64, help="the capped rank in the memory part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", choices=["base", "full", "rmax"], help=argparse.SUPPRESS)
    args = parse_args(parser)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_rows, args.max_new_tokens, args.r_max_small)
        return
    quiet_logs()
    print(f"step costs, SmolLM2-135M-Instruct on CPU: {machine_line()}")
    runners = {"steps": part_steps, "diagnostics": part_diagnostics, "extraction": part_extraction,
               "memory": part_memory}
    for part in PARTS:
        if part in args.parts:
            runners[part](args)


if __name__ == "__main__":
    main()
