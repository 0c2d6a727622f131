"""The package layers, read from the source (no imports run): the library never imports its
applications, and no package imports one above it. And what one light command really imports."""
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


def test_train_check_imports_neither_deepspeed_nor_megatron(shards_dir, tokenizer_path):
    """`janus-pretrain train --check` runs on a Slurm batch node before every job start
    (slurm/launch.sh): DeepSpeed's and megatron-core's imports alone took 3 of its 4.6 s."""
    import subprocess
    import sys

    code = ("import sys\nfrom janus_pretrain.cli import main\n"
            f"main(['train', '--check', '--config', 'configs/pretrain/demo.yaml', "
            f"'data.train={shards_dir}', 'data.tokenizer={tokenizer_path}'])\n"
            "print(sorted(m for m in ('deepspeed', 'megatron.core') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["config: ok (1 ranks, accumulation 1)", "[]"], out.stdout
