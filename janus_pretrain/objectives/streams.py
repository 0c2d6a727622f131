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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TwoStream:
    tokens: torch.Tensor     # [B, L + 2K]
    positions: torch.Tensor  # [B, L + 2K]
    mask: torch.Tensor       # [B, L + 2K, L + 2K] bool, True = may attend
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
    unmasked = real & ~masked

    content = torch.where(masked, torch.full_like(target, mask_id), target)
    true_tok = torch.where(valid, target.gather(1, pos), torch.full_like(pos, pad_id))
    query_tok = torch.where(valid, torch.full_like(pos, mask_id), torch.full_like(pos, pad_id))
    tokens = torch.cat([content, true_tok, query_tok], dim=1)
    positions = torch.cat([arange_l.expand(b, length), pos, pos], dim=1)

    # Columns over the content block, for the true and query rows: [B, K, L].
    p_row = pos[:, :, None]
    col_masked = masked[:, None, :]
    col_unmasked = unmasked[:, None, :]
    c = arange_l[None, None, :]
    true_sees_content = col_unmasked | (col_masked & (c > p_row))
    query_sees_content = col_unmasked | (col_masked & (c >= p_row))
    # Columns over the true block: [B, K, K].
    p_col = pos[:, None, :]
    v_col = valid[:, None, :]
    true_sees_true = v_col & (p_col <= p_row)
    query_sees_true = v_col & (p_col < p_row)

    mask = torch.zeros(b, length + 2 * k, length + 2 * k, dtype=torch.bool, device=target.device)
    mask[:, :length, :length] = real[:, None, :]
    mask[:, length:length + k, :length] = true_sees_content
    mask[:, length:length + k, length:length + k] = true_sees_true
    mask[:, length + k:, :length] = query_sees_content
    mask[:, length + k:, length:length + k] = query_sees_true

    aux_rows = (length + k + torch.arange(k, device=target.device)).expand(b, k)
    return TwoStream(tokens=tokens, positions=positions, mask=mask, nar_rows=pos,
                     aux_rows=aux_rows, masked_pos=pos, labels=true_tok, valid=valid)


def ar_inputs(target: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forcing: (input [B, L-1], labels [B, L-1], valid [B, L-1]). Row t predicts target[t+1]."""
    labels = target[:, 1:]
    return target[:, :-1], labels, labels != pad_id
