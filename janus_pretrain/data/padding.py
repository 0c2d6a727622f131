"""Id arrays -> model-ready rows: the BOS/EOS frame every sequence gets, and right padding."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from janus_pretrain.tokenizer import BOS, EOS, PAD


def pad_batch(rows: Sequence[np.ndarray]) -> torch.Tensor:
    """Right-pad 1-D id arrays with [PAD] -> [B, max_len] long."""
    out = np.full((len(rows), max(len(r) for r in rows)), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def with_bos_eos(ids: np.ndarray) -> np.ndarray:
    """[BOS] ids [EOS], int64."""
    return np.concatenate([[BOS], ids, [EOS]]).astype(np.int64)
