"""The JANUS cross-entropy and symmetric-KL terms in one pass over the vocabulary
(docs/method.md, section 4).

Each stream's logits are normalised once (log-probabilities and probabilities), every CE and
symKL term is read from those, and the backward is written out: one gradient per stream's
logits, instead of autograd through a log-softmax, an exp and a difference per KL term. The
streams read at the masked slots are stacked, so that their sums and gradients are batched
products (`_VocabTerms`). Logits arrive split over the tensor-parallel group along the vocabulary
(janus_pretrain.parallel.vocab) and are never gathered; the forward's vocabulary sums are
all-reduced, the backward needs no communication (every gradient is local given the global
per-row sums).

Only the real vocabulary counts: the model's padding columns hold PAD_LOGIT (probability 0;
finite, so p log p is 0 there), they are left out of label smoothing's uniform distribution
(1 / V_real each), and contribute nothing to a KL term. Terms are means over the valid token
rows of the micro-batch, in fp32:
    CE    (1 - eps) * -log p(y) + eps * mean over the real vocabulary of -log p(v)
    symKL (KL(p||q) + KL(q||p)) / 2 = sum_v (p - q)(log p - log q) / 2, gradients into both sides
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from janus_pretrain.parallel.vocab import log_softmax, real_columns, shard_start, tp_sum


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
    """Normalised logits: logp [..., V_local] fp32 (finite in padding columns), p = exp(logp) (0
    there), real [V_local] (1.0 for a real token, 0.0 for padding) and the global
    real-vocabulary size."""

    def __init__(self, logits: torch.Tensor):
        self.logp = log_softmax(logits)
        self.p = self.logp.exp()
        self.real = real_columns(logits)
        self.vocab = tp_sum(self.real.sum())
        self._real_sum = None

    def real_sum(self) -> torch.Tensor:
        """sum of logp over the real columns, per row [...]: a product with `real`, not a mask."""
        if self._real_sum is None:
            self._real_sum = tp_sum(self.logp @ self.real)
        return self._real_sum


# The streams read at the masked slots, in the order they are stacked: the AR stream's rows that
# predict the masked positions, then NAR and AUX.
SLOTS = ("ar_m", "nar", "aux")


def _flat_rows(rows: torch.Tensor, t: int) -> torch.Tensor:
    """rows [B, K] into a [B, T, ...] tensor -> indices [B * K] into its [B * T, ...] view."""
    return (rows + t * torch.arange(rows.shape[0], device=rows.device)[:, None]).flatten()


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, V], rows [B, K] -> x[b, rows[b, k]] [B, K, V] (whole rows copied: index_select,
    not an element-wise gather)."""
    b, t, v = x.shape
    return x.reshape(b * t, v).index_select(0, _flat_rows(rows, t)).view(b, -1, v)


def _mean_weights(valid: torch.Tensor) -> torch.Tensor:
    """valid [...] bool -> [...] fp32 weights of a mean over the valid rows."""
    valid = valid.float()
    return valid / valid.sum().clamp(min=1.0)


