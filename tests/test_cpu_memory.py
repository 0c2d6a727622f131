"""cpu_memory.reuse_freed_memory: a large tensor freed and allocated again is served from the
kept heap, without faulting its pages in a second time (a fresh process each way, so that this
test process's own allocator state does not matter)."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from janus_pretrain.cpu_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MB, written once, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_tensor()
print(min(faults_of_one_tensor() for _ in range(3)))
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_tensor_is_reused_without_faulting_its_pages_again():
    default, reused = faults("default"), faults("reuse")
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # glibc maps and unmaps a 64 MB block every time
    assert reused < pages // 20
