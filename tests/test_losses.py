"""Loss terms against hand computations with torch's own functions and against the unfused
reference (tests/loss_reference.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import loss_reference as reference

from janus_pretrain.config import LossWeights, ModelConfig, ObjectiveConfig
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives import losses
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.parallel.vocab import PAD_LOGIT
from janus_pretrain.tokenizer import PAD


WEIGHTS = {"ce_ar": 1.0, "ce_nar": 0.5, "ce_aux": 0.5, "kl_ar_nar": 1.0, "kl_ar_aux": 3.0,
           "kl_nar_aux": 1.0}


def padded_logits(*shape, vocab: int) -> torch.Tensor:
    """Random logits [*shape] whose columns from `vocab` on are the table's padding."""
    x = torch.randn(*shape)
    x[..., vocab:] = PAD_LOGIT
    return x


def random_targets(b=3, t=7, k=4, vocab=11, smoothing=0.1) -> losses.Targets:
    ar_valid = torch.rand(b, t) > 0.2
    valid = torch.rand(b, k) > 0.3
    return losses.Targets(torch.randint(0, vocab, (b, t)), ar_valid,
                          torch.randint(0, vocab, (b, k)), valid,
                          torch.randint(0, t, (b, k)), smoothing)


def test_reference_cross_entropy_is_torch_over_the_real_vocabulary(single_process):
    torch.manual_seed(0)
    logits = padded_logits(3, 5, 16, vocab=11)
    labels = torch.randint(0, 11, (3, 5))
    valid = torch.rand(3, 5) > 0.3
    for eps in (0.0, 0.1):
        ours = reference.cross_entropy(logits, labels, valid, eps)
        ref = F.cross_entropy(logits[valid][:, :11], labels[valid], label_smoothing=eps)
        torch.testing.assert_close(ours, ref)


