"""The sibling rule of the layout (docs/internals.md), by reading every module's imports, those inside
functions included: lint-imports checks the layers, this also checks what evaluation may see of a stage.

- teacher, distill and student never import each other;
- evaluation imports a stage only through its package's public names (`from student import X`), never
  a module inside it (`student.runtime`): a stage's files may move without touching evaluation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("teacher", "distill", "student")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def package_modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_training_stages_never_import_each_other(stage):
    others = tuple(s for s in STAGES if s != stage)
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in package_modules(stage) for line, module in imported_modules(path)
           if module.split(".")[0] in others]
    assert not bad, "\n".join(bad)


def test_evaluation_sees_only_the_public_names_of_a_stage():
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in package_modules("evaluation") for line, module in imported_modules(path)
           if module.split(".")[0] in STAGES and module not in STAGES]
    assert not bad, "\n".join(bad)


def test_the_check_finds_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from student.runtime import OnnxPredictor\n    import teacher.plan\n")
    assert imported_modules(module) == [(2, "student.runtime"), (3, "teacher.plan")]
