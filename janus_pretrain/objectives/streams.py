"""Decoder inputs and attention masks for the three JANUS streams (docs/method.md, sections 1-2).

Pure tensor functions, built once per batch on the device. Target rows are `[BOS y1 .. yn EOS PAD..]`.

AR: ordinary teacher forcing, input `target[:, :-1]`, labels `target[:, 1:]`, causal mask.

NAR + AUX in one pass. The decoder sequence of a sample is
    [ content: target with [MASK] at masked positions (L rows)
    | true:    the true token of each masked position, in position order (K slots)
    | query:   one [MASK] per masked position (K slots) ]
every token carrying the position of its target position, where K is the largest number of
masked positions in the batch (shorter samples leave slots unused). With `j`, `i` masked
target positions, True = may attend:
- content rows see the unmasked tokens and the [MASK] tokens: P_NAR is read at the [MASK] rows;
- true row i sees unmasked tokens, true tokens of j <= i, [MASK] tokens of j > i;
- query row i sees unmasked tokens, true tokens of j < i, [MASK] tokens of j >= i: P_AUX.
No row ever sees a query row, so the query stream is XLNet's second stream.
The mask is kept as this rule over the batch's vectors (`TwoStreamMask`): FlexAttention reads the
rule, SDPA its dense form (model/rule_mask.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from janus_pretrain.model.rule_mask import RuleMask


@dataclass
class TwoStream:
    tokens: torch.Tensor     # [B, L + 2K]
    positions: torch.Tensor  # [B, L + 2K]
    mask: "TwoStreamMask"    # [B, L + 2K, L + 2K], True = may attend (`.dense()` for SDPA)
    nar_rows: torch.Tensor   # [B, K] rows whose output is P_NAR of the k-th masked position
    aux_rows: torch.Tensor   # [B, K] rows whose output is P_AUX of the k-th masked position
    masked_pos: torch.Tensor  # [B, K] target position of the k-th masked token (0 where unused)
    labels: torch.Tensor     # [B, K] true token of the k-th masked position
    valid: torch.Tensor      # [B, K] bool, False for unused slots


def two_stream(target: torch.Tensor, masked: torch.Tensor, masked_pos: torch.Tensor,
               pad_id: int, mask_id: int) -> TwoStream:
    """Build the fused NAR/AUX decoder input. target [B, L] long; masked [B, L] bool;
    masked_pos [B, K] the same positions in ascending order, -1 in unused slots (the host
    collator lists them, so the device never has to tell the host K)."""
    b, length = target.shape
    valid = masked_pos >= 0
    pos = masked_pos.clamp(min=0)
    k = pos.shape[1]
    arange_l = torch.arange(length, device=target.device)
    real = target != pad_id

    content = torch.where(masked, torch.full_like(target, mask_id), target)
    true_tok = torch.where(valid, target.gather(1, pos), torch.full_like(pos, pad_id))
    query_tok = torch.where(valid, torch.full_like(pos, mask_id), torch.full_like(pos, pad_id))
    tokens = torch.cat([content, true_tok, query_tok], dim=1)
    positions = torch.cat([arange_l.expand(b, length), pos, pos], dim=1)

    mask = TwoStreamMask(real, masked, pos, valid)
    aux_rows = (length + k + torch.arange(k, device=target.device)).expand(b, k)
    return TwoStream(tokens=tokens, positions=positions, mask=mask, nar_rows=pos,
                     aux_rows=aux_rows, masked_pos=pos, labels=true_tok, valid=valid)


def ar_inputs(target: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forcing: (input [B, L-1], labels [B, L-1], valid [B, L-1]). Row t predicts target[t+1]."""
    labels = target[:, 1:]
    return target[:, :-1], labels, labels != pad_id


class TwoStreamMask(RuleMask):
    """The rule of the module docstring over (sample, row, column), read from the batch's
    vectors: `real` and `masked` [B, L], the masked positions `pos` and their validity `valid`
    [B, K]. Rows and columns are laid out as [content L | true K | query K]. Unused slots
    (valid False) read position 0: their rows are never read, and no row sees them."""

    def __init__(self, real: torch.Tensor, masked: torch.Tensor, pos: torch.Tensor,
                 valid: torch.Tensor):
        self.batch, self.content = real.shape
        self.slots = pos.shape[1]
        self.length = self.content + 2 * self.slots
        self.device = real.device
        if self.slots == 0:  # one unused slot, so that indexing stays in range
            pos, valid = pos.new_zeros(self.batch, 1), valid.new_zeros(self.batch, 1)
        self.real, self.masked, self.pos, self.valid = real, masked, pos, valid

    def allows(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        length, slots = self.content, self.slots
        last = max(slots, 1) - 1
        true_row = (q >= length) & (q < length + slots)
        query_row = (q >= length + slots) & (q < length + 2 * slots)
        content_col = k < length
        c = k.clamp(max=length - 1)
        real, masked = self.real[b, c], self.masked[b, c]
        # The row's slot i and its position p_i; the column's slot j (over the true block).
        p_row = self.pos[b, torch.where(query_row, q - length - slots, q - length).clamp(0, last)]
        j = (k - length).clamp(0, last)
        p_col, v_col = self.pos[b, j], self.valid[b, j]
        # true row i: masked content j > i, true j <= i; query row i: masked content j >= i,
        # true j < i. Both see every unmasked token; neither sees a query column.
        later = torch.where(query_row, c >= p_row, c > p_row)
        earlier = torch.where(query_row, p_col < p_row, p_col <= p_row)
        sees_content = content_col & ((real & ~masked) | (masked & later))
        sees_true = (k >= length) & (k < length + slots) & v_col & earlier
        content_row = (q < length) & content_col & real
        return content_row | ((true_row | query_row) & (sees_content | sees_true))

    def dense(self) -> torch.Tensor:
        """The rule over every index, built block by block: the same mask as `allows` gives
        (tests/test_streams.py holds them equal) in fewer kernels, which SDPA's step pays."""
        b, length, k = self.batch, self.content, self.slots
        pos, valid = self.pos[:, :k], self.valid[:, :k]
        unmasked = (self.real & ~self.masked)[:, None, :]
        masked = self.masked[:, None, :]
        c = torch.arange(length, device=self.device)[None, None, :]
        p_row, p_col, v_col = pos[:, :, None], pos[:, None, :], valid[:, None, :]
        mask = torch.zeros(b, self.length, self.length, dtype=torch.bool, device=self.device)
        mask[:, :length, :length] = self.real[:, None, :]
        mask[:, length:length + k, :length] = unmasked | (masked & (c > p_row))
        mask[:, length:length + k, length:length + k] = v_col & (p_col <= p_row)
        mask[:, length + k:, :length] = unmasked | (masked & (c >= p_row))
        mask[:, length + k:, length:length + k] = v_col & (p_col < p_row)
        return mask
