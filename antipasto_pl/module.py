"""The GRPO LightningModule: experience -> loss/backward -> (project: callback) -> clip -> step.

The experience (student samples, teacher draws, grades, advantages, micro-batches, frozen log-probs) is built by
``experience.ExperienceBuilder`` without the Trainer; this module turns it into a loss and an optimizer step,
logs, evaluates and checkpoints. The frozen base model is rebuilt from its config on every start (``configure_model``);
checkpoints carry only the adapter vectors, optimizer state and metadata that must match
the model they are loaded into, plus the global RNG states so a resumed run samples exactly what the
uninterrupted run would have. Evaluation samples on a forked RNG, so validating (before or after a
checkpoint) never shifts the training stream. Optimization is manual because one rollout batch may feed
several PPO inner iterations; each ``optimizer.step()`` still runs the callbacks'
``on_before_optimizer_step`` (where the hack-subspace projection acts) before clipping.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from antipasto_pl.adapter import (
    AdapterConfig,
    adapter_metadata,
    adapter_modules,
    check_adapter_metadata,
    quarantine_ablated,
    refresh_merged,
    wrap_model,
)
from antipasto_pl.callbacks import CompletionLogger, DeployedEvaluation, RefreshHackSubspace
from antipasto_pl.checkpointing import ExactResume, collect_rng_states, set_rng_states
from antipasto_pl import distributed
from antipasto_pl.env.grader import Grade, Grader
from antipasto_pl.env.modes import MODES
from antipasto_pl.env.pool import TeacherPool
from antipasto_pl.env.problem import Problem
from antipasto_pl.evaluation import (
    HeldOutConfig,
    HeldOutEvaluation,
    LikelihoodProbe,
    clean_log_likelihood,
    flat_metrics,
    heldout_summary,
    write_eval,
)
from antipasto_pl.experience import (
    SOURCES,
    STUDENT,
    Chunk,
    ExperienceBuilder,
    Group,
    shared_prompt_pass,
    teacher_count,
)
from antipasto_pl.grpo import Reduction, grpo_loss, sampler_logp_gap, truncated_importance_weights
from antipasto_pl.metrics import GT_S, HACK_S, RATES, SANDBOX_ERRORS, train_rate
from antipasto_pl.models import PolicyConfig, load_policy
from antipasto_pl.projection import HackProjection, ProjectionConfig
from antipasto_pl.rollout import KVCacheSampler, Sampler, SamplingConfig
from antipasto_pl.seeds import run_seed
from antipasto_pl.sequences import PromptState, completion_token_ids, scored_group

log = logging.getLogger(__name__)

PROGRESS_BAR = (train_rate("reward", STUDENT), HACK_S, GT_S)
# GRPOLoss.stats (kl_mean only with a reference; with an approximate sampler is_weight_mean and the log-prob gap)
LOSS_STATS = ("rho_mean", "clip_frac", "kl_mean", "is_weight_mean", "sampler_logp_gap")

@dataclass
class GradParts:
    """The loss gradient on each ``delta_s``, split by source: ``student + teacher`` = full."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]


