"""Issue 16: bad input as a new user gives it -- non-zero exit, one message line naming the thing, the
file and what was expected, a hint line, and no traceback (unless --debug / ANTIPASTO_DEBUG=1)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from antipasto_pl.cli import DEBUG_HINT, main
from antipasto_pl.env.problems import builtin_problems, load_problems, problem_to_dict

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the console script in-process; the message it exits with (stderr must hold no traceback)."""
    monkeypatch.setattr(sys, "argv", ["antipasto", *args])
    monkeypatch.delenv("ANTIPASTO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    message = exit_info.value.code
    assert isinstance(message, str), f"exit status {message!r}, expected an error message"  # str: status 1
    assert "Traceback" not in capsys.readouterr().err
    lines = message.splitlines()
    assert len(lines) == 2 and lines[1] == DEBUG_HINT, message
    return lines[0]


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", SMOKE, f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=1", *extra]


def test_empty_and_corrupt_configs_name_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    empty, corrupt = tmp_path / "empty.yaml", tmp_path / "corrupt.yaml"
    empty.write_text("")
    corrupt.write_text("model:\n  policy: [tiny-llama\n")
    message = cli_error(monkeypatch, capsys, "fit", "--config", str(empty))
    assert f"config file {empty} is empty" in message and "YAML mapping" in message
    message = cli_error(monkeypatch, capsys, "fit", f"--config={corrupt}")
    assert f"config file {corrupt} is not valid YAML at line 3" in message
    message = cli_error(monkeypatch, capsys, "fit", "--config", str(tmp_path / "missing.yaml"))
    assert f"config file {tmp_path / 'missing.yaml'} does not exist" in message


def test_a_model_path_that_does_not_exist(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = str(tmp_path / "no-such-model")
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, f"--model.policy.name={missing}"))
    assert f"model.policy.name: {missing!r} is not an existing model directory" in message
    assert "Hugging Face repo id" in message


def test_bad_jsonl_row_and_missing_problem_file(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(problem_to_dict(builtin_problems()[0])) + "\n{not json\n")
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, f"--data.problems={bad}"))
    assert f"{bad} line 2: invalid JSON" in message
    missing = tmp_path / "missing.jsonl"
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, f"--data.problems={missing}"))
    assert f"problem source {str(missing)!r} is neither" in message


def test_truncated_and_missing_checkpoints(tmp_path: Path, monkeypatch, capsys) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not a whole archive")
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, f"--ckpt_path={truncated}"))
    assert f"checkpoint {truncated} is corrupt or truncated" in message
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, f"--ckpt_path={tmp_path / 'missing.ckpt'}"))
    assert f"checkpoint {tmp_path / 'missing.ckpt'} does not exist" in message


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.setattr(sys, "argv", ["antipasto", "fit", "--config", str(empty), "--debug"])
    with pytest.raises(ValueError, match="is empty"):
        main()
    monkeypatch.setattr(sys, "argv", ["antipasto", "fit", "--config", str(empty)])
    monkeypatch.setenv("ANTIPASTO_DEBUG", "1")
    with pytest.raises(ValueError, match="is empty"):
        main()


def test_jsonl_problems_whose_canonical_fails_are_skipped_by_name(tmp_path: Path, caplog) -> None:
    good, broken = builtin_problems()[:2]
    rows = [problem_to_dict(good), {**problem_to_dict(broken), "canonical_solution": "class Solution:\n    pass\n"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING):
        loaded = load_problems(str(path))
    assert [p.id for p in loaded] == [good.id]
    assert str(path) in caplog.text and broken.id in caplog.text and "canonical_solution" in caplog.text
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: the canonical_solution of every problem fails its own tests \({broken.id}\)"):
        load_problems(str(path))


def test_bad_sampler_settings_are_refused_by_name(tmp_path: Path, monkeypatch, capsys) -> None:
    message = cli_error(monkeypatch, capsys, *fit_args(tmp_path, "--model.importance_sampling_cap=0"))
    assert "importance_sampling_cap must be > 0, got 0" in message
    # An unknown sampler precision is a parse error (exit 2), named by the parser with the accepted values.
    monkeypatch.setattr(sys, "argv", ["antipasto", *fit_args(tmp_path, "--model.sampler=antipasto_pl.rollout.KVCacheSampler",
                                                             "--model.sampler.weights=int8")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert 'Parser key "weights"' in err and "Expected a typing.Literal['policy', 'bfloat16']. Got value: int8" in err
