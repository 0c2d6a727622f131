"""The two-stream NAR/AUX pass and the AR pass on the real model: no leakage, and the fused
masked pass equals a slow per-row reference that applies the visibility rules of docs/method.md, section 2, directly."""
import math

import numpy as np
import pytest
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import MASK, PAD

VOCAB = 50


@pytest.fixture(scope="module")
def model(single_process):
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=3, hidden_size=32, ffn_hidden_size=64,
                      num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0)
    return JanusModel(cfg, VOCAB, PAD).eval()


@pytest.fixture(scope="module")
def objective():
    return JanusObjective(ObjectiveConfig(masking="span"), 32, 32, 256)


def make_batch(objective, seed=0, lengths=(9, 14, 5)):
    rng = np.random.default_rng(seed)
    examples = [(rng.integers(5, VOCAB, size=n), rng.integers(5, VOCAB, size=n + 2))
                for n in lengths]
    return objective.collate(examples, rng)


def run(model, objective, batch):
    prep = objective.prepare(batch)
    with torch.no_grad():
        out = model(**prep.model_inputs)
    return prep, out


def other_token(t: int) -> int:
    return 5 + (t - 5 + 7) % (VOCAB - 5)


def test_nar_and_aux_never_see_their_own_true_token(model, objective):
    batch = make_batch(objective)
    prep, out = run(model, objective, batch)
    s = prep.streams
    checked = 0
    for b in range(batch["tgt"].shape[0]):
        for k in torch.nonzero(s.valid[b]).flatten().tolist():
            i = int(s.masked_pos[b, k])
            changed = {key: v.clone() for key, v in batch.items()}
            changed["tgt"][b, i] = other_token(int(batch["tgt"][b, i]))
            _, out2 = run(model, objective, changed)
            torch.testing.assert_close(out2["nar"][b, k], out["nar"][b, k], rtol=0, atol=1e-6)
            torch.testing.assert_close(out2["aux"][b, k], out["aux"][b, k], rtol=0, atol=1e-6)
            # The AR stream does see y_i from row i on: the change must reach it (a live check).
            assert not torch.allclose(out2["ar"][b, i], out["ar"][b, i])
            checked += 1
    assert checked >= 10


def test_aux_sees_earlier_masked_tokens_but_not_later_ones(model, objective):
    batch = make_batch(objective, seed=1)
    prep, out = run(model, objective, batch)
    s = prep.streams
    b = int(torch.argmax(s.valid.sum(1)))
    slots = torch.nonzero(s.valid[b]).flatten().tolist()
    assert len(slots) >= 3
    mid = slots[len(slots) // 2]
    j = int(s.masked_pos[b, mid])
    changed = {key: v.clone() for key, v in batch.items()}
    changed["tgt"][b, j] = other_token(int(batch["tgt"][b, j]))
    _, out2 = run(model, objective, changed)
    for k in slots:
        i = int(s.masked_pos[b, k])
        # NAR never sees a true masked token.
        torch.testing.assert_close(out2["nar"][b, k], out["nar"][b, k], rtol=0, atol=1e-6)
        same_aux = torch.allclose(out2["aux"][b, k], out["aux"][b, k], rtol=0, atol=1e-6)
        assert same_aux == (i <= j), f"AUX at {i} after changing masked y_{j}"


def test_ar_row_never_sees_the_future(model, objective):
    batch = make_batch(objective, seed=2)
    _, out = run(model, objective, batch)
    b = 1
    length = int((batch["tgt"][b] != PAD).sum())
    for t in range(1, length - 1):
        changed = {key: v.clone() for key, v in batch.items()}
        changed["tgt"][b, t] = other_token(int(batch["tgt"][b, t]))
        _, out2 = run(model, objective, changed)
        # AR row r predicts y_{r+1} from y_<=r: rows r < t must not move, row t must.
        torch.testing.assert_close(out2["ar"][b, :t], out["ar"][b, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out2["ar"][b, t], out["ar"][b, t])


def reference_rows(target: list[int], masked: set[int]) -> tuple[list, dict]:
    """Rows (kind, position, token) and who sees whom, written from docs/method.md's rules directly."""
    rows = [("tok", p, t) for p, t in enumerate(target) if p not in masked]
    rows += [("mask", p, MASK) for p in sorted(masked)]
    rows += [("true", p, target[p]) for p in sorted(masked)]
    rows += [("query", p, MASK) for p in sorted(masked)]

    def sees(row, col):
        kind, i, _ = row
        ckind, j, _ = col
        if ckind == "query":
            return False
        if kind in ("tok", "mask"):
            return ckind in ("tok", "mask")
        if ckind == "tok":
            return True
        if kind == "true":
            return (ckind == "true" and j <= i) or (ckind == "mask" and j > i)
        return (ckind == "true" and j < i) or (ckind == "mask" and j >= i)  # query

    context = {r: [c for c in range(len(rows)) if sees(rows[r], rows[c])] for r in range(len(rows))}
    return rows, context


def slow_decoder(model, rows, context, memory, memory_mask):
    """The decoder layer by layer, attention computed row by row over an explicit key list."""
    tokens = torch.tensor([[t for _, _, t in rows]])
    positions = torch.tensor([[p for _, p, _ in rows]])
    x = model.embed(tokens) + model.dec_pos(positions)
    for layer in model.decoder:
        attn = layer.self_attn
        h = layer.norm_self(x)
        q, k, v = attn.qkv(h)[0].view(1, len(rows), attn.heads, 3, attn.head_dim).unbind(3)
        outs = []
        for r in range(len(rows)):
            keys = context[r]
            scores = torch.einsum("hd,khd->hk", q[0, r], k[0, keys]) / math.sqrt(attn.head_dim)
            outs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v[0, keys]).reshape(-1))
        x = x + attn.out(torch.stack(outs)[None])[0]
        x = x + layer.cross_attn(layer.norm_cross(x), mask=memory_mask, memory=memory)
        x = x + layer.ffn(layer.norm_ffn(x))
    return model.dec_norm(x)


