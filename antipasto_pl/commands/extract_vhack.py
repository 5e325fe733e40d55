"""``antipasto extract-vhack``: extract the hack subspace V for a training config, as ``antipasto fit`` would."""

from __future__ import annotations

from pathlib import Path

from antipasto_pl.cli import load_training_config
from antipasto_pl.projection import HackProjection
from antipasto_pl.vhack import HackSubspace, LengthNorm, SubspaceKind


def format_summary(subspace: HackSubspace) -> str:
    """One line per module: name, rows kept, top singular value."""
    width = max((len(name) for name in subspace.modules), default=6)
    lines = [f"{'module':<{width}}  {'k':>3}  {'top_sv':>10}"]
    for name in subspace.modules:
        s = subspace.singular_values[name]
        lines.append(f"{name:<{width}}  {s.numel():>3}  {s.max().item():>10.4g}")
    return "\n".join(lines)


def extract_vhack_command(
    config: list[str],
    out: str | None = None,
    k: int | None = None,
    kind: SubspaceKind | None = None,
    tau_axis: float | None = None,
    length_norm: LengthNorm | None = None,
) -> Path:
    """Extract the hack subspace V for a training config, exactly as `antipasto fit` would, and save it.

    The policy, adapter, pairs and projection settings come from the same YAML files that
    `antipasto fit --config` takes (a preset and an arm overlay, say), so V matches the run it is meant
    for; the result lands in the extraction cache, where that run will find it.

    Args:
        config: training YAML files, applied in order, as for fit: `--config A --config B`.
        out: also write the subspace to this .safetensors path.
        k: override model.projection.k (rows kept per module).
        kind: override model.projection.subspace: real, or a control: random, shuffled, nonhack, stub.
        tau_axis: override model.projection.tau_axis.
        length_norm: override model.projection.length_norm (mean or sum).
    """
    overrides = ["--data.use_pool", "false"]  # pairs do not depend on the teacher pool: build none
    for name, value in (("k", k), ("subspace", kind), ("tau_axis", tau_axis), ("length_norm", length_norm)):
        if value is not None:
            overrides += [f"--model.projection.{name}", str(value)]
    cli = load_training_config(config, overrides)
    module, datamodule = cli.model, cli.datamodule
    module.configure_model()
    module.model.to(cli.trainer.strategy.root_device)
    datamodule.setup("fit")
    projection = HackProjection(module.projection_config)
    subspace = projection.extract(module, datamodule)
    path = projection.cache_file(module, datamodule)
    if out is not None:
        path = Path(out)
        subspace.save(path)
    print(format_summary(subspace))
    print(f"hack subspace ({subspace.metadata.get('kind')}, {len(subspace.modules)} modules): {path}")
    return path
