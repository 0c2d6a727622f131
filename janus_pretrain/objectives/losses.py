"""The JANUS cross-entropy and symmetric-KL terms in one pass over the vocabulary (DESIGN.md
section 1, "Loss").

Each stream's logits are normalised once (log-probabilities and probabilities), every CE and
symKL term is read from those, and the backward is written out: one gradient per stream's
logits, accumulated term by term, instead of autograd through a log-softmax, an exp and a
difference per KL term. Logits arrive split over the tensor-parallel group along the vocabulary
(janus_pretrain.parallel.vocab) and are never gathered; the forward's vocabulary sums are
all-reduced, the backward needs no communication (every gradient is local given the global
per-row sums).

Only the real vocabulary counts: the model's padding columns are -inf (probability 0), they are
left out of label smoothing's uniform distribution (1 / V_real each), and contribute nothing to
a KL term. Terms are means over the valid token rows of the micro-batch, in fp32:
    CE    (1 - eps) * -log p(y) + eps * mean over the real vocabulary of -log p(v)
    symKL (KL(p||q) + KL(q||p)) / 2 = sum_v (p - q)(log p - log q) / 2, gradients into both sides
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from janus_pretrain.parallel.vocab import log_softmax, shard_start, tp_sum, vocab_sum


@dataclass
class Targets:
    """What the terms are measured against. ar_labels / ar_valid [B, T] (AR row t predicts target
    position t + 1); labels / valid [B, K] for the NAR and AUX slots; ar_rows [B, K] the AR row
    that predicts each slot's position (any row where the slot is not valid)."""

    ar_labels: Optional[torch.Tensor]
    ar_valid: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]
    ar_rows: Optional[torch.Tensor]
    smoothing: float


class _Stream:
    """One stream's normalised shard: logp [..., V_local] fp32 (0, not -inf, in padding
    columns, so that differences and sums over the shard stay finite), p = exp(logp) (0 there),
    real [V_local] bool and the global real-vocabulary size."""

    def __init__(self, logits: torch.Tensor):
        self.logp = log_softmax(logits)
        self.p = self.logp.exp()
        self.real = torch.isfinite(logits.detach()[(0,) * (logits.dim() - 1)])
        self.logp.masked_fill_(~self.real, 0.0)
        self.vocab = tp_sum(self.real.sum().float())

    def gathered(self, rows: torch.Tensor) -> "_Stream":
        """The rows [B, K] of a [B, T, V_local] stream as a [B, K, V_local] one."""
        out = object.__new__(_Stream)
        index = rows[..., None].expand(-1, -1, self.p.shape[-1])
        out.logp, out.p = self.logp.gather(1, index), self.p.gather(1, index)
        out.real, out.vocab = self.real, self.vocab
        return out


def _mean_weights(valid: torch.Tensor) -> torch.Tensor:
    """valid [...] bool -> [...] fp32 weights of a mean over the valid rows."""
    valid = valid.float()
    return valid / valid.sum().clamp(min=1.0)


