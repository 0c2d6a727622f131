"""The JANUS encoder-decoder: a transformer built from tensor-parallel layers (model/layers.py).

The model is plain PyTorch apart from the parallel linear layers; it knows nothing of DeepSpeed or
of the JANUS objective. The decoder takes an arbitrary boolean self-attention mask (True = may
attend) and explicit positions, which is all the two-stream NAR/AUX pass needs
(janus_pretrain.objectives.streams builds both). Shapes are batch-first: `[batch, seq, hidden]`.

Two flavours share every code path (`model.arch`): "janus", pre-LN with a final LayerNorm per
stack, and "bart", the post-LN layout of Hugging Face / fairseq BART (a LayerNorm on the summed
embeddings, learned positions offset by 2, a final-logits bias), whose weights map one to one
onto BartForConditionalGeneration's (checkpoint/hf.py).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from janus_pretrain.config import ModelConfig
from janus_pretrain.model.recompute import run_layer
from janus_pretrain.model.flex import FlexMask
from janus_pretrain.model.rule_mask import RuleMask, dense
from janus_pretrain.model.layers import Layers, init_normal, linear, to_tensor_parallel
from janus_pretrain.parallel.rng import tp_region
from janus_pretrain.parallel.vocab import PAD_LOGIT

# BART's learned position tables start with two rows its position ids never reach.
BART_POSITION_OFFSET = 2


class Attention(nn.Module):
    """Multi-head attention with heads split across the tensor-parallel group.

    Projections keep a per-head interleaved layout ([head, q|k|v, head_dim]) so a column split
    of the fused projection hands each TP rank whole heads.
    """

    def __init__(self, cfg: ModelConfig, layers: Layers, cross: bool):
        super().__init__()
        self.cross = cross
        self.heads = cfg.num_heads // layers.tp_size
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.dropout = cfg.attention_dropout
        h = cfg.hidden_size
        if cross:
            self.q = layers.column(h, h)
            self.kv = layers.column(h, 2 * h)
        else:
            self.qkv = layers.column(h, 3 * h)
        self.out = layers.row(h, h)

    def forward(self, x: torch.Tensor, mask=None, causal: bool = False,
                memory: Optional[torch.Tensor] = None, cache: Optional[dict] = None) -> torch.Tensor:
        """x: [B, T, H]; mask: bool, broadcastable to [B, heads, T, S], or a FlexMask (flex path);
        memory: [B, S, H] (cross).

        `cache` (incremental decoding): self-attention appends this call's keys/values to
        cache["k"], cache["v"] and attends over all of them; cross-attention computes the memory's
        keys/values on the first call and reuses them after.
        """
        b, t, _ = x.shape
        if self.cross:
            q = linear(self.q, x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                kv = linear(self.kv, memory).view(b, memory.shape[1], self.heads, 2, self.head_dim)
                k, v = (z.transpose(1, 2) for z in kv.unbind(3))
        else:
            qkv = linear(self.qkv, x).view(b, t, self.heads, 3, self.head_dim)
            q, k, v = (z.transpose(1, 2) for z in qkv.unbind(3))
            if cache is not None and "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if isinstance(mask, FlexMask):
            out = mask.attend(q, k, v)
        else:
            p = self.dropout if self.training else 0.0
            with sdpa_backend(q), tp_region(p > 0):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=causal)
        return linear(self.out, out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


def sdpa_backend(q: torch.Tensor):
    """SDPA's math backend for bf16 / fp16 on CPU, torch's own choice elsewhere. On CPU the flash
    kernel's backward is slow in reduced precision: forward + backward in bf16 took 2-3.7x the
    math backend's time at our shapes on the 2-core test machine (in fp32, flash is the faster;
    docs/performance.md, "Where a CPU step's time goes")."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        self.up = layers.column(cfg.hidden_size, cfg.ffn_hidden_size)
        self.down = layers.row(cfg.ffn_hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(linear(self.up, x))
        with tp_region(self.drop.p > 0 and self.training):
            hidden = self.drop(hidden)
        return linear(self.down, hidden)


class Residual(nn.Module):
    """The residual wiring of both flavours: pre-LN (janus) normalises the sublayer's input,
    post-LN (bart) the residual sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.arch == "bart"
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer: Callable) -> torch.Tensor:
        if self.post_norm:
            return norm(x + self.drop(sublayer(x)))
        return x + self.drop(sublayer(norm(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.hidden_size)
        self.attn = Attention(cfg, layers, cross=False)
        self.norm_ffn = nn.LayerNorm(cfg.hidden_size)
        self.ffn = FeedForward(cfg, layers)
        self.residual = Residual(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.residual(x, self.norm_attn, lambda h: self.attn(h, mask=mask))
        return self.residual(x, self.norm_ffn, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: Layers):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.hidden_size)
        self.self_attn = Attention(cfg, layers, cross=False)
        self.norm_cross = nn.LayerNorm(cfg.hidden_size)
        self.cross_attn = Attention(cfg, layers, cross=True)
        self.norm_ffn = nn.LayerNorm(cfg.hidden_size)
        self.ffn = FeedForward(cfg, layers)
        self.residual = Residual(cfg)

    def forward(self, x, self_mask, causal, memory, memory_mask, cache=None):
        self_cache, cross_cache = (cache["self"], cache["cross"]) if cache is not None else (None, None)
        x = self.residual(x, self.norm_self, lambda h: self.self_attn(
            h, mask=self_mask, causal=causal, cache=self_cache))
        x = self.residual(x, self.norm_cross, lambda h: self.cross_attn(
            h, mask=memory_mask, memory=memory, cache=cross_cache))
        return self.residual(x, self.norm_ffn, self.ffn)


class JanusModel(nn.Module):
    """Shared-embedding encoder-decoder with a target-length classifier.

    `forward` runs the encoder once (twice with `encoder_passes=2`: the AR stream reads one
    pass, the two-stream pass and the length head another) and whichever decoder streams the
    batch asks for:
    - `ar_tokens` [B, T]: causal pass, logits for every row;
    - `nar_tokens`/`nar_positions`/`nar_mask` [B, L'] / [B, L'] / [B, L', L'] (or its RuleMask):
      the two-stream pass, logits only for the rows in `nar_rows` and `aux_rows` ([B, K] each);
    - `length`: logits of the target-length classifier;
    - `bang_tokens`/`bang_positions`/`bang_query`/`bang_mask` [B, T'] / [B, T'] / [T'] / [B, T', T']
      or None (causal): a BANG pass (objectives/bang.py); the `bang_query` rows take the learned
      [MASK] vector as input and are the only rows projected to logits.
    With `mask_vector` (BANG objectives) the model holds that one learned [MASK] input vector.
    Logits are vocab-parallel: `[..., padded_vocab / tp]` on each TP rank, PAD_LOGIT in the columns
    that pad the table.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, mask_vector: bool = False):
        super().__init__()
        layers = Layers()
        tp = layers.tp_size
        # Padded independently of the TP size (which must divide the multiple), so that one
        # checkpoint reshards between layouts without touching the vocabulary.
        multiple = cfg.vocab_divisible_by
        assert multiple % tp == 0, "config check: vocab_divisible_by % tensor_parallel"
        self.vocab_size = vocab_size
        self.padded_vocab_size = (vocab_size + multiple - 1) // multiple * multiple
        # Added to this rank's logit shard: 0 in the columns of real tokens, PAD_LOGIT in those
        # that pad the table (a bias, so the matmul applies it in the same pass).
        v_local = self.padded_vocab_size // tp
        first = layers.tp_rank * v_local
        columns = torch.arange(first, first + v_local)
        self.register_buffer("padding_bias", torch.zeros(v_local).masked_fill(
            columns >= vocab_size, PAD_LOGIT), persistent=False)
        self.pad_id = pad_id
        self.cfg = cfg
        self.embed = layers.embedding(self.padded_vocab_size, cfg.hidden_size)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        bart = cfg.arch == "bart"
        self.pos_offset = BART_POSITION_OFFSET if bart else 0
        self.enc_pos = nn.Embedding(cfg.max_positions + self.pos_offset, cfg.hidden_size)
        self.dec_pos = nn.Embedding(cfg.max_positions + self.pos_offset, cfg.hidden_size)
        for emb in (self.enc_pos, self.dec_pos):
            init_normal(emb.weight)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, layers) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, layers) for _ in range(cfg.decoder_layers))
        # pre-LN ends each stack with a LayerNorm; post-LN normalises the embeddings instead.
        norm = lambda: nn.LayerNorm(cfg.hidden_size)  # noqa: E731
        self.enc_norm, self.dec_norm = (None, None) if bart else (norm(), norm())
        self.enc_emb_norm, self.dec_emb_norm = (norm(), norm()) if bart else (None, None)
        # BART's final_logits_bias, vocab-parallel like the logits (a trained parameter here).
        self.final_logits_bias = None
        if bart:
            self.final_logits_bias = nn.Parameter(torch.zeros(v_local))
            for attribute, value in (("tensor_model_parallel", True), ("partition_dim", 0),
                                     ("partition_stride", 1)):
                setattr(self.final_logits_bias, attribute, value)
        self.length_head = nn.Linear(cfg.hidden_size, cfg.length_classes)
        init_normal(self.length_head.weight)
        nn.init.zeros_(self.length_head.bias)
        # Drawn last, so that a model without it initialises exactly as before.
        self.mask_vector = (nn.Parameter(init_normal(torch.empty(cfg.hidden_size)))
                            if mask_vector else None)

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, table: nn.Embedding,
                     norm: Optional[nn.LayerNorm], query: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """Token plus position embeddings (normalised in the bart flavour), with dropout; the
        `query` rows [T] bool take the learned [MASK] vector instead of their token (BANG)."""
        x = self.embed(tokens)
        if query is not None:
            x = torch.where(query[:, None], self.mask_vector.to(x.dtype), x)
        x = x * self.embed_scale + table(positions + self.pos_offset)
        return self.drop(norm(x) if norm is not None else x)

    @staticmethod
    def final_norm(x: torch.Tensor, norm: Optional[nn.LayerNorm]) -> torch.Tensor:
        return norm(x) if norm is not None else x

    def run_encoder(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_tokens [B, S] -> (memory [B, S, H], memory_mask [B, 1, 1, S], True = real token)."""
        key_mask = (src_tokens != self.pad_id)[:, None, None, :]
        s = src_tokens.shape[1]
        pos = torch.arange(s, device=src_tokens.device)
        x = self.embed_tokens(src_tokens, pos, self.enc_pos, self.enc_emb_norm)
        attn_mask = (FlexMask.keys(key_mask.reshape(-1, s), s) if self.use_flex(src_tokens)
                     else key_mask)
        for layer in self.encoder:
            x = run_layer(layer, self.checkpointing, x, attn_mask)
        return self.final_norm(x, self.enc_norm), key_mask

    def decode(self, tokens: torch.Tensor, positions: Optional[torch.Tensor],
               memory: torch.Tensor, memory_mask: torch.Tensor,
               self_mask: Optional[torch.Tensor] = None, causal: bool = False,
               cache: Optional[list[dict]] = None, query: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """tokens [B, T]; positions [B, T] or None for 0..T-1; self_mask [B, T, T] (or [B, 1, T]
        key mask) -> [B, T, H]. With `cache` (from `new_cache`), tokens are the next step only and
        positions default to the number of steps already cached. `self_mask` may be a RuleMask
        (the two-stream mask): flex reads its rule, SDPA its dense form. `query` [T] bool: rows
        whose input is the learned [MASK] vector instead of their token's embedding (BANG)."""
        if positions is None:
            start = cache[0]["self"]["k"].shape[2] if cache and "k" in cache[0]["self"] else 0
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens, positions, self.dec_pos, self.dec_emb_norm, query)
        if cache is None and self.use_flex(tokens):
            b, t = tokens.shape
            if causal:
                mask = FlexMask.causal(t, tokens.device)
            elif self_mask is None:
                mask = FlexMask.keys(torch.ones(b, t, dtype=torch.bool, device=tokens.device), t)
            elif isinstance(self_mask, RuleMask):
                mask = FlexMask.rule(self_mask)
            else:
                mask = FlexMask.dense(self_mask, t, t)
            memory_mask = FlexMask.keys(memory_mask.reshape(b, memory.shape[1]), t)
            causal = False
        else:
            mask = dense(self_mask)
            mask = mask[:, None] if mask is not None else None
        if cache is not None:
            for i, layer in enumerate(self.decoder):
                x = layer(x, mask, causal, memory, memory_mask, cache[i])
        else:
            for layer in self.decoder:
                x = run_layer(layer, self.checkpointing, x, mask, causal, memory, memory_mask)
        return self.final_norm(x, self.dec_norm)

    @property
    def checkpointing(self) -> bool:
        return self.training and self.cfg.activation_checkpointing == "full"

    def use_flex(self, tokens: torch.Tensor) -> bool:
        """FlexAttention on CUDA only: torch 2.13 has no flex backward on CPU (model/flex.py)."""
        return self.cfg.attention == "flex" and tokens.is_cuda

    def new_cache(self) -> list[dict]:
        """Empty per-layer key/value cache for incremental decoding."""
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    @staticmethod
    def reorder_cache(cache: list[dict], index: torch.Tensor) -> None:
        """Select batch rows of every cached key/value (beam search), in place. index: [B']."""
        for layer in cache:
            for part in layer.values():
                for key in list(part):
                    part[key] = part[key].index_select(0, index)

    @staticmethod
    def gather_cache(cache: list[dict], rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep batch rows `rows` [B'] of every cached key/value and, of row i's self-attention
        keys/values, the slots `slots[i]` in that order ([B', T']), in place: speculative
        decoding keeps each row's accepted keys, left-aligned (generate/spec.py)."""
        for layer in cache:
            for part in layer.values():
                for key in list(part):
                    part[key] = part[key].index_select(0, rows)
            for key in ("k", "v"):
                x = layer["self"][key]
                index = slots[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
                layer["self"][key] = x.gather(2, index)

    @staticmethod
    def truncate_cache(cache: list[dict], length: int) -> None:
        """Keep the first `length` self-attention keys/values of every layer, in place (a BANG
        step appends its predicting row, which later steps must not see)."""
        for layer in cache:
            for key in ("k", "v"):
                layer["self"][key] = layer["self"][key][:, :, :length]

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> vocab-parallel logits [..., padded_vocab / tp] (tied to the embedding),
        PAD_LOGIT in the padding columns of the table (the last shard's tail): no token,
        probability 0 in every softmax, no share of label smoothing, no gradient."""
        hidden = to_tensor_parallel(hidden)
        # A buffer: DeepSpeed's bf16/fp16 modes cast only the parameters. (Filling the padding
        # columns in place would save the bias's broadcast copy in the forward, but its backward
        # copies the whole gradient.)
        bias = self.padding_bias.to(self.embed.weight.dtype)
        if self.final_logits_bias is not None:
            bias = bias + self.final_logits_bias
        return F.linear(hidden, self.embed.weight, bias)

    def length_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder output -> [B, length_classes]."""
        keep = memory_mask[:, 0, 0, :, None].to(memory.dtype)
        pooled = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.length_head(pooled)

    def forward(self, src_tokens: torch.Tensor, ar_tokens: Optional[torch.Tensor] = None,
                nar_tokens: Optional[torch.Tensor] = None,
                nar_positions: Optional[torch.Tensor] = None,
                nar_mask: Optional[torch.Tensor | RuleMask] = None,
                nar_rows: Optional[torch.Tensor] = None,
                aux_rows: Optional[torch.Tensor] = None,
                length: bool = False,
                bang_tokens: Optional[torch.Tensor] = None,
                bang_positions: Optional[torch.Tensor] = None,
                bang_query: Optional[torch.Tensor] = None,
                bang_mask: Optional[torch.Tensor] = None,
                encoder_passes: int = 1) -> dict[str, torch.Tensor]:
        memory, memory_mask = self.run_encoder(src_tokens)
        out = {}
        if ar_tokens is not None:
            h = self.decode(ar_tokens, None, memory, memory_mask, causal=True)
            out["ar"] = self.output_logits(h)
            if encoder_passes == 2 and (nar_tokens is not None or length):
                # The JANUS authors' step: the NAR/AUX pass (and the length head) reads an
                # encoder pass of its own, with its own dropout masks (docs/method.md, section 4).
                memory, memory_mask = self.run_encoder(src_tokens)
        if nar_tokens is not None:
            h = self.decode(nar_tokens, nar_positions, memory, memory_mask, self_mask=nar_mask)
            # One projection per stream, not one split in two: the split's backward would
            # concatenate the two [B, K, V] gradients into a fresh buffer.
            out["nar"], out["aux"] = (
                self.output_logits(h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1])))
                for rows in (nar_rows, aux_rows))
        if bang_tokens is not None:
            h = self.decode(bang_tokens, bang_positions, memory, memory_mask, self_mask=bang_mask,
                            causal=bang_mask is None, query=bang_query)
            out["bang"] = self.output_logits(h[:, bang_query])
        if length:
            out["length"] = self.length_logits(memory, memory_mask)
        return out
