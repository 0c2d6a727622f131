"""The package layers, read from the source (no imports run): the library never imports its
applications, and no package imports one above it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "janus_pretrain"

# package -> the packages of janus_pretrain it must never import (they sit above it)
ABOVE = {"checkpoint": {"train", "objectives", "generate", "bench"},
         "generate": {"train", "objectives", "bench"},
         "model": {"train", "objectives", "generate", "checkpoint", "data", "bench"},
         "parallel": {"train", "objectives", "generate", "checkpoint", "data", "model", "bench"},
         "data": {"train", "objectives", "generate", "checkpoint", "model", "bench"},
         "objectives": {"train", "generate", "checkpoint", "bench"},
         "train": {"bench"}}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        package = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
        for name in imported(path):
            parts = name.split(".")
            if parts[0] == "finetune":
                out.append(f"{path.relative_to(root)} imports the application {name}")
            elif parts[0] == "janus_pretrain" and len(parts) > 1 and package in ABOVE \
                    and parts[1] in ABOVE[package]:
                out.append(f"{path.relative_to(root)} imports {name}, above {package}/")
    return out


def test_the_library_imports_no_application_and_nothing_above_it():
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "bad.py").write_text(
        "from janus_pretrain.train.engine import decay_groups\nimport finetune.tasks\n")
    assert sorted(violations(tmp_path)) == [
        "checkpoint/bad.py imports janus_pretrain.train.engine, above checkpoint/",
        "checkpoint/bad.py imports janus_pretrain.train.engine.decay_groups, above checkpoint/",
        "checkpoint/bad.py imports the application finetune.tasks"]
