"""What every search returns per source: the tokens and how they scored."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS / EOS
    score: float       # the search's ranking score (AR: log-prob / length ** length_penalty;
                       # NAR: average token log-prob, or the AR score when reranked)
    log_prob: float    # sum of token log-probs
