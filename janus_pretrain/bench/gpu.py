"""The GPU check in one go (about 2 minutes on one GPU): bf16 training steps at the base shape,
batch 64 x (256 + 256), the old and the new paths side by side.

    python -m janus_pretrain.bench gpu [--json PATH]
    python -m janus_pretrain.bench gpu --dry-run-cpu   # the same code path, tiny shapes, on CPU

Rows (single process, TP = 1; bench/train.py's step, timing and FLOP count, not a copy):
    ar / janus sdpa            bf16 weights + fp32 AdamW masters (train.py `bf16`), torch's own
                               SDPA choice (cuDNN attention first on sm90: a plan per new shape)
    janus sdpa no-cudnn        the same with cuDNN attention left out of SDPA's choice
    ar / janus flex            FlexAttention (model/flex.py)
    bart                       HF BART of the same shape, bf16, SDPA
    ar / janus captured        the bare sdpa step captured whole (forward, loss, backward, fused
                               capturable AdamW) in one CUDA graph and replayed: the floor a step
                               without any host work reaches (CUDA only)
    janus loop ZeRO-S          the real loop (train/loop.py `optimizer_step`: DeepSpeed engine,
                               non-finite guard, metrics) at ZeRO stage S in bf16; for S = 2 the
                               first steps run under torch.cuda.set_sync_debug_mode("error"), so a
                               host sync inside a step fails the row (`sync_free`)
MFU is against the best of bf16 matmuls of side 2048-8192 measured in this process right before
each row (model/flops.py). Every row runs with attention_dropout = 0, since flex has none, so
sdpa and flex compare like for like. The dry run skips the flex and captured rows (no flex
backward on CPU in torch 2.13; no CUDA graphs). --json is rewritten after each row, so a run cut
short keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback

import torch

from janus_pretrain.bench.train import (device_run, PeakMemory, host_batches, measured,
                                        objective_config, run_bart, run_ours, time_steps)
from janus_pretrain.model.flops import matmul_peak
from janus_pretrain.parallel import state

# peak_sizes: the matmuls whose best rate is the MFU denominator (model/flops.py); small in the
# dry run, where a CPU without bf16 instructions spends a minute on one 2048 x 2048 bf16 matmul.
SHAPES = {False: dict(model="base", batch=64, src_len=256, tgt_len=256, vocab=32000, warmup=3,
                      steps=10, compile=False, peak_sizes=(2048, 4096, 8192)),
          True: dict(model="tiny", batch=2, src_len=16, tgt_len=16, vocab=512, warmup=1, steps=1,
                     compile=False, peak_sizes=(128,))}
NO_ATTN_DROPOUT = ("model.attention_dropout=0",)


def run_loop(name: str, stage: int, device: torch.device, args, sync_debug: bool) -> dict:
    """Steps of the real loop's `optimizer_step` at ZeRO `stage` in bf16 (no log step among
    them); with `sync_debug`, the timed steps run with CUDA's sync debug mode at "error"."""
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.train.engine import build_engine
    from janus_pretrain.train.loop import optimizer_step
    from janus_pretrain.train.metrics import StepStats
    from janus_pretrain.train.nonfinite import NonFiniteGuard

    cfg, objective = objective_config(name, args, NO_ATTN_DROPOUT + (
        "parallel.precision=bf16", f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
        f"data.micro_batch_size={args.batch}", "train.grad_accum=1"))
    torch.manual_seed(0)
    engine = build_engine(JanusModel(cfg.model, args.vocab, PAD), cfg)
    host = host_batches(cfg, objective, args, args.warmup + args.steps)
    batches = iter(host * 2)
    guard, stats = NonFiniteGuard(engine), StepStats(device, objective.terms)
    engine.train()

    def step(i: int) -> None:
        debug = sync_debug and device.type == "cuda" and i >= args.warmup
        if debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer_step(engine, objective, batches, cfg, guard, stats, False, device, i + 1)
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")

    times = time_steps(step, args.warmup, args.steps, device)
    return {**measured(times, objective, host, cfg, engine.module.padded_vocab_size),
            "sync_free": sync_debug and device.type == "cuda"}


