"""Length buckets (data/buckets.py): every example in exactly one batch, one shape per bucket,
batches within their token budget, and padding that changes the loss only by rounding."""
import numpy as np
import pytest
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.data.batching import TokenBudget, token_budget_plan
from janus_pretrain.data.buckets import Buckets, fill_bucketed
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import PAD

LENGTHS = (16, 24, 32, 48, 64)


def test_buckets_round_up_and_cap():
    b = Buckets(LENGTHS, max_source_len=40, max_target_len=100, slot_shares=(0.5,))
    assert [b.length(n, 40) for n in (3, 16, 17, 33, 40)] == [16, 16, 24, 40, 40]
    assert b.lengths_of(np.array([3, 17, 65, 99]), 100).tolist() == [16, 24, 100, 100]
    assert [b.slots(k, 24) for k in (1, 12, 13, 24)] == [12, 12, 24, 24]


def test_bucketed_plan_uses_every_example_once_in_one_shape_per_bucket():
    rng = np.random.default_rng(0)
    n = 3000
    src_ids, tgt_ids = rng.integers(1, 60, n), rng.integers(1, 60, n)
    budget = TokenBudget(1024, 64, 64, Buckets(LENGTHS, 64, 64))
    src, tgt = budget.row_lengths(src_ids, tgt_ids)
    for dp in (1, 2):
        plan = token_budget_plan(src_ids, tgt_ids, budget, seed=3, epoch=0, group=dp)
        assert sorted(np.concatenate(plan).tolist()) == list(range(n))
        assert len(plan) % dp == 0
        shapes = {}
        for batch in plan:
            s, t = int(src[batch].max()), int(tgt[batch].max())
            assert len(batch) * max(s, t) <= 1024
            shapes.setdefault((s, t), set()).add(len(batch))
        # one row count per bucket, but for the leftovers' last batch (and DP halving)
        assert sum(len(rows) for rows in shapes.values()) <= len(shapes) + 1 + (dp > 1)
    # without buckets the same data brings many more shapes
    plain = token_budget_plan(src_ids, tgt_ids, TokenBudget(1024, 64, 64), 3, 0, 1)
    raw_s, raw_t = TokenBudget(1024, 64, 64).row_lengths(src_ids, tgt_ids)
    assert len({(len(b), raw_s[b].max(), raw_t[b].max()) for b in plain}) > 3 * len(shapes)


def test_fill_bucketed_carries_leftovers_to_a_bucket_that_holds_them():
    order = np.arange(7)
    src = np.array([16, 16, 16, 24, 24, 24, 24])
    tgt = np.array([16, 16, 16, 24, 24, 24, 24])
    # 2 rows of 16 (budget 40 // 16), then 1 row of 24: the third 16-example joins the 24s
    order, offsets = fill_bucketed(order, src, tgt, 40)
    assert [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [
        [0, 1], [3], [4], [5], [6], [2]]


@pytest.mark.parametrize("masking", ["span", "uniform"])
def test_padding_to_buckets_changes_the_loss_only_by_rounding(single_process, masking):
    cfg = ModelConfig(encoder_layers=1, decoder_layers=2, hidden_size=32, ffn_hidden_size=64,
                      num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0)
    objective = JanusObjective(ObjectiveConfig(masking=masking, label_smoothing=0.1), 64, 64,
                               cfg.length_classes)
    rng = np.random.default_rng(1)
    examples = [(rng.integers(5, 200, n), rng.integers(5, 200, m)) for n, m in
                ((7, 11), (13, 5), (3, 17))]
    plain = objective.collate(examples, np.random.default_rng(7))
    padded = Buckets(LENGTHS, 64, 64, (0.5,)).pad(plain)
    assert padded["src"].shape[1] == 16 and padded["tgt"].shape[1] == 24
    assert padded["masked_pos"].shape[1] in (12, 24) and padded["masked_pos"].shape[1] >= \
        plain["masked_pos"].shape[1]
    torch.manual_seed(0)
    model = JanusModel(cfg, 256, PAD)
    losses = []
    for batch in (plain, padded):
        prep = objective.prepare(batch)
        total, terms = objective.loss(model(**prep.model_inputs), prep)
        model.zero_grad()
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        losses.append((total.detach(), terms, grads))
    (a, ta, ga), (b, tb, gb) = losses
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
