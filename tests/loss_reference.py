"""The unfused JANUS loss terms (log-softmax per stream, then each CE and each symKL term on its
own, autograd for the backward), the reference that objectives/losses.py must equal at any TP
size. Same definition: padding columns of the table (PAD_LOGIT) have probability 0, take no
part in a KL term and no share of label smoothing, whose uniform term is over the real
vocabulary only."""
import torch

from janus_pretrain.parallel.vocab import PAD_LOGIT, log_softmax, shard_start, tp_sum, vocab_sum


def label_log_prob(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) from vocab-parallel log-probs: [..., V_local], [...] -> [...]."""
    v_local = logp.shape[-1]
    local = labels - shard_start(v_local)
    here = (local >= 0) & (local < v_local)
    picked = logp.gather(-1, local.clamp(0, v_local - 1)[..., None])[..., 0]
    return tp_sum(picked * here)


def _real(logits: torch.Tensor) -> torch.Tensor:
    """[..., V_local] -> [V_local] bool, False in the padding columns."""
    return logits.detach()[(0,) * (logits.dim() - 1)] > PAD_LOGIT / 2


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def cross_entropy(logits, labels, valid, smoothing=0.0):
    logp = log_softmax(logits)
    nll = -label_log_prob(logp, labels)
    if smoothing > 0:
        real = _real(logits)
        uniform = -vocab_sum(logp.masked_fill(~real, 0.0)) / tp_sum(real.sum().float())
        nll = (1.0 - smoothing) * nll + smoothing * uniform
    return masked_mean(nll, valid)


def sym_kl(logits_p, logits_q, valid):
    real = _real(logits_p)
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    diff = (lp - lq).masked_fill(~real, 0.0)  # padding columns take no part
    per_row = vocab_sum((lp.exp() - lq.exp()) * diff) / 2
    return masked_mean(per_row, valid)


def janus_terms(targets, ar, nar, aux) -> dict:
    """The six vocabulary terms from logits ar [B, T, V_local], nar / aux [B, K, V_local]."""
    eps = targets.smoothing
    rows = targets.ar_rows[..., None].expand(-1, -1, ar.shape[-1])
    ar_m = ar.gather(1, rows)
    return {"ce_ar": cross_entropy(ar, targets.ar_labels, targets.ar_valid, eps),
            "ce_nar": cross_entropy(nar, targets.labels, targets.valid, eps),
            "ce_aux": cross_entropy(aux, targets.labels, targets.valid, eps),
            "kl_ar_nar": sym_kl(ar_m, nar, targets.valid),
            "kl_ar_aux": sym_kl(ar_m, aux, targets.valid),
            "kl_nar_aux": sym_kl(nar, aux, targets.valid)}


def fused_and_reference(targets, logits: dict, weights: dict) -> dict:
    """Both implementations on copies of the same logits {stream: tensor}; the total
    sum(weights[t] * term) is backpropagated through each. -> {"fused" | "reference":
    (terms, {stream: logit gradient})}."""
    from janus_pretrain.objectives import losses

    out = {}
    for kind in ("fused", "reference"):
        leaves = {n: x.detach().clone().requires_grad_() for n, x in logits.items()}
        if kind == "fused":
            terms = losses.vocab_terms(tuple(weights), targets, leaves["ar"], leaves["nar"],
                                       leaves["aux"])
        else:
            terms = janus_terms(targets, leaves["ar"], leaves["nar"], leaves["aux"])
        sum(weights[t] * terms[t] for t in weights).backward()
        out[kind] = ({t: terms[t].detach() for t in weights},
                     {n: x.grad for n, x in leaves.items()})
    return out
