"""Helper of the tensor-parallel tests, run under torchrun: one JANUS forward + backward (all three
streams, every loss term) at the launched TP size, then AR, NAR and speculative decoding; rank 0
saves the loss terms, the full gradients (TP shards gathered along their partition dimension), the
AR logits with their inputs (tests/test_hf_bart.py) and the hypotheses to argv[2], and the
vocabulary terms and logit gradients of the fused loss and of the unfused reference (tests/loss_reference.py) on the
same logits. With the seeded initialisation it does the same for a BANG model (N = 2 streams; AR
decoding through the predicting stream, and bang_nar's one pass) under "bang".

argv[3], optional, says where the weights come from: `step:<dir>` a training checkpoint written
at this TP size, `file:<path>` a consolidated file (resharded to this TP size); default: the
seeded initialisation."""
import sys

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

import loss_reference
from janus_pretrain.config import LossWeights, ModelConfig, ObjectiveConfig
from janus_pretrain.generate.ar import beam_search, greedy
from janus_pretrain.generate.bang import one_pass
from janus_pretrain.generate.nar import mask_predict
from janus_pretrain.generate.spec import speculative
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives import losses
from janus_pretrain.objectives.bang import BangObjective
from janus_pretrain.objectives.janus import VOCAB_TERMS, JanusObjective
from janus_pretrain.parallel.vocab import gather_vocab
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD

VOCAB = 300


def full_grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad.detach()
    if not getattr(param, "tensor_model_parallel", False):
        return grad
    parts = [torch.empty_like(grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def fused_and_reference(obj: JanusObjective, prep, outputs: dict) -> dict:
    """loss_reference.fused_and_reference on the model's logits, shards gathered."""
    s = prep.streams
    targets = losses.Targets(prep.ar_labels, prep.ar_valid, s.labels, s.valid,
                             (s.masked_pos - 1).clamp(min=0), obj.cfg.label_smoothing)
    weights = {t: getattr(obj.cfg.weights, t) for t in VOCAB_TERMS}
    logits = {n: outputs[n] for n in ("ar", "nar", "aux")}
    both = loss_reference.fused_and_reference(targets, logits, weights)
    return {kind: (terms, {n: gather_vocab(g) for n, g in grads.items()})
            for kind, (terms, grads) in both.items()}


def build_model(weights: str) -> JanusModel:
    if weights.startswith("step:"):
        from janus_pretrain.generate.api import Generator

        return Generator.from_checkpoint(weights[5:], ps.get_tensor_model_parallel_world_size()).model
    if weights.startswith("file:"):
        from janus_pretrain.generate.api import Generator

        return Generator.from_consolidated(weights[5:], ps.get_tensor_model_parallel_world_size()).model
    return seeded_model()


def seeded_model(mask_vector: bool = False) -> JanusModel:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, hidden_size=32, ffn_hidden_size=64,
                      num_heads=4, max_positions=64, length_classes=32, dropout=0.0,
                      attention_dropout=0.0)
    return JanusModel(cfg, VOCAB, PAD, mask_vector=mask_vector)


def decode(model: JanusModel, src: torch.Tensor) -> dict:
    """Every rank of the TP group runs the same searches; returns their token ids."""
    model.eval()
    with torch.no_grad():
        model.embed.weight.mul_(20)  # peaked distributions: no near-ties for rounding to flip
        memory, mask = model.run_encoder(src)
        return {"greedy": [h.tokens for h in greedy(model, memory, mask, max_len=8)],
                "beam": [[h.tokens for h in b] for b in beam_search(model, memory, mask, 3, 8)],
                "nar": [h.tokens for h in mask_predict(model, memory, mask, 3, 2, max_len=8)],
                "spec": [h.tokens for h in speculative(model, memory, mask, 8, block=3)[0]]}


def bang_step(batch: dict) -> dict:
    """A BANG step (loss, full gradients) and its decodings, on the seeded BANG model."""
    model = seeded_model(mask_vector=True)
    obj = BangObjective(ObjectiveConfig(kind="bang", masking="none", streams=2,
                                        label_smoothing=0.1), 32, 32)
    prep = obj.prepare(batch)
    loss, _ = obj.loss(model(**prep.model_inputs), prep)
    loss.backward()
    grads = {name: full_grad(p) for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        model.embed.weight.mul_(20)
        memory, mask = model.run_encoder(batch["src"])
        hyps = {"greedy": [h.tokens for h in greedy(model, memory, mask, 8, predict_stream=True)],
                "beam": [[h.tokens for h in b] for b in beam_search(model, memory, mask, 3, 8,
                                                                    predict_stream=True)],
                "one_pass": [h.tokens for h in one_pass(model, memory, mask, 8)]}
    return {"loss": loss.detach(), "grads": grads, "hyps": hyps}


def main(tp: int, out: str, weights: str = "init") -> None:
    topo = state.initialize(tp)
    seeded = weights == "init"
    model = build_model(weights)
    vocab = model.vocab_size
    weights = LossWeights(ce_ar=1.0, ce_nar=0.5, ce_aux=0.5, kl_ar_nar=1.0, kl_ar_aux=3.0,
                          kl_nar_aux=1.0, length=0.1)
    obj = JanusObjective(ObjectiveConfig(masking="span", weights=weights, label_smoothing=0.1),
                         32, 32, 32)
    rng = np.random.default_rng(0)
    batch = obj.collate([(rng.integers(5, vocab, n), rng.integers(5, vocab, n + 3))
                         for n in (6, 11, 9)], rng)
    prep = obj.prepare(batch)
    outputs = model(**prep.model_inputs)
    loss, terms = obj.loss(outputs, prep)
    loss.backward()
    both = fused_and_reference(obj, prep, outputs)
    ar_logits = gather_vocab(outputs["ar"].detach())[..., :vocab]
    grads = {name: full_grad(p) for name, p in model.named_parameters()}
    hyps = decode(model, batch["src"])
    bang = bang_step(batch) if seeded else None
    if topo.rank == 0:
        torch.save({"loss": loss.detach(), "terms": terms, "grads": grads, "hyps": hyps,
                    "fused_vs_reference": both, "ar_logits": ar_logits, "bang": bang,
                    "inputs": {k: prep.model_inputs[k] for k in ("src_tokens", "ar_tokens")}}, out)
    state.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])
