"""Which tokens to hide: span masks for the decoder and BART text infilling for the encoder.

Numpy on the host, run in the data collator; each function takes the generator it draws from,
so a batch's noise is a pure function of the loader position (see data/loader.py).
Sequences here are bare token ids, without BOS/EOS.
"""
from __future__ import annotations

import math

import numpy as np


def span_mask(rng: np.random.Generator, allowed: np.ndarray, count: int, lam: float) -> np.ndarray:
    """Choose exactly min(count, allowed.sum()) allowed positions, in spans of Poisson(lam) length.

    allowed [n] bool -> chosen [n] bool. Spans start at a random free position and run right,
    skipping positions that are not allowed or already chosen; lengths are at least 1.
    """
    chosen = np.zeros(len(allowed), dtype=bool)
    left = min(int(count), int(allowed.sum()))
    while left > 0:
        free = np.flatnonzero(allowed & ~chosen)
        start = free[rng.integers(len(free))]
        length = max(1, int(rng.poisson(lam)))
        window = np.flatnonzero(allowed[start:start + length] & ~chosen[start:start + length])
        take = start + window[:left]
        chosen[take] = True
        left -= len(take)
    return chosen


def text_infilling(rng: np.random.Generator, tokens: np.ndarray, ratio: float, lam: float,
                   mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """BART text infilling: hide round(ratio * n) tokens in Poisson(lam) spans, one [MASK] per span.

    tokens [n] -> (source [m] with m <= n, hidden [n] bool marking the tokens the encoder lost).
    """
    n = len(tokens)
    hidden = span_mask(rng, np.ones(n, dtype=bool), max(1, round(ratio * n)) if n else 0, lam)
    span_start = hidden & ~np.concatenate([[False], hidden[:-1]])
    source = np.where(hidden, mask_id, tokens)[~hidden | span_start]
    return source, hidden


def denoising_target_mask(rng: np.random.Generator, hidden: np.ndarray, extra_share: float,
                          lam: float) -> np.ndarray:
    """Decoder NAR/AUX mask for pretraining: the encoder-hidden tokens plus extra spans the encoder
    does see, the extra spans making up `extra_share` of the result. hidden [n] -> [n] bool."""
    extra = round(hidden.sum() * extra_share / (1.0 - extra_share))
    return hidden | span_mask(rng, ~hidden, extra, lam)


def target_span_mask(rng: np.random.Generator, n: int, ratio: float, lam: float) -> np.ndarray:
    """Fine-tuning mask: ceil(ratio * n) of n target tokens in Poisson(lam) spans. -> [n] bool."""
    return span_mask(rng, np.ones(n, dtype=bool), math.ceil(ratio * n), lam)


def target_uniform_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    """CMLM mask: a uniform number in [1, n] of uniformly chosen target tokens. -> [n] bool."""
    chosen = np.zeros(n, dtype=bool)
    if n:
        chosen[rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)] = True
    return chosen
