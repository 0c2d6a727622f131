"""Decoding latency and throughput: AR greedy, AR beam 5, NAR mask-predict T = 1, 4, 10 and
speculative decoding (exact and relaxed), on one model and the same inputs, in one run.

With random sources, every setting emits exactly the reference number of tokens per sentence (AR
may not stop before it and must stop at it; NAR is given that length, one candidate), so the
ratios compare decoding work, not output lengths. Without --checkpoint the model is randomly
initialised at the given shape, which costs the same to run as a trained one, but its NAR drafts
are never accepted: the spec rows measure what speculative decoding gains only with a trained
checkpoint and real sentences (--sources), which decode to their own lengths (spec exact emits
exactly greedy's). The spec rows add passes per sentence, tokens per iteration and the share of
time spent drafting and verifying (the rest is bookkeeping).

    python -m janus_pretrain.bench decode --model base --sentences 10 --batch-size 16
    python -m janus_pretrain.bench decode --checkpoint runs/janus --sources val.en --batch-size 32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from janus_pretrain.config import load_config
from janus_pretrain.data.padding import with_bos_eos
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import DecodeOptions, Generator
from janus_pretrain.model import JanusModel
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD

SETTINGS = {
    "ar_greedy": dict(mode="ar", beam=1),
    "ar_beam5": dict(mode="ar", beam=5),
    "nar_T1": dict(mode="nar", iterations=1),
    "nar_T4": dict(mode="nar", iterations=4),
    "nar_T10": dict(mode="nar", iterations=10),
    "spec_exact": dict(mode="spec", spec_accept="exact"),
    "spec_relaxed": dict(mode="spec", spec_accept="relaxed"),
}


def random_generator(preset: str, vocab: int) -> Generator:
    cfg = load_config(None, [f"model={preset}", "data.max_source_len=128", "data.max_target_len=128"])
    topo = state.initialize(1)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, vocab, PAD).to(topo.device)
    return Generator(model, tokenizer=None, cfg=cfg, device=topo.device)


def timed(gen: Generator, src: list, lengths: Optional[list[int]], batch_size: int,
          setting: dict, max_len: int) -> float:
    """Seconds to decode `src`; `lengths` forces every output's length (None: free)."""
    opts = DecodeOptions(**setting, batch_size=batch_size, force_lengths=lengths, max_len=max_len)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hyps = gen.decode_ids(src, opts)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert lengths is None or [len(h.tokens) for h in hyps] == lengths, \
        "a setting emitted another length"
    return elapsed


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench decode",
                                description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (default: random weights)")
    p.add_argument("--model", default="base", help="model preset when no checkpoint is given")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--src-len", type=int, default=24)
    p.add_argument("--tgt-len", type=int, default=24, help="tokens every setting must emit")
    p.add_argument("--sentences", type=int, default=10, help="sentences timed at batch 1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=2, help="batches timed for throughput")
    p.add_argument("--sources", help="a text file of source sentences (with --checkpoint): decode "
                                     "those, each to its own length, instead of random ids")
    p.add_argument("--max-len", type=int, default=64, help="with --sources: the output limit")
    p.add_argument("--spec-block", type=int, default=4, help="spec: tokens drafted per iteration")
    args = p.parse_args(argv)
    if args.sources and not args.checkpoint:
        raise JanusError("bench decode: --sources needs --checkpoint (its tokenizer)")

    gen = Generator.from_checkpoint(args.checkpoint) if args.checkpoint else \
        random_generator(args.model, args.vocab)
    vocab = gen.model.vocab_size
    n = max(args.sentences, args.batch_size * args.batches)
    if args.sources:
        src = gen.source_ids(Path(args.sources).read_text(encoding="utf-8").splitlines()[:n])
        n, lengths, max_len = len(src), [None] * len(src), args.max_len
    else:
        rng = np.random.default_rng(0)
        src = [with_bos_eos(rng.integers(5, vocab, size=args.src_len)) for _ in range(n)]
        lengths, max_len = [args.tgt_len] * n, args.tgt_len
    force = (lambda x: None) if args.sources else (lambda x: x)
    timed(gen, src[:2], force(lengths[:2]), 2, SETTINGS["ar_beam5"], max_len)  # warm-up
    print(f"device={gen.device} threads={torch.get_num_threads()} "
          f"layers={gen.cfg.model.encoder_layers}+{gen.cfg.model.decoder_layers} "
          f"hidden={gen.cfg.model.hidden_size} vocab={vocab} "
          + (f"sources={args.sources} max_len={max_len}" if args.sources else
             f"src_len={args.src_len} tgt_len={args.tgt_len}") + f" spec_block={args.spec_block}")
    rows = {}
    for name, setting in SETTINGS.items():
        if setting["mode"] == "spec":
            setting = dict(setting, spec_block=args.spec_block)
        k = min(args.sentences, n)
        latency = timed(gen, src[:k], force(lengths[:k]), 1, setting, max_len) / k
        one = gen.stats  # batch 1: where the time went
        m = min(args.batch_size * args.batches, n)
        throughput = m / timed(gen, src[:m], force(lengths[:m]), args.batch_size, setting,
                               max_len)
        rows[name] = (latency * 1000, throughput, gen.stats, one)
    print(f"{'setting':<12} {'ms/sent@1':>10} {'sent/s@' + str(args.batch_size):>11} "
          f"{'vs beam5@1':>10} {'vs greedy@1':>11} {'vs greedy@' + str(args.batch_size):>12} "
          f"{'passes/sent':>11} {'tok/iter':>8} {'draft%@1':>8} {'verify%@1':>9}")
    beam_ms, greedy_ms, greedy_sps = rows["ar_beam5"][0], rows["ar_greedy"][0], rows["ar_greedy"][1]
    for name, (ms, sps, stats, one) in rows.items():
        counted = stats.sentences > 0
        spec = name.startswith("spec")
        print(f"{name:<12} {ms:>10.1f} {sps:>11.1f} {beam_ms / ms:>9.2f}x {greedy_ms / ms:>10.2f}x "
              f"{sps / greedy_sps:>11.2f}x "
              f"{stats.passes_per_sentence if counted else float('nan'):>11.1f} "
              f"{stats.tokens_per_iteration if spec else float('nan'):>8.2f} "
              f"{100 * one.draft_s / one.total_s if spec else float('nan'):>8.0f} "
              f"{100 * one.verify_s / one.total_s if spec else float('nan'):>9.0f}")
