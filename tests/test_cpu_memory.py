"""cpu_memory.reuse_freed_memory: glibc keeps freed large blocks on the heap and serves the next
step's blocks from them, without faulting their pages in again (a fresh process each way, so that
this test process's own allocator state does not matter; what that is worth to a training step is
`bench train`'s to say, docs/performance.md)."""
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
from janus_pretrain.cpu_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 64 * 2**20
def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(SIZE) for _ in range(4)]  # 4 x 64 MB, written, then all freed
    for block in blocks:
        libc.memset(block, 1, SIZE)
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()
print(max(faults_of_a_step() for _ in range(3)))
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_faulting_their_pages_again():
    default, reused = faults("default"), faults("reuse")
    pages = 4 * 64 * 2**20 // 4096
    assert default > pages // 2  # glibc maps and unmaps each 64 MB block every time
    assert reused < pages // 20
