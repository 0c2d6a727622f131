"""Hugging Face BART in and out: BartForConditionalGeneration <-> the bart flavour of JanusModel.

    janus-pretrain convert from-hf DIR_OR_HUB_NAME --output model.safetensors
    janus-pretrain convert to-hf CHECKPOINT_OR_CONSOLIDATED --output DIR

Every BART weight has one JANUS counterpart (model/transformer.py, `model.arch: bart`); only the
layout differs: our self-attention fuses q, k, v per head ([head, q|k|v, head_dim] rows, so a TP
split hands each rank whole heads), cross-attention fuses k, v alike, and our ids put the special
tokens first (tokenizer.HFTokenizer), so embedding rows and the final-logits bias are permuted,
and padded to the padded vocabulary with zeros. JANUS's own weights (the length head) and run
config travel to-hf in a side file, janus.safetensors, that from-hf reads back; without it the
length head starts from a seeded initialisation and the config claims AR decoding only.
transformers is needed here only (the `bench` extra); the converted model decodes without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from janus_pretrain.checkpoint import consolidated
from janus_pretrain.checkpoint.files import META
from janus_pretrain.config import (DataConfig, LossWeights, ModelConfig, ObjectiveConfig, RunConfig,
                                   from_dict, to_dict)
from janus_pretrain.errors import JanusError
from janus_pretrain.model.layers import INIT_STD
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD, UNK, HFTokenizer, Tokenizer, load_tokenizer

Weights = dict[str, torch.Tensor]
SIDE_FILE = "janus.safetensors"  # JANUS-only weights and the run config, beside the HF files
JANUS_ONLY = ("length_head.weight", "length_head.bias")
# The ModelConfig fields config.json fixes (the side file's config must agree on them).
SHAPE = ("arch", "encoder_layers", "decoder_layers", "hidden_size", "ffn_hidden_size",
         "num_heads", "max_positions", "scale_embedding")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise JanusError("convert: needs transformers (pip install 'janus-pretrain[bench]')") from None
    return transformers


def is_hf_dir(path: Path) -> bool:
    """A directory written by `save_pretrained` (config.json, no janus.json of ours)."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / META).is_file()


def model_config(hf) -> ModelConfig:
    """BartConfig -> the bart flavour's ModelConfig; what JANUS cannot express is refused."""
    if hf.model_type != "bart":
        raise JanusError(f"convert: model_type {hf.model_type!r} is not bart (mBART and others "
                         f"place their LayerNorms differently)")
    if hf.activation_function != "gelu":
        raise JanusError(f"convert: activation_function {hf.activation_function!r}: the model "
                         f"has GELU only")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if getattr(hf, enc) != getattr(hf, dec):
            raise JanusError(f"convert: {enc}={getattr(hf, enc)} differs from {dec}="
                             f"{getattr(hf, dec)}; both stacks share one shape here")
    return ModelConfig(arch="bart", encoder_layers=hf.encoder_layers,
                       decoder_layers=hf.decoder_layers, hidden_size=hf.d_model,
                       ffn_hidden_size=hf.encoder_ffn_dim, num_heads=hf.encoder_attention_heads,
                       max_positions=hf.max_position_embeddings, dropout=hf.dropout,
                       attention_dropout=hf.attention_dropout,
                       activation_dropout=hf.activation_dropout,
                       scale_embedding=bool(hf.scale_embedding))


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer):
    """The BartConfig of a bart-flavour model. The decoder starts from [BOS] (JANUS's convention,
    not BART's </s>), so HF generate starts where our search does."""
    if cfg.arch != "bart":
        raise JanusError("convert: to-hf needs a model.arch=bart model (BART is post-LN; the "
                         "janus flavour's pre-LN layers have no BartForConditionalGeneration form)")
    ids = hf_ids(tokenizer)
    return _transformers().BartConfig(
        vocab_size=tokenizer.vocab_size, d_model=cfg.hidden_size, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.ffn_hidden_size,
        decoder_ffn_dim=cfg.ffn_hidden_size, max_position_embeddings=cfg.max_positions,
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, activation_function="gelu",
        scale_embedding=cfg.scale_embedding, pad_token_id=int(ids[PAD]),
        bos_token_id=int(ids[BOS]), eos_token_id=int(ids[EOS]),
        decoder_start_token_id=int(ids[BOS]), forced_eos_token_id=int(ids[EOS]),
        forced_bos_token_id=None)


def hf_ids(tokenizer: Tokenizer) -> torch.Tensor:
    """Our id -> the Hugging Face id (the identity for a sentencepiece tokenizer)."""
    if isinstance(tokenizer, HFTokenizer):
        return torch.from_numpy(tokenizer.hf_ids)
    return torch.arange(tokenizer.vocab_size)


def padded_vocab(cfg: ModelConfig, vocab_size: int) -> int:
    multiple = cfg.vocab_divisible_by
    return (vocab_size + multiple - 1) // multiple * multiple


