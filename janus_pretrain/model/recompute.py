"""Per-layer activation checkpointing (`model.activation_checkpointing: full`).

torch.utils.checkpoint (non-reentrant, preserve_rng_state=True) rather than megatron-core's
`tensor_parallel.checkpoint`: our dropout draws from torch's default generators (nn.Dropout and
SDPA's dropout, never megatron's `get_cuda_rng_tracker().fork()`), and torch's checkpoint saves and
restores exactly those: the CPU generator and the default generator of every CUDA device the
inputs live on. So the recomputed forward replays the same dropout masks on CPU and on GPU, at any
TP size (every TP rank recomputes its layer, collectives included, in the same order), with no CUDA
call on CPU and no CPU shim. megatron's checkpoint would only replay the tracker's CUDA state, which
is the wrong generator for these layers and calls CUDA on CPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, enabled: bool, *args):
    """layer(*args), recomputed in backward when `enabled` and autograd records this call.

    Under no_grad (evaluation, KV-cache decoding) there is nothing to save, so it runs plainly.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True)
    return layer(*args)
