"""Analytic memory of one GPU in a training step: model states by precision, ZeRO stage, TP and
DP, and the activations one micro-batch holds for backward, by objective and checkpointing.

The planner (janus_pretrain/plan.py), `bench memory` and `bench accounting` read this module, so
the accounting the plan ranks layouts by is the one the benchmark checks against live engines.

Model states per rank (Rajbhandari et al., 2020, with the numel of this TP rank's shard):
    params     w x numel, / dp from ZeRO-3          (w = 2 in bf16/fp16, 4 in fp32)
    grads      w x numel, / dp from ZeRO-2
    optimizer  Adam m, v (8 bytes) plus an fp32 master (4 bytes) unless fp32 without ZeRO,
               / dp from ZeRO-1
    buffers    DeepSpeed's gradient bucket from ZeRO-1, ZeRO-3's gathered parameters
               (`model_states`)

Activations of a micro-batch, counted from the layers of model/transformer.py as SDPA's fused
kernels run them (flash / efficient attention and FlexAttention keep no [T, T] scores; a row keeps
only its log-sum-exp), per token row of one layer, with w the activation width, h the hidden
size, f the FFN width, a the heads, t = TP (tensors before a column-parallel layer and after a
row-parallel one are whole on every TP rank; those between are split):
    attention block  LN input + LN output w h, qkv 3 w h / t, kernel output w h / t (the
                     head merge is a view of it), log-sum-exp 4 a / t, LN statistics 8,
                     residual dropout mask h; a boolean self-attention mask becomes an
                     additive one of w per [T, T] cell in every layer
    cross block      as attention with q only (w h / t); keys/values 2 w h / t per source row
    FFN block        LN input + LN output w h, GELU input and output 2 w f / t, LN statistics
                     8, dropout mask h
Encoder rows pay attention + FFN, decoder rows attention + cross + FFN in every decoder pass.
With `activation_checkpointing: full` a layer keeps only its input (w h per row) and one layer
is rebuilt at a time during backward.

The vocabulary: every stream of logits the loss reads keeps its fp32 log-probabilities and
probabilities (8 bytes per row and column of V / t, objectives/losses.py `_Stream`) and the
output projection's input (w h per projected row); the backward adds the logits' fp32 gradient
and its cast to w, one stream group at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from janus_pretrain.config import ModelConfig

WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed's bucket defaults where the JSON leaves them out (deepspeed/runtime/zero/config.py).
DEFAULT_BUCKET = 500_000_000
# What a GPU holds beyond the tensors this module counts (the CUDA context, NCCL's buffers, the
# caching allocator's reserved but free blocks): an allowance, not a measurement. The tensors
# themselves this module predicts within 4% of torch.cuda.max_memory_allocated on the H200 table's
# rows (`bench accounting --h200`, docs/performance.md), which does not see these.
FRAMEWORK_OVERHEAD = 2.0 * 2**30


def padded_vocab(cfg: ModelConfig, vocab: int) -> int:
    m = cfg.vocab_divisible_by
    return (vocab + m - 1) // m * m


def parameter_sizes(cfg: ModelConfig, vocab: int, tp: int = 1, mask_vector: bool = False
                    ) -> list[int]:
    """The numel of every parameter tensor one TP rank holds, as JanusModel builds them (tests
    check the sum against the module): column-parallel weights and biases and row-parallel
    weights split over `tp`; row-parallel biases, LayerNorms, position tables and the length head
    whole. ZeRO-3 keeps tensors under its persistence threshold whole on every rank, so the
    sizes matter, not only their sum."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    norm = [h, h]
    attn = [3 * h * h // tp, 3 * h // tp, h * h // tp, h]
    cross = [h * h // tp, h // tp, 2 * h * h // tp, 2 * h // tp, h * h // tp, h]
    ffn = [h * f // tp, f // tp, f * h // tp, h]
    enc = (norm + attn + norm + ffn) * cfg.encoder_layers
    dec = (norm + attn + norm + cross + norm + ffn) * cfg.decoder_layers
    v = padded_vocab(cfg, vocab)
    positions = [(cfg.max_positions + (2 if cfg.arch == "bart" else 0)) * h] * 2
    # pre-LN: a final LayerNorm per stack; bart: one on each stack's embeddings, a logits bias
    rest = norm * 2 + ([v // tp] if cfg.arch == "bart" else [])
    length = [h * cfg.length_classes, cfg.length_classes]
    return [v * h // tp] + positions + enc + dec + rest + length + ([h] if mask_vector else [])


def parameter_count(cfg: ModelConfig, vocab: int, tp: int = 1, mask_vector: bool = False) -> int:
    """Parameters one TP rank holds (`parameter_sizes` summed)."""
    return sum(parameter_sizes(cfg, vocab, tp, mask_vector))


def trained_count(cfg, vocab: int, tp: int = 1) -> int:
    """Parameters of a run config's model that its objective gives gradients: all but the
    length head where no term reads it (objective.weights.length = 0, and BANG)."""
    sizes = parameter_sizes(cfg.model, vocab, tp, cfg.objective.is_bang)
    length = cfg.model.hidden_size * cfg.model.length_classes + cfg.model.length_classes
    uses_length = not cfg.objective.is_bang and cfg.objective.weights.length > 0
    return sum(sizes) - (0 if uses_length else length)


@dataclass(frozen=True)
class ZeroBuckets:
    """The DeepSpeed JSON's settings that become buffers on the GPU (elements)."""

    reduce_bucket_size: int = DEFAULT_BUCKET
    overlap_comm: bool = False
    max_live_parameters: int = 1_000_000_000

    @classmethod
    def from_json(cls, ds: dict) -> "ZeroBuckets":
        z = ds.get("zero_optimization", {})
        # DeepSpeed's default: overlap_comm on at ZeRO-3 only (deepspeed/runtime/zero/config.py)
        return cls(int(z.get("reduce_bucket_size", DEFAULT_BUCKET)),
                   bool(z.get("overlap_comm", z.get("stage", 0) == 3)),
                   int(z.get("stage3_max_live_parameters", 1_000_000_000)))


def model_states(numel: int, stage: int, dp: int, precision: str,
                 buckets: ZeroBuckets | None = None) -> dict[str, float]:
    """Bytes per rank of parameters, gradients, optimizer state (with fp32 masters) and
    DeepSpeed's buffers, for `numel` parameters on this TP rank; "step" is what the optimizer
    step allocates on top while it runs.

    Gradients are "grads" where they stay allocated between steps (ZeRO 2/3's partition; at
    ZeRO-0 in bf16 the fp32 master gradients train/master_weights.py keeps until the next step,
    in fp16 DeepSpeed's optimizer's 16-bit gradients) and "grads_backward" where backward
    allocates them as it frees the activations they come from (ZeRO-1, ZeRO-0 in bf16 and fp32).
    ZeRO-0 in bf16 steps through flat buffers: the fp32
    gradients and the masters' 16-bit copy (4 + w bytes a parameter). Buffers, measured on live
    engines (`bench accounting`): ZeRO 1-3 allocate the whole `reduce_bucket_size` bucket (ZeRO
    1/2 two with `overlap_comm`, which double-buffers), and ZeRO-3 keeps the parameters it
    gathers for forward until backward has used them, up to `stage3_max_live_parameters`."""
    width = WIDTH[precision]
    masters = stage == 0 and precision == "bf16"  # train/engine.py `uses_master_weights`
    optimizer = 12 if (stage > 0 or precision != "fp32") else 8
    grads = width * numel / (dp if stage >= 2 else 1)
    # kept between steps: ZeRO 2/3's partition, DeepSpeed's fp16 optimizer's 16-bit gradients
    kept = stage >= 2 or (stage == 0 and precision == "fp16")
    out = {"params": width * numel / (dp if stage >= 3 else 1),
           "grads": grads if kept else (4 * numel if masters else 0.0),
           "grads_backward": 0.0 if kept else grads,
           "optimizer": optimizer * numel / (dp if stage >= 1 else 1),
           "buffers": 0.0, "step": (4 + width) * numel if masters else 0.0}
    if buckets is not None and stage > 0:
        copies = 2 if (stage in (1, 2) and buckets.overlap_comm) else 1
        out["buffers"] = width * buckets.reduce_bucket_size * copies
        if stage == 3:
            out["buffers"] += width * min(numel, buckets.max_live_parameters) * (1 - 1 / dp)
    return out


def peak_parts(states: dict[str, float], acts: dict[str, float]) -> dict[str, float]:
    """A rank's peak in a step by part. The gradients backward allocates take the room of the
    activations it frees; during the optimizer step they are all there, with the step's own
    buffers and the loss's saved log-probabilities (the loss tensor, and so its graph, lives
    until the step is done). The larger of the two goes under "activations"."""
    parts = {k: states[k] for k in ("params", "grads", "optimizer", "buffers")}
    parts["activations"] = max(sum(acts.values()), states["grads_backward"] + states["step"]
                               + acts["vocabulary"])
    return parts


def peak_bytes(states: dict[str, float], acts: dict[str, float]) -> float:
    return sum(peak_parts(states, acts).values())


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch: `passes` are the decoder passes as (rows, rows projected to
    the vocabulary) per sample (model/flops.py `decoder_passes` / `bang_passes`), `streams` the
    loss's groups of projected rows, each kept as log-probabilities and probabilities; a
    `causal` pass runs SDPA's causal kernel, the others a boolean mask [B, T, T]."""

    batch: int
    src_len: int
    passes: tuple[tuple[int, int], ...]
    streams: tuple[int, ...] = field(default=())
    encoder_passes: int = 1
    causal: tuple[bool, ...] = field(default=())  # per pass: causal (no mask tensor) or masked
    stacked: int = 0  # logit rows the loss copies to stack its slot streams (JANUS's slots)


def _attention_row(h: int, a: int, w: int, tp: int, q: int, mask: int, math: bool) -> float:
    """Per query row: LN input and output, the projections the kernel keeps (`q` of q/k/v on
    these rows), its output and log-sum-exp, LN statistics, the dropout mask. SDPA's CPU math
    backend (bf16 on CPU) keeps instead an fp32 copy of q (and of k, v: `math_keys`) and a copy
    of its output in w, and fp32 probabilities per key (`activations`)."""
    kernel = (4 + w) * h / tp if math else (q + 1) * w * h / tp + 4 * a / tp
    return 2 * w * h + kernel + 8 + mask * h


def _ffn_row(h: int, f: int, w: int, tp: int, mask: int) -> float:
    return 2 * w * h + 2 * w * f / tp + 8 + mask * h


def activations(cfg: ModelConfig, vocab: int, mb: MicroBatch, tp: int, precision: str,
                checkpointing: bool, device: str = "cuda") -> dict[str, float]:
    """Bytes one rank holds for backward after the forward of micro-batch `mb`, and the extra
    the loss and backward add at their peak: {"layers", "vocabulary", "transient"}.

    `device` "cuda" is the GPU's step: fused attention kernels, one-byte dropout masks. "cpu" is
    this code on a CPU, as `bench accounting` measures it: dropout masks in the activations'
    dtype (torch's CPU kernel), and in bf16/fp16 SDPA's math backend (model/transformer.py
    `sdpa_backend`), which keeps fp32 copies of q, k, v and fp32 probabilities
    [B, heads / tp, T, S]."""
    h, f, a, w = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads, WIDTH[precision]
    mask = w if device == "cpu" else 1
    math = device == "cpu" and w != 4
    scores = 4 * a / tp if math else 0.0  # per query row and key
    keys = 8 * h / tp if math else 0.0  # the math path's fp32 k, v per key row
    b, s = mb.batch, mb.src_len
    v = padded_vocab(cfg, vocab) / tp
    enc_row = _attention_row(h, a, w, tp, 3, mask, math) + _ffn_row(h, f, w, tp, mask) + keys
    dec_row = enc_row + _attention_row(h, a, w, tp, 1, mask, math)
    enc_layer = b * s * enc_row + scores * b * s * s
    kv = keys or 2 * w * h / tp  # cross-attention's keys/values per source row

    def dec_layer(t: int, causal: bool) -> float:
        # SDPA's fused kernels take a boolean self-attention mask (every pass but the causal AR
        # one) as an additive one of the query's dtype, made in every layer
        additive = 0 if causal or math else w * b * t * t
        return b * t * dec_row + kv * b * s + additive + scores * b * (t * t + t * s)

    dec_layers = [dec_layer(t, causal) for (t, _), causal in zip(mb.passes, mb.causal)]
    enc_rows = mb.encoder_passes * b * s
    dec_rows = sum(b * t for t, _ in mb.passes)
    # per row of each stack: the embedding dropout mask, the final LayerNorm's input, statistics
    # and output; rows projected from a gathered subset keep that copy too
    layers = ((enc_rows + dec_rows) * (mask * h + 2 * w * h + 8)
              + w * h * sum(b * r for t, r in mb.passes if r < t))
    if checkpointing:
        # each layer keeps its input; backward rebuilds one layer at a time, the largest
        layers += w * h * (enc_rows * cfg.encoder_layers + dec_rows * cfg.decoder_layers)
        rebuilt = max([enc_layer] + dec_layers)
    else:
        layers += (mb.encoder_passes * enc_layer * cfg.encoder_layers
                   + sum(dec_layers) * cfg.decoder_layers)
        rebuilt = 0.0
    vocabulary = 8 * v * b * sum(mb.streams)
    # the loss's forward holds every stream's logits and the stacked copies at once
    forward = w * v * b * (sum(r for _, r in mb.passes) + mb.stacked)
    # its backward: the fp32 gradient of the largest stream group and its cast to w, plus the
    # layer being rebuilt under checkpointing
    cast = w if w != 4 else 0
    backward = (4 + cast) * v * b * max(mb.streams, default=0) + rebuilt
    return {"layers": layers, "vocabulary": vocabulary, "transient": max(forward, backward)}

