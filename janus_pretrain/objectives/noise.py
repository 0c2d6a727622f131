"""Which tokens to hide: span masks for the decoder and BART text infilling for the encoder.

Numpy on the host, run in the data collator; each function takes the generator it draws from,
so a batch's noise is a pure function of the loader position (see data/loader.py).
Sequences here are bare token ids, without BOS/EOS (but for the [EOS] that separates the
documents of a packed pretraining block: `pretraining_noise`).
"""
from __future__ import annotations

import math

import numpy as np

from janus_pretrain.tokenizer import EOS


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


def authors_spans(rng: np.random.Generator, n: int, ratio: float, lam: float) -> np.ndarray:
    """Spans as the JANUS authors' released code samples them (docs/method.md, section 3).

    Over the n + 2 slots of a sequence with BOS/EOS: a budget of ceil(ratio * (n + 2)) tokens,
    Poisson(lam) span lengths (zero-length spans included) drawn until they cover the budget,
    the last one trimmed to fit; span starts drawn without replacement, independently of each
    other, so spans overlap; a span running past the end shrinks to one token. Returns the span
    id (1, 2, ...) covering each of the n real tokens, 0 where none (BOS/EOS dropped; where
    spans overlap the later one wins). -> [n] int
    """
    slots = n + 2
    budget = math.ceil(ratio * slots)
    lengths = np.zeros(0, dtype=np.int64)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.poisson(lam, size=budget)])
    count = min(int(np.searchsorted(np.cumsum(lengths), budget)) + 1, slots)
    lengths = lengths[:count]
    lengths[-1] = budget - lengths[:-1].sum()
    starts = rng.permutation(slots)[:count]
    lengths[starts + lengths > slots] = 1
    ids = np.zeros(slots, dtype=np.int64)
    for k, (start, length) in enumerate(zip(starts, lengths), start=1):
        ids[start:start + length] = k
    return ids[1:-1]


def authors_target_mask(rng: np.random.Generator, n: int, ratio: float, lam: float) -> np.ndarray:
    """Fine-tuning mask as the authors': `authors_spans` at ratio 0.7 masks ~0.57 of the real
    tokens on average, varying per sentence. One token is masked where the draw masked none
    (ours: every row keeps a NAR target). -> [n] bool"""
    m = authors_spans(rng, n, ratio, lam) > 0
    if n and not m.any():
        m[rng.integers(n)] = True
    return m


def authors_denoising(rng: np.random.Generator, tokens: np.ndarray, ratio: float, lam: float,
                      hide_prob: float, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pretraining noise as the authors': Poisson(lam) spans over ratio of the tokens; each span is
    replaced in the encoder by one [MASK] with probability hide_prob, else left visible; the
    decoder's NAR/AUX mask is every span. tokens [n] -> (source [m], decoder mask [n] bool)."""
    n = len(tokens)
    ids = authors_spans(rng, n, ratio, lam)
    spans = np.unique(ids[ids > 0])
    hide = np.zeros(ids.max(initial=0) + 1, dtype=bool)
    hide[spans[rng.random(len(spans)) < hide_prob]] = True
    hidden = hide[ids] & (ids > 0)
    span_start = hidden & ~np.concatenate([[False], hidden[:-1]])
    source = np.where(hidden, mask_id, tokens)[~hidden | span_start]
    masked = ids > 0
    if n and not masked.any():
        masked[rng.integers(n)] = True
    return source, masked


def target_uniform_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    """CMLM mask: a uniform number in [1, n] of uniformly chosen target tokens. -> [n] bool."""
    chosen = np.zeros(n, dtype=bool)
    if n:
        chosen[rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)] = True
    return chosen



def pretraining_noise(rng: np.random.Generator, tokens: np.ndarray, cfg, mask_id: int,
                      separator: int = EOS) -> tuple[np.ndarray, np.ndarray]:
    """`denoise` (pretraining) by `cfg.mask_sampler` (an ObjectiveConfig): tokens [n] ->
    (source [m], decoder mask [n] bool). JANUS and BANG both call it, so that with the same
    generator they see the same sources. A packed block's documents (split by `separator`,
    data/packing.py) are noised one by one, so no span crosses from one into the next; the
    separators stay in the source and out of the mask."""
    cuts = np.flatnonzero(tokens == separator)
    if len(cuts):
        sources, masks = [], []
        for start, end in zip(np.concatenate([[0], cuts + 1]), np.append(cuts, len(tokens))):
            if end > start:
                source, mask = _document_noise(rng, tokens[start:end], cfg, mask_id)
                sources.append(source)
                masks.append(mask)
            if end < len(tokens):
                sources.append(tokens[end:end + 1])
                masks.append(np.zeros(1, dtype=bool))
        return np.concatenate(sources), np.concatenate(masks)
    return _document_noise(rng, tokens, cfg, mask_id)


def _document_noise(rng: np.random.Generator, tokens: np.ndarray, cfg, mask_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    if cfg.mask_sampler == "authors":
        return authors_denoising(rng, tokens, cfg.source_mask_ratio, cfg.source_span_lambda,
                                 1.0 - cfg.extra_mask_share, mask_id)
    source, hidden = text_infilling(rng, tokens, cfg.source_mask_ratio, cfg.source_span_lambda,
                                    mask_id)
    return source, denoising_target_mask(rng, hidden, cfg.extra_mask_share, cfg.source_span_lambda)
