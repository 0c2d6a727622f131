"""The JANUS objective: how a batch is built and which loss terms it pays for.

The training loop only calls `collate` (host, in the loader), `prepare` (device, once per batch),
the model, and `loss`; it never branches on the objective. Pretraining and fine-tuning differ
only in the config: `masking=denoise` builds the source by text infilling of the target,
`span` / `uniform` take the source as given and mask the target only.

Loss (weights from `ObjectiveConfig.weights`, a zero weight skips the term and, where no term
needs it, the whole stream):
    w.ce_ar*CE_AR + w.ce_nar*CE_NAR + w.ce_aux*CE_AUX + w.length*L_length
    + w.kl_ar_nar*symKL(AR, NAR) + w.kl_ar_aux*symKL(AR, AUX) + w.kl_nar_aux*symKL(NAR, AUX)
with the KL terms over the masked target positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.data.padding import pad_batch, with_bos_eos
from janus_pretrain.model.flops import decoder_passes, step_flops
from janus_pretrain.objectives import losses, noise
from janus_pretrain.objectives.streams import TwoStream, ar_inputs, two_stream
from janus_pretrain.tokenizer import MASK, PAD

VOCAB_TERMS = ("ce_ar", "ce_nar", "ce_aux", "kl_ar_nar", "kl_ar_aux", "kl_nar_aux")
TERMS = VOCAB_TERMS + ("length",)


# The decoder outputs each vocabulary term is computed from ("nar" stands for NAR and AUX).
STREAMS_OF = {"ce_ar": {"ar"}, "ce_nar": {"nar"}, "ce_aux": {"nar"}, "kl_nar_aux": {"nar"},
              "kl_ar_nar": {"ar", "nar"}, "kl_ar_aux": {"ar", "nar"}}


@dataclass
class Prepared:
    """Device-side inputs of one micro-batch: model keyword arguments plus what the loss needs."""

    model_inputs: dict
    ar_labels: Optional[torch.Tensor]
    ar_valid: Optional[torch.Tensor]
    streams: Optional[TwoStream]
    length_target: Optional[torch.Tensor]
    target_tokens: torch.Tensor  # scalar: the batch's predicted target tokens (with EOS)


class JanusObjective:
    def __init__(self, cfg: ObjectiveConfig, max_source_len: int, max_target_len: int,
                 length_classes: int):
        self.cfg = cfg
        self.max_source_len = max_source_len
        self.max_target_len = max_target_len
        self.length_classes = length_classes
        w = cfg.weights
        self.needs_ar = w.ce_ar > 0 or w.kl_ar_nar > 0 or w.kl_ar_aux > 0
        self.needs_nar = any(x > 0 for x in (w.ce_nar, w.ce_aux, w.kl_ar_nar, w.kl_ar_aux,
                                             w.kl_nar_aux))
        self.needs_length = w.length > 0
        # a second encoder pass only where a second stream reads the encoder
        self.encoder_passes = (cfg.encoder_passes if self.needs_ar and
                               (self.needs_nar or self.needs_length) else 1)
        self.terms = {t for t in TERMS if getattr(w, t) > 0}  # the terms `loss` reports

    def collate(self, examples: Sequence[tuple[Optional[np.ndarray], np.ndarray]],
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """(source ids or None, target ids) pairs, bare ids -> host tensors
        src [B, S], tgt [B, L] (with BOS/EOS), masked [B, L] bool (NAR/AUX positions) and
        masked_pos [B, K] (those positions in order, -1 in unused slots; K = the most in a row),
        so that the device never has to tell the host K."""
        cfg = self.cfg
        sources, targets, masks = [], [], []
        for src, tgt in examples:
            tgt = np.asarray(tgt)[: self.max_target_len - 2]
            n = len(tgt)
            authors = cfg.mask_sampler == "authors"
            if cfg.masking == "denoise":
                src, m = noise.pretraining_noise(rng, tgt, cfg, MASK)
            elif not self.needs_nar:  # no stream reads a target mask: draw none
                m = np.zeros(n, dtype=bool)
            elif cfg.masking == "span" and authors:
                m = noise.authors_target_mask(rng, n, cfg.target_mask_ratio,
                                              cfg.target_span_lambda)
            elif cfg.masking == "span":
                m = noise.target_span_mask(rng, n, cfg.target_mask_ratio, cfg.target_span_lambda)
            else:
                m = noise.target_uniform_mask(rng, n)
            sources.append(with_bos_eos(np.asarray(src)[: self.max_source_len - 2]))
            targets.append(with_bos_eos(tgt))
            masks.append(np.concatenate([[False], m, [False]]))
        positions = [np.flatnonzero(m) for m in masks]
        masked_pos = np.full((len(masks), max(len(q) for q in positions)), -1, dtype=np.int64)
        for i, q in enumerate(positions):
            masked_pos[i, :len(q)] = q
        return {"src": pad_batch(sources), "tgt": pad_batch(targets),
                "masked": pad_batch([m.astype(np.int64) for m in masks]).bool(),
                "masked_pos": torch.from_numpy(masked_pos)}

    def flops(self, host: dict[str, torch.Tensor], model: ModelConfig, vocab: int) -> float:
        """Analytic training FLOPs of a `collate` batch: the decoder passes this objective runs
        (AR teacher forcing, the two-stream pass) at the batch's padded shapes."""
        b, s = host["src"].shape
        passes = decoder_passes(self.needs_ar, self.needs_nar, host["tgt"].shape[1],
                                host["masked_pos"].shape[1])
        return step_flops(model, vocab, b, s, passes, self.encoder_passes)

    def prepare(self, batch: dict[str, torch.Tensor]) -> Prepared:
        """Device tensors from `collate` -> model inputs and loss targets, built once per batch."""
        tgt = batch["tgt"]
        inputs = {"src_tokens": batch["src"], "encoder_passes": self.encoder_passes}
        ar_labels = ar_valid = streams = length_target = None
        if self.needs_ar:
            inputs["ar_tokens"], ar_labels, ar_valid = ar_inputs(tgt, PAD)
        if self.needs_nar:
            streams = two_stream(tgt, batch["masked"], batch["masked_pos"], PAD, MASK)
            inputs.update(nar_tokens=streams.tokens, nar_positions=streams.positions,
                          nar_mask=streams.mask, nar_rows=streams.nar_rows,
                          aux_rows=streams.aux_rows)
        if self.needs_length:
            inputs["length"] = True
            length_target = ((tgt != PAD).sum(1) - 2).clamp(max=self.length_classes - 1)
        target_tokens = (tgt[:, 1:] != PAD).sum()
        return Prepared(inputs, ar_labels, ar_valid, streams, length_target, target_tokens)

    def loss(self, outputs: dict[str, torch.Tensor], prep: Prepared, step: Optional[int] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (weighted total, {term: detached value}) for the terms with non-zero weight. `step`
        (the update being computed, from 1) scales the KL weights during `kl_warmup_steps`;
        None (validation) weighs them fully."""
        w = self.cfg.weights
        ran = {"ar" if "ar" in outputs else None, "nar" if "nar" in outputs else None}
        names = tuple(t for t in VOCAB_TERMS if getattr(w, t) > 0 and STREAMS_OF[t] <= ran)
        s = prep.streams
        # AR row t predicts target position t + 1; masked positions are never BOS.
        targets = losses.Targets(
            prep.ar_labels, prep.ar_valid, s and s.labels, s and s.valid,
            s and (s.masked_pos - 1).clamp(min=0), self.cfg.label_smoothing,
            self.cfg.kl_ar_detach)
        terms = losses.vocab_terms(names, targets, outputs.get("ar"), outputs.get("nar"),
                                   outputs.get("aux"))
        if self.needs_length:
            lp_len = torch.log_softmax(outputs["length"].float(), dim=-1)
            terms["length"] = -lp_len.gather(1, prep.length_target[:, None]).mean()
        if self.cfg.loss_normalization == "target_tokens" and s is not None:
            # Sums over the masked slots / target tokens = the slot mean * |M| / N.
            share = s.valid.sum() / prep.target_tokens.clamp(min=1)
            for name in terms.keys() - {"ce_ar", "length"}:
                terms[name] = terms[name] * share
        warm = self.cfg.kl_warmup_steps
        kl_scale = min(1.0, step / warm) if warm and step is not None else 1.0
        total = sum(getattr(w, name) * (kl_scale if name.startswith("kl_") else 1.0) * value
                    for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
