"""Dropout in tensor-parallel regions (a rank's heads, its FFN columns) draws a mask per TP rank,
leaves the replicated stream in step on every rank, and draws nothing at dropout 0 (so TP = 2
still equals TP = 1 there: test_tensor_parallel.py). The TP rank is faked in one process: the
layers are plain torch at TP = 1, `parallel.tp` answers as rank r of 2."""
from __future__ import annotations

import pytest
import torch

from janus_pretrain.config import ModelConfig
from janus_pretrain.model.layers import Layers
from janus_pretrain.model.transformer import Attention, FeedForward
from janus_pretrain.parallel import tp


def _layers(dropout: float):
    cfg = ModelConfig(hidden_size=16, ffn_hidden_size=32, num_heads=2, dropout=0.0,
                      attention_dropout=dropout, activation_dropout=dropout)
    torch.manual_seed(0)
    return Attention(cfg, Layers(), cross=False).train(), FeedForward(cfg, Layers()).train()


def _run(monkeypatch, rank: int, dropout: float):
    """Outputs of both layers as TP rank `rank` of 2, and the CPU generator's state after."""
    attention, ffn = _layers(dropout)
    with monkeypatch.context() as patch:
        patch.setattr(tp, "world_size", lambda: 2)
        patch.setattr(tp, "rank", lambda: rank)
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        out = attention(x), ffn(x)
    return out, torch.get_rng_state()


def test_tp_ranks_draw_their_own_dropout_masks(monkeypatch):
    (att0, ffn0), after0 = _run(monkeypatch, 0, 0.5)
    (att1, ffn1), after1 = _run(monkeypatch, 1, 0.5)
    (att0b, ffn0b), _ = _run(monkeypatch, 0, 0.5)
    assert not torch.equal(att0, att1) and not torch.equal(ffn0, ffn1)
    assert torch.equal(att0, att0b) and torch.equal(ffn0, ffn0b)  # a pure function of the seed
    assert torch.equal(after0, after1)  # the replicated stream stays the same on every TP rank


def test_no_dropout_draws_nothing(monkeypatch):
    (att0, ffn0), after = _run(monkeypatch, 0, 0.0)
    (att1, ffn1), _ = _run(monkeypatch, 1, 0.0)
    assert torch.equal(att0, att1) and torch.equal(ffn0, ffn1)
    assert torch.equal(after, torch.manual_seed(7).get_state())


@pytest.mark.parametrize("rank", [0, 1])
def test_recomputed_forward_replays_the_masks(monkeypatch, rank):
    """Activation checkpointing restores the CPU generator, so the recomputed forward's masks
    (and so its gradients) are those of the first forward."""
    from torch.utils.checkpoint import checkpoint

    _, ffn = _layers(0.5)
    monkeypatch.setattr(tp, "world_size", lambda: 2)
    monkeypatch.setattr(tp, "rank", lambda: rank)
    grads = []
    for recompute in (False, True):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)
        y = checkpoint(ffn, x, use_reentrant=False) if recompute else ffn(x)
        y.sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
