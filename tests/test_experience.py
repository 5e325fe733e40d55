"""The experience builder on its own (no Trainer): a tiny real model, the real sandboxed grader, a real pool."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_policy

from antipasto_pl.adapter import adapter_modules, reference_policy
from antipasto_pl.env.grader import Grader
from antipasto_pl.env.pool import TeacherPool, build_pool
from antipasto_pl.env.problems import builtin_problems
from antipasto_pl.experience import STUDENT, TEACHER, ExperienceBuilder
from antipasto_pl.rollout import KVCacheSampler, SamplingConfig
from antipasto_pl.sequences import group_log_probs

SKELETON = "```python\n{skeleton}"
SAMPLING = SamplingConfig(max_new_tokens=8, prefill=SKELETON)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Two problems of two modes, a pool of 4 graded records per prompt, a tiny policy off its zero point (so the
    reference policy differs from it), and a grader."""
    problems = [p for p in builtin_problems() if p.mode in ("sentinel", "file_marker")][:2]
    directory = tmp_path_factory.mktemp("pool")
    build_pool(problems, directory, per_prompt=4, prefill=SKELETON)
    pool = TeacherPool.load(directory, problems, prefill=SKELETON)
    model, tokenizer = tiny_policy()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.delta_s.copy_(0.05 * torch.randn(adapter.delta_s.shape, generator=generator))
    with Grader() as grader:
        yield problems, pool, model, tokenizer, grader


def builder(setting, n_student: int, n_teacher: int, **kwargs) -> ExperienceBuilder:
    problems, pool, model, tokenizer, grader = setting
    return ExperienceBuilder(tokenizer, KVCacheSampler(), SAMPLING, grader, n_student, n_teacher, pool, **kwargs)


def test_experience_from_prompts_to_chunks(setting) -> None:
    problems, pool, model, tokenizer, grader = setting
    build = builder(setting, n_student=3, n_teacher=2, seed=7, micro_batch_size=2)
    torch.manual_seed(0)
    experience = build.build(model, problems, step=5, want_old=True, want_ref=True)

    assert [g.problem.id for g in experience.groups] == [p.id for p in problems]
    for group in experience.groups:
        assert [s.source for s in group.samples] == [STUDENT] * 3 + [TEACHER] * 2
        # Teacher records: drawn by (seed, step, problem), with their frozen grades.
        drawn = pool.sample(group.problem.id, 2, random.Random(f"7/5/{group.problem.id}"))
        teachers = group.samples[3:]
        assert [s.text for s in teachers] == [r.completion for r in drawn]
        assert [s.grade for s in teachers] == [r.grade() for r in drawn]
        # Students: graded as prefill + completion by the sandbox.
        students = group.samples[:3]
        regraded = grader.grade_batch([(group.problem, build.prefill(group.problem) + s.text) for s in students])
        assert [s.grade for s in students] == regraded
        # Dr.GRPO advantages from the foolable reward.
        rewards = torch.tensor([s.grade.reward for s in group.samples])
        torch.testing.assert_close(torch.tensor([s.advantage for s in group.samples]), rewards - rewards.mean())

    for source, size in ((STUDENT, 3), (TEACHER, 2)):
        rows = [(i, s) for i, g in enumerate(experience.groups) if g.active for s in g.samples
                if s.source == source and s.token_ids]
        chunks = experience.chunks[source]
        assert sum(len(c.advantages) for c in chunks) == len(rows)
        assert all(len(c.advantages) <= 2 for c in chunks)
        flat = [(c.group, ids[: int(mask.sum())], a) for c in chunks
                for ids, mask, a in zip(c.batch.completion_ids.tolist(), c.batch.completion_mask, c.advantages.tolist())]
        assert flat == [(i, list(s.token_ids), pytest.approx(s.advantage)) for i, s in rows]
        # The frozen log-probs: the policy as it sampled (the PPO ratio's denominator) and the reference.
        assert len(experience.frozen[source]) == len(chunks)
        for chunk, (old, ref) in zip(chunks, experience.frozen[source]):
            with torch.no_grad():
                torch.testing.assert_close(old, group_log_probs(model, chunk.batch))
                with reference_policy(model):
                    torch.testing.assert_close(ref, group_log_probs(model, chunk.batch))
            assert not torch.allclose(old, ref)
    assert any(g.active for g in experience.groups)
    assert set(experience.seconds) == {"generate", "grade_wait", "score_frozen"}


def test_same_seed_same_experience_and_teacher_draws_leave_the_sampling_stream_alone(setting) -> None:
    problems, pool, model, _, _ = setting

    def texts(experience):
        return [[(s.source, s.text, s.advantage) for s in g.samples] for g in experience.groups]

    mixed = builder(setting, n_student=2, n_teacher=1)
    torch.manual_seed(3)
    first = mixed.build(model, problems, step=0)
    torch.manual_seed(3)
    assert texts(mixed.build(model, problems, step=0)) == texts(first)
    assert first.frozen[STUDENT] and all(f == (None, None) for f in first.frozen[STUDENT])  # nothing asked for

    teachers_only = builder(setting, n_student=0, n_teacher=1)
    state = torch.get_rng_state()
    draws = {tuple(g.samples[0].text for g in teachers_only.build(model, problems, step).groups) for step in range(6)}
    assert torch.equal(torch.get_rng_state(), state)
    assert len(draws) > 1  # each step its own draw


def test_teachers_need_a_pool(setting) -> None:
    _, _, _, tokenizer, grader = setting
    with pytest.raises(ValueError, match="2 teacher records per prompt need a teacher pool"):
        ExperienceBuilder(tokenizer, KVCacheSampler(), SAMPLING, grader, n_student=2, n_teacher=2)
