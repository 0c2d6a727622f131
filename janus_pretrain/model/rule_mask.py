"""Self-attention masks given by a rule over indices, for masks that are a function of a few
per-batch vectors (the two-stream mask: objectives/streams.py).

One rule, two readers: SDPA takes the dense [B, T, T] boolean the rule gives over every index
(`dense`), FlexAttention evaluates the rule per block from the vectors (model/flex.py
`FlexMask.rule`) and never builds or copies a [B, T, T] tensor. A subclass may build its dense
form in fewer kernels than evaluating `allows` over the whole grid takes; its tests then hold the
two equal.
"""
from __future__ import annotations

import torch


class RuleMask:
    """A [B, T, T] boolean self-attention mask (True = may attend) given by `allows`."""

    batch: int
    length: int
    device: torch.device

    def allows(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whether query row `q` of sample `b` may attend to key `k`: integer index tensors that
        broadcast together (0-dim under FlexAttention). A key at or past `length` is never
        allowed: FlexAttention pads the keys up to its block size."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole mask, [B, T, T] bool (SDPA)."""
        idx = torch.arange(self.length, device=self.device)
        b = torch.arange(self.batch, device=self.device)
        return self.allows(b[:, None, None], idx[None, :, None], idx[None, None, :])


def dense(mask):
    """A mask as SDPA takes it: a RuleMask made dense, anything else (a tensor, None) as is."""
    return mask.dense() if isinstance(mask, RuleMask) else mask
