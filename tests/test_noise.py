"""Masking: exact counts, spans, never BOS/EOS, and the pretraining union mask."""
import math

import numpy as np
import pytest

from janus_pretrain.config import ObjectiveConfig
from janus_pretrain.objectives import noise
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD


@pytest.mark.parametrize("n", [1, 5, 40, 200])
def test_target_span_mask_count_and_spans(n):
    rng = np.random.default_rng(n)
    m = noise.target_span_mask(rng, n, 0.7, 2.0)
    assert m.sum() == math.ceil(0.7 * n)
    if n >= 40:  # spans, not isolated tokens: fewer runs than masked tokens
        runs = int((m & ~np.concatenate([[False], m[:-1]])).sum())
        assert runs < m.sum()


def test_span_mask_respects_allowed():
    rng = np.random.default_rng(0)
    allowed = np.arange(50) % 3 != 0
    m = noise.span_mask(rng, allowed, 20, 3.0)
    assert m.sum() == 20 and not (m & ~allowed).any()
    assert noise.span_mask(rng, allowed, 1000, 3.0).sum() == allowed.sum()


def test_text_infilling_one_mask_per_span():
    rng = np.random.default_rng(1)
    tokens = np.arange(10, 110)
    source, hidden = noise.text_infilling(rng, tokens, 0.3, 3.0, MASK)
    assert hidden.sum() == 30
    spans = int((hidden & ~np.concatenate([[False], hidden[:-1]])).sum())
    assert (source == MASK).sum() == spans
    assert len(source) == 100 - 30 + spans
    # The visible tokens keep their order.
    assert list(source[source != MASK]) == list(tokens[~hidden])


def test_denoising_union_mask():
    rng = np.random.default_rng(2)
    hidden = noise.span_mask(rng, np.ones(100, bool), 30, 3.0)
    m = noise.denoising_target_mask(rng, hidden, 0.5, 3.0)
    assert (m & hidden).sum() == 30 and (m & ~hidden).sum() == 30


def test_uniform_mask_range():
    rng = np.random.default_rng(3)
    counts = {int(noise.target_uniform_mask(rng, 6).sum()) for _ in range(200)}
    assert counts == {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("masking", ["denoise", "span", "uniform"])
def test_collate_never_masks_bos_eos_or_pad(masking):
    obj = JanusObjective(ObjectiveConfig(masking=masking), 24, 24, 64)
    rng = np.random.default_rng(4)
    examples = [(np.arange(5, 5 + n), np.arange(7, 7 + n)) for n in (3, 10, 40)]
    batch = obj.collate(examples, rng)
    tgt, masked = batch["tgt"], batch["masked"]
    assert tgt.shape[1] == 24  # truncated to max_target_len including BOS/EOS
    assert not masked[tgt == BOS].any() and not masked[tgt == EOS].any()
    assert not masked[tgt == PAD].any()
    assert masked.sum(1).min() >= 1


def test_authors_target_mask_statistics():
    """The authors' fine-tuning sampler: ~0.57 of a target masked on average at ratio 0.7 (not
    the exact sampler's >= 0.7), varying per sentence, never more than the budget."""
    rng = np.random.default_rng(5)
    shares = []
    for n in rng.integers(5, 30, size=3000):
        m = noise.authors_target_mask(rng, int(n), 0.7, 2.0)
        assert 1 <= m.sum() <= math.ceil(0.7 * (n + 2))
        shares.append(m.mean())
    assert 0.54 < np.mean(shares) < 0.60
    assert np.std(shares) > 0.05


def test_authors_spans_overlap_and_zero_lengths():
    """Starts are drawn independently, so some draws cover fewer tokens than the budget."""
    rng = np.random.default_rng(6)
    covered = [(noise.authors_spans(rng, 40, 0.7, 2.0) > 0).sum() for _ in range(200)]
    assert max(covered) <= math.ceil(0.7 * 42) and min(covered) < math.ceil(0.7 * 42) - 2


def test_authors_denoising_statistics():
    """Pretraining: the decoder masks ~30% (less where spans overlap), about half of it hidden
    from the encoder, each hidden span one [MASK]; the visible tokens keep their order."""
    rng = np.random.default_rng(7)
    tokens = np.arange(10, 130)
    masked_share, hidden_share = [], []
    for _ in range(400):
        source, masked = noise.authors_denoising(rng, tokens, 0.3, 3.0, 0.5, MASK)
        kept = source[source != MASK]
        assert set(kept) >= set(tokens[~masked])
        assert list(kept) == sorted(kept)
        masked_share.append(masked.mean())
        hidden_share.append(1 - len(kept) / len(tokens))
    assert 0.24 < np.mean(masked_share) <= 0.30
    assert 0.4 < np.mean(hidden_share) / np.mean(masked_share) < 0.6


@pytest.mark.parametrize("masking", ["denoise", "span"])
def test_collate_authors_sampler(masking):
    obj = JanusObjective(ObjectiveConfig(masking=masking, mask_sampler="authors"), 64, 64, 64)
    rng = np.random.default_rng(8)
    batch = obj.collate([(np.arange(5, 25), np.arange(7, 7 + n)) for n in (1, 10, 50)], rng)
    tgt, masked = batch["tgt"], batch["masked"]
    assert not masked[(tgt == BOS) | (tgt == EOS) | (tgt == PAD)].any()
    assert masked.sum(1).min() >= 1