def run_captured(name: str, device: torch.device, args) -> dict:
    """The bare bf16 sdpa step captured whole in one CUDA graph, then replayed on each batch
    copied into its static inputs."""
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD
    from janus_pretrain.bench.train import Bf16Master

    cfg, objective = objective_config(name, args, NO_ATTN_DROPOUT)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=torch.bfloat16).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Bf16Master(params, lambda ps: torch.optim.AdamW(
        ps, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True, capturable=True))
    host = host_batches(cfg, objective, args, args.warmup + args.steps)
    static = {k: v.to(device) for k, v in host[0].items()}

    def step() -> None:
        prep = objective.prepare(static)
        loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up outside the graph (allocations, autotuning)
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # the graph's backward then writes, not adds, the gradients
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay(i: int) -> None:
        for k, v in host[i].items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()

    times = time_steps(replay, args.warmup, args.steps, device)
    return measured(times, objective, host, cfg, model.padded_vocab_size)


def without_cudnn_attention(run):
    """Run `run()` with cuDNN attention left out of SDPA's backends (the others in torch's order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapped():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            return run()
    return wrapped


def rows(device: torch.device, args) -> dict:
    cpu = device.type == "cpu"
    table = {}
    for attention in ("sdpa", "flex"):
        if attention == "flex" and cpu:
            continue
        for name in ("ar", "janus"):
            over = NO_ATTN_DROPOUT + (f"model.attention={attention}",)
            table[f"bf16 {name} {attention}"] = lambda n=name, o=over: run_ours(
                n, "bf16", device, args, o)
        if attention == "sdpa":
            table["bf16 janus sdpa no-cudnn"] = without_cudnn_attention(
                lambda: run_ours("janus", "bf16", device, args, NO_ATTN_DROPOUT))
    table["bf16 bart sdpa"] = lambda: run_bart("bf16", device, args, NO_ATTN_DROPOUT)
    if not cpu:
        for name in ("ar", "janus"):
            table[f"bf16 {name} captured"] = lambda n=name: run_captured(n, device, args)
    for stage in (0, 1, 2):
        table[f"bf16 janus loop ZeRO-{stage}"] = lambda z=stage: run_loop(
            "janus", z, device, args, sync_debug=z == 2)
    return table


def main(argv: list[str]) -> None:
    args, device = device_run("gpu", __doc__.splitlines()[0], argv, SHAPES, "flex rows")
    tokens = args.batch * (args.src_len + args.tgt_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} model={args.model} batch={args.batch} "
          f"src_len={args.src_len} tgt_len={args.tgt_len} steps={args.warmup}+{args.steps}",
          flush=True)
    print(f"{'row':<26} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'peak TF/s':>9} "
          f"{'MFU':>6} {'peak MiB':>9}")
    results = {}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": name, "shape": SHAPES[args.dry_run_cpu],
                                             "rows": results}, indent=1))

    for row, run in rows(device, args).items():
        gc.collect()
        peak = matmul_peak(device, torch.bfloat16, sizes=args.peak_sizes)
        try:
            with PeakMemory(device) as mem:
                r = run()
        except Exception as e:  # noqa: BLE001 - one GPU run: a failed row is a result, the next runs
            traceback.print_exc()
            results[row] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{row:<26} failed: {results[row]['error'][:200]}", flush=True)
            save()
            continue
        achieved = r["flops"] / r["seconds"]
        results[row] = {**r, "tokens_per_s": tokens / r["seconds"], "peak_flops": peak,
                        "mfu": achieved / peak, "peak_bytes": mem.bytes}
        print(f"{row:<26} {r['seconds'] * 1000:>9.1f} {tokens / r['seconds']:>10.0f} "
              f"{achieved / 1e12:>8.2f} {peak / 1e12:>9.2f} {achieved / peak:>6.1%} "
              f"{mem.bytes / 2**20:>9.0f}", flush=True)
        save()
    for a, b in (("bf16 janus sdpa", "bf16 ar sdpa"), ("bf16 janus flex", "bf16 ar flex"),
                 ("bf16 janus sdpa", "bf16 janus sdpa no-cudnn"),
                 ("bf16 janus sdpa", "bf16 janus flex"), ("bf16 ar sdpa", "bf16 ar captured"),
                 ("bf16 janus sdpa", "bf16 janus captured"),
                 ("bf16 janus loop ZeRO-2", "bf16 janus sdpa"),
                 ("bf16 janus loop ZeRO-1", "bf16 janus sdpa")):
        if "mfu" in results.get(a, {}) and "mfu" in results.get(b, {}):
            print(f"{a} / {b} step time: {results[a]['seconds'] / results[b]['seconds']:.2f}x",
                  flush=True)
    for row, r in results.items():
        if "times" in r:
            print(f"{row}: slowest / median step {max(r['times']) / r['seconds']:.2f}", flush=True)
    state.shutdown()
    if any("error" in r for r in results.values()):
        sys.exit(1)
