"""`python -m janus_pretrain.bench gpu`: refuses in one line without CUDA, and its --dry-run-cpu
mode runs the same rows (flex left out: no CPU backward) at tiny shapes and writes --json."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DIST_VARS, REPO


def bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "janus_pretrain.bench", "gpu", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda():
    from janus_pretrain.bench import gpu

    with pytest.raises(SystemExit, match=r"^bench gpu: no CUDA device here \(use --dry-run-cpu"):
        gpu.main([])


def test_dry_run_cpu_runs_every_cpu_row(tmp_path):
    out = bench("--dry-run-cpu", "--json", str(tmp_path / "gpu.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert list(rows) == ["bf16 ar sdpa", "bf16 janus sdpa", "bf16 bart sdpa", "bf16 ar ZeRO-0",
                          "bf16 janus ZeRO-2"]
    for row, r in rows.items():
        assert r["seconds"] > 0 and r["flops"] > 0 and 0 < r["mfu"], row
        assert row in out.stdout
