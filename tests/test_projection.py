"""The HackProjection callback and the module's gradient split, on a real tiny model and optimizer."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from antipasto_pl.adapter import adapter_modules
from antipasto_pl.data import AntipastoDataModule
from antipasto_pl.experience import STUDENT, TEACHER
from antipasto_pl.grpo import grpo_loss
from antipasto_pl.models import PolicyConfig
from antipasto_pl.module import AntipastoModule
from antipasto_pl.projection import HackProjection, ProjectionConfig
from antipasto_pl.projection_math import hack_cosine, project_gradient
from antipasto_pl.rollout import SamplingConfig
from antipasto_pl.sequences import batch_from_ids, completion_log_probs
from antipasto_pl.vhack import HackSubspace
from antipasto_pl.vhack_math import random_basis


def tiny_module(**kwargs) -> AntipastoModule:
    module = AntipastoModule(policy=PolicyConfig(name="tiny-llama"), **kwargs)
    module.configure_model()
    return module


def random_subspace(module: AntipastoModule, k: int = 3) -> HackSubspace:
    adapters = adapter_modules(module.model)
    gen = torch.Generator().manual_seed(0)
    v = {name: random_basis(k, a.rank, gen) for name, a in adapters.items()}
    return HackSubspace(v, {n: torch.ones(k) for n in v}, {n: a.weight_hash for n, a in adapters.items()})


def set_random_grads(module: AntipastoModule) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    grads = {}
    for name, a in adapter_modules(module.model).items():
        a.delta_s.grad = torch.randn(a.rank, generator=gen)
        grads[name] = a.delta_s.grad.clone()
    return grads


def projected(intervention: str, **config):
    module = tiny_module()
    callback = HackProjection(ProjectionConfig(intervention=intervention, **config))
    subspace = random_subspace(module)
    callback.set_subspace(subspace, module)
    optimizer = module.configure_optimizers()
    grads = set_random_grads(module)
    callback.on_before_optimizer_step(None, module, optimizer)
    return module, callback, subspace, optimizer, grads


def test_none_measures_only() -> None:
    module, _, _, _, grads = projected("none")
    for name, a in adapter_modules(module.model).items():
        assert torch.equal(a.delta_s.grad, grads[name]) and a.delta_s_hack.grad is None


def test_erase_writes_the_projected_gradient() -> None:
    module, _, subspace, _, grads = projected("erase")
    for name, a in adapter_modules(module.model).items():
        v = subspace.v_hack[name]
        torch.testing.assert_close(a.delta_s.grad, project_gradient(grads[name], v).g_projected)
        assert hack_cosine(a.delta_s.grad, v) < 1e-6  # cout = 0 under the one-sided gate
        assert a.delta_s_hack.grad is None


@pytest.mark.parametrize("intervention", ["route", "erase"])
def test_route_moves_the_quarantine_only_along_v(intervention: str) -> None:
    module, callback, subspace, optimizer, grads = projected(intervention)
    hook = optimizer.register_step_post_hook(lambda *args: callback._after_step(module))
    before = {n: a.delta_s_hack.detach().clone() for n, a in adapter_modules(module.model).items()}
    optimizer.step()
    hook.remove()
    moved = False
    for name, a in adapter_modules(module.model).items():
        v = subspace.v_hack[name]
        move = a.delta_s_hack.detach() - before[name]
        if intervention == "erase":
            assert torch.equal(move, torch.zeros_like(move))
            continue
        removed = project_gradient(grads[name], v).removed
        torch.testing.assert_close(a.delta_s_hack.grad, removed)
        torch.testing.assert_close(move - (move @ v.T) @ v, torch.zeros_like(move), atol=1e-6, rtol=0)
        moved |= bool(move.abs().sum() > 0)
    assert moved or intervention == "erase"


def test_project_moments_removes_hackward_momentum() -> None:
    module, callback, subspace, optimizer, _ = projected("erase", project_moments=True)
    optimizer.step()  # creates Adam's first moment from the projected gradient
    adapters = adapter_modules(module.model)
    for a in adapters.values():  # a hack-ward gradient now would leak through momentum
        a.delta_s.grad = torch.ones(a.rank)
    for name, a in adapters.items():
        optimizer.state[a.delta_s]["exp_avg"].copy_(subspace.v_hack[name].sum(0))
    callback.on_before_optimizer_step(None, module, optimizer)
    for name, a in adapters.items():
        coeffs = subspace.v_hack[name] @ optimizer.state[a.delta_s]["exp_avg"]
        assert (coeffs <= 1e-6).all()


class SplitCheck(L.Callback):
    """Runs before the projection: compares the module's gradient (shared-prompt chunks, one backward) and its
    student/teacher split with full prompt + completion rows, one backward over all rows and one per source."""

    def __init__(self) -> None:
        self.checked = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, module: AntipastoModule, optimizer) -> None:
        adapters = adapter_modules(module.model)
        params = [a.delta_s for a in adapters.values()]
        parts = module.grad_parts
        rows = [(g.prompt_ids, s) for g in module.last_groups if g.active for s in g.samples]
        assert {s.source for _, s in rows} == {STUDENT, TEACHER}

        def full_row_grad(sources: set[str]) -> tuple[torch.Tensor, ...]:
            chosen = [(p, s) for p, s in rows if s.source in sources]
            batch = batch_from_ids([p for p, _ in chosen], [s.token_ids for _, s in chosen], module.tokenizer.pad_token_id)
            advantages = torch.tensor([s.advantage for _, s in chosen])
            with torch.enable_grad():
                logp = completion_log_probs(module.model, batch)
                loss = grpo_loss(logp, advantages, batch.completion_mask[:, 1:], mode="dr_grpo",
                                 denom=module._denominator(len(module.last_groups))).loss
                return torch.autograd.grad(loss, params)

        full, student, teacher = full_row_grad({STUDENT, TEACHER}), full_row_grad({STUDENT}), full_row_grad({TEACHER})
        for i, (name, a) in enumerate(adapters.items()):
            torch.testing.assert_close(parts.student[name] + parts.teacher[name], a.delta_s.grad, atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(a.delta_s.grad, full[i], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(parts.student[name], student[i], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(parts.teacher[name], teacher[i], atol=1e-6, rtol=1e-4)
            assert a.delta_s_hack.grad is None
        assert any(parts.teacher[n].abs().sum() > 0 and parts.student[n].abs().sum() > 0 for n in adapters)
        self.checked += 1


@pytest.mark.parametrize(("learning_rate", "ppo_epochs", "beta"), [(0.0, 1, 0.0), (1e-2, 1, 0.0), (0.0, 2, 0.1)])
def test_student_and_teacher_gradients_sum_to_the_full_gradient(tmp_path, learning_rate, ppo_epochs, beta) -> None:
    """Checked at every optimizer step: with moving weights, a prompt pass (or its retained graph) leaking from one
    step into the next would show; with two PPO epochs and a KL term at lr 0 (rollout policy = policy = reference, so
    the ratio is 1 and the KL gradient 0), frozen log-probs handed to the wrong chunk would."""
    module = AntipastoModule(policy=PolicyConfig(name="tiny-llama"), sampling=SamplingConfig(max_new_tokens=8),
                             max_completion_tokens=640, group_size=4, mix_ratio=0.5, micro_batch_size=3, log_completions_every=0,
                             projection=ProjectionConfig(k=1), learning_rate=learning_rate, ppo_epochs=ppo_epochs,
                             beta=beta)
    data = AntipastoDataModule(prompts_per_step=2, pool_per_prompt=2, pair_problems=1, variants_per_mode=1,
                               modes=["sentinel", "file_marker"])
    check = SplitCheck()
    trainer = L.Trainer(max_steps=3 * ppo_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[check], default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert check.checked == trainer.global_step == 3 * ppo_epochs
