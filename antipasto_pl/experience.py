"""One step's experience, built without the Trainer: prompts -> student samples + teacher draws -> grades ->
advantages -> micro-batches of tensors, with the frozen log-probs the loss compares against.

The LightningModule owns the model and the optimizer and turns an ``Experience`` into a loss and a step
(docs/design.md section 7); everything before that lives here, so it can be run and tested on its own with a
model, a tokenizer, a grader and (optionally) a teacher pool.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from antipasto_pl.adapter import reference_policy
from antipasto_pl.env.grader import Grade, Grader
from antipasto_pl.env.pool import PoolRecord, TeacherPool
from antipasto_pl.env.problem import Problem
from antipasto_pl.grpo import group_advantages
from antipasto_pl.rollout import Sampler, SamplingConfig
from antipasto_pl.sequences import (
    GroupBatch,
    PromptState,
    chat_prompt,
    completion_token_ids,
    group_batch,
    group_log_probs,
    prompt_pass,
    prompt_token_ids,
    shares_prompt_cache,
)

STUDENT, TEACHER = "s", "t"
SOURCES = (STUDENT, TEACHER)


def teacher_count(group_size: int, mix_ratio: float) -> int:
    """G_t = floor(G * mix_ratio + 1/2): halves round up (Python's round() would send G=2, mix 0.25 to 0)."""
    return math.floor(group_size * mix_ratio + 0.5)


@dataclass
class Sample:
    """One member of a GRPO group: a student sample or a frozen teacher-pool completion."""

    source: str  # STUDENT | TEACHER
    text: str
    token_ids: tuple[int, ...]
    grade: Grade | None = None
    advantage: float = 0.0
    sampler_log_probs: tuple[float, ...] = ()  # a student token's log-prob under the distribution it was drawn from


@dataclass
class Group:
    """All samples for one prompt; a group whose rewards do not vary carries no gradient."""

    problem: Problem
    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return any(s.advantage != 0.0 for s in self.samples)


class Chunk(NamedTuple):
    """A micro-batch: rows of one source from the group at index ``group`` of the step's groups."""

    batch: GroupBatch
    advantages: Tensor  # (B,)
    group: int
    sampler_logp: Tensor | None = None  # (B, Lc): students of an approximate sampler, for importance weights


# Per chunk: log-probs under the rollout policy (the PPO ratio's denominator; only with several inner iterations)
# and under the reference policy (only with a KL term).
FrozenLogProbs = tuple[Tensor | None, Tensor | None]


@dataclass
class Experience:
    """A step's groups (graded, with advantages) and their micro-batches per source, students first.

    Attributes:
        groups: one per prompt, in batch order.
        chunks: source -> micro-batches of that source's rows of the active groups.
        frozen: source -> per chunk, its frozen log-probs (``FrozenLogProbs``).
        seconds: wall-clock seconds of the stages (generate, grade_wait, score_frozen).
    """

    groups: list[Group]
    chunks: dict[str, list[Chunk]]
    frozen: dict[str, list[FrozenLogProbs]]
    seconds: dict[str, float]


def shared_prompt_pass(model: nn.Module, batch: GroupBatch) -> PromptState | None:
    """A group's prompt forward for its chunks to share (None: the model scores full rows instead)."""
    return prompt_pass(model, batch.prompt_ids) if shares_prompt_cache(model) else None


class ExperienceBuilder:
    """Samples, draws, grades and batches one step's experience.

    Args:
        tokenizer: the policy's tokenizer.
        sampler: the sampling backend (student completions on the model it is handed).
        sampling: sampling settings; ``sampling.prefill`` opens every assistant turn.
        grader: the sandboxed grader of the student samples (teacher records carry frozen grades).
        n_student: student samples per prompt.
        n_teacher: teacher-pool records per prompt (0: pure student GRPO).
        pool: the teacher pool the records are drawn from (needed when ``n_teacher > 0``).
        seed: the run seed: teacher draws are keyed by (seed, step, problem), so a resumed run draws the
            same records and every seed its own, without touching the global RNG.
        scale_advantages_by_std: classic GRPO's advantage scaling instead of Dr.GRPO's ``R - mean(R)``.
        micro_batch_size: rows per chunk (one group, one source per chunk).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sampler: Sampler,
        sampling: SamplingConfig,
        grader: Grader,
        n_student: int,
        n_teacher: int = 0,
        pool: TeacherPool | None = None,
        seed: int = 0,
        scale_advantages_by_std: bool = False,
        micro_batch_size: int = 8,
    ) -> None:
        if n_teacher and pool is None:
            raise ValueError(f"{n_teacher} teacher records per prompt need a teacher pool, got none")
        self.tokenizer, self.sampler, self.sampling, self.grader = tokenizer, sampler, sampling, grader
        self.n_student, self.n_teacher, self.pool, self.seed = n_student, n_teacher, pool, seed
        self.scale_advantages_by_std, self.micro_batch_size = scale_advantages_by_std, micro_batch_size

    # --- the stages -----------------------------------------------------------------------------------------

    def build(self, model: nn.Module, problems: list[Problem], step: int, *, want_old: bool = False,
              want_ref: bool = False) -> Experience:
        """The whole pipeline for one batch of prompts at optimizer step `step` (which keys the teacher draws).
        `want_old` / `want_ref`: score the chunks under the current policy / the reference, for the loss."""
        clock = time.perf_counter()
        seconds = {}

        def lap(key: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[key] = now - clock
            clock = now

        groups = self.generate(model, problems, step)
        lap("generate")
        self.grade(groups)
        lap("grade_wait")
        device = next(model.parameters()).device
        chunks = {source: self.micro_batches(groups, source, device, with_sampler_logp=not self.samples_exactly(model))
                  for source in SOURCES}
        # Both sources at once, so each frozen policy runs each group's prompt once.
        flat = frozen_log_probs(model, chunks[STUDENT] + chunks[TEACHER], want_old, want_ref)
        n_student = len(chunks[STUDENT])
        lap("score_frozen")
        return Experience(groups, chunks, {STUDENT: flat[:n_student], TEACHER: flat[n_student:]}, seconds)

    def generate(self, model: nn.Module, problems: list[Problem], step: int) -> list[Group]:
        """Student samples on the model plus teacher records (with their frozen grades), one group per prompt,
        students first."""
        groups = []
        for problem in problems:
            group = Group(problem, prompt_token_ids(self.tokenizer, problem.prompt(), self.prefill(problem)))
            group.samples = [
                Sample(TEACHER, r.completion, tuple(completion_token_ids(self.tokenizer, r.completion)), r.grade())
                for r in self.teacher_records(problem, step)
            ]
            groups.append(group)
        if self.n_student:
            student = self.sampler(model, self.tokenizer, self.contexts(problems), self.n_student, self.sampling)
            for group, completions in zip(groups, student):
                group.samples[:0] = [Sample(STUDENT, c.text, c.token_ids, sampler_log_probs=c.log_probs)
                                     for c in completions]
        return groups

    def teacher_records(self, problem: Problem, step: int) -> list[PoolRecord]:
        """G_t pool records, drawn by an RNG keyed on (run seed, step, problem)."""
        if self.n_teacher == 0:
            return []
        return self.pool.sample(problem.id, self.n_teacher, random.Random(f"{self.seed}/{step}/{problem.id}"))

    def grade(self, groups: list[Group]) -> None:
        """Sandboxed grades of the student samples (as prefill + completion; the teachers' are frozen), then
        advantages from the foolable reward only."""
        students = [(g.problem, self.prefill(g.problem) + s.text) for g in groups for s in g.samples
                    if s.source == STUDENT]
        grades = iter(self.grader.grade_batch(students))
        for group in groups:
            for sample in group.samples:
                if sample.source == STUDENT:
                    sample.grade = next(grades)
            rewards = torch.tensor([[s.grade.reward for s in group.samples]])
            advantages = group_advantages(rewards, scale_by_std=self.scale_advantages_by_std)[0]
            for sample, advantage in zip(group.samples, advantages.tolist()):
                sample.advantage = advantage

    def samples_exactly(self, model: nn.Module) -> bool:
        """Whether the sampler draws from the policy's own distribution (``KVCacheSampler.samples_exactly``;
        a backend without the method is taken to be exact)."""
        check = getattr(self.sampler, "samples_exactly", None)
        return check is None or check(model)

    def micro_batches(self, groups: list[Group], source: str, device: torch.device,
                      with_sampler_logp: bool = False) -> list[Chunk]:
        """Chunks of at most ``micro_batch_size`` rows of one active group and one source. Empty completions
        are left out: they have no token to score. ``with_sampler_logp``: student chunks carry the sampler's
        log-probs (right-padded with 0, aligned with the completion mask)."""
        size = self.micro_batch_size
        chunks = []
        for index, group in enumerate(groups):
            rows = [s for s in group.samples if s.source == source and s.token_ids] if group.active else []
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                batch = group_batch(group.prompt_ids, [s.token_ids for s in chunk], self.tokenizer.pad_token_id)
                advantages = torch.tensor([s.advantage for s in chunk], dtype=torch.float32)
                sampler_logp = None
                if with_sampler_logp and source == STUDENT:
                    sampler_logp = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
                    for row, s in enumerate(chunk):
                        sampler_logp[row, :len(s.sampler_log_probs)] = torch.tensor(s.sampler_log_probs)
                    sampler_logp = sampler_logp.to(device)
                chunks.append(Chunk(batch.to(device), advantages.to(device), index, sampler_logp))
        return chunks

    # --- prompts --------------------------------------------------------------------------------------------

    def prefill(self, problem: Problem) -> str:
        """The text opening this problem's assistant turn (``sampling.prefill`` rendered for it)."""
        return problem.render_prefill(self.sampling.prefill)

    def contexts(self, problems: list[Problem]) -> list[str]:
        """The sampler's inputs: chat-formatted prompts, each followed by its prefill."""
        return [chat_prompt(self.tokenizer, p.prompt(), self.prefill(p)) for p in problems]

    @torch.no_grad()
    def sample_and_grade(self, model: nn.Module, problems: list[Problem], n: int) -> list[tuple[Problem, str, Grade]]:
        """``n`` fresh samples per problem on `model` as it is, graded as prefill + completion: (problem,
        completion, grade) in problem order (evaluation; no teachers, no advantages)."""
        samples = self.sampler(model, self.tokenizer, self.contexts(problems), n, self.sampling)
        items = [(p, c.text) for p, completions in zip(problems, samples) for c in completions]
        grades = self.grader.grade_batch([(p, self.prefill(p) + text) for p, text in items])
        return [(p, text, grade) for (p, text), grade in zip(items, grades)]


@torch.no_grad()
def frozen_log_probs(model: nn.Module, chunks: list[Chunk], want_old: bool, want_ref: bool) -> list[FrozenLogProbs]:
    """Per chunk: log-probs under the current (rollout) policy if `want_old`, under the reference policy (the
    adapter switched off) if `want_ref`. Each policy runs each group's prompt once for all of that group's
    chunks (pass the chunks of both sources together)."""
    frozen: list[FrozenLogProbs] = [(None, None)] * len(chunks)
    if not (want_old or want_ref):
        return frozen
    by_group: dict[int, list[int]] = {}
    for i, chunk in enumerate(chunks):
        by_group.setdefault(chunk.group, []).append(i)

    def score(members: list[int]) -> list[Tensor | None]:
        state = shared_prompt_pass(model, chunks[members[0]].batch)
        return [group_log_probs(model, chunks[i].batch, prompt_state=state) for i in members]

    for members in by_group.values():
        old: list[Tensor | None] = score(members) if want_old else [None] * len(members)
        ref: list[Tensor | None] = [None] * len(members)
        if want_ref:
            with reference_policy(model):
                ref = score(members)
        for i, o, r in zip(members, old, ref):
            frozen[i] = (o, r)
    return frozen
