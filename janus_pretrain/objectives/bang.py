"""The BANG objective (Qi et al., 2021), trained by the JANUS loop: docs/method.md, section 9.

Target rows are `[BOS y1 .. yn EOS PAD..]` (y_t at position t, y_0 = BOS), T = L - 1 decoder rows
per stream, row r predicting target position r + 1 as in the AR pass.

`bang` (`bang_streams`): a main stream, `target[:, :-1]` at positions 0..T-1, causal, predicts
nothing; then N predicting streams of [MASK] (the model's learned `mask_vector`), row r of every
stream at position r + 1, the position of the token it predicts. With True = may attend:
- main row r sees main rows 0..r;
- stream k at position t sees main rows 0..t-k (y_0..y_t-k), itself, and the [MASK] rows at
  position t-j of stream k-j (j = 1..k-1), which see the same main prefix.
So stream k predicts y_t with the k-1 tokens before it unseen: stream 1 is AR, and the diagonal
(stream t at position t) sees only BOS and [MASK]s. With N = 1 this is BANG's AR fine-tuning.

`bang_nar` (`bang_nar_inputs`): BANG's NAR fine-tuning, the T rows of one predicting stream with
causal self-attention among them and no main stream, so row t depends on neither the target
tokens nor its length: decoding runs it once to a maximum length (generate/bang.py).

Loss: token cross entropy over every valid predicting row, all streams pooled with equal weights
(the mean over those rows), with objective.label_smoothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.data.padding import pad_batch, with_bos_eos
from janus_pretrain.model.flops import bang_passes, step_flops
from janus_pretrain.objectives import losses, noise
from janus_pretrain.tokenizer import MASK, PAD

TERMS = ("ce_bang",)


@dataclass
class BangStreams:
    tokens: torch.Tensor      # [B, R] token ids (PAD on the predicting rows, whose input is the
                              # learned [MASK] vector)
    positions: torch.Tensor   # [B, R]
    query: torch.Tensor       # [R] bool: the predicting rows, in stream order
    mask: Optional[torch.Tensor]  # [B, R, R] bool, True = may attend; None: causal
    labels: torch.Tensor      # [B, N * T] the token each predicting row predicts
    valid: torch.Tensor       # [B, N * T] bool


def stream_mask(rows: int, streams: int, device: torch.device) -> torch.Tensor:
    """The cross-stream visible attention mask over [main | stream 1 | .. | stream N], `rows`
    rows each -> [(1 + N) rows, (1 + N) rows] bool (see the module docstring)."""
    index = torch.arange((1 + streams) * rows, device=device)
    a, r = (index // rows)[:, None], (index % rows)[:, None]   # row: stream, row in stream
    b, c = (index // rows)[None, :], (index % rows)[None, :]   # column
    main_sees = (a == 0) & (b == 0) & (c <= r)
    prefix = (a > 0) & (b == 0) & (c <= r + 1 - a)
    diagonal = (a > 0) & (b > 0) & (b <= a) & (c - b == r - a)
    return main_sees | prefix | diagonal


def bang_streams(target: torch.Tensor, streams: int, pad_id: int) -> BangStreams:
    """target [B, L] -> the main stream plus `streams` predicting streams (kind=bang)."""
    b, length = target.shape
    rows = length - 1
    arange = torch.arange(rows, device=target.device).expand(b, rows)
    tokens = torch.cat([target[:, :-1], torch.full((b, streams * rows), pad_id,
                                                   dtype=target.dtype, device=target.device)], 1)
    positions = torch.cat([arange] + [arange + 1] * streams, dim=1)
    query = torch.arange((1 + streams) * rows, device=target.device) >= rows
    mask = stream_mask(rows, streams, target.device).expand(b, -1, -1)
    labels = target[:, 1:].repeat(1, streams)
    return BangStreams(tokens, positions, query, mask, labels, labels != pad_id)


def bang_nar_inputs(target: torch.Tensor, pad_id: int) -> BangStreams:
    """target [B, L] -> one causal stream of [MASK] at positions 1..L-1 (kind=bang_nar)."""
    b, length = target.shape
    labels = target[:, 1:]
    positions = torch.arange(1, length, device=target.device).expand(b, length - 1)
    query = torch.ones(length - 1, dtype=torch.bool, device=target.device)
    return BangStreams(torch.full_like(labels, pad_id), positions, query, None, labels,
                       labels != pad_id)


@dataclass
class Prepared:
    model_inputs: dict
    streams: BangStreams


class BangObjective:
    """kind=bang or bang_nar, with JanusObjective's interface (collate, prepare, loss, flops)."""

    terms = set(TERMS)

    def __init__(self, cfg: ObjectiveConfig, max_source_len: int, max_target_len: int):
        self.cfg = cfg
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len

    @property
    def streams(self) -> int:
        """Predicting streams per target row (bang_nar has one and no main stream)."""
        return self.cfg.streams if self.cfg.kind == "bang" else 1

    def collate(self, examples: Sequence[tuple[Optional[np.ndarray], np.ndarray]],
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """(source ids or None, target ids) pairs, bare ids -> src [B, S], tgt [B, L] with
        BOS/EOS; `denoise` makes the source from the target as JANUS does (the same sources for
        the same generator: noise.pretraining_noise), and BANG uses no decoder mask."""
        sources, targets = [], []
        for src, tgt in examples:
            tgt = np.asarray(tgt)[: self.max_target_len - 2]
            if self.cfg.masking == "denoise":
                src, _ = noise.pretraining_noise(rng, tgt, self.cfg, MASK)
            sources.append(with_bos_eos(np.asarray(src)[: self.max_source_len - 2]))
            targets.append(with_bos_eos(tgt))
        return {"src": pad_batch(sources), "tgt": pad_batch(targets)}

    def flops(self, host: dict[str, torch.Tensor], model: ModelConfig, vocab: int) -> float:
        """Analytic training FLOPs: one decoder pass of (1 + N) T rows (bang_nar: T), N T of
        them projected to the vocabulary."""
        b, s = host["src"].shape
        return step_flops(model, vocab, b, s,
                          bang_passes(self.cfg.kind == "bang", self.streams, host["tgt"].shape[1]))

    def prepare(self, batch: dict[str, torch.Tensor]) -> Prepared:
        tgt = batch["tgt"]
        if self.cfg.kind == "bang":
            s = bang_streams(tgt, self.cfg.streams, PAD)
        else:
            s = bang_nar_inputs(tgt, PAD)
        inputs = {"src_tokens": batch["src"], "bang_tokens": s.tokens,
                  "bang_positions": s.positions, "bang_query": s.query, "bang_mask": s.mask}
        return Prepared(inputs, s)

    def loss(self, outputs: dict[str, torch.Tensor], prep: Prepared, step: Optional[int] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (mean token CE over the valid predicting rows, {"ce_bang": its detached value}).
        `step` is JanusObjective.loss's (its KL warm-up); BANG's loss does not change with it."""
        s = prep.streams
        ce = losses.token_cross_entropy(outputs["bang"], s.labels, s.valid,
                                        self.cfg.label_smoothing)
        return ce, {"ce_bang": ce.detach()}
