"""Dropout inside a tensor-parallel region draws its own mask on each TP rank.

Every rank is seeded alike (train/loop.py `seed_everything`), which the replicated activations
need: a residual dropout after a row-parallel all-reduce must drop the same elements on every TP
rank. Inside a region that holds a shard (a rank's attention heads, its columns of the FFN) the
same generator would give every shard the same mask, so the TP shards of a layer would drop
correlated elements where a TP = 1 run drops independent ones. As Megatron forks a per-TP-rank
RNG for those regions, `tp_region` runs its block on the default generators reseeded per rank
and restores them after. The seeds come from the CPU generator, which every TP rank advances
alike, and which activation checkpointing saves and restores: the recomputed forward reseeds
the same way and replays the masks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from janus_pretrain.parallel import tp


@contextlib.contextmanager
def tp_region(dropout: bool) -> Iterator[None]:
    """Run the block's dropout on this TP rank's own stream; a no-op without dropout (`dropout`
    false: p = 0 or eval) or at TP = 1, so those runs draw nothing and stay as they were."""
    size = tp.world_size()
    if not dropout or size == 1:
        yield
        return
    seed = int(torch.randint(2**62, (size,))[tp.rank()])
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
