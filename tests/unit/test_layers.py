"""Layers import downwards only: jobs -> pipelines -> models -> config -> errors.

The CLI (jobs/) drives the Ray runtimes (pipelines/), which call the task modules (models/), which read
the config schema (config/), which raises the one user error (errors.py). A module may import its own
layer and any layer below it, never one above: checked on the source with `ast`, imports inside
functions included, so no import has to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["errors", "config", "models", "pipelines", "jobs"]  # bottom to top
RANK = {name: i for i, name in enumerate(LAYERS)}


def layer_of(path: Path, root: Path) -> str:
    """`jobs` for jobs/cli.py, `errors` for errors.py."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(root: Path) -> list[str]:
    """`file:line: <layer> imports <higher layer>` for every import against the direction."""
    wrong = []
    for layer in LAYERS:
        files = [root / "errors.py"] if layer == "errors" else sorted((root / layer).rglob("*.py"))
        for file in files:
            if not file.is_file():
                continue
            for line, name in imported(ast.parse(file.read_text(), str(file))):
                if name in RANK and RANK[name] > RANK[layer]:
                    wrong.append(f"{file.relative_to(root)}:{line}: {layer} imports {name}")
    return wrong


def test_every_layer_imports_only_itself_and_the_layers_below():
    assert upward_imports(REPO) == []


def test_every_source_module_belongs_to_a_layer():
    """A new top-level package must be placed in LAYERS (and in pyproject's packages) to be checked."""
    packaged = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"errors"}
    assert packaged - {"tests", "infra"} == set(LAYERS)


@pytest.mark.parametrize(
    "file, source, expected",
    [
        ("pipelines/train.py", "from jobs.config import JobConfig\n", "pipelines/train.py:1: pipelines imports jobs"),
        ("models/spec.py", "def f():\n    import pipelines.storage\n", "models/spec.py:2: models imports pipelines"),
        ("config/job.py", "from models import get_task\n", "config/job.py:1: config imports models"),
        ("errors.py", "import config\n", "errors.py:1: errors imports config"),
    ],
)
def test_an_upward_import_is_reported_with_its_file_and_line(tmp_path, file, source, expected):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    (tmp_path / "jobs/cli.py").write_text("import pipelines.train\nimport errors\n")  # downward: fine
    assert upward_imports(tmp_path) == [expected]
