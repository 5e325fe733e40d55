"""``antipasto export``: a trained run's deployable artefacts.

Writes the adapter alone (``adapter.safetensors``, loadable with ``load_adapter`` onto the same base
model) and the deployment view as a plain Hugging Face model directory: every wrapped weight becomes
``W + U diag(delta_s) Vh`` with the quarantine ``delta_s_hack`` dropped, so the result loads with
``AutoModelForCausalLM.from_pretrained`` and needs nothing from this package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import instantiate_module

from antipasto_pl.adapter import adapter_modules, merged_state_dict, quarantine_ablated, save_adapter
from antipasto_pl.checkpointing import AtomicCheckpointIO
from antipasto_pl.module import AntipastoModule

ADAPTER_FILE = "adapter.safetensors"
MERGED_DIR = "merged"


def load_trained_module(ckpt_path: str | Path) -> AntipastoModule:
    """The checkpoint's policy: the module rebuilt from the hyperparameters it records, its adapter loaded
    (after checking it fits the rebuilt base model)."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters")
    if not hparams:
        raise ValueError(f"checkpoint {ckpt_path} records no hyperparameters; expected one written by antipasto fit")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    for section in ("policy", "adapter", "projection"):  # cache roots were per-component settings before `cache_dir`
        if isinstance(hparams.get(section), dict):
            hparams[section] = {k: v for k, v in hparams[section].items() if k != "cache_dir"}
    module = instantiate_module(AntipastoModule, hparams)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # names the module / rank / base weight that does not match
    state = checkpoint["state_dict"]
    with torch.no_grad():
        for name, adapter in adapter_modules(module.model).items():
            for vector in ("delta_s", "delta_s_hack"):
                key = f"model.{name}.svd_adapter.{vector}"
                if key not in state:
                    raise ValueError(f"checkpoint {ckpt_path} has no {key!r}; expected one written by antipasto fit")
                getattr(adapter, vector).copy_(state[key])
    return module


def export_command(ckpt_path: str, out_dir: str) -> Path:
    """Export a checkpoint's adapter and its deployment view (quarantine ablated, adapter merged).

    The policy, adapter and arm are rebuilt from the hyperparameters the checkpoint records: no training config
    is needed.

    Args:
        ckpt_path: checkpoint written by `antipasto fit` (e.g. runs/cpu/checkpoints/last.ckpt).
        out_dir: output directory: `adapter.safetensors` and `merged/` (model + tokenizer).
    """
    module = load_trained_module(ckpt_path)
    model, out = module.model, Path(out_dir)
    save_adapter(model, out / ADAPTER_FILE)
    with quarantine_ablated(model):
        model.save_pretrained(out / MERGED_DIR, state_dict=merged_state_dict(model))
    module.tokenizer.save_pretrained(out / MERGED_DIR)
    print(f"adapter: {out / ADAPTER_FILE}\nmerged model (quarantine ablated): {out / MERGED_DIR}")
    return out
