"""The run lock's failures reach every rank as one line: a file system without flock (ENOSYS on
Lustre mounted without -o flock) raises on rank 0 only, and the other ranks must not wait for a
broadcast that never comes."""
from __future__ import annotations

import errno
import multiprocessing
from pathlib import Path

from janus_pretrain.parallel.state import free_port

RANKS = 2


def _rank(rank: int, port: int, directory: str, results) -> None:
    import fcntl

    import torch.distributed as dist

    from janus_pretrain.errors import JanusError
    from janus_pretrain.train import run_lock

    def no_flock(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    fcntl.flock = no_flock
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=RANKS)
    try:
        with run_lock.hold(Path(directory), rank == 0):
            results.put((rank, "held"))
    except JanusError as e:
        results.put((rank, str(e)))
    except Exception as e:  # noqa: BLE001 (what the test reports)
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_a_file_system_without_flock_is_one_line_on_every_rank(tmp_path):
    # spawn: a fork of the test session would inherit its process group and gloo threads
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path / "run"), results))
             for r in range(RANKS)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in range(RANKS))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    for rank in range(RANKS):
        assert got[rank].startswith("train: cannot lock "), got
        assert "does not support flock" in got[rank] and "\n" not in got[rank]
