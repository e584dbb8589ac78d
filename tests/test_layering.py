"""The layers of the code, checked by parsing every import (docs/tasks.md, DESIGN.md "Contracts"):

- util/ (the run loop and its services) never imports models/ or tasks/, nor names a class defined there;
- models/ never imports util/, datasets/ or tasks/ (a model is a plain single-device nn.Module);
- no script (a main, a launcher, a benchmark) is imported by any other file of the project;
- no task module imports another task's module (shared pieces live in helpers such as tasks/common.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("util", "models", "datasets", "tasks", "launchers", "benchmarks")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _project_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + sorted(ROOT.glob("main_*.py"))


def _imports(path: Path) -> set[str]:
    """Every module name an import statement of `path` names (relative imports resolved), anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from tasks import mae` imports tasks.mae
    return names


def _is_script(path: Path) -> bool:
    """A file run as a program: the mains, the launchers, the benchmarks (they have a __main__ block)."""
    if path.parent == ROOT:
        return path.name.startswith("main_")
    if path.parent.name not in ("launchers", "benchmarks"):
        return False
    return "__name__ == \"__main__\"" in path.read_text()


def _task_modules() -> set[str]:
    import tasks

    return set(tasks.PRETRAIN.values()) | {"tasks.classify"}


def _hits(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in prefixes)


@pytest.mark.parametrize("path", sorted((ROOT / "util").rglob("*.py")), ids=lambda p: p.name)
def test_util_never_imports_models_or_tasks(path: Path) -> None:
    assert not _hits(_imports(path), ("models", "tasks")), f"{path.name} imports {_hits(_imports(path), ('models', 'tasks'))}"


def _class_names(package: str) -> set[str]:
    out = set()
    for path in (ROOT / package).rglob("*.py"):
        out |= {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    return out


def test_util_names_no_task_or_model_class() -> None:
    """No identifier in util/ is the name of a class defined in models/ or tasks/ (strings and comments aside)."""
    classes = _class_names("models") | _class_names("tasks")
    found = []
    for path in sorted((ROOT / "util").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in classes:
                found.append(f"{path.name}:{node.lineno} {name}")
    assert not found, found


@pytest.mark.parametrize("path", sorted((ROOT / "models").rglob("*.py")), ids=lambda p: p.name)
def test_models_never_import_util_datasets_or_tasks(path: Path) -> None:
    bad = _hits(_imports(path), ("util", "datasets", "tasks"))
    assert not bad, f"models/{path.name} imports {bad}"


def test_no_script_imports_another_script() -> None:
    scripts = {_module_name(p) for p in _project_files() if _is_script(p)}
    assert {"main_pretrain", "main_finetune"} <= scripts  # the check sees the mains
    found = [f"{_module_name(p)} imports {sorted(_imports(p) & scripts)}" for p in _project_files()
             if _imports(p) & (scripts - {_module_name(p)})]
    assert not found, found


def test_no_task_imports_another_tasks_module() -> None:
    task_modules = _task_modules()
    found = []
    for name in sorted(task_modules):
        path = ROOT / (name.replace(".", "/") + ".py")
        other = sorted(_imports(path) & (task_modules - {name}))
        if other:
            found.append(f"{name} imports {other}")
    assert len(task_modules) >= 4 and not found, found


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The parser resolves the import forms the checks rely on (a check that never fires proves nothing)."""
    f = ROOT / "util" / "__init__.py"
    names = _imports(f)
    assert not _hits(names, ("models", "tasks"))
    sample = tmp_path / "x.py"
    sample.write_text("import models.mae\nfrom tasks import mae\ndef f():\n    from util.config import flag\n")
    got = _imports(sample)
    assert {"models.mae", "tasks.mae", "util.config"} <= got
