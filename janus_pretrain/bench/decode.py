"""Decoding latency and throughput: AR greedy, AR beam 5 and NAR mask-predict T = 1, 4, 10, on one
model and the same inputs, in one run.

Every setting emits exactly the reference number of tokens per sentence (AR may not stop before
it and must stop at it; NAR is given that length, one candidate), so the ratios compare decoding
work, not output lengths. Without --checkpoint the model is randomly initialised at the given
shape, which costs the same to run as a trained one.

    python -m janus_pretrain.bench decode --model base --sentences 10 --batch-size 16
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from janus_pretrain.config import load_config
from janus_pretrain.data.padding import with_bos_eos
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
}


def random_generator(preset: str, vocab: int) -> Generator:
    cfg = load_config(None, [f"model={preset}", "data.max_source_len=128", "data.max_target_len=128"])
    topo = state.initialize(1)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, vocab, PAD).to(topo.device)
    return Generator(model, tokenizer=None, cfg=cfg, device=topo.device)


def timed(gen: Generator, src: list, lengths: list[int], batch_size: int, setting: dict) -> float:
    opts = DecodeOptions(**setting, batch_size=batch_size, force_lengths=lengths,
                         max_len=max(lengths))
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    hyps = gen.decode_ids(src, opts)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert [len(h.tokens) for h in hyps] == lengths, "a setting emitted another length"
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
    args = p.parse_args(argv)

    gen = Generator.from_checkpoint(args.checkpoint) if args.checkpoint else \
        random_generator(args.model, args.vocab)
    vocab = gen.model.vocab_size
    rng = np.random.default_rng(0)
    n = max(args.sentences, args.batch_size * args.batches)
    src = [with_bos_eos(rng.integers(5, vocab, size=args.src_len)) for _ in range(n)]
    lengths = [args.tgt_len] * n
    timed(gen, src[:2], lengths[:2], 2, SETTINGS["ar_beam5"])  # warm-up
    print(f"device={gen.device} threads={torch.get_num_threads()} "
          f"layers={gen.cfg.model.encoder_layers}+{gen.cfg.model.decoder_layers} "
          f"hidden={gen.cfg.model.hidden_size} vocab={vocab} src_len={args.src_len} "
          f"tgt_len={args.tgt_len}")
    rows = {}
    for name, setting in SETTINGS.items():
        k = args.sentences
        latency = sum(timed(gen, [s], [L], 1, setting) for s, L in zip(src[:k], lengths[:k])) / k
        m = args.batch_size * args.batches
        throughput = m / timed(gen, src[:m], lengths[:m], args.batch_size, setting)
        rows[name] = (latency * 1000, throughput)
    base_latency, base_throughput = rows["ar_beam5"]
    print(f"{'setting':<10} {'ms/sent@1':>10} {'sent/s@' + str(args.batch_size):>11} "
          f"{'speed-up@1':>11} {'speed-up@' + str(args.batch_size):>12}   (vs ar_beam5)")
    for name, (ms, sps) in rows.items():
        print(f"{name:<10} {ms:>10.1f} {sps:>11.1f} {base_latency / ms:>10.2f}x "
              f"{sps / base_throughput:>11.2f}x")