# Every term; the cmlm ablation (slots NAR and AUX, no KL); KL terms without CE_AR (the AR
# stream's gradient comes from its slot rows only); CE_AR alone (no slot stream).
SUBSETS = [tuple(WEIGHTS), ("ce_nar", "ce_aux"), ("kl_ar_nar", "kl_nar_aux", "ce_nar"),
           ("ce_ar",)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["all", "cmlm", "kl_without_ce_ar", "ce_ar"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_terms_and_gradients_equal_the_unfused_reference(single_process, smoothing,
                                                               subset):
    torch.manual_seed(1)
    targets = random_targets(smoothing=smoothing)
    logits = {"ar": padded_logits(3, 7, 16, vocab=11), "nar": padded_logits(3, 4, 16, vocab=11),
              "aux": padded_logits(3, 4, 16, vocab=11)}
    weights = {t: WEIGHTS[t] for t in subset}
    got = reference.fused_and_reference(targets, logits, weights)
    (fused, fused_grads), (ref, ref_grads) = got["fused"], got["reference"]
    for name in weights:
        torch.testing.assert_close(fused[name], ref[name], rtol=0, atol=1e-6, msg=name)
    for name, grad in ref_grads.items():
        if grad is None:  # no term of the subset reads this stream
            assert fused_grads[name] is None, name
            continue
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=1e-6, msg=name)
        assert (fused_grads[name][..., 11:] == 0).all()  # padding columns take no gradient


def test_sym_kl_symmetric_zero_and_two_sided_gradients(single_process):
    torch.manual_seed(1)
    targets = random_targets()
    a = padded_logits(3, 4, 16, vocab=11).requires_grad_()
    b = padded_logits(3, 4, 16, vocab=11).requires_grad_()
    ar = padded_logits(3, 7, 16, vocab=11)

    def kl(x, y):
        return losses.vocab_terms(("kl_nar_aux",), targets, ar, x, y)["kl_nar_aux"]

    value = kl(a, b)
    torch.testing.assert_close(kl(b, a), value)
    assert float(kl(a, a)) == pytest.approx(0.0, abs=1e-7)
    value.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # Invalid rows take no part.
    assert a.grad[~targets.valid].abs().sum() == 0


@pytest.mark.parametrize("normalization", ["term", "target_tokens"])
def test_janus_loss_terms_by_hand(single_process, normalization):
    torch.manual_seed(2)
    weights = LossWeights(ce_ar=1.0, ce_nar=0.5, ce_aux=0.5, kl_ar_nar=1.0, kl_ar_aux=3.0,
                          kl_nar_aux=1.0, length=0.1)
    obj = JanusObjective(ObjectiveConfig(masking="span", weights=weights, label_smoothing=0.1,
                                         loss_normalization=normalization), 32, 32, 64)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, hidden_size=16, ffn_hidden_size=32,
                      num_heads=2, max_positions=64, length_classes=64, dropout=0.0,
                      attention_dropout=0.0)
    model = JanusModel(cfg, 40, PAD)
    rng = np.random.default_rng(0)
    batch = obj.collate([(rng.integers(5, 40, 6), rng.integers(5, 40, n)) for n in (4, 9)], rng)
    prep = obj.prepare(batch)
    out = model(**prep.model_inputs)
    total, terms = obj.loss(out, prep)
    assert set(terms) == {"ce_ar", "ce_nar", "ce_aux", "kl_ar_nar", "kl_ar_aux", "kl_nar_aux",
                          "length"}

    tgt, masked = batch["tgt"], batch["masked"]
    eps = 0.1
    ar_valid = tgt[:, 1:] != PAD
    # The real vocabulary only: the model's padding columns hold PAD_LOGIT.
    out = {**out, **{k: out[k][..., :40] for k in ("ar", "nar", "aux")}}
    ce_ar = F.cross_entropy(out["ar"][ar_valid], tgt[:, 1:][ar_valid], label_smoothing=eps)
    # NAR/AUX slots hold the masked positions in ascending order.
    nar_rows, aux_rows, ar_rows, labels = [], [], [], []
    for b in range(tgt.shape[0]):
        for k, pos in enumerate(torch.nonzero(masked[b]).flatten().tolist()):
            nar_rows.append(out["nar"][b, k])
            aux_rows.append(out["aux"][b, k])
            ar_rows.append(out["ar"][b, pos - 1])  # AR row pos-1 predicts position pos
            labels.append(int(tgt[b, pos]))
    nar, aux, ar = torch.stack(nar_rows), torch.stack(aux_rows), torch.stack(ar_rows)
    labels = torch.tensor(labels)

    def skl(x, y):
        lx, ly = x.log_softmax(-1), y.log_softmax(-1)
        return (0.5 * ((lx.exp() * (lx - ly)).sum(-1) + (ly.exp() * (ly - lx)).sum(-1))).mean()

    n_tokens = (tgt != PAD).sum(1) - 2
    expected = {
        "ce_ar": ce_ar,
        "ce_nar": F.cross_entropy(nar, labels, label_smoothing=eps),
        "ce_aux": F.cross_entropy(aux, labels, label_smoothing=eps),
        "kl_ar_nar": skl(ar, nar),
        "kl_ar_aux": skl(ar, aux),
        "kl_nar_aux": skl(nar, aux),
        "length": F.cross_entropy(out["length"], n_tokens),
    }
    if normalization == "target_tokens":  # sums over the masked slots / target tokens
        for name in ("ce_nar", "ce_aux", "kl_ar_nar", "kl_ar_aux", "kl_nar_aux"):
            expected[name] = expected[name] * len(labels) / int(ar_valid.sum())
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), msg=name)
    weighted = sum(getattr(weights, n) * v for n, v in expected.items())
    torch.testing.assert_close(total, weighted)
    assert math.isfinite(float(total))


