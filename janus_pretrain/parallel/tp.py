"""This process's tensor-parallel group, read without importing megatron-core.

parallel/state.py sets up megatron-core's parallel_state for training and TP decoding; a model
loaded for decoding at TP = 1 with torch alone (no `state.initialize`) has a group of one. So the
model and search ask here, and megatron-core is imported only where a group of several needs it.
"""
from __future__ import annotations

import sys

import torch


def pick_device(local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is present, else the CPU: the one place a device is chosen."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def megatron_state():
    """megatron-core's parallel_state when it has been initialised, else None (then nothing has
    imported it, or nobody set up its groups: a single-rank process either way)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    return ps if ps is not None and ps.model_parallel_is_initialized() else None


def world_size() -> int:
    ps = megatron_state()
    return 1 if ps is None else ps.get_tensor_model_parallel_world_size()


def rank() -> int:
    ps = megatron_state()
    return 0 if ps is None else ps.get_tensor_model_parallel_rank()


def group():
    """The TP process group (megatron-core's); None at a group of one without megatron."""
    ps = megatron_state()
    return None if ps is None else ps.get_tensor_model_parallel_group()