def _label_local(labels: torch.Tensor, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global labels [...] -> (shard column [...] clamped into the shard, whether it is here)."""
    local = labels - shard_start(v_local)
    here = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), here


def _cross_entropy(s: _Stream, slot: Optional[int], labels: torch.Tensor, weights: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """Weighted sum of label-smoothed CE over the rows of stream s (of its slot `slot` [B, K]
    when s is stacked [B, K, s, V_local])."""
    pick = (lambda x: x) if slot is None else (lambda x: x[:, :, slot])
    logp = pick(s.logp)
    local, here = _label_local(labels, logp.shape[-1])
    nll = -tp_sum(logp.gather(-1, local[..., None])[..., 0] * here)
    if eps > 0:
        nll = (1.0 - eps) * nll - eps * pick(s.real_sum()) / s.vocab
    return (nll * weights).sum()


def _subtract_ce(grad: torch.Tensor, s: _Stream, labels: torch.Tensor, w: torch.Tensor,
                 eps: float) -> None:
    """grad [..., V_local] -= w ((1 - eps) onehot(label) + eps real / V_real), in place; the
    w p part of the CE gradient is the caller's (w [..., 1])."""
    if eps > 0:
        grad.addcmul_(s.real, w / s.vocab, value=-eps)  # s.vocab: a device scalar
    local, here = _label_local(labels, grad.shape[-1])
    grad.scatter_add_(-1, local[..., None], -(1.0 - eps) * w * here[..., None])


class _VocabTerms(torch.autograd.Function):
    """CE_AR over the AR stream's rows; every term at the masked slots over the slot streams
    (SLOTS) stacked as [B, K, s, V_local], so that one batched product gives every sum
    sum_v p_x log p_y of a row (the s x s matrix `dots`) and one more pass the s gradients.

    symKL(x, y) = (KL(x||y) + KL(y||x)) / 2 with KL(x||y) = dots[x, x] - dots[x, y], and
    d symKL / d logits_x = (p_x (log p_x - log p_y - KL(x||y) + 1) - p_y) / 2, so with w the
    term's weight per row / 2 and w_ce that of a CE on x, every slot stream's gradient is
        p_x (c_x + sum_y A[x, y] log p_y) - sum_y Bm[x, y] p_y - w_ce (CE's one-hot, smoothing)
    c_x = sum w (1 - KL(x||y)) + w_ce, A[x, x] = sum w, A[x, y] = -w, Bm[x, y] = w: two batched
    products, one in-place product and the CE's smoothing and sparse parts, all but the first
    in place (each fresh [rows, V] buffer is one more pass of writes)."""

    @staticmethod
    def forward(ctx, names: tuple, targets: Targets, ar, nar, aux):
        ar_stream = _Stream(ar) if "ce_ar" in names else None
        slots = slot_streams(names)
        logits = {"nar": nar, "aux": aux}
        if "ar_m" in slots:
            logits["ar_m"] = _take_rows(ar, targets.ar_rows)
        stacked = _Stream(torch.stack([logits[n] for n in slots], dim=2)) if slots else None
        dots = None
        if any(name.startswith("kl_") for name in names):
            p, logp = (x.flatten(0, -3) for x in (stacked.p, stacked.logp))
            dots = tp_sum(torch.bmm(p, logp.transpose(1, 2)).view(*stacked.p.shape[:-1], -1))
        w_ar = _mean_weights(targets.ar_valid) if ar_stream is not None else None
        w_m = _mean_weights(targets.valid) if slots else None
        values, kls = [], {}
        diag = dots.diagonal(dim1=-2, dim2=-1) if dots is not None else None
        for name in names:
            if name == "ce_ar":
                values.append(_cross_entropy(ar_stream, None, targets.ar_labels, w_ar,
                                             targets.smoothing))
            elif name.startswith("ce_"):
                x = slots.index(name[3:])
                values.append(_cross_entropy(stacked, x, targets.labels, w_m, targets.smoothing))
            else:
                x, y = (slots.index(n) for n in _slots_of(name))
                kls[name] = (diag[..., x] - dots[..., x, y], diag[..., y] - dots[..., y, x])
                values.append(((kls[name][0] + kls[name][1]) * w_m).sum() / 2)
        ctx.names, ctx.targets, ctx.slots, ctx.kls = names, targets, slots, kls
        ctx.ar_stream, ctx.stacked, ctx.w_ar, ctx.w_m = ar_stream, stacked, w_ar, w_m
        ctx.ar_shape = ar.shape if ar is not None else None
        return torch.stack(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        targets, slots, eps = ctx.targets, ctx.slots, ctx.targets.smoothing
        grad_ar = grad_slots = None
        g = dict(zip(ctx.names, grad.unbind()))
        if "ce_ar" in g:
            s, w = ctx.ar_stream, (ctx.w_ar * g["ce_ar"])[..., None]
            grad_ar = s.p * w
            _subtract_ce(grad_ar, s, targets.ar_labels, w, eps)
        if slots:
            s = ctx.stacked
            n = len(slots)
            c = s.p.new_zeros(*s.p.shape[:-2], n)
            a = s.p.new_zeros(*s.p.shape[:-2], n, n)
            bm = torch.zeros_like(a)
            trained = set()
            for name, (kl_xy, kl_yx) in ctx.kls.items():
                w = ctx.w_m * (g[name] / 2)
                x_name, y_name = _slots_of(name)
                x, y = slots.index(x_name), slots.index(y_name)
                sides = [(y, x, kl_yx)]
                if not (x_name == "ar_m" and targets.detach_ar_kl):
                    sides.append((x, y, kl_xy))
                for i, j, kl in sides:
                    c[..., i] += w * (1.0 - kl)
                    a[..., i, i] += w
                    a[..., i, j] -= w
                    bm[..., i, j] += w
                    trained.add(i)
            ce = {}
            for name in ("ce_nar", "ce_aux"):
                if name in g:
                    i = slots.index(name[3:])
                    ce[i] = (ctx.w_m * g[name])[..., None]
                    c[..., i] += ce[i][..., 0]
                    trained.add(i)
            # p_x c_x is row scaling, so (c + A log p) p - Bm p = (A log p) p + (diag(c) - Bm) p:
            # no broadcast of c to copy into the fresh buffer first.
            p, logp = s.p.flatten(0, -3), s.logp.flatten(0, -3)
            grad_slots = torch.bmm(a.flatten(0, -3), logp).mul_(p)
            grad_slots.baddbmm_((torch.diag_embed(c) - bm).flatten(0, -3), p)
            grad_slots = grad_slots.view_as(s.p)
            for i, w in ce.items():
                _subtract_ce(grad_slots[:, :, i], s, targets.labels, w, eps)
            grads = {n: grad_slots[:, :, i] for i, n in enumerate(slots) if i in trained}
            if "ar_m" in grads:
                if grad_ar is None:  # the AR rows take gradient from the KL terms only
                    grad_ar = s.p.new_zeros(ctx.ar_shape)
                b, t, v = grad_ar.shape
                grad_ar.view(b * t, v).index_add_(0, _flat_rows(targets.ar_rows, t),
                                                  grads["ar_m"].reshape(-1, v))
            return None, None, grad_ar, grads.get("nar"), grads.get("aux")
        return None, None, grad_ar, None, None


def slot_streams(names: tuple[str, ...]) -> list[str]:
    """The slot streams (SLOTS) the terms `names` read, stacked in this order."""
    return [n for n in SLOTS if any(n in _slots_of(name) for name in names)]


def _slots_of(name: str) -> tuple[str, ...]:
    """The slot streams a term reads: ce_ar none (it reads the AR rows themselves), ce_nar
    ("nar",), kl_ar_aux ("ar_m", "aux"): the AR side of a KL term is read at the masked slots."""
    if name == "ce_ar":
        return ()
    return tuple("ar_m" if side == "ar" else side for side in name.split("_")[1:])


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
