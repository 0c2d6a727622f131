"""Analytic model FLOPs of a training step, for tokens/s -> MFU.

Counted from shapes, matmuls only (2 FLOPs per multiply-add), forward x 3 for forward + backward.
Attention scores and values are counted densely over the keys (masked entries are computed
too). A micro-batch of source length S and decoder passes of lengths T_p, each projecting R_p rows
to the vocabulary, costs per layer and sequence:
    encoder:  S * (8h^2 + 4hf) + 4 S^2 h
    decoder:  T * (8h^2 + 4hf + 4h^2) + 4 T^2 h + 4 T S h + 4 S h^2 (cross keys/values)
    output:   2 R h V
"""
from __future__ import annotations

import time

import torch

from janus_pretrain.config import ModelConfig


def step_flops(cfg: ModelConfig, vocab: int, batch: int, src_len: int,
               decoder_passes: list[tuple[int, int]], encoder_passes: int = 1) -> float:
    """Training FLOPs of one micro-batch; decoder_passes = [(length, rows projected), ...]."""
    h, f, s = cfg.hidden_size, cfg.ffn_hidden_size, src_len
    fwd = encoder_passes * cfg.encoder_layers * (s * (8 * h * h + 4 * h * f) + 4 * s * s * h)
    for t, rows in decoder_passes:
        fwd += cfg.decoder_layers * (t * (12 * h * h + 4 * h * f) + 4 * t * t * h
                                     + 4 * t * s * h + 4 * s * h * h)
        fwd += 2 * rows * h * vocab
    return 3.0 * batch * fwd


def decoder_passes(ar: bool, nar: bool, tgt_len: int, masked: int) -> list[tuple[int, int]]:
    """The decoder passes of a micro-batch of padded target length `tgt_len` (with BOS/EOS) and
    `masked` NAR/AUX slots (K): AR teacher forcing runs tgt_len - 1 rows and projects all of them;
    the two-stream pass runs tgt_len + 2K rows and projects the 2K NAR and AUX rows."""
    passes = []
    if ar:
        passes.append((tgt_len - 1, tgt_len - 1))
    if nar:
        passes.append((tgt_len + 2 * masked, 2 * masked))
    return passes


def bang_passes(main: bool, streams: int, tgt_len: int) -> list[tuple[int, int]]:
    """BANG's one decoder pass at padded target length `tgt_len`: T = tgt_len - 1 rows per
    stream, the main stream (kind=bang; bang_nar has none) plus `streams` predicting streams, all
    of whose rows are projected."""
    rows = tgt_len - 1
    return [((int(main) + streams) * rows, streams * rows)]


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] | None = None,
                seconds: float = 0.5) -> float:
    """The machine's matmul peak, the denominator of MFU: the best FLOP/s of square matmuls of
    the given sides (default 2048, 4096 and 8192 on a GPU, where only the large ones reach the
    peak: an H200 gives ~675 TFLOP/s at 2048 and ~790 at 8192 in bf16; 2048 on a CPU)."""
    if sizes is None:
        sizes = (2048, 4096, 8192) if device.type == "cuda" else (2048,)
    return max(_matmul_rate(device, dtype, size, seconds / len(sizes)) for size in sizes)


def _matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Measured FLOP/s of a square matmul at `size`, or at the first power of two from 256 up
    where one product takes over a tenth of `seconds`: bf16 on a CPU without bf16 units runs at
    ~1 GFLOP/s, 17 s for one product of side 2048."""
    # A private generator: measuring must not move the training RNG streams.
    gen = torch.Generator(device).manual_seed(0)
    side = min(size, 256)
    while True:
        a = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
        b = torch.randn(side, side, device=device, dtype=dtype, generator=gen)
        a @ b  # untimed: the first product of a shape pays for kernel selection
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if side >= size or time.perf_counter() - start > seconds / 10:
            break
        side = min(2 * side, size)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    return 2 * side**3 * n / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
