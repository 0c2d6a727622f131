"""Padding in one epoch of training batches: random batches of a fixed number of pairs against
length-bucketed batches filled to a token budget (`data.micro_batch_size` vs `data.max_tokens`).

    python -m janus_pretrain.bench padding [--source ...train.en --target ...train.de]
        [--vocab 8000] [--batch 64] [--max-tokens 4096] [--max-len 256]

Tokenizes both sides with a sentencepiece model trained here (or `--tokenizer`), builds the
epoch's plans the loader would build, and prints the share of padded cells (rows x longest row,
[BOS]/[EOS] counted as tokens) on each side. Only lengths are needed, so no batch is collated.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from janus_pretrain.data.batching import TokenBudget, fixed_size_plan, token_budget_plan
from janus_pretrain.tokenizer import load_tokenizer, train_tokenizer

MULTI30K = Path(__file__).resolve().parents[3] / "shared" / "data" / "nmt" / "multi30k"


def pad_fraction(plan: list[np.ndarray], rows: np.ndarray) -> float:
    """Batches (example indices) and collated row lengths [N] -> padded cells / all cells."""
    real = sum(int(rows[b].sum()) for b in plan)
    cells = sum(len(b) * int(rows[b].max()) for b in plan)
    return 1.0 - real / cells


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench padding",
                                description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(MULTI30K / "train.en"))
    p.add_argument("--target", default=str(MULTI30K / "train.de"))
    p.add_argument("--tokenizer", help="a sentencepiece .model (default: train one of --vocab)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.tokenizer or train_tokenizer([args.source, args.target],
                                                  Path(tmp) / "tok.model", args.vocab).path
        tok = load_tokenizer(model)
    src_ids, tgt_ids = (np.array([len(x) for x in tok.encode(
        Path(f).read_text(encoding="utf-8").splitlines())]) for f in (args.source, args.target))
    budget = TokenBudget(args.max_tokens, args.max_len, args.max_len)
    src, tgt = budget.row_lengths(src_ids, tgt_ids)
    plans = {f"random, {args.batch} pairs": fixed_size_plan(len(tgt), args.batch, args.seed, 0, 1),
             f"budget, {args.max_tokens} tokens": token_budget_plan(
                 src_ids, tgt_ids, budget, args.seed, 0, 1)}
    print(f"{len(tgt)} pairs, vocabulary {tok.vocab_size}, mean target row {tgt.mean():.1f} "
          f"tokens ([BOS]/[EOS] included)")
    print(f"{'batches':<22}{'count':>7}{'rows/batch':>12}{'target pad':>12}{'source pad':>12}")
    for name, plan in plans.items():
        print(f"{name:<22}{len(plan):>7}{np.mean([len(b) for b in plan]):>12.1f}"
              f"{pad_fraction(plan, tgt):>12.1%}{pad_fraction(plan, src):>12.1%}")
