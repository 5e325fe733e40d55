"""`antipasto`: LightningCLI for fit/validate/test/predict, plus project subcommands.

Extra subcommands (``antipasto build-pool ...``) are plain typed functions whose
signatures and docstrings jsonargparse turns into CLIs; they are registered in
``EXTRA_COMMANDS`` as "module:function" and imported only when called.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

EXTRA_COMMANDS: dict[str, str] = {
    "build-pool": "antipasto_pl.env.pool:build_pool_command",
    "extract-vhack": "antipasto_pl.vhack:extract_vhack_command",
    "export": "antipasto_pl.export:export_command",
    "experiment": "antipasto_pl.experiment:experiment_command",
    "report": "antipasto_pl.report:report_command",
}

DESCRIPTION = (
    "antipasto_pl: GRPO on loophole coding graders through an SVD adapter, with hack-subspace "
    "gradient projection. Lightning subcommands: fit, validate, test, predict "
    "(e.g. `antipasto fit --config configs/smoke.yaml`). Project subcommands: {extra}."
)
# validate, test and predict rebuild the model from the config: without a checkpoint the adapter is at zero.
EVALUATE_HELP = (
    "{what} on the held-out problems. Without --ckpt_path this is the UNTRAINED policy (the adapter at zero); "
    "pass --ckpt_path last (or a checkpoint file) to use a trained run."
)
EVALUATE_COMMANDS = {"validate": "Validate", "test": "Test", "predict": "Sample and grade completions"}


# Intentional choices Lightning warns about on every run: the frozen policy stays in eval mode (no
# dropout, so sampling and scoring see the same network), and checkpoints are written after the step.
LIGHTNING_NOISE = ("Found .* module\\(s\\) in eval mode", "Using ModelCheckpoint with manual optimization",
                   "LightningCLI's args parameter")
for _message in LIGHTNING_NOISE:
    warnings.filterwarnings("ignore", message=_message)


def _load(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class AntipastoCLI(LightningCLI):
    """LightningCLI with the project's module and data module as defaults, and resumable runs.

    Checkpoints are written atomically (``AtomicCheckpointIO``) to ``<default_root_dir>/checkpoints``
    (a ``ModelCheckpoint`` without a ``dirpath`` would write into the run's versioned log directory,
    where ``--ckpt_path last`` of the next run, which gets a new version, never looks). A checkpoint
    named by ``--ckpt_path`` is checked for truncation before anything reads it.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        from antipasto_pl.data import AntipastoDataModule
        from antipasto_pl.module import AntipastoModule

        super().__init__(
            AntipastoModule,
            AntipastoDataModule,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": DESCRIPTION.format(extra=", ".join(EXTRA_COMMANDS)),
                **{name: {"description": EVALUATE_HELP.format(what=what)} for name, what in EVALUATE_COMMANDS.items()},
            },
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One prefill for the student's turns and the data's written ones (pool records, pairs).
        parser.link_arguments("model.sampling.prefill", "data.prefill")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        from antipasto_pl.checkpointing import check_checkpoint_file

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path:
            check_checkpoint_file(ckpt_path)  # before LightningCLI unpickles it for the hyperparameters

    def _warn_if_untrained(self) -> None:
        """An evaluation without ``--ckpt_path`` of a config whose run has checkpoints is almost always a mistake."""
        if self.config[self.subcommand].get("ckpt_path"):
            return
        directory = Path(self.trainer.default_root_dir) / "checkpoints"
        if found := sorted(p.name for p in directory.glob("*.ckpt")):
            warnings.warn(
                f"antipasto {self.subcommand} without --ckpt_path evaluates the untrained policy (the adapter at "
                f"zero), not the run in {directory} ({', '.join(found)}); pass --ckpt_path last to evaluate it",
                stacklevel=2,
            )

    before_validate = before_test = before_predict = _warn_if_untrained

    def before_instantiate_classes(self) -> None:
        """Refuse a sharding strategy before Lightning starts any process (or asks for a GPU, as FSDP does)."""
        from antipasto_pl.distributed import check_strategy

        config = self.config[self.subcommand] if self.subcommand else self.config
        check_strategy(config.get("trainer", {}).get("strategy", "auto"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from antipasto_pl.checkpointing import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        return trainer


# What a user's input can cause (a bad path, file, value or config); anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, yaml.YAMLError, MisconfigurationException)
DEBUG_HINT = "(run with --debug or ANTIPASTO_DEBUG=1 for the traceback)"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``antipasto`` console script.

    From the command line (`argv` None) a user error exits with status 1 and two lines -- the message,
    which names the thing, the file and what was expected, and how to see the traceback (``--debug``
    or ``ANTIPASTO_DEBUG=1``); called with `argv` (tests, notebooks) errors raise as usual.
    """
    if argv is not None:
        _main(list(argv))
        return
    args = sys.argv[1:]
    debug = "--debug" in args or os.environ.get("ANTIPASTO_DEBUG", "") not in ("", "0")
    try:
        _main([a for a in args if a != "--debug"])
    except USER_ERRORS as exc:
        if debug:
            raise
        sys.exit(f"antipasto: error: {' '.join(str(exc).split())}\n{DEBUG_HINT}")


def _main(args: list[str]) -> None:
    if args and args[0] in EXTRA_COMMANDS:
        from jsonargparse import auto_cli

        auto_cli(_load(EXTRA_COMMANDS[args[0]]), args=args[1:], as_positional=False)
        return
    for path in _config_paths(args):
        check_config_file(path)
    AntipastoCLI(args=None if args == sys.argv[1:] else args)  # None: LightningCLI reads sys.argv, and does not warn


def _config_paths(args: list[str]) -> list[str]:
    """The files given to ``--config`` / ``-c`` (jsonargparse's own errors for them name no file)."""
    paths = []
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
        elif arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
    return paths


def check_config_file(path: str) -> None:
    """Fail, naming the file, on a config that is missing, unreadable, not YAML, empty or not a mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} cannot be read ({exc.__class__.__name__}: {exc}); expected a YAML file") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if config is None:
        raise ValueError(f"config file {path} is empty; expected a YAML mapping of options (model:, data:, trainer:, ...)")
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} holds a {type(config).__name__}; expected a YAML mapping of options (model:, data:, trainer:, ...)")


if __name__ == "__main__":
    main()
