"""The weights a fresh run starts from (`train.init_from`): a checkpoint, a consolidated file or a
Hugging Face BART directory, resharded to this rank."""
from __future__ import annotations

from pathlib import Path

from janus_pretrain.checkpoint import consolidated, hf, store, weights
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import reshard
from janus_pretrain.tokenizer import Tokenizer


def init_weights(model: JanusModel, path: str, tokenizer: Tokenizer) -> None:
    """Model weights only, from a (pretrained) checkpoint, a consolidated file or a Hugging Face
    BART directory (checkpoint/hf.py), trained with the same tokenizer."""
    source = Path(path)
    if source.is_file() or hf.is_hf_dir(source):
        full = consolidated.read(source) if source.is_file() else hf.load(source)
        store.require_same_tokenizer(full.tokenizer, tokenizer, source)
        loaded = reshard.shard_for_this_rank(fit_mask_vector(model, dict(full.weights)), model)
        weights.load_into(model, loaded, source)
        return
    ckpt = weights.resolve(path)
    store.check_tokenizer(ckpt, tokenizer)
    weights.load_into(model, fit_mask_vector(model, weights.weights_for_this_rank(ckpt, model)),
                      ckpt)


def fit_mask_vector(model: JanusModel, loaded: dict) -> dict:
    """BANG's [MASK] vector is the one weight JANUS and BANG objectives do not share: a model
    that needs it and does not find it starts it fresh, one that has no use for it drops it."""
    if model.mask_vector is None:
        loaded.pop("mask_vector", None)
    else:
        loaded.setdefault("mask_vector", model.mask_vector.detach().clone())
    return loaded