def _heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    """[H, ...] projection rows -> [heads, head_dim, ...]."""
    return w.view(heads, w.shape[0] // heads, *w.shape[1:])


def _fuse(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """q/k/v rows -> our per-head interleaved rows [head, part, head_dim, ...]."""
    fused = torch.stack([_heads(p, heads) for p in parts], dim=1)
    return fused.reshape(-1, *parts[0].shape[1:])


def _split(w: torch.Tensor, n: int, heads: int) -> list[torch.Tensor]:
    """Inverse of _fuse."""
    per = w.view(heads, n, w.shape[0] // (heads * n), *w.shape[1:])
    return [per[:, i].reshape(-1, *w.shape[1:]) for i in range(n)]


def _layer_map(stack: str, i: int) -> dict[str, str]:
    """Our names -> HF's for one layer's unfused weights (LayerNorms, outputs, feed-forward)."""
    ours = f"{'encoder' if stack == 'encoder' else 'decoder'}.{i}."
    hf = f"model.{stack}.layers.{i}."
    if stack == "encoder":
        names = {"norm_attn": "self_attn_layer_norm", "attn.out": "self_attn.out_proj"}
    else:
        names = {"norm_self": "self_attn_layer_norm", "self_attn.out": "self_attn.out_proj",
                 "norm_cross": "encoder_attn_layer_norm", "cross_attn.q": "encoder_attn.q_proj",
                 "cross_attn.out": "encoder_attn.out_proj"}
    names.update({"norm_ffn": "final_layer_norm", "ffn.up": "fc1", "ffn.down": "fc2"})
    return {f"{ours}{a}.{p}": f"{hf}{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _fused_map(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(our fused projection, its HF parts in order) for every layer, without .weight/.bias."""
    out = []
    for i in range(cfg.encoder_layers):
        hf = f"model.encoder.layers.{i}.self_attn."
        out.append((f"encoder.{i}.attn.qkv", [hf + p for p in ("q_proj", "k_proj", "v_proj")]))
    for i in range(cfg.decoder_layers):
        hf = f"model.decoder.layers.{i}."
        out.append((f"decoder.{i}.self_attn.qkv",
                    [hf + "self_attn." + p for p in ("q_proj", "k_proj", "v_proj")]))
        out.append((f"decoder.{i}.cross_attn.kv", [hf + "encoder_attn." + p for p in ("k_proj", "v_proj")]))
    return out


def _plain_map(cfg: ModelConfig) -> dict[str, str]:
    """Our names -> HF's for every weight copied as it is."""
    names = {"enc_pos.weight": "model.encoder.embed_positions.weight",
             "dec_pos.weight": "model.decoder.embed_positions.weight"}
    for ours, stack in (("enc_emb_norm", "encoder"), ("dec_emb_norm", "decoder")):
        for p in ("weight", "bias"):
            names[f"{ours}.{p}"] = f"model.{stack}.layernorm_embedding.{p}"
    for i in range(cfg.encoder_layers):
        names.update(_layer_map("encoder", i))
    for i in range(cfg.decoder_layers):
        names.update(_layer_map("decoder", i))
    return names


def to_janus(hf_state: Weights, cfg: ModelConfig, tokenizer: Tokenizer) -> Weights:
    """BartForConditionalGeneration's state dict -> our full (TP = 1) weights, without the
    JANUS-only ones."""
    ids = hf_ids(tokenizer)
    rows = padded_vocab(cfg, tokenizer.vocab_size)
    shared = hf_state["model.shared.weight"]
    if shared.shape[0] != tokenizer.vocab_size:
        raise JanusError(f"convert: the model has {shared.shape[0]} token embeddings, its "
                         f"tokenizer {tokenizer.vocab_size} tokens")
    embed = shared.new_zeros(rows, shared.shape[1])
    embed[:len(ids)] = shared[ids]
    bias = shared.new_zeros(rows)
    bias[:len(ids)] = hf_state["final_logits_bias"][0][ids]
    out = {"embed.weight": embed, "final_logits_bias": bias}
    out.update({ours: hf_state[theirs] for ours, theirs in _plain_map(cfg).items()})
    for ours, parts in _fused_map(cfg):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = _fuse([hf_state[f"{part}.{p}"] for part in parts], cfg.num_heads)
    return {k: v.float().contiguous() for k, v in out.items()}


def to_hf(weights: Weights, cfg: ModelConfig, tokenizer: Tokenizer) -> Weights:
    """Inverse of to_janus: our full weights -> BartForConditionalGeneration's state dict."""
    ids = hf_ids(tokenizer)
    v = len(ids)
    shared = torch.empty_like(weights["embed.weight"][:v])
    shared[ids] = weights["embed.weight"][:v]
    bias = torch.empty_like(weights["final_logits_bias"][:v])
    bias[ids] = weights["final_logits_bias"][:v]
    out = {"model.shared.weight": shared, "final_logits_bias": bias[None]}
    out.update({theirs: weights[ours] for ours, theirs in _plain_map(cfg).items()})
    for ours, parts in _fused_map(cfg):
        for p in ("weight", "bias"):
            for part, w in zip(parts, _split(weights[f"{ours}.{p}"], len(parts), cfg.num_heads)):
                out[f"{part}.{p}"] = w
    return {k: t.contiguous() for k, t in out.items()}


def load(source: str | Path, seed: int = 0) -> consolidated.Consolidated:
    """A BART directory written by `save_pretrained` (or a hub name, with network) -> our full
    weights, a run config and the tokenizer (renumbered, tokenizer.HFTokenizer)."""
    transformers = _transformers()
    path = Path(source)
    where = str(source)
    if not path.exists():  # a hub name: fetched once into the HF cache
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(source)))
        except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
            raise JanusError(f"convert: {source} is no directory, and not a hub model this "
                             f"machine can fetch ({type(e).__name__})") from None
    tokenizer = load_tokenizer(path)
    hf_model = transformers.BartForConditionalGeneration.from_pretrained(str(path))
    shape = model_config(hf_model.config)
    side = path / SIDE_FILE
    if side.is_file():
        run = from_dict(json.loads(_side_metadata(side)["config"]))
        extra = load_file(str(side))
        if any(getattr(run.model, k) != getattr(shape, k) for k in SHAPE):
            raise JanusError(f"convert: {side} describes another model than "
                             f"{path / 'config.json'}")
    else:
        run = RunConfig(model=shape, objective=_ar_only(), data=_fitting_data(shape))
        extra = _fresh_janus_only(shape, seed)
    weights = to_janus(hf_model.state_dict(), run.model, tokenizer)
    weights.update(extra)
    return consolidated.Consolidated(weights, to_dict(run), tokenizer, f"hf:{where}")


def _side_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _ar_only():
    """A BART model was trained to decode AR only: `generate` refuses NAR unless forced."""
    weights = LossWeights(ce_ar=1.0, ce_nar=0.0, ce_aux=0.0, kl_ar_nar=0.0, kl_ar_aux=0.0,
                          kl_nar_aux=0.0, length=0.0)
    return ObjectiveConfig(weights=weights)


def _fitting_data(cfg: ModelConfig):
    """Default lengths, cut to the model's positions."""
    longest = min(DataConfig.max_source_len, cfg.max_positions)
    return DataConfig(max_source_len=longest, max_target_len=longest)


def _fresh_janus_only(cfg: ModelConfig, seed: int) -> Weights:
    """The length head initialised as JanusModel does, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty(cfg.length_classes, cfg.hidden_size).normal_(0.0, INIT_STD,
                                                                      generator=generator)
    return {"length_head.weight": weight, "length_head.bias": torch.zeros(cfg.length_classes)}


def from_hf(source: str | Path, output: str | Path) -> Path:
    """`convert from-hf`: a BART directory or hub name -> a consolidated file."""
    loaded = load(source)
    return consolidated.write(output, loaded.weights, loaded.config, loaded.tokenizer,
                              loaded.source)


def export(source: str | Path, output: str | Path) -> Path:
    """`convert to-hf`: a checkpoint (any TP size, see weights.resolve) or a consolidated file ->
    a Hugging Face directory: config.json, generation_config.json, model.safetensors, the
    tokenizer's files, and janus.safetensors (length head, run config)."""
    transformers = _transformers()
    source = Path(source)
    if source.is_file():
        full = consolidated.read(source)
    else:
        from janus_pretrain.checkpoint.weights import full_model

        full = full_model(source)
    run = from_dict(full.config)
    config = hf_config(run.model, full.tokenizer)
    with torch.device("meta"):
        hf_model = transformers.BartForConditionalGeneration(config)
    hf_model.load_state_dict(to_hf(full.weights, run.model, full.tokenizer), strict=False,
                             assign=True)
    hf_model.tie_weights()
    missing = [n for n, p in [*hf_model.named_parameters(), *hf_model.named_buffers()]
               if p.is_meta]
    if missing:
        raise JanusError(f"convert: no weight for {missing[0]} in {source}")
    output = Path(output)
    hf_model.save_pretrained(str(output))
    save_file({k: full.weights[k].contiguous() for k in JANUS_ONLY}, str(output / SIDE_FILE),
              metadata={"config": json.dumps(full.config), "source": full.source})
    _save_tokenizer(full.tokenizer, output)
    return output


def _save_tokenizer(tokenizer: Tokenizer, output: Path) -> None:
    """tokenizer.json + tokenizer_config.json (AutoTokenizer loads them; encoding adds <s> ...
    </s> as BART's does), or the sentencepiece model as it is."""
    if not isinstance(tokenizer, HFTokenizer):
        (output / tokenizer.filename).write_bytes(tokenizer.model_bytes())
        return
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    names = [hf.id_to_token(int(i)) for i in tokenizer.hf_ids[:5]]  # PAD UNK BOS EOS MASK
    if hf.post_processor is None:
        bos, eos = names[BOS], names[EOS]
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, int(tokenizer.hf_ids[BOS])), (eos, int(tokenizer.hf_ids[EOS]))])
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=hf, pad_token=names[PAD], unk_token=names[UNK], bos_token=names[BOS],
        eos_token=names[EOS], mask_token=names[MASK])
    fast.save_pretrained(str(output))
