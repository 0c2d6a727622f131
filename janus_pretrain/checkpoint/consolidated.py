"""One-file models: the full (TP = 1) weights as safetensors, with the run config and the
tokenizer in its JSON header.

Written by `janus-pretrain checkpoint consolidate` and `convert from-hf`, read by the Generator,
`train.init_from` and `convert to-hf`. A safetensors file holds tensors and strings only, so
loading one (from anyone) runs no code, unlike a torch pickle; and this module needs neither
megatron-core nor DeepSpeed, so decoding from such a file needs torch alone.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from janus_pretrain.errors import JanusError
from janus_pretrain.tokenizer import Tokenizer, tokenizer_from_bytes

FORMAT = "janus-pretrain consolidated model"


@dataclass
class Consolidated:
    weights: dict[str, torch.Tensor]
    config: dict  # the run config (config.to_dict)
    tokenizer: Tokenizer
    source: str  # what it was made from


def write(path: str | Path, weights: dict[str, torch.Tensor], config: dict, tokenizer: Tokenizer,
          source: str) -> Path:
    """A directory, or a place that cannot be written (a read-only mount), is one error."""
    path = Path(path)
    header = {"format": FORMAT, "config": json.dumps(config), "source": source,
              "tokenizer": base64.b64encode(tokenizer.model_bytes()).decode("ascii")}
    if path.is_dir():
        raise JanusError(f"checkpoint: cannot write {path}: it is a directory (name a .safetensors "
                         f"file)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(path),
                  metadata=header)
    except (OSError, SafetensorError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise JanusError(f"checkpoint: cannot write {path}: {why}") from None
    return path


def read(path: str | Path) -> Consolidated:
    """A consolidated file -> its weights (on the CPU), run config, tokenizer and source."""
    path = Path(path)
    if not path.is_file():
        raise JanusError(f"checkpoint: consolidated file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise JanusError(f"checkpoint: {path} is not a safetensors file ({e}); consolidated "
                         f"files are safetensors (a torch pickle is refused without running it: "
                         f"consolidate the checkpoint again)") from None
    if header.get("format") != FORMAT:
        raise JanusError(f"checkpoint: {path} is a safetensors file but not a janus-pretrain "
                         f"consolidated model (for Hugging Face BART, use `convert from-hf`)")
    tokenizer = tokenizer_from_bytes(base64.b64decode(header["tokenizer"]),
                                     f"{path} (its tokenizer)")
    return Consolidated(weights, json.loads(header["config"]), tokenizer, header["source"])
