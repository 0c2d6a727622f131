"""`janus-pretrain train --check`: what slurm/launch.sh verifies on the batch node before any
rank starts. Each rank would find the same errors, but under torchrun a rank's exit status 2 (a
user error) reaches the batch script as 1, like a crash, which is requeued; found here, it ends
the job at once instead of spending the retry budget on a config that cannot work.
"""
from __future__ import annotations

import os

from janus_pretrain.config import RunConfig
from janus_pretrain.data.corpora import open_corpus
from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import load_tokenizer
from janus_pretrain.train import batch_size
from janus_pretrain.train.deepspeed_json import read_deepspeed_json


def check(cfg: RunConfig) -> int:
    """Raise the first JanusError a launch of WORLD_SIZE ranks (LOCAL_WORLD_SIZE per node) would
    meet before training; returns the accumulation it would run with."""
    cfg.check_data()
    read_deepspeed_json(cfg)
    world, tp = int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel.tensor_parallel
    if world % tp:
        raise JanusError(f"config: parallel.tensor_parallel: {tp} does not divide the world size "
                         f"{world}")
    local = os.environ.get("LOCAL_WORLD_SIZE")
    accum = batch_size.accumulation(cfg, world // tp, int(local) if local else None)
    open_corpus(cfg.data.train, load_tokenizer(cfg.data.tokenizer))
    return accum
