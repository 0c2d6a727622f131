"""The model's linear and embedding layers, for this process's tensor-parallel group.

With megatron-core's parallel state set up (parallel/state.py: training, TP decoding) they are
megatron-core's Column/RowParallelLinear and VocabParallelEmbedding. Without it (a model loaded
for decoding at TP = 1 with torch alone, generate/api.py) they are torch's nn.Linear and
nn.Embedding: the same parameter names, shapes and computation at TP = 1, so the same weights load
into either and megatron-core (and DeepSpeed) need not be installed to decode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from janus_pretrain.parallel import tp

INIT_STD = 0.02


def init_normal(weight: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(weight, mean=0.0, std=INIT_STD)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a layer made by `Layers.column` / `Layers.row` (bias added, output not gathered).

    With one TP rank the layer is a plain linear, and F.linear on its own weight and bias is the
    same function, but faster and autocast-aware: one addmm instead of a matmul and a separate bias
    pass, and CPU autocast reaches it (megatron-core's autograd function adds the fp32 bias after
    the autocast matmul, which promotes the output back to fp32, and its backward runs outside
    autocast, all in fp32).
    """
    group = getattr(layer, "tp_group", None)
    if group is None or group.size() == 1:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)[0]


class Layers:
    """Builds the layers of one model: megatron-core's when its parallel state is set up."""

    def __init__(self):
        self.tp_size, self.tp_rank = tp.world_size(), tp.rank()
        self.megatron = tp.megatron_state() is not None
        if self.megatron:
            from megatron.core.model_parallel_config import ModelParallelConfig

            # CPU initialisation builds the full master weight and then slices it, so a TP = 2
            # model holds exactly the shards of the TP = 1 model with the same seed, on CPU and
            # GPU alike.
            self.mp = ModelParallelConfig(tensor_model_parallel_size=self.tp_size,
                                          use_cpu_initialization=True,
                                          gradient_accumulation_fusion=False)

    def column(self, n_in: int, n_out: int) -> nn.Module:
        """n_in -> n_out, the output split over the TP group."""
        if not self.megatron:
            return _plain_linear(n_in, n_out)
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return ColumnParallelLinear(n_in, n_out, config=self.mp, init_method=init_normal,
                                             bias=True, gather_output=False, tp_group=tp.group())

    def row(self, n_in: int, n_out: int) -> nn.Module:
        """n_in (split over the TP group) -> n_out, summed over the group."""
        if not self.megatron:
            return _plain_linear(n_in, n_out)
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear(n_in, n_out, config=self.mp, init_method=init_normal, bias=True,
                                 input_is_parallel=True, skip_bias_add=False, tp_group=tp.group())

    def embedding(self, rows: int, dim: int) -> nn.Module:
        """A table of `rows` (split over the TP group) x dim."""
        if not self.megatron:
            table = nn.Embedding(rows, dim)
            init_normal(table.weight)
            return table
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        return VocabParallelEmbedding(rows, dim, init_method=init_normal, config=self.mp,
                                      tp_group=tp.group())


def to_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce backward over the TP group: `x` feeds a vocab-parallel matmul."""
    if tp.world_size() == 1:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=tp.group())


def _plain_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    init_normal(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