def test_fused_pass_equals_per_row_reference(model, objective):
    batch = make_batch(objective, seed=3)
    prep, out = run(model, objective, batch)
    s = prep.streams
    with torch.no_grad():
        for b in range(batch["tgt"].shape[0]):
            length = int((batch["tgt"][b] != PAD).sum())
            target = batch["tgt"][b, :length].tolist()
            masked = {int(p) for p in torch.nonzero(batch["masked"][b]).flatten()}
            rows, context = reference_rows(target, masked)
            src = batch["src"][b:b + 1]
            src = src[:, : int((src != PAD).sum())]
            memory, memory_mask = model.run_encoder(src)
            hidden = slow_decoder(model, rows, context, memory, memory_mask)
            logits = model.output_logits(hidden[0])
            row_of = {(kind, p): r for r, (kind, p, _) in enumerate(rows)}
            for k in torch.nonzero(s.valid[b]).flatten().tolist():
                p = int(s.masked_pos[b, k])
                torch.testing.assert_close(out["nar"][b, k], logits[row_of[("mask", p)]],
                                           rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(out["aux"][b, k], logits[row_of[("query", p)]],
                                           rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("slots", [0, 1, 4])
def test_dense_two_stream_mask_is_its_rule(slots):
    """SDPA reads TwoStreamMask.dense (built block by block), FlexAttention reads `allows`
    (model/flex.py): on batches with padding, unused slots and K = 0, they are the same mask."""
    from janus_pretrain.model.rule_mask import RuleMask
    from janus_pretrain.objectives.streams import two_stream

    rng = np.random.default_rng(slots)
    for _ in range(20):
        b, length = int(rng.integers(1, 5)), int(rng.integers(slots + 2, 20))
        target = torch.full((b, length), PAD)
        masked = torch.zeros(b, length, dtype=torch.bool)
        masked_pos = torch.full((b, slots), -1)
        for i in range(b):
            n = int(rng.integers(slots + 2, length + 1))
            target[i, :n] = torch.from_numpy(rng.integers(5, VOCAB, n))
            chosen = np.sort(rng.choice(np.arange(1, n), int(rng.integers(0, slots + 1)),
                                        replace=False))
            masked[i, chosen] = True
            masked_pos[i, :len(chosen)] = torch.from_numpy(chosen)
        mask = two_stream(target, masked, masked_pos, PAD, MASK).mask
        assert mask.dense().shape == (b, length + 2 * slots, length + 2 * slots)
        torch.testing.assert_close(mask.dense(), RuleMask.dense(mask))
