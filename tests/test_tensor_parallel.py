"""Tensor parallelism: a TP = 2 JANUS step (all streams, all loss terms, vocab-sharded KL)
equals the TP = 1 step with the same full weights."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from janus_pretrain.parallel.state import free_port

pytestmark = pytest.mark.distributed


def run_probe(tp: int, out) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
           f"--master_port={free_port()}", str(REPO / "tests" / "tp_probe.py"), str(tp), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_tp2_step_equals_tp1(tmp_path):
    one = run_probe(1, tmp_path / "tp1.pt")
    two = run_probe(2, tmp_path / "tp2.pt")
    assert set(one["terms"]) == {"ce_ar", "ce_nar", "ce_aux", "kl_ar_nar", "kl_ar_aux",
                                 "kl_nar_aux", "length"}
    for name, value in one["terms"].items():
        torch.testing.assert_close(two["terms"][name], value, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(two["loss"], one["loss"], rtol=0, atol=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