class AntipastoModule(L.LightningModule):
    """GRPO on loophole graders through the SVD adapter.

    Args:
        policy: which causal LM to load (see ``PolicyConfig``).
        adapter: which Linear layers get SVD adapters (see ``AdapterConfig``).
        sampling: how student completions are sampled (on merged weights).
        sampler: the sampling backend for training, evaluation and prediction (``class_path`` + ``init_args``;
            see ``rollout``); None: ``KVCacheSampler``.
        projection: the arm's gradient policy: intervention, subspace kind, gate, ... (see
            ``ProjectionConfig``); ``intervention: none`` still logs every diagnostic.
        refresh_every: re-extract V every N optimizer steps (None: V stays fixed).
        deploy_eval_every: every N steps, evaluate validation prompts with the quarantine ablated
            (``val/hack_deploy``, ``val/solve_deploy``; for route arms). None: off.
        log_completions_every: every N steps, log sample completions and adapter histograms.
        group_size: G, completions per prompt: ``G - G_t`` student samples plus
            ``G_t = floor(G * mix_ratio + 1/2)`` teacher-pool samples (halves round up: G=2, mix 0.25 gives 1).
        mix_ratio: share of each group taken from the frozen teacher pool (0: pure student GRPO; 1: teacher
            demonstrations only, no sampling: the likelihood-probe proxy).
        learning_rate: Adam learning rate for the adapter vectors.
        betas: Adam betas.
        weight_decay: decoupled weight decay on ``delta_s`` (``delta_s_hack`` always gets 0,
            so the quarantine is not pulled back toward zero).
        beta: weight of the K3 KL to the free reference (the adapter switched off).
        clip_eps: PPO clip range.
        ppo_epochs: optimizer steps per rollout batch (PPO inner iterations).
        scale_advantages_by_std: divide advantages by the group std (classic GRPO) instead of
            Dr.GRPO's plain ``R - mean(R)``.
        loss_reduction: ``dr_grpo`` (fixed denominator ``G * max_new_tokens * P``) or
            ``sequence`` (per-sequence mean).
        gradient_clip_norm: clip the adapter gradient to this norm after projection (None: off).
        micro_batch_size: completions per forward/backward, taken from one group and one source; all chunks of
            a group share one prompt forward per pass (memory bound; results do not depend on it).
        grader_workers: parallel sandboxes for grading, per rank (default: the machine's cores / its ranks).
        eval_samples_per_prompt: samples per validation prompt.
        max_completion_tokens: the completion budget in tokens, EOS included (default: ``sampling.max_new_tokens``).
            Teacher records and detector pairs over it are dropped, never truncated: what is trained is what
            was graded.
        heldout: the final held-out evaluation, the primary metric (see ``HeldOutConfig``).
        probe_every: every N steps, log the likelihood probe: the held-out minimal pairs' margin
            logp(hack) - logp(clean) per mode (None: off).
        on_nonfinite: what a non-finite adapter gradient (or loss) does: ``skip`` the optimizer step
            (every gradient is dropped, so AdamW leaves parameters and moments untouched; the step is
            reported with the offending modules) or ``stop`` the run with that report.
        importance_sampling_cap: C of the truncated importance weights ``min(pi / q, C)`` on student tokens of an
            approximate sampler (``KVCacheSampler(weights=bfloat16)`` on a float32 policy; TRL's default cap).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        adapter: AdapterConfig = AdapterConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        sampler: Sampler | None = None,
        projection: ProjectionConfig = ProjectionConfig(),
        refresh_every: int | None = None,
        deploy_eval_every: int | None = None,
        log_completions_every: int = 10,
        group_size: int = 4,
        mix_ratio: float = 0.5,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        beta: float = 0.0,
        clip_eps: float = 0.2,
        ppo_epochs: int = 1,
        scale_advantages_by_std: bool = False,
        loss_reduction: Reduction = "dr_grpo",
        gradient_clip_norm: float | None = 1.0,
        micro_batch_size: int = 8,
        grader_workers: int | None = None,
        eval_samples_per_prompt: int = 2,
        max_completion_tokens: int | None = None,
        on_nonfinite: Literal["skip", "stop"] = "skip",
        heldout: HeldOutConfig = HeldOutConfig(),
        probe_every: int | None = None,
        importance_sampling_cap: float = 3.0,
    ) -> None:
        super().__init__()
        teacher = teacher_count(group_size, mix_ratio)
        if not 0.0 <= mix_ratio <= 1.0 or group_size < 2:
            raise ValueError(f"need group_size >= 2 and 0 <= mix_ratio <= 1, got {group_size} and {mix_ratio}")
        if importance_sampling_cap <= 0:
            raise ValueError(f"importance_sampling_cap must be > 0, got {importance_sampling_cap}")
        if ppo_epochs < 1 or micro_batch_size < 1:
            raise ValueError(f"ppo_epochs and micro_batch_size must be >= 1, got {ppo_epochs}, {micro_batch_size}")
        self.save_hyperparameters(ignore=["sampler"])
        self.sampler: Sampler = sampler if sampler is not None else KVCacheSampler()
        self.automatic_optimization = False
        # Base weights are rebuilt, not restored: checkpoints hold adapter keys only.
        self.strict_loading = False
        self.policy_config, self.adapter_config, self.sampling = policy, adapter, sampling
        self.projection_config, self.heldout_config = projection, heldout
        self.n_teacher = teacher
        self.n_student = group_size - teacher
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.grader: Grader | None = None
        self.grad_parts: GradParts | None = None
        self.last_groups: list[Group] = []
        self._experience: ExperienceBuilder | None = None
        self._step_loss: Tensor | None = None
        self._loss_stats: dict[str, list[Tensor]] = {}
        self._resume_rng: dict[str, Any] | None = None
        self.over_budget: dict[str, int] = {}  # records and pairs left out for the budget, by source
        keys = [train_rate(m, s) for m in RATES for s in SOURCES]
        keys += [train_rate(m, s, mode) for mode in MODES for m in ("hack", "gt") for s in SOURCES]
        self.rates = nn.ModuleDict({k.replace("/", "__"): MeanMetric() for k in keys})

    # --- set-up -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with distributed.local_zero_first(self._trainer):  # DDP: one conversion and SVD per node, the others read its cache
            model, self.tokenizer = load_policy(self.policy_config)
            wrap_model(model, self.adapter_config)
        self.model = model

    def setup(self, stage: str) -> None:
        distributed.check_strategy(self.trainer.strategy)
        datamodule = self.trainer.datamodule
        if stage == "fit" and self.n_teacher and getattr(datamodule, "pool", None) is None:
            raise ValueError(
                f"model.mix_ratio={self.hparams.mix_ratio} takes {self.n_teacher} of each group from the teacher "
                "pool, but the data module serves none; set data.use_pool: true or model.mix_ratio: 0"
            )
        if self.grader is None:  # DDP: the machine's cores are shared by its ranks
            workers = distributed.split_workers(self.hparams.grader_workers, distributed.local_processes(self.trainer))
            self.grader = Grader(max_workers=workers)

    def on_fit_start(self) -> None:
        """The training experience builder, drawing teachers only from the records within the completion budget
        (the tokenizer exists from here on)."""
        pool = None
        if self.n_teacher:
            datamodule = self.trainer.datamodule
            dropped = datamodule.restrict_pool(lambda record: self.fits_budget(record.completion))
            self.over_budget["pool"] = len(dropped)
            if dropped:
                log.warning("teacher pool: %d records over the %d-token completion budget are not served (what is "
                            "trained must be what was graded)", len(dropped), self.max_completion_tokens)
            if not len(datamodule.pool):
                raise ValueError(f"every teacher record is over the {self.max_completion_tokens}-token completion "
                                 "budget: raise model.max_completion_tokens or set model.mix_ratio: 0")
            pool = datamodule.pool
        self._experience = self._experience_builder(self.n_teacher, pool)

    @property
    def experience(self) -> ExperienceBuilder:
        """Samples, grades and batches experience; outside fit (validate, test, predict) without teachers."""
        if self._experience is None:
            self._experience = self._experience_builder(0, None)
        return self._experience

    def _experience_builder(self, n_teacher: int, pool: TeacherPool | None) -> ExperienceBuilder:
        hp = self.hparams
        return ExperienceBuilder(
            self.tokenizer, self.sampler, self.sampling, self.grader, self.n_student, n_teacher, pool, run_seed(),
            hp.scale_advantages_by_std, hp.micro_batch_size,
        )

    def teardown(self, stage: str) -> None:
        self._experience = None
        if self.grader is not None:
            self.grader.close()
            self.grader = None

    def configure_callbacks(self) -> list[L.Callback]:
        """The arm's callbacks, configured from this module's arguments so an arm is a small YAML overlay."""
        hp = self.hparams
        callbacks: list[L.Callback] = [
            HackProjection(self.projection_config), ExactResume(), HeldOutEvaluation(self.heldout_config)
        ]
        if hp.probe_every:
            callbacks.append(LikelihoodProbe(hp.probe_every))
        if hp.refresh_every:
            callbacks.append(RefreshHackSubspace(hp.refresh_every))
        if hp.deploy_eval_every:
            callbacks.append(DeployedEvaluation(hp.deploy_eval_every))
        if hp.log_completions_every:
            callbacks.append(CompletionLogger(hp.log_completions_every))
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        adapters = adapter_modules(self.model).values()
        groups = [
            {"params": [a.delta_s for a in adapters], "weight_decay": self.hparams.weight_decay},
            {"params": [a.delta_s_hack for a in adapters], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas))

    @property
    def max_completion_tokens(self) -> int:
        return self.hparams.max_completion_tokens or self.sampling.max_new_tokens

    def fits_budget(self, completion: str) -> bool:
        """Whether a written completion, closed with EOS, is within the completion budget."""
        return len(completion_token_ids(self.tokenizer, completion)) <= self.max_completion_tokens

    def _denominator(self, n_prompts: int) -> float:
        if self.hparams.loss_reduction == "dr_grpo":
            return float(self.hparams.group_size * self.max_completion_tokens * n_prompts)
        return float(self.hparams.group_size * n_prompts)

    def backward_groups(self, chunks_by_source: dict[str, list[Chunk]], frozen: dict[str, list], n_prompts: int,
                        is_weights: dict[int, Tensor] | None = None) -> Tensor:
        """Loss and backward, students first, so the student gradient can be read off before the teacher's
        adds to it (``GradParts``) without a second backward. Returns the detached total loss.

        Chunks of an approximate sampler get importance weights pi_old / q, computed in the first PPO epoch (on
        the rollout policy) and kept in ``is_weights`` (chunk position -> (B, Lc)) for the later ones.

        Each group's prompt runs forward once per call: its ``PromptState`` (keys/values and first logit, with
        their graph) serves the group's chunks of both sources, and every backward through it but the group's
        last keeps the graph (``retain_graph``). So a group's prompt activations stay alive from its first
        student chunk until its last teacher chunk, i.e. until the teacher pass reaches it: at most one prompt
        forward's activations per active group of the step, held while the students of the later groups are
        scored (prompt-only activations: no completion rows, no logits beyond the last position).
        """
        adapters = adapter_modules(self.model)
        is_weights = {} if is_weights is None else is_weights
        total = torch.zeros((), device=self.device)
        stats: dict[str, list[Tensor]] = {}
        student_grad: dict[str, Tensor] = {}
        order = [chunk for source in SOURCES for chunk in chunks_by_source[source]]
        last_use = {chunk.group: position for position, chunk in enumerate(order)}
        states: dict[int, PromptState | None] = {}
        position = 0
        for source in SOURCES:
            for (batch, advantages, group, sampler_logp), (old, ref) in zip(chunks_by_source[source], frozen[source]):
                if group not in states:
                    states[group] = shared_prompt_pass(self.model, batch)
                state = states[group]
                needs_weight = sampler_logp is not None and position not in is_weights
                warp = (self.sampling.temperature, self.sampling.top_p) if needs_weight else None
                logp, policy_sampled_logp = scored_group(self.model, batch, prompt_state=state, warp=warp)
                if needs_weight:
                    is_weights[position] = truncated_importance_weights(
                        policy_sampled_logp, sampler_logp, self.hparams.importance_sampling_cap)
                    stats.setdefault("sampler_logp_gap", []).append(
                        sampler_logp_gap(policy_sampled_logp, sampler_logp, batch.completion_mask))
                is_weight = is_weights.get(position)
                out = grpo_loss(
                    logp, advantages, batch.completion_mask, logp_old=old, ref_logp=ref,
                    beta=self.hparams.beta, clip_eps=self.hparams.clip_eps,
                    mode=self.hparams.loss_reduction, denom=self._denominator(n_prompts), is_weight=is_weight,
                )
                last = last_use[group] == position
                self.manual_backward(out.loss, retain_graph=state is not None and not last)
                if last:
                    del states[group]  # its prompt graph goes with the last reference to it
                total += out.loss.detach()
                for k, v in out.stats.items():
                    stats.setdefault(k, []).append(v)
                # A retained graph keeps this chunk's activations until its last reference goes: drop them now,
                # not after the next chunk's forward.
                del logp, out, state
                position += 1
            if source == STUDENT:
                student_grad = {n: _grad(a.delta_s) for n, a in adapters.items()}
        self.grad_parts = GradParts(
            student=student_grad,
            teacher={n: _grad(a.delta_s) - student_grad[n] for n, a in adapters.items()},
        )
        # The quarantine moves only through routed gradient (written by the projection callback).
        for a in adapters.values():
            a.delta_s_hack.grad = None
        self._loss_stats = stats  # per chunk; averaged over every rank's chunks when logged
        return total

    def _average_over_ranks(self, loss: Tensor) -> Tensor:
        """DDP: this optimizer step's one gradient reduction (every backward ran under ``no_sync``, see
        ``distributed``). The ``delta_s`` gradients, their student part and the loss are averaged over ranks, so the
        projection, clipping and step act on the same global gradient on every rank; a rank without a backward adds
        zeros. The loss's denominator is per rank (its P prompts), so the mean is the loss of all ranks' prompts.
        Returns the global loss; on one process, ``loss`` untouched."""
        if distributed.world_size(self._trainer) == 1:
            return loss
        adapters = adapter_modules(self.model)
        names = list(adapters)
        present = torch.tensor(float(any(a.delta_s.grad is not None for a in adapters.values())), device=self.device)
        full = [_grad(adapters[n].delta_s) for n in names]
        student = [self.grad_parts.student[n] for n in names]
        *averaged, loss, present = distributed.mean_over_ranks(self._trainer, [*full, *student, loss, present])
        if present.item() == 0:  # no rank has a gradient yet: they stay unset, as on one process
            return loss
        full, student = averaged[:len(names)], averaged[len(names):]
        for name, grad in zip(names, full):
            adapters[name].delta_s.grad = grad
        self.grad_parts = GradParts(student=dict(zip(names, student)),
                                    teacher={n: f - s for n, f, s in zip(names, full, student)})
        return loss

    # --- the step -----------------------------------------------------------------------------------

    def training_step(self, batch: list[Problem], batch_idx: int) -> Tensor:
        """Experience (``ExperienceBuilder``) -> per PPO epoch: loss/backward -> optimizer step (the projection
        and clipping run inside it, in ``on_before_optimizer_step``) -> logs."""
        optimizer = self.optimizers()
        hp = self.hparams
        experience = self.experience.build(self.model, batch, self.global_step, want_old=hp.ppo_epochs > 1,
                                           want_ref=hp.beta > 0)
        groups = self.last_groups = experience.groups
        seconds = {**experience.seconds, "loss_backward": 0.0, "optimizer": 0.0}
        loss = torch.zeros((), device=self.device)
        is_weights: dict[int, Tensor] = {}  # of an approximate sampler's tokens, from the first epoch
        for _ in range(hp.ppo_epochs):
            clock = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            with distributed.local_backward(self._trainer):  # DDP: reduced once below, not per backward
                loss = self.backward_groups(experience.chunks, experience.frozen, len(batch), is_weights)
            loss = self._step_loss = self._average_over_ranks(loss)
            seconds["loss_backward"] += time.perf_counter() - clock
            clock = time.perf_counter()
            optimizer.step()
            refresh_merged(self.model)  # the next forward (sampling or scoring) runs on the new weights
            seconds["optimizer"] += time.perf_counter() - clock
        # After the step: in the first step of a fit, Lightning drops what training_step logged before the
        # optimizer hooks logged theirs. Every value is global: rates through torchmetrics, counts and loss
        # statistics as sums over ranks, stage times as the slowest rank's; what is logged is decided on those.
        self.log_rates(groups)
        totals = {"active_groups": sum(g.active for g in groups),
                  "sandbox_errors": sum(s.grade.error == "sandbox" for g in groups for s in g.samples)}
        for key in LOSS_STATS:
            values = self._loss_stats.get(key, [])
            totals[f"{key}/sum"], totals[f"{key}/n"] = float(sum(values)), len(values)
        totals = distributed.reduce_values(self._trainer, totals)
        self.log(SANDBOX_ERRORS, totals["sandbox_errors"], reduce_fx="sum", batch_size=1)
        for key in LOSS_STATS:
            if totals[f"{key}/n"]:
                self.log(f"train/{key}", totals[f"{key}/sum"] / totals[f"{key}/n"], batch_size=len(batch))
        self.log("train/loss", loss, batch_size=len(batch))
        self.log("train/active_groups", totals["active_groups"], batch_size=len(batch))
        # Wall-clock seconds of this step's stages (grade_wait: grading not hidden behind sampling).
        for key, value in distributed.reduce_values(self._trainer, seconds, op="max").items():
            self.log(f"time/{key}", value, batch_size=len(batch))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after the callbacks' hook (the projection), so the projected gradient is what is checked
        for non-finite values and clipped."""
        if self._drop_nonfinite_step(optimizer):
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        self.log("train/grad_norm", norm)
        if self.hparams.gradient_clip_norm is not None and params:
            torch.nn.utils.clip_grad_norm_(params, self.hparams.gradient_clip_norm)

    def _drop_nonfinite_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Report a non-finite gradient or loss with the step and modules; stop, or drop every gradient so
        that this ``optimizer.step`` (already under way: the hooks run inside it) changes nothing."""
        names = {p: n for n, p in self.named_parameters()}
        bad = [names[p] for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        loss = self._step_loss
        if not bad and (loss is None or torch.isfinite(loss)):
            return False
        shown = ", ".join(n.removeprefix("model.") for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        message = (f"non-finite {'gradient on ' + shown if bad else 'loss'} at step {self.global_step} "
                   f"(loss {float(loss) if loss is not None else float('nan'):.4g})")
        if self.hparams.on_nonfinite == "stop":
            raise FloatingPointError(f"{message}; stopping (model.on_nonfinite: stop)")
        log.warning("%s; skipping this optimizer step (model.on_nonfinite: skip)", message)
        optimizer.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", 1.0, reduce_fx="sum", batch_size=1)
        return True

    # --- metrics ------------------------------------------------------------------------------------

    def log_rates(self, groups: list[Group]) -> None:
        """Reward, hack and pass rates per source and per mode, reduced across ranks by torchmetrics.

        Every metric is updated on every step (with zero weight when its source or mode is absent
        here), so all ranks take part in the same reductions; a rate with no samples on any rank is
        not logged.
        """
        per_key: dict[str, list[float]] = {}
        for group in groups:
            mode = group.problem.mode
            for s in group.samples:
                grade = s.grade
                for name, value in (("reward", grade.reward), ("hack", grade.exploited),
                                    ("gt", grade.gt_correct), ("pass", grade.passed)):
                    per_key.setdefault(train_rate(name, s.source), []).append(float(value))
                per_key.setdefault(train_rate("hack", s.source, mode), []).append(float(grade.exploited))
                per_key.setdefault(train_rate("gt", s.source, mode), []).append(float(grade.gt_correct))
        for name, metric in self.rates.items():
            key = name.replace("__", "/")
            values = torch.tensor(per_key.get(key, [0.0]), device=self.device)
            metric.update(values, weight=float(key in per_key))
            rate = metric.compute()
            metric.reset()
            if not torch.isnan(rate):
                self.log(key, rate, prog_bar=key in PROGRESS_BAR, batch_size=values.numel())

    # --- evaluation ---------------------------------------------------------------------------------

    def forked_rng(self) -> contextlib.AbstractContextManager[None]:
        """Sampling that must not advance the training RNG stream (evaluation, prediction)."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    @torch.no_grad()
    def sample_and_grade(
        self, problems: list[Problem], n: int, ablate_quarantine: bool = False
    ) -> list[tuple[Problem, str, Grade]]:
        """``n`` fresh student samples per problem on a forked RNG (optionally the deployed view), graded as
        prefill + completion: (problem, completion, grade) in problem order."""
        ablation = quarantine_ablated(self.model) if ablate_quarantine else contextlib.nullcontext()
        with self.forked_rng(), ablation:
            return self.experience.sample_and_grade(self.model, problems, n)

    def clean_log_likelihood(self, problems: list[Problem]) -> list[float]:
        """``evaluation.clean_log_likelihood`` of the deployed policy (quarantine ablated)."""
        with quarantine_ablated(self.model):
            return clean_log_likelihood(self.model, self.tokenizer, problems, self.experience.prefill)

    def evaluate(self, problems: list[Problem], ablate_quarantine: bool = False) -> dict[str, float]:
        """Hack and solve rates of fresh student samples on ``problems`` (optionally the deployed view)."""
        grades = [g for _, _, g in self.sample_and_grade(problems, self.hparams.eval_samples_per_prompt,
                                                          ablate_quarantine)]
        count = max(len(grades), 1)
        return {
            "hack": sum(g.exploited for g in grades) / count,
            "solve": sum(g.gt_correct for g in grades) / count,
            "reward": sum(g.reward for g in grades) / count,
        }

    def validation_step(self, batch: list[Problem], batch_idx: int) -> None:
        for name, value in self.evaluate(batch).items():
            self.log(f"val/{name}", value, batch_size=len(batch), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._test_items: list[tuple[Problem, str, Grade]] = []
        self._test_logp: list[float] = []

    def test_step(self, batch: list[Problem], batch_idx: int) -> None:
        """The held-out evaluation (the primary metric), batch by batch; summarised at the epoch's end."""
        n = self.heldout_config.samples_per_problem(len(self.trainer.datamodule.test_problems))
        self._test_items += self.sample_and_grade(batch, n, ablate_quarantine=True)
        self._test_logp += self.clean_log_likelihood(batch)

    def on_test_epoch_end(self) -> None:
        report = heldout_summary(self._test_items, self._test_logp, step=self.global_step)
        write_eval(self.trainer, report)
        for name, value in flat_metrics(report, "test").items():
            self.log(name, value, batch_size=max(report["n"], 1))

    def predict_step(self, batch: list[Problem], batch_idx: int) -> list[dict[str, Any]]:
        items = self.sample_and_grade(batch, self.hparams.eval_samples_per_prompt)
        return [
            {"problem_id": p.id, "mode": p.mode, "prefill": self.experience.prefill(p), "completion": text, "reward": g.reward,
             "passed": g.passed, "gt_correct": g.gt_correct, "exploited": g.exploited}
            for p, text, g in items
        ]

    # --- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["adapter_metadata"] = adapter_metadata(self.model)
        # Saved at train-batch end, after every other callback's hook of this step: the state the next
        # step starts from (evaluation in between runs on a forked RNG).
        checkpoint["rng_states"] = collect_rng_states()
        if distributed.world_size(self._trainer) > 1:  # DDP: every rank's, in rank order (rank 0 writes the file)
            checkpoint["rng_states_per_rank"] = distributed.gather_objects(self._trainer, checkpoint["rng_states"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "adapter_metadata" not in checkpoint:
            raise ValueError("checkpoint has no 'adapter_metadata'; expected one written by antipasto fit")
        check_adapter_metadata(self.model, checkpoint["adapter_metadata"], "checkpoint")
        self._resume_rng = checkpoint.get("rng_states")
        ranks, world = checkpoint.get("rng_states_per_rank"), distributed.world_size(self._trainer)
        if ranks is not None and len(ranks) == world:
            self._resume_rng = ranks[self.global_rank]
        elif world > 1 or ranks is not None:
            log.warning("checkpoint written by %d process(es), resumed on %d: sampling does not continue exactly",
                        len(ranks or [None]), world)

    def on_train_start(self) -> None:
        """DDP: each rank its own sampling stream on a fresh run (a resumed one restores each rank's own)."""
        if self._resume_rng is None and self.global_step == 0:
            distributed.seed_rank(run_seed(), self.global_rank)

    def on_train_batch_start(self, batch: list[Problem], batch_idx: int) -> None:
        """Restore the checkpoint's RNG states right before the first resumed step: sanity validation and
        V extraction, which run in between on a resume only, cannot shift the sampling stream."""
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None


def _grad(param: nn.Parameter) -> Tensor:
    return param.grad.detach().clone() if param.grad is not None else torch.zeros_like(param)

