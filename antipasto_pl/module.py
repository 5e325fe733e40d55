"""The LightningModule that owns the SVD-wrapped policy.

The frozen base model is rebuilt from its config on every start (``configure_model``);
checkpoints carry only the adapter vectors (plus optimizer state and metadata that must
match the model they are loaded into).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from antipasto_pl.adapter import (
    AdapterConfig,
    adapter_metadata,
    adapter_modules,
    check_adapter_metadata,
    wrap_model,
)
from antipasto_pl.env.problem import Problem
from antipasto_pl.models import PolicyConfig, load_policy
from antipasto_pl.rollout import SamplingConfig, hf_generate
from antipasto_pl.sequences import completion_nll, encode_completions


class AntipastoModule(L.LightningModule):
    """SVD-adapter policy trained through LightningCLI.

    Args:
        policy: which causal LM to load (see ``PolicyConfig``).
        adapter: which Linear layers get SVD adapters (see ``AdapterConfig``).
        learning_rate: Adam learning rate for the adapter vectors.
        betas: Adam betas.
        weight_decay: decoupled weight decay on ``delta_s`` (``delta_s_hack`` always gets 0,
            so the quarantine is not pulled back into the policy).
        max_completion_tokens: completion tokens scored per sample.
        sampling: how ``predict`` samples completions (on merged weights).
        samples_per_prompt: completions sampled per prompt by ``predict``.
    """

    def __init__(
        self,
        policy: PolicyConfig | None = None,
        adapter: AdapterConfig | None = None,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        max_completion_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        samples_per_prompt: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy_config = policy or PolicyConfig()
        self.adapter_config = adapter or AdapterConfig()
        self.sampling = sampling or SamplingConfig()
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        # Base weights are rebuilt, not restored: checkpoints hold adapter keys only.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model, self.tokenizer = load_policy(self.policy_config)
        summary = wrap_model(model, self.adapter_config)
        self.model = model
        self.adapter_summary = summary

    def transfer_batch_to_device(self, batch: list[Problem], device: torch.device, dataloader_idx: int) -> list[Problem]:
        """Batches are problem records that stay on the host; tokens are made on the device later."""
        return batch

    def _canonical_nll(self, batch: list[Problem]) -> torch.Tensor:
        """Teacher-forced NLL of each problem's canonical solution, written as a fenced answer: (B,)."""
        prompts = [problem.prompt() for problem in batch]
        completions = [f"```python\n{problem.canonical_solution.rstrip()}\n```" for problem in batch]
        tokens = encode_completions(self.tokenizer, prompts, completions, self.hparams.max_completion_tokens)
        return completion_nll(self.model, tokens.to(self.device))

    def training_step(self, batch: list[Problem], batch_idx: int) -> torch.Tensor:
        loss = self._canonical_nll(batch).mean()
        self.log("train/nll", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[Problem], batch_idx: int) -> None:
        self.log("val/nll", self._canonical_nll(batch).mean(), prog_bar=True, batch_size=len(batch))

    def test_step(self, batch: list[Problem], batch_idx: int) -> None:
        self.log("test/nll", self._canonical_nll(batch).mean(), batch_size=len(batch))

    def predict_step(self, batch: list[Problem], batch_idx: int) -> list[dict[str, Any]]:
        prompts = [problem.prompt() for problem in batch]
        samples = hf_generate(self.model, self.tokenizer, prompts, self.hparams.samples_per_prompt, self.sampling)
        return [
            {"problem_id": problem.id, "mode": problem.mode, "completion": completion}
            for problem, completions in zip(batch, samples)
            for completion in completions
        ]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        adapters = adapter_modules(self.model).values()
        groups = [
            {"params": [a.delta_s for a in adapters], "weight_decay": self.hparams.weight_decay},
            {"params": [a.delta_s_hack for a in adapters], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["adapter_metadata"] = adapter_metadata(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "adapter_metadata" not in checkpoint:
            raise ValueError("checkpoint has no 'adapter_metadata'; expected one written by antipasto fit")
        check_adapter_metadata(self.model, checkpoint["adapter_metadata"], "checkpoint")
