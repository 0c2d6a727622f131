"""FlexAttention for CUDA (`model.attention: flex`): the attention masks as block masks.

SDPA with an arbitrary boolean mask (the two-stream mask) falls back to unfused attention on CUDA;
FlexAttention runs it fused and skips the blocks the mask empties. A `FlexMask` is built once per
batch for each mask kind (encoder key mask, decoder self mask, cross mask) and shared by all layers;
key masks are read from their [B, S] vector, the two-stream mask from its rule over the batch's
vectors (model/rule_mask.py), the causal mask is built once per length; only BANG's masks still
come dense.
Query and key lengths are padded up to a multiple of the block size (padded keys masked out, padded
query rows dropped), so the compiled kernel sees a few repeating shapes instead of one per batch.
flex has no attention dropout (config check) and no CPU backward in torch 2.13, so the model uses
it on CUDA only; its forward does run on CPU, which is how the tests check it against SDPA.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from janus_pretrain.model.rule_mask import RuleMask

BLOCK = 128


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_block_mask():
    """create_block_mask compiled: a rule's ~50 elementwise ops over the [B, T, T] grid fuse
    into one kernel, compiled once per shape (few, with length buckets) and reused by every
    batch, whose vectors are the compiled function's inputs."""
    return torch.compile(create_block_mask, dynamic=False)


def _round_up(n: int, block: int) -> int:
    return (n + block - 1) // block * block


class FlexMask:
    """A boolean mask (True = may attend), broadcastable to [B, 1, T, S], as a padded BlockMask.

    Built from `mask_mod(b, h, q, k)` over the lengths padded up to the block (padded keys must
    be False; padded query rows are dropped): from a dense mask (`dense`: BANG's masks), or,
    where the mask is a function of a few indices, without one: `keys` (a key-padding mask, from
    a [B, S] vector), `rule` (a RuleMask: the two-stream mask) and `causal` (a pure function of
    the shape, built once per length and cached). `build` is create_block_mask or its compiled
    form."""

    def __init__(self, mask_mod, batch: Optional[int], q_len: int, kv_len: int,
                 device: torch.device, block: int = BLOCK, build=create_block_mask):
        self.q_len, self.kv_len = q_len, kv_len
        self.padded_len = qp, kp = _round_up(q_len, block), _round_up(kv_len, block)
        self.block_mask = build(mask_mod, batch, None, qp, kp, device=device, BLOCK_SIZE=block)

    @classmethod
    def dense(cls, mask: torch.Tensor, q_len: int, kv_len: int, block: int = BLOCK) -> "FlexMask":
        """From a dense mask [B, T or 1, S] (or [B, 1, T or 1, S]), copied into a padded one."""
        b = mask.shape[0]
        padded = torch.zeros(b, _round_up(q_len, block), _round_up(kv_len, block),
                             dtype=torch.bool, device=mask.device)
        padded[:, :q_len, :kv_len] = mask.reshape(b, mask.shape[-2], kv_len).expand(
            b, q_len, kv_len)

        def mask_mod(bi, h, q, k):
            return padded[bi, q, k]

        return cls(mask_mod, b, q_len, kv_len, mask.device, block)

    @classmethod
    def keys(cls, real: torch.Tensor, q_len: int, block: int = BLOCK) -> "FlexMask":
        """Every query row sees the keys that `real` [B, S] marks, and only those: the encoder's
        self-attention and every cross-attention, with no [B, T, S] mask built."""
        b, s = real.shape
        padded = F.pad(real, (0, _round_up(s, block) - s))  # padded keys: False

        def mask_mod(bi, h, q, k):
            return padded[bi, k]

        return cls(mask_mod, b, q_len, s, real.device, block)

    @classmethod
    def rule(cls, rule: RuleMask, block: int = BLOCK) -> "FlexMask":
        """A self-attention mask read from its rule per block (the two-stream mask): no
        [B, T, T] tensor is built, and none is copied into a padded one."""
        def mask_mod(bi, h, q, k):
            return rule.allows(bi, q, k)

        return cls(mask_mod, rule.batch, rule.length, rule.length, rule.device, block,
                   _compiled_block_mask())

    @staticmethod
    def causal(t: int, device: torch.device, block: int = BLOCK) -> "FlexMask":
        """Row i sees keys 0..i, for any batch (the AR decoder): one per length, cached."""
        return _causal(t, torch.device(device), block)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, heads, T, D], k/v [B, heads, S, D] -> [B, heads, T, D]."""
        qp, kp = self.padded_len
        if qp != q.shape[2]:  # bucketed lengths (data/buckets.py) are often aligned already
            q = F.pad(q, (0, 0, 0, qp - q.shape[2]))
        if kp != k.shape[2]:
            k, v = (F.pad(z, (0, 0, 0, kp - z.shape[2])) for z in (k, v))
        out = _compiled()(q, k, v, block_mask=self.block_mask)
        return out if qp == self.q_len else out[:, :, :self.q_len]


@functools.lru_cache(maxsize=64)
def _causal(t: int, device: torch.device, block: int) -> FlexMask:
    def mask_mod(bi, h, q, k):
        return (q >= k) & (k < t)

    return FlexMask(mask_mod, None, t, t, device, block)
