"""One GRPO optimizer step of this trainer against TRL's GRPOTrainer, in the same run, on CPU.

Both train SmolLM2-135M-Instruct (loaded by `antipasto_pl.models.load_policy`; TRL gets the model object and
its tokenizer) on the same builtin problems in the same order (the first batches this project's data module
draws), one prompt per step, G=8 completions of 64 new tokens, rewarded by this project's sandboxed `Grader`
(so both pay the same grading):

* this trainer: `AntipastoModule` + `AntipastoDataModule` under the real Lightning `Trainer`, configured like
  configs/cpu.yaml but with group_size 8, prompts_per_step 1, max_new_tokens 64, mix_ratio 0 (pure student
  GRPO, like TRL), no teacher pool; the projection callback runs as in the vanilla arm (intervention none,
  k=4) on a random V so that no extraction is needed first. Steps timed by a Callback
  (on_train_batch_start / on_train_batch_end). Once per `--sampler-weights`: `policy` (the exact sampler, float32
  like TRL's) and `bfloat16` (opt-in: bfloat16 weights, its tokens importance-weighted).
* TRL: `GRPOTrainer`, full fine-tune, its default loss (loss_type and beta as that TRL version defaults
  them, printed), num_generations 8, per-device batch 8 (one prompt per step), max_completion_length 64,
  use_cpu, float32 (bf16 off, as this trainer), gradient checkpointing off (this trainer does not
  recompute activations; `--trl-gradient-checkpointing` turns TRL's default back on), no eval, logging
  or saving. Steps timed by a TrainerCallback (on_step_begin / on_step_end).
* TRL + LoRA: the same, with a PEFT LoRA (r=16, alpha 32, no dropout) on the adapter's attention and MLP
  targets (q/k/v/o, gate/up/down) instead of the full fine-tune (`--skip-lora` leaves it out).

Fairness: both samples are forced to exactly 64 tokens (this trainer: `sampling.ignore_eos`; TRL:
`min_new_tokens`; `--natural-length` turns that off), since a step's cost depends on how long its completions are. This trainer skips the backward of a group
whose rewards do not vary (no gradient), which TRL never does; with 64-token completions most rewards are 0
(the code block is cut off), so by default such groups get a tiny zero-mean advantage and run their
backward like TRL (`--natural-advantages` measures the trainer as it is instead, and the table says how many
steps had a backward).

Each trainer is measured in a fresh Python process (`--in-process`: all in this one, one after another;
a trainer measured after another one can then inherit its allocator and thread-pool state). Warm-up steps
first, then the median of `--repeats` steps each; the ratios are ours / TRL's median step time
(targets: <= 0.45 against the full fine-tune, <= 0.6 against TRL + LoRA), for each sampler.

    python benchmarks/step_vs_trl.py [--repeats 5] [--warmup 1] [--group-size 8] [--max-new-tokens 64]
        [--order antipasto-first|trl-first] [--natural-length] [--natural-advantages]
        [--trl-gradient-checkpointing] [--skip-trl] [--skip-lora] [--sampler-weights policy bfloat16]
        [--in-process]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from _antipasto_run import ForceActive, StepTimer, first_batches, fit, make_data, make_module
from _common import (
    SMOLLM2,
    fmt_s,
    machine_line,
    median,
    parse_args,
    quiet_logs,
    table,
    verdict,
)

from antipasto_pl.adapter import ATTENTION_TARGETS, MLP_TARGETS
from antipasto_pl.env.grader import Grader
from antipasto_pl.env.problem import Problem
from antipasto_pl.models import PolicyConfig, load_policy

TARGET = 0.45  # ours / TRL full fine-tune
LORA_TARGET = 0.6  # ours / TRL + LoRA
LORA_RANK = 16


def run_antipasto(args: argparse.Namespace, steps: int, weights: str) -> dict:
    module = make_module(group_size=args.group_size, mix_ratio=0.0, max_new_tokens=args.max_new_tokens,
                         ignore_eos=not args.natural_length,
                         micro_batch_size=args.micro_batch_size, sampler_weights=weights)
    timer = StepTimer()
    timer.wrap_pieces(module)
    lengths: list[float] = []

    class Lengths(L.Callback):  # mean completion length of each step's samples
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            samples = [s for g in pl_module.last_groups for s in g.samples]
            lengths.append(sum(len(s.token_ids) for s in samples) / max(len(samples), 1))

    force = ForceActive() if not args.natural_advantages else contextlib.nullcontext(None)
    with force as forced:
        fit(module, make_data(1, use_pool=False), steps, [timer, Lengths()], seed=args.seed)
    w = args.warmup
    result = {
        "times": timer.times[w:], "batches": timer.batches, "lengths": lengths[w:],
        "active": [m.get("train/active_groups", float("nan")) for m in timer.logged[w:]],
        "pieces": timer.pieces[w:], "logged": timer.logged[w:],
        "jittered": (forced.jittered_groups, forced.groups, forced.calls) if forced is not None else None,
    }
    del module
    gc.collect()
    return result


def run_trl(args: argparse.Namespace, steps: int, problems: list[Problem], lora: bool = False) -> dict:
    """TRL's GRPOTrainer, a full fine-tune or (``lora``) a PEFT LoRA on the attention and MLP projections."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_policy(PolicyConfig(name=SMOLLM2, dtype="float32"))
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=list(ATTENTION_TARGETS + MLP_TARGETS))
    else:
        model.requires_grad_(True)  # load_policy freezes it; TRL fine-tunes every weight
    by_id = {p.id: p for p in problems}
    grader = Grader()
    grade_times: list[float] = []
    lengths: list[float] = []

    def antipasto_reward(prompts, completions, problem_id, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is not None:
            lengths.append(sum(len(ids) for ids in completion_ids) / max(len(completion_ids), 1))
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        grades = grader.grade_batch([(by_id[pid], text) for pid, text in zip(problem_id, texts)])
        grade_times.append(time.perf_counter() - start)
        return [g.reward for g in grades]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, targs, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt()}], "problem_id": p.id}
                                 for p in problems])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        num_generations=args.group_size, per_device_train_batch_size=args.group_size,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens,
        generation_kwargs=None if args.natural_length else {"min_new_tokens": args.max_new_tokens},
        temperature=1.0, top_p=1.0,
        max_steps=steps, shuffle_dataset=False, seed=args.seed,
        report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings = {k: getattr(config, k, None) for k in (
        "loss_type", "beta", "scale_rewards", "num_iterations", "steps_per_generation", "generation_batch_size",
        "epsilon", "learning_rate", "optim", "gradient_checkpointing", "bf16", "top_k")}
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=antipasto_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    try:
        trainer.train()
    finally:
        grader.close()
    w = args.warmup
    result = {"times": timer.times[w:], "version": trl.__version__, "settings": settings,
              "grade": grade_times[w:], "lengths": lengths[w:],
              "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    del trainer, model
    gc.collect()
    return result


def measure(args: argparse.Namespace, job: str, steps: int, problems: list[Problem]) -> dict:
    """One trainer's measurement in this process: ``antipasto:<weights>``, ``trl`` or ``trl-lora``."""
    if job.startswith("antipasto:"):
        return run_antipasto(args, steps, job.split(":")[1])
    return run_trl(args, steps, problems, lora=job == "trl-lora")


def run_job(args: argparse.Namespace, job: str, steps: int, problems: list[Problem]) -> dict:
    """`measure`, unless ``--in-process`` in a fresh Python process (this script with ``--job``), so that no
    trainer inherits another's allocator, thread-pool or oneDNN cache state."""
    if args.in_process:
        return measure(args, job, steps, problems)
    with tempfile.TemporaryDirectory(prefix="step-vs-trl-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--job", job, "--result-json", str(out)], check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per trainer (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="this trainer's rows per forward/backward")
    parser.add_argument("--order", choices=["antipasto-first", "trl-first"], default="antipasto-first")
    parser.add_argument("--natural-length", action="store_true", help="let EOS end completions early (both)")
    parser.add_argument("--natural-advantages", action="store_true",
                        help="do not force a backward for zero-variance groups (this trainer as it runs)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL with its default gradient checkpointing on")
    parser.add_argument("--skip-trl", action="store_true", help="measure this trainer only")
    parser.add_argument("--skip-lora", action="store_true", help="leave out TRL + LoRA")
    parser.add_argument("--sampler-weights", nargs="+", choices=["policy", "bfloat16"], default=["policy", "bfloat16"],
                        help="this trainer's KVCacheSampler weights, one run each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="measure every trainer in this process, one after another (default: each in its own)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: the one trainer a child process measures
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parse_args(parser)
    quiet_logs()
    steps = args.warmup + args.repeats
    problems = [b[0] for b in first_batches(1, steps, args.seed)]
    if args.job:  # a child of run_job: measure one trainer, hand its result back as JSON
        Path(args.result_json).write_text(json.dumps(measure(args, args.job, steps, problems)))
        return
    print(f"GRPO step vs TRL, SmolLM2-135M-Instruct on CPU: {machine_line()}")
    print(f"G={args.group_size}, {args.max_new_tokens} new tokens, 1 prompt per step, warm-up {args.warmup}, "
          f"median of {args.repeats}; forced length: {not args.natural_length}; "
          f"forced backward: {not args.natural_advantages}")
    print("prompts: " + ", ".join(p.id for p in problems))

    jobs = [f"antipasto:{w}" for w in args.sampler_weights]
    if not args.skip_trl:
        trl_jobs = ["trl"] + ([] if args.skip_lora else ["trl-lora"])
        jobs = jobs + trl_jobs if args.order == "antipasto-first" else trl_jobs + jobs
    results = {job: run_job(args, job, steps, problems) for job in jobs}
    ours_by_weights = {job.split(":")[1]: r for job, r in results.items() if job.startswith("antipasto:")}
    for ours in ours_by_weights.values():
        if [b[0] for b in ours["batches"]] != [p.id for p in problems]:
            print(f"WARNING: this trainer drew {ours['batches']}, expected {[p.id for p in problems]}")
    trl_result, lora_result = results.get("trl"), results.get("trl-lora")

    peers = [(f"TRL {r['version']} GRPOTrainer ({kind})", r) for kind, r in
             (("full FT", trl_result), (f"LoRA r={LORA_RANK}", lora_result)) if r is not None]
    rows = []
    for weights, ours in ours_by_weights.items():
        rows.append([f"antipasto_pl (SVD adapter), sampler weights {weights}", fmt_s(ours["times"]),
                     f"{median(ours['lengths']):.1f}" if ours["lengths"] else "?", ""])
    for label, result in peers:
        rows.append([f"{label}, {result['trainable'] / 1e6:.2f} M trainable", fmt_s(result["times"]),
                     f"{median(result['lengths']):.1f}" if result["lengths"] else "?",
                     " / ".join(f"{median(ours['times']) / median(result['times']):.3f}"
                                for ours in ours_by_weights.values())])
    print()
    print(table(rows, ["trainer", "median step", "mean completion tokens",
                       f"this trainer's step ({' / '.join(ours_by_weights)}) / this row's"]))
    if trl_result is not None:
        print(f"\nTRL settings: {trl_result['settings']}")
        print(f"TRL reward (grading) per step: {fmt_s(trl_result['grade'])}")
    for weights, ours in ours_by_weights.items():
        print(f"\nthis trainer, sampler weights {weights}: active groups per step {ours['active']}")
        if ours["jittered"] is not None:
            jittered, groups, _ = ours["jittered"]
            print(f"  {jittered}/{groups} groups had equal rewards and were given a +-1e-3 advantage")
        pieces = ours["pieces"]
        if pieces:
            parts = {k: median([p.get(k, 0.0) for p in pieces]) for k in pieces[0]}
            print("  median per step: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        logged = ours["logged"]
        if logged and any(k.startswith("time/") for k in logged[0]):
            keys = sorted(k for k in logged[0] if k.startswith("time/"))
            values = {k: median([m.get(k, 0.0) for m in logged]) for k in keys}
            print("  logged: " + ", ".join(f"{k} {v:.2f} s" for k, v in values.items()))
        ours_s = median(ours["times"])
        for label, result, target in (("TRL", trl_result, TARGET), ("TRL + LoRA", lora_result, LORA_TARGET)):
            if result is not None:
                ratio = ours_s / median(result["times"])
                print(f"  step time ratio antipasto/{label} = {ratio:.3f} ({verdict(ratio, target, False)})")


if __name__ == "__main__":
    main()
