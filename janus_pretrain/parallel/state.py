"""Start torch.distributed and megatron-core's parallel_state, and tell DeepSpeed about the groups.

Every launcher we support (plain `python`, `torchrun`, `deepspeed`, slurm via either) exports
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare single process gets a
world of one. megatron-core's layers ask parallel_state for the TP group even at TP = 1, so
this always runs before a model is built.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from janus_pretrain.cpu_memory import reuse_freed_memory
from janus_pretrain.errors import JanusError
from janus_pretrain.parallel.tp import pick_device


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(tensor_parallel: int = 1, timeout_minutes: Optional[float] = None) -> Topology:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's TP/DP groups.
    Idempotent at the same TP size; another TP size is refused, not silently ignored.
    `timeout_minutes`: how long a collective may wait (torch's default: 10 NCCL, 30 gloo)."""
    # A bare process is rank 0 of 1; DeepSpeed insists on finding these variables.
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise JanusError("MASTER_PORT is not set: launch several ranks with torchrun or deepspeed")
        os.environ["MASTER_PORT"] = str(free_port())
    if world_size % tensor_parallel:
        raise JanusError(f"config: parallel.tensor_parallel: {tensor_parallel} does not divide "
                         f"the world size {world_size}")
    device = pick_device(local_rank)
    if device.type == "cpu":
        reuse_freed_memory()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    elif ps.get_tensor_model_parallel_world_size() != tensor_parallel:
        raise JanusError(f"parallel: this process already runs at tensor_parallel="
                         f"{ps.get_tensor_model_parallel_world_size()}; it cannot switch to "
                         f"{tensor_parallel} (call state.shutdown() first)")
    return Topology(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel_rank() -> int:
    return ps.get_data_parallel_rank()


def data_parallel_size() -> int:
    return ps.get_data_parallel_world_size()


def data_parallel_group():
    return ps.get_data_parallel_group()


def tensor_parallel_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


class DeepSpeedMPU:
    """megatron-core's parallel_state under the method names DeepSpeed's `mpu` argument expects.

    Without it DeepSpeed treats every rank as a data-parallel peer and averages gradients over
    TP shards: the run still trains, but wrongly (tests/test_zero_tp.py checks it against a dense run).
    """

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(lambda: 0)
    get_pipeline_model_parallel_world_size = staticmethod(lambda: 1)