def test_padding_columns_hold_pad_logit_and_train_nothing(single_process):
    """The model's padding columns: PAD_LOGIT plus a product, probability exactly 0, and, through
    every JANUS term, no gradient into the embedding rows that pad the table."""
    torch.manual_seed(3)
    obj = JanusObjective(ObjectiveConfig(masking="span", weights=LossWeights(**WEIGHTS),
                                         label_smoothing=0.1), 32, 32, 64)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, hidden_size=16, ffn_hidden_size=32,
                      num_heads=2, max_positions=64, length_classes=64, dropout=0.0,
                      attention_dropout=0.0)
    model = JanusModel(cfg, 40, PAD)
    assert model.padded_vocab_size > 40
    rng = np.random.default_rng(0)
    batch = obj.collate([(rng.integers(5, 40, 6), rng.integers(5, 40, n)) for n in (4, 9)], rng)
    prep = obj.prepare(batch)
    out = model(**prep.model_inputs)
    for name in ("ar", "nar", "aux"):
        assert torch.isfinite(out[name]).all() and (out[name][..., 40:] < PAD_LOGIT / 2).all()
        assert (out[name][..., :40].abs() < 100).all()
        assert (out[name].float().softmax(-1)[..., 40:] == 0).all()
    total, _ = obj.loss(out, prep)
    total.backward()
    grad = model.embed.weight.grad
    assert grad[:40].abs().sum() > 0 and (grad[40:] == 0).all()


def test_zero_weights_skip_streams(single_process):
    ar_only = JanusObjective(ObjectiveConfig(masking="span", weights=LossWeights(
        ce_ar=1, ce_nar=0, ce_aux=0, kl_ar_aux=0, kl_nar_aux=0)), 16, 16, 32)
    assert ar_only.needs_ar and not ar_only.needs_nar
    rng = np.random.default_rng(0)
    prep = ar_only.prepare(ar_only.collate([(np.arange(5, 9), np.arange(5, 12))], rng))
    assert "nar_tokens" not in prep.model_inputs and "ar_tokens" in prep.model_inputs


def test_kl_warmup_scales_only_the_kl_terms(single_process):
    weights = LossWeights(ce_ar=1.0, ce_nar=0.5, ce_aux=0.5, kl_ar_nar=1.0, kl_ar_aux=3.0,
                          kl_nar_aux=1.0)
    obj = JanusObjective(ObjectiveConfig(masking="span", weights=weights, kl_warmup_steps=10),
                         16, 16, 32)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, hidden_size=16, ffn_hidden_size=32,
                      num_heads=2, max_positions=32, length_classes=32, dropout=0.0,
                      attention_dropout=0.0)
    model = JanusModel(cfg, 40, PAD)
    rng = np.random.default_rng(1)
    prep = obj.prepare(obj.collate([(rng.integers(5, 40, 5), rng.integers(5, 40, 7))], rng))
    out = model(**prep.model_inputs)
    full, terms = obj.loss(out, prep)  # validation: no step, full weights
    kl = sum(getattr(weights, t) * terms[t] for t in terms if t.startswith("kl_"))
    assert float(kl) > 0
    for step, scale in ((1, 0.1), (4, 0.4), (10, 1.0), (50, 1.0)):
        total, _ = obj.loss(out, prep, step)
        torch.testing.assert_close(total, full - (1 - scale) * kl)


def _tiny_janus(dropout: float, seed: int = 3) -> JanusModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=1, hidden_size=16, ffn_hidden_size=32,
                      num_heads=2, max_positions=32, length_classes=32, dropout=dropout,
                      attention_dropout=dropout)
    return JanusModel(cfg, 40, PAD)


def _loss_and_grads(objective_cfg: ObjectiveConfig, dropout: float):
    """Loss terms and parameter gradients of one step of a fixed tiny model and batch."""
    obj = JanusObjective(objective_cfg, 16, 16, 32)
    model = _tiny_janus(dropout)
    rng = np.random.default_rng(4)
    pairs = [(rng.integers(5, 40, 6), rng.integers(5, 40, 8)) for _ in range(3)]
    prep = obj.prepare(obj.collate(pairs, rng))
    torch.manual_seed(5)  # the same dropout stream for both settings
    total, terms = obj.loss(model(**prep.model_inputs), prep)
    total.backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_encoder_passes_equal_one_without_dropout(single_process):
    """The authors' two-pass step differs from ours only by its second dropout sample: without
    dropout every term and every gradient is the same; with dropout the terms differ."""
    weights = LossWeights(**WEIGHTS, length=0.1)
    one = _loss_and_grads(ObjectiveConfig(masking="span", weights=weights), 0.0)
    two = _loss_and_grads(ObjectiveConfig(masking="span", weights=weights, encoder_passes=2), 0.0)
    for name in one[0]:
        torch.testing.assert_close(two[0][name], one[0][name], rtol=1e-6, atol=1e-7, msg=name)
    assert one[1].keys() == two[1].keys()
    for name in one[1]:
        torch.testing.assert_close(two[1][name], one[1][name], rtol=1e-5, atol=1e-7, msg=name)
    one_d = _loss_and_grads(ObjectiveConfig(masking="span", weights=weights), 0.3)
    two_d = _loss_and_grads(ObjectiveConfig(masking="span", weights=weights, encoder_passes=2), 0.3)
    assert not torch.allclose(one_d[0]["kl_ar_nar"], two_d[0]["kl_ar_nar"])