def _label_local(labels: torch.Tensor, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global labels [...] -> (shard column [...] clamped into the shard, whether it is here)."""
    local = labels - shard_start(v_local)
    here = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), here


def _cross_entropy(s: _Stream, labels: torch.Tensor, weights: torch.Tensor, eps: float
                   ) -> torch.Tensor:
    local, here = _label_local(labels, s.logp.shape[-1])
    nll = -tp_sum(s.logp.gather(-1, local[..., None])[..., 0] * here)
    if eps > 0:
        nll = (1.0 - eps) * nll - eps * vocab_sum(s.logp) / s.vocab
    return (nll * weights).sum()


def _cross_entropy_grad(s: _Stream, labels: torch.Tensor, weights: torch.Tensor, eps: float,
                        out: torch.Tensor) -> None:
    """out += d CE / d logits = w * (p - (1 - eps) onehot(y) - eps * real / V_real)."""
    local, here = _label_local(labels, s.p.shape[-1])
    w = weights[..., None]
    if eps > 0:
        out.addcmul_(s.p - s.real * (eps / s.vocab), w)
    else:
        out.addcmul_(s.p, w)
    out.scatter_add_(-1, local[..., None], -(1.0 - eps) * w * here[..., None])


def _sym_kl(a: _Stream, b: _Stream, weights: torch.Tensor):
    """-> (term, saved for the backward: D = log a - log b, KL(a||b), KL(b||a) per row)."""
    diff = a.logp - b.logp
    kl_ab = vocab_sum(a.p * diff)
    kl_ba = -vocab_sum(b.p * diff)
    return ((kl_ab + kl_ba) * weights).sum() / 2, (diff, kl_ab, kl_ba)


def _sym_kl_grad(a: _Stream, b: _Stream, saved, weights: torch.Tensor, out_a: torch.Tensor,
                 out_b: torch.Tensor) -> None:
    """d symKL / d logits_a = (a * (D - KL(a||b) + 1) - b) / 2, and symmetrically for b with -D."""
    diff, kl_ab, kl_ba = saved
    w = weights[..., None] / 2
    t = (diff - (kl_ab - 1.0)[..., None]).mul_(a.p).sub_(b.p)
    out_a.addcmul_(t, w)
    t = (diff + (kl_ba - 1.0)[..., None]).mul_(b.p).add_(a.p)
    out_b.addcmul_(t, w, value=-1.0)


class _VocabTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, names: tuple, targets: Targets, ar, nar, aux):
        streams = {n: _Stream(x) for n, x in (("ar", ar), ("nar", nar), ("aux", aux))
                   if x is not None}
        if any(n.startswith("kl_ar") for n in names):
            streams["ar_m"] = streams["ar"].gathered(targets.ar_rows)
        w_ar = _mean_weights(targets.ar_valid) if ar is not None else None
        w_m = _mean_weights(targets.valid) if nar is not None else None
        values, saved = [], {}
        for name in names:
            if name == "ce_ar":
                values.append(_cross_entropy(streams["ar"], targets.ar_labels, w_ar,
                                             targets.smoothing))
            elif name.startswith("ce_"):
                values.append(_cross_entropy(streams[name[3:]], targets.labels, w_m,
                                             targets.smoothing))
            else:
                a, b = _kl_sides(name)
                value, saved[name] = _sym_kl(streams[a], streams[b], w_m)
                values.append(value)
        ctx.names, ctx.targets, ctx.streams, ctx.saved = names, targets, streams, saved
        ctx.weights = {"ar": w_ar, "m": w_m}
        return torch.stack(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        streams, targets = ctx.streams, ctx.targets
        grads = {n: torch.zeros_like(s.p) for n, s in streams.items()}
        for g, name in zip(grad.unbind(), ctx.names):
            if name == "ce_ar":
                _cross_entropy_grad(streams["ar"], targets.ar_labels, ctx.weights["ar"] * g,
                                    targets.smoothing, grads["ar"])
            elif name.startswith("ce_"):
                stream = name[3:]
                _cross_entropy_grad(streams[stream], targets.labels, ctx.weights["m"] * g,
                                    targets.smoothing, grads[stream])
            else:
                a, b = _kl_sides(name)
                _sym_kl_grad(streams[a], streams[b], ctx.saved[name], ctx.weights["m"] * g,
                             grads[a], grads[b])
        if "ar_m" in grads:
            rows = targets.ar_rows[..., None].expand_as(grads["ar_m"])
            grads["ar"].scatter_add_(1, rows, grads["ar_m"])
        return None, None, grads.get("ar"), grads.get("nar"), grads.get("aux")


def _kl_sides(name: str) -> tuple[str, str]:
    """kl_ar_nar -> ("ar_m", "nar"): the AR side of a KL term is read at the masked slots."""
    a, b = name[3:].split("_")
    return ("ar_m" if a == "ar" else a), b


def vocab_terms(names: tuple[str, ...], targets: Targets, ar: Optional[torch.Tensor],
                nar: Optional[torch.Tensor], aux: Optional[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The named terms (ce_ar, ce_nar, ce_aux, kl_ar_nar, kl_ar_aux, kl_nar_aux) from vocab-
    parallel logits ar [B, T, V_local], nar / aux [B, K, V_local] (None where no term reads the
    stream) -> {name: scalar}, differentiable into each stream's logits."""
    if not names:
        return {}
    values = _VocabTerms.apply(tuple(names), targets, ar, nar, aux)
    return dict(zip(names, values.unbind()))
