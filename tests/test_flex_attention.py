"""The FlexAttention path (model/flex.py) against SDPA with the boolean mask: the compiled flex
forward on CPU (torch 2.13 runs it; it has no CPU backward, so the model uses flex on CUDA only)
on the two-stream and the causal patterns, lengths not a multiple of the block so padding is
exercised; and the config refuses flex with attention dropout."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.errors import JanusError
from janus_pretrain.model.flex import FlexMask
from janus_pretrain.objectives.janus import JanusObjective


def two_stream_mask(seed: int = 0):
    """A two-stream RuleMask of a real collated batch (two samples of other lengths)."""
    objective = JanusObjective(ObjectiveConfig(masking="span"), 16, 12, 16)
    rng = np.random.default_rng(seed)
    host = objective.collate([(rng.integers(5, 99, 9), rng.integers(5, 99, 7 + i))
                              for i in range(2)], rng)
    return objective.prepare(host).model_inputs["nar_mask"]


def test_compiled_flex_forward_equals_sdpa():
    """Each way a FlexMask is built (from a dense mask, from the two-stream rule, from a key
    vector, the cached causal one) attends as SDPA does with the same mask as a dense boolean."""
    cpu = torch.device("cpu")
    rule = two_stream_mask()
    two_stream = rule.dense()
    b, t, _ = two_stream.shape
    real = torch.ones(b, t + 3, dtype=torch.bool)
    real[0, t - 2:] = False  # a padded source of another length than the target
    cases = {
        "dense": (FlexMask.dense(two_stream, t, t, block=16), two_stream, t),
        "two_stream": (FlexMask.rule(rule, block=16), two_stream, t),
        "causal": (FlexMask.causal(t, cpu, block=16),
                   torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t), t),
        "keys": (FlexMask.keys(real, t, block=16), real[:, None, :].expand(b, t, t + 3), t + 3),
    }
    for name, (flex_mask, dense, s) in cases.items():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(b, 2, t, 8, generator=gen)
        k, v = (torch.randn(b, 2, s, 8, generator=gen) for _ in range(2))
        assert t % 16 and s % 16  # padded up to the block: the padding is exercised
        flex = flex_mask.attend(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
        torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5, msg=name)
    assert FlexMask.causal(t, cpu, block=16) is cases["causal"][0]  # built once per length
    # Another batch of the shape: its rule mask reuses the compiled mask builder.
    other = two_stream_mask(seed=1)
    assert other.length == t and not torch.equal(other.masked, rule.masked)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = FlexMask.rule(other, block=16)
    torch.testing.assert_close(again.block_mask.to_dense(),
                               FlexMask.dense(other.dense(), t, t, block=16).block_mask.to_dense())


def test_flex_with_attention_dropout_is_a_config_error():
    with pytest.raises(JanusError, match="model.attention"):
        ModelConfig(attention="flex", attention_dropout=0.1)
    ModelConfig(attention="flex", attention_dropout=0.0)
    with pytest.raises(JanusError, match="model.activation_checkpointing"):
        ModelConfig(activation_checkpointing="some")


def test_model_flex_forward_equals_sdpa(single_process, monkeypatch):
    """The model's flex wiring (encoder, decoder self and cross masks, padding to the block),
    forced on for a CPU forward: the same logits as SDPA, on the AR and two-stream passes."""
    import dataclasses

    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD

    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, hidden_size=32, ffn_hidden_size=48,
                      num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0)
    objective = JanusObjective(ObjectiveConfig(masking="span"), 16, 12, cfg.length_classes)
    objective.needs_length = False
    rng = np.random.default_rng(0)
    host = objective.collate([(rng.integers(5, 99, 9 - i), rng.integers(5, 99, 7 + i))
                              for i in range(2)], rng)
    inputs = objective.prepare(host).model_inputs
    torch.manual_seed(0)
    sdpa = JanusModel(cfg, 128, PAD).eval()
    flex = JanusModel(dataclasses.replace(cfg, attention="flex"), 128, PAD).eval()
    flex.load_state_dict(sdpa.state_dict())
    monkeypatch.setattr(JanusModel, "use_flex",
                        lambda self, tokens: self.cfg.attention == "flex")
    with torch.no_grad():
        ref, out = sdpa(**inputs), flex(**inputs)
    assert {"ar", "nar", "aux"} <= out.keys()
    for key in ("ar", "nar", "aux"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