def test_two_encoder_passes_count_one_more_encoder_pass():
    from janus_pretrain.model.flops import step_flops

    cfg = ModelConfig(encoder_layers=2, decoder_layers=1, hidden_size=16, ffn_hidden_size=32,
                      num_heads=2, max_positions=32, length_classes=32)
    host = JanusObjective(ObjectiveConfig(masking="span"), 16, 16, 32).collate(
        [(np.arange(5, 11), np.arange(5, 13))], np.random.default_rng(0))
    one, two = (JanusObjective(ObjectiveConfig(masking="span", encoder_passes=n), 16, 16, 32)
                .flops(host, cfg, 40) for n in (1, 2))
    s = host["src"].shape[1]
    encoder = step_flops(cfg, 40, 1, s, [])
    assert two - one == pytest.approx(encoder)
    ar_only = JanusObjective(ObjectiveConfig(masking="span", encoder_passes=2, weights=LossWeights(
        ce_ar=1, ce_nar=0, ce_aux=0, kl_ar_aux=0, kl_nar_aux=0)), 16, 16, 32)
    assert ar_only.encoder_passes == 1  # one stream: nothing to give a second pass


def test_one_sided_kl_sends_no_gradient_into_ar(single_process):
    """kl_ar_detach: the KL(AR, .) terms keep their values, put exactly nothing on the AR logits
    and the same as before on NAR and AUX."""
    torch.manual_seed(2)
    targets = random_targets(smoothing=0.1)
    base = {"ar": padded_logits(3, 7, 16, vocab=11), "nar": padded_logits(3, 4, 16, vocab=11),
            "aux": padded_logits(3, 4, 16, vocab=11)}
    names = ("ce_ar", "kl_ar_nar", "kl_ar_aux")

    def grads(detach: bool, terms=names):
        logits = {k: v.clone().requires_grad_() for k, v in base.items()}
        t = losses.Targets(*[getattr(targets, f) for f in ("ar_labels", "ar_valid", "labels",
                                                             "valid", "ar_rows", "smoothing")],
                           detach_ar_kl=detach)
        values = losses.vocab_terms(terms, t, logits["ar"], logits["nar"], logits["aux"])
        sum(values.values()).backward()
        return values, {k: (v.grad if v.grad is not None else torch.zeros_like(v))
                        for k, v in logits.items()}

    two_sided, g2 = grads(False)
    one_sided, g1 = grads(True)
    _, ce_only = grads(False, ("ce_ar",))
    for name in names:
        torch.testing.assert_close(one_sided[name], two_sided[name])
    torch.testing.assert_close(g1["ar"], ce_only["ar"], rtol=0, atol=0)
    assert not torch.allclose(g2["ar"], ce_only["ar"])  # two-sided: AR is pulled
    for k in ("nar", "aux"):
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=0)


def test_two_encoder_passes_are_a_janus_option_only():
    from janus_pretrain.errors import JanusError

    with pytest.raises(JanusError, match="^config: objective.encoder_passes: 2 is a JANUS step"):
        ObjectiveConfig(kind="bang", masking="none", encoder_passes=2)
    with pytest.raises(JanusError, match="must be 1 or 2"):
        ObjectiveConfig(encoder_passes=3)
