"""Activation checkpointing recomputes each layer in backward and must change nothing: with
dropout on, the same seed gives the same gradients as a run without it, for the two-stream (janus)
and the AR pass; under no_grad (KV-cache decoding) it stays out of the way."""
import dataclasses

import numpy as np
import pytest
import torch

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import PAD

VOCAB = 256
CFG = ModelConfig(encoder_layers=2, decoder_layers=2, hidden_size=32, ffn_hidden_size=48,
                  num_heads=4, max_positions=64, dropout=0.3, attention_dropout=0.2)


def grads(checkpointing: str, ar: bool, nar: bool):
    objective = JanusObjective(ObjectiveConfig(masking="span"), 16, 16, CFG.length_classes)
    objective.needs_ar, objective.needs_nar, objective.needs_length = ar, nar, False
    rng = np.random.default_rng(0)
    host = objective.collate([(rng.integers(5, VOCAB, 9), rng.integers(5, VOCAB, 7))
                              for _ in range(3)], rng)
    torch.manual_seed(0)
    model = JanusModel(dataclasses.replace(CFG, activation_checkpointing=checkpointing), VOCAB, PAD)
    model.train()
    torch.manual_seed(1)
    prep = objective.prepare(host)
    loss, _ = objective.loss(model(**prep.model_inputs), prep)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ar,nar", [(True, False), (True, True)], ids=["ar", "janus"])
def test_checkpointed_gradients_equal_plain(single_process, ar, nar):
    loss, plain = grads("none", ar, nar)
    loss_ckpt, ckpt = grads("full", ar, nar)
    assert torch.equal(loss, loss_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_no_checkpointing_under_no_grad(single_process):
    torch.manual_seed(0)
    model = JanusModel(dataclasses.replace(CFG, activation_checkpointing="full"), VOCAB, PAD).eval()
    src = torch.randint(5, VOCAB, (2, 7))
    with torch.no_grad():
        memory, memory_mask = model.run_encoder(src)
        cache = model.new_cache()
        steps = [model.decode(torch.full((2, 1), 2 + i), None, memory, memory_mask, cache=cache)
                 for i in range(3)]
        full = model.decode(torch.tensor([[2, 3, 4]] * 2), None, memory, memory_mask, causal=True)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
