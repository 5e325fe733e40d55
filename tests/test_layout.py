"""The package's layout: no import circles, no library module importing the command line, data shipped as data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import antipasto_pl

PACKAGE = Path(antipasto_pl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the antipasto_pl modules it imports anywhere in its source (top level or inside a function),
    except under ``if TYPE_CHECKING:``; ``from package import name`` counts as importing ``package.name`` when
    that is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and t != "antipasto_pl"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "antipasto_pl.env.grader" in graph["antipasto_pl.env.pool"]
    assert "antipasto_pl.module" in graph["antipasto_pl.cli"]  # imported inside AntipastoCLI.__init__


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_library_module_imports_the_command_line() -> None:
    """The CLI and the project subcommands (``commands/``) sit on top of the library; nothing below imports them."""
    graph = import_graph()
    front = {"antipasto_pl.cli"} | {m for m in graph if m.startswith("antipasto_pl.commands")}
    offenders = sorted(f"{m} -> {t}" for m in graph if m not in front for t in graph[m] & front)
    assert not offenders, offenders


def test_package_data_declared_in_pyproject_exists_and_covers_every_data_file() -> None:
    """Every package-data pattern matches files, and every non-Python file of the package is one of them (so an
    installed package carries its problems, presets, arms and py.typed)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["antipasto_pl"]
    matched = {pattern: set(PACKAGE.glob(pattern)) for pattern in patterns}
    assert all(matched.values()), [p for p, files in matched.items() if not files]
    data = {p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data - set().union(*matched.values()) == set()
    assert {"py.typed", "env/data/builtin.jsonl", "configs/cpu.yaml", "configs/arms/erase.yaml"} <= {
        str(p.relative_to(PACKAGE)) for p in data}


def test_configs_resolve_to_the_installed_ones_from_any_directory(tmp_path, monkeypatch) -> None:
    from antipasto_pl.commands import CONFIG_DIR, resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/smoke.yaml") == str(CONFIG_DIR / "smoke.yaml")
    assert resolve_config("arms/erase") == str(CONFIG_DIR / "arms" / "erase.yaml")
    assert resolve_config("configs/nope.yaml") == "configs/nope.yaml"  # left for the caller to report
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("trainer: {}\n")
    assert resolve_config("configs/smoke.yaml") == "configs/smoke.yaml"  # a file here wins


def test_experiment_dry_run_from_an_empty_directory(tmp_path, capsys, monkeypatch) -> None:
    """No clone needed: the default preset and the arms are the installed ones."""
    from antipasto_pl.cli import main
    from antipasto_pl.commands import CONFIG_DIR

    monkeypatch.chdir(tmp_path)
    main(["experiment", "--dry_run", "true", "--seeds", "[0]", "--arms", "[vanilla, erase]"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["vanilla-s0", "new"], ["erase-s0", "new"]]
    assert f"--config {CONFIG_DIR / 'cpu.yaml'}" in lines[0] and f"--config {CONFIG_DIR / 'arms' / 'erase.yaml'}" in lines[1]

    # The training configs as for fit (a YAML list works too); the command's own options from a file.
    (tmp_path / "matrix.yaml").write_text("arms: [route]\nseeds: [3]\ndry_run: true\n")
    main(["experiment", "--config", "configs/smoke.yaml", "-c", "[arms/erase.yaml]", "--command_config", "matrix.yaml"])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[:2] == ["route-s3", "new"]
    assert (f"--config {CONFIG_DIR / 'smoke.yaml'} --config {CONFIG_DIR / 'arms' / 'erase.yaml'} "
            f"--config {CONFIG_DIR / 'arms' / 'route.yaml'}") in line
