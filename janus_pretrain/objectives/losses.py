"""The JANUS cross-entropy and symmetric-KL terms in one pass over the vocabulary
(docs/method.md, section 4).

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
    detach_ar_kl: bool = False  # symKL(AR, .) sends no gradient into the AR logits


class _Stream:
    """One stream's normalised shard: logp [..., V_local] fp32 (0, not -inf, in padding
    columns, so that products and sums over the shard stay finite), p = exp(logp) (0 there),
    real [V_local] (1.0 for a real token, 0.0 for padding), the global real-vocabulary size
    and, once asked for, sum_v p log p per row."""

    def __init__(self, logp: torch.Tensor, p: torch.Tensor, real: torch.Tensor,
                 vocab: torch.Tensor):
        self.logp, self.p, self.real, self.vocab = logp, p, real, vocab
        self._neg_entropy = None

    @classmethod
    def of(cls, logits: torch.Tensor) -> "_Stream":
        logp = log_softmax(logits)
        p = logp.exp()
        real = torch.isfinite(logits.detach()[(0,) * (logits.dim() - 1)])
        logp.masked_fill_(~real, 0.0)
        return cls(logp, p, real.float(), tp_sum(real.sum().float()))

    def gathered(self, rows: torch.Tensor) -> "_Stream":
        """The rows [B, K] of a [B, T, V_local] stream as a [B, K, V_local] one."""
        return _Stream(_take_rows(self.logp, rows), _take_rows(self.p, rows), self.real,
                       self.vocab)

    def neg_entropy(self, scratch: torch.Tensor) -> torch.Tensor:
        if self._neg_entropy is None:
            self._neg_entropy = vocab_dot(self.p, self.logp, scratch)
        return self._neg_entropy


def _flat_rows(rows: torch.Tensor, t: int) -> torch.Tensor:
    """rows [B, K] into a [B, T, ...] tensor -> indices [B * K] into its [B * T, ...] view."""
    return (rows + t * torch.arange(rows.shape[0], device=rows.device)[:, None]).flatten()


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, V], rows [B, K] -> x[b, rows[b, k]] [B, K, V] (whole rows copied: index_select,
    not an element-wise gather)."""
    b, t, v = x.shape
    return x.reshape(b * t, v).index_select(0, _flat_rows(rows, t)).view(b, -1, v)


def vocab_dot(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum_v x y over the (split) vocabulary: [..., V_local] x 2 -> [...]; the products go to
    `scratch` (of x's shape), reused by every dot product of the step (a fresh tensor each time
    costs page faults)."""
    return tp_sum(torch.mul(x, y, out=scratch).sum(-1))


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


def _kl_pair(a: _Stream, b: _Stream, scratch: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(a||b), KL(b||a)) per row, from sum p log p and the two cross sums."""
    return (a.neg_entropy(scratch) - vocab_dot(a.p, b.logp, scratch),
            b.neg_entropy(scratch) - vocab_dot(b.p, a.logp, scratch))


def _stream_grad(x: _Stream, kl: list, ce: Optional[tuple], eps: float) -> torch.Tensor:
    """d loss / d logits of one stream [..., V_local].

    kl: (w [..., 1], partner y, KL(x||y) [...]) per symKL term on x, w its weight per row / 2;
    d symKL / d logits_x = p_x (log p_x - log p_y - KL(x||y) + 1) - p_y  (times w), so
        grad = p_x (sum_w (1 - KL) + w_ce + (sum_w) log p_x - sum_y w log p_y) - sum_y w p_y
               - w_ce ((1 - eps) onehot(label) + eps real / V_real)
    with ce = (labels, w_ce [..., 1]) for the cross entropy on x. In-place updates of one
    buffer: a fresh [rows, V] tensor costs page faults that in-place ops do not."""
    offset = sum(w * (1.0 - k[..., None]) for w, _, k in kl) if kl else 0.0
    if ce is not None:
        offset = offset + ce[1]
    if kl:
        grad = x.logp * sum(w for w, _, _ in kl)
        grad.add_(offset)
        for w, y, _ in kl:
            grad.addcmul_(y.logp, w, value=-1.0)
        grad.mul_(x.p)
        for w, y, _ in kl:
            grad.addcmul_(y.p, w, value=-1.0)
    elif ce is not None:
        grad = x.p * offset
    else:
        grad = torch.zeros_like(x.p)
    if ce is not None:
        labels, w = ce
        if eps > 0:
            grad.addcmul_(x.real, w, value=-eps / x.vocab)
        local, here = _label_local(labels, x.p.shape[-1])
        grad.scatter_add_(-1, local[..., None], -(1.0 - eps) * w * here[..., None])
    return grad


class _VocabTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, names: tuple, targets: Targets, ar, nar, aux):
        streams = {n: _Stream.of(x) for n, x in (("ar", ar), ("nar", nar), ("aux", aux))
                   if x is not None}
        if any(n.startswith("kl_ar") for n in names):
            streams["ar_m"] = streams["ar"].gathered(targets.ar_rows)
        w_ar = _mean_weights(targets.ar_valid) if ar is not None else None
        w_m = _mean_weights(targets.valid) if nar is not None else None
        values, kls = [], {}
        scratch = torch.empty_like(streams["nar"].p) if nar is not None else None
        for name in names:
            if name == "ce_ar":
                values.append(_cross_entropy(streams["ar"], targets.ar_labels, w_ar,
                                             targets.smoothing))
            elif name.startswith("ce_"):
                values.append(_cross_entropy(streams[name[3:]], targets.labels, w_m,
                                             targets.smoothing))
            else:
                a, b = _kl_sides(name)
                kls[name] = _kl_pair(streams[a], streams[b], scratch)
                values.append(((kls[name][0] + kls[name][1]) * w_m).sum() / 2)
        ctx.names, ctx.targets, ctx.streams, ctx.kls = names, targets, streams, kls
        ctx.weights = {"ar": w_ar, "m": w_m}
        return torch.stack(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        streams, targets = ctx.streams, ctx.targets
        kl = {n: [] for n in streams}
        ce = {}
        for g, name in zip(grad.unbind(), ctx.names):
            if name == "ce_ar":
                ce["ar"] = (targets.ar_labels, (ctx.weights["ar"] * g)[..., None])
            elif name.startswith("ce_"):
                ce[name[3:]] = (targets.labels, (ctx.weights["m"] * g)[..., None])
            else:
                a, b = _kl_sides(name)
                w = (ctx.weights["m"] * (g / 2))[..., None]
                kl_ab, kl_ba = ctx.kls[name]
                if not (a == "ar_m" and targets.detach_ar_kl):
                    kl[a].append((w, streams[b], kl_ab))
                kl[b].append((w, streams[a], kl_ba))
        # a stream no term differentiates (the AR side of a detached KL) gets no gradient work
        grads = {n: _stream_grad(s, kl[n], ce.get(n), targets.smoothing)
                 for n, s in streams.items() if kl[n] or n in ce}
        if "ar_m" in grads:
            b, t, v = grads["ar"].shape
            grads["ar"].view(b * t, v).index_add_(0, _flat_rows(targets.ar_rows, t),
                                                   grads["ar_m"].view(-1, v))
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


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                        smoothing: float) -> torch.Tensor:
    """Label-smoothed CE, the mean over the valid rows, of vocab-parallel logits [B, T, V_local]
    against labels / valid [B, T] (the CE_AR computation, for any rows: BANG's streams)."""
    targets = Targets(labels, valid, None, None, None, smoothing)
    return vocab_terms(("ce_ar",), targets, logits, None, None)["ce_ar"]
