"""`antipasto`: LightningCLI for fit/validate/test/predict, plus project subcommands.

Project subcommands (``antipasto build-pool ...``, in ``antipasto_pl.commands``) are plain typed functions whose
signatures and docstrings jsonargparse turns into CLIs; they are registered in ``EXTRA_COMMANDS`` as
"module:function" and imported only when called. Those that take a training config take it as ``fit`` does
(``--config A --config B``); their own options may come from a YAML file given to ``--command_config``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from antipasto_pl.storage import CACHE_ENV

EXTRA_COMMANDS: dict[str, str] = {
    "build-pool": "antipasto_pl.commands.build_pool:build_pool_command",
    "extract-vhack": "antipasto_pl.commands.extract_vhack:extract_vhack_command",
    "export": "antipasto_pl.commands.export:export_command",
    "experiment": "antipasto_pl.commands.experiment:experiment_command",
    "report": "antipasto_pl.commands.report:report_command",
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
        parser.add_argument("--cache_dir", type=Optional[str], default=None,
                            help="root of the on-disk cache: converted models, SVD factors, hack subspaces, teacher "
                                 f"pools (default: ${CACHE_ENV}, else ~/.cache/antipasto_pl)")
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
        """Refuse a sharding strategy before Lightning starts any process (or asks for a GPU, as FSDP does); set
        the cache root from ``cache_dir``."""
        from antipasto_pl.distributed import check_strategy

        config = self.config[self.subcommand] if self.subcommand else self.config
        check_strategy(config.get("trainer", {}).get("strategy", "auto"))
        if config.get("cache_dir"):  # the one cache root, for this process and the ranks it launches
            os.environ[CACHE_ENV] = str(config["cache_dir"])

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
        run_project_command(_load(EXTRA_COMMANDS[args[0]]), args[1:])
        return
    resolved, configs = _resolve_configs(args)
    for path in configs:
        check_config_file(path)
    # None: LightningCLI reads sys.argv itself, and does not warn about being given arguments
    cli = AntipastoCLI(args=None if resolved == sys.argv[1:] else resolved)
    from antipasto_pl.checkpointing import stop_signal

    signum = stop_signal(cli.trainer)
    if signum is not None:  # stopped early, checkpoint written: not a finished run (`antipasto experiment` resumes it)
        raise SystemExit(128 + signum)


def run_project_command(command: Callable, args: list[str]) -> Any:
    """Parse `args` against `command`'s signature and call it.

    A command with a ``config`` parameter takes the training YAML files like ``fit``: every ``--config A`` (or
    ``-c A``; a YAML list ``'[A, B]'`` also works) is gathered, in order, into that one list argument.
    ``--command_config FILE`` reads the command's own options from a YAML file.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"antipasto {command.__module__.rpartition('.')[2].replace('_', '-')}",
                            description=(command.__doc__ or "").split("\n\n")[0])
    parser.add_function_arguments(command, as_group=False, as_positional=False)
    parser.add_argument("--command_config", action=ActionConfigFile, help="a YAML file of this command's options")
    if "config" in inspect.signature(command).parameters:
        args, configs = _resolve_configs(args)
        for path in configs:
            check_config_file(path)
        args = [arg for arg in args if not arg.startswith("--config=")]
        if configs:
            args = [f"--config={json.dumps(configs)}", *args]
    options = parser.parse_args(args).as_dict()  # plain values: nothing to instantiate
    options.pop("command_config", None)
    return command(**options)


def _resolve_configs(args: list[str]) -> tuple[list[str], list[str]]:
    """`args` with every ``--config`` / ``-c`` value written ``--config=<file>``, one file each (a YAML list
    ``'[A, B]'`` becomes two), in place, and each file resolved by ``commands.resolve_config`` (an installed
    preset or arm when there is no such file here); and the files in order. jsonargparse's own errors for a
    missing config file name no file, so the caller checks them first."""
    from antipasto_pl.commands import resolve_config

    resolved: list[str] = []
    paths: list[str] = []
    i = 0
    while i < len(args):
        arg, value = args[i], None
        if arg.startswith("--config="):
            value = arg.partition("=")[2]
        elif arg in ("--config", "-c") and i + 1 < len(args):
            value, i = args[i + 1], i + 1
        else:
            resolved.append(arg)
        if value is not None:
            listed = yaml.safe_load(value) if value.lstrip().startswith("[") else None
            files = [resolve_config(str(p)) for p in (listed if isinstance(listed, list) else [value])]
            paths += files
            resolved += [f"--config={path}" for path in files]
        i += 1
    return resolved, paths


def load_training_config(configs: Sequence[str], overrides: Sequence[str] = ()) -> AntipastoCLI:
    """The module, data module and trainer of a training config (YAML files applied in order, then `overrides`
    such as ``["--data.use_pool", "false"]``), instantiated as ``antipasto fit`` would, without running anything."""
    return AntipastoCLI(args=[arg for path in configs for arg in ("--config", str(path))] + list(overrides), run=False)


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
