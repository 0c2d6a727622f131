"""Task metrics on detokenized strings, all on a 0-100 scale.

BLEU is sacreBLEU's corpus BLEU (13a tokenization; BLEU-n = up to n-gram precision), ROUGE is
Google's rouge-score (F1 of ROUGE-1/2/L with the Porter stemmer, averaged over examples, the
way ROUGE-1.5.5 reports it), METEOR is nltk's on an offline WordNet (finetune/wordnet.py).
Distinct-n and CoQA's F1 are small enough to be ours.
"""
from __future__ import annotations

import collections
import functools
import re
import string
from typing import Callable, Optional, Sequence

from janus_pretrain.errors import JanusError
from finetune.wordnet import UNAVAILABLE, wordnet

Metric = Callable[[Sequence[str], Sequence[str]], Optional[float]]


def bleu(hyps: Sequence[str], refs: Sequence[str], order: int = 4) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(max_ngram_order=order).corpus_score(list(hyps), [list(refs)]).score


class _RougeTokenizer:
    """rouge-score's own tokenization (lowercase, alphanumeric runs, Porter-stem words over 3
    letters), memoised per text and per word: stemming is two thirds of rouge-score's run time,
    and a test set repeats its words and its references (scoring the five 11k-summary XSum
    systems takes ~15 s instead of ~60 s)."""

    def __init__(self):
        from nltk.stem import porter

        self.stem = functools.lru_cache(maxsize=None)(porter.PorterStemmer().stem)
        self.tokenize = functools.lru_cache(maxsize=1 << 16)(self._tokenize)

    def _tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        return tokenize.tokenize(text, self)


_rouge_tokenizer = functools.lru_cache(maxsize=1)(_RougeTokenizer)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """-> {rouge1, rouge2, rougeL}: mean F1 over examples."""
    from rouge_score.rouge_scorer import RougeScorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(names), tokenizer=_rouge_tokenizer())
    sums = dict.fromkeys(names, 0.0)
    for h, r in zip(hyps, refs):
        scores = scorer.score(r, h)
        for n in names:
            sums[n] += scores[n].fmeasure
    return {n: 100 * s / max(len(hyps), 1) for n, s in sums.items()}


def meteor(hyps: Sequence[str], refs: Sequence[str]) -> Optional[float]:
    """Mean sentence METEOR (whitespace tokens, lowercased); None without an offline WordNet."""
    wn = wordnet()
    if wn is None:
        return None
    from nltk.translate.meteor_score import meteor_score

    total = sum(meteor_score([r.lower().split()], h.lower().split(), wordnet=wn)
                for h, r in zip(hyps, refs))
    return 100 * total / max(len(hyps), 1)


def distinct(hyps: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the whole output."""
    grams = [tuple(toks[i:i + n]) for toks in (h.split() for h in hyps)
             for i in range(len(toks) - n + 1)]
    return 100 * len(set(grams)) / max(len(grams), 1)


def _normalize_answer(text: str) -> list[str]:
    """CoQA's official normalisation: lowercase, no punctuation, no articles."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def coqa_f1(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean token-overlap F1 of the normalised answers (CoQA's official scorer, one reference)."""
    total = 0.0
    for h, r in zip(hyps, refs):
        h_toks, r_toks = _normalize_answer(h), _normalize_answer(r)
        if not h_toks or not r_toks:
            total += float(h_toks == r_toks)
            continue
        common = sum((collections.Counter(h_toks) & collections.Counter(r_toks)).values())
        if common:
            precision, recall = common / len(h_toks), common / len(r_toks)
            total += 2 * precision * recall / (precision + recall)
    return 100 * total / max(len(hyps), 1)


METRICS: dict[str, Metric] = {
    "bleu": bleu,
    "bleu1": lambda h, r: bleu(h, r, 1),
    "bleu2": lambda h, r: bleu(h, r, 2),
    "bleu4": bleu,
    "rouge1": lambda h, r: rouge(h, r)["rouge1"],
    "rouge2": lambda h, r: rouge(h, r)["rouge2"],
    "rougeL": lambda h, r: rouge(h, r)["rougeL"],
    "meteor": meteor,
    "distinct1": lambda h, r: distinct(h, 1),
    "distinct2": lambda h, r: distinct(h, 2),
    "f1": coqa_f1,
}


def score(names: Sequence[str], hyps: Sequence[str], refs: Sequence[str]) -> dict[str, Optional[float]]:
    """The named metrics of hypotheses against one reference each; None marks a metric that
    cannot be computed here (METEOR without WordNet)."""
    if len(hyps) != len(refs):
        raise JanusError(f"metrics: {len(hyps)} hypotheses for {len(refs)} references")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise JanusError(f"metrics: unknown metric '{unknown[0]}' (known: {', '.join(METRICS)})")
    out: dict[str, Optional[float]] = {}
    if any(n.startswith("rouge") for n in names):
        out.update({k: v for k, v in rouge(hyps, refs).items() if k in names})
    for n in names:
        if n not in out:
            out[n] = METRICS[n](hyps, refs)
    return {n: out[n] for n in names}


def unavailable(results: dict[str, Optional[float]]) -> list[str]:
    """Human-readable notes for the metrics `score` could not compute."""
    return [UNAVAILABLE for n, v in results.items() if v is None and n == "meteor"]
