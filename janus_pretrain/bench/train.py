"""Training-step speed: our `ar` and `janus` objectives and Hugging Face BART of the same shape,
against the machine's own matmul peak, in fp32 and bf16, in one run.

    python -m janus_pretrain.bench train --model base --batch 8 --src-len 128 --tgt-len 128

A step is forward + backward + torch AdamW step on one micro-batch (single process, TP = 1, no
DeepSpeed), from device tensors: `prepare` (masks and index tensors) is inside the step, the host
collator (noise, padding) is not, as in training where the loader runs it. The figures:
    tokens/s   (source + target tokens) / median step time
    FLOPs      analytic model FLOPs of the step (JanusObjective.flops, janus_pretrain/model/flops.py)
    MFU        achieved FLOP/s / the matmul peak measured in this process in the same dtype
    peak mem   max RSS over the row (CPU; VmHWM, reset per row) or torch.cuda.max_memory_allocated
Objectives: `ar` is configs/finetune/ar.yaml (CE_AR only), `janus` configs/finetune/janus.yaml
(the fine-tuning loss of docs/method.md, section 4, span masking of 70% of the target). BART is
BartForConditionalGeneration from a BartConfig of the same layers, hidden size, heads, FFN,
vocabulary, positions and dropouts (random init, nothing downloaded), SDPA attention, AR cross
entropy on the same batch.

Precisions (rows fp32, bf16, autocast):
    fp32      fp32 weights and compute
    bf16      what DeepSpeed's bf16 mode does in training: bf16 weights, activations and
              gradients, AdamW on fp32 master weights (`Bf16Master`); the losses run in fp32
    autocast  fp32 weights, torch.autocast(bf16) around forward and loss (HF's usual recipe)
Both models run every precision the same way, so each ratio is like for like. Autocast reaches our
linear layers because at TP = 1 they run as F.linear (see model/transformer.py `linear`); through
megatron-core's own autograd function it would not (fp32 bias add, fp32 backward).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from janus_pretrain.config import CONFIG_ROOT, ModelConfig, load_config
from janus_pretrain.model import JanusModel
from janus_pretrain.model.flops import matmul_peak
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD

# precision -> (weight dtype, autocast dtype or None, dtype of the matmul peak)
PRECISIONS = {"fp32": (torch.float32, None, torch.float32),
              "bf16": (torch.bfloat16, None, torch.bfloat16),
              "autocast": (torch.float32, torch.bfloat16, torch.bfloat16)}


class Bf16Master:
    """AdamW over fp32 master copies of bf16 model weights (DeepSpeed's bf16 scheme)."""

    def __init__(self, params: list[torch.nn.Parameter], make: Callable):
        self.params = params
        self.master = [p.detach().float().requires_grad_() for p in params]
        self.inner = make(self.master)

    def step(self) -> None:
        with torch.no_grad():
            pairs = []
            for m, p in zip(self.master, self.params):
                if p.grad is None:  # a head this objective does not train
                    m.grad = None
                    continue
                if m.grad is None:
                    m.grad = torch.empty_like(m)
                pairs.append((m.grad, p.grad))
            torch._foreach_copy_(*map(list, zip(*pairs)))
            self.inner.step()
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def adamw(params) -> torch.optim.Optimizer:
    # fused: one kernel over all tensors on CPU and GPU alike, as train/engine.py builds it.
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                             fused=True)


def optimizer_for(model: torch.nn.Module, dtype: torch.dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    return Bf16Master(params, adamw) if dtype == torch.bfloat16 else adamw(params)


class PeakMemory:
    """Peak process memory over a block: RSS high-water mark (CPU) or max allocated (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            status = Path("/proc/self/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            self.bytes = int(line.split()[1]) * 1024


def time_steps(step: Callable[[int], None], warmup: int, steps: int, device: torch.device
               ) -> float:
    """Median seconds of `steps` calls of step(i) after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def objective_config(name: str, preset: str, args, overrides: tuple = ()) -> tuple:
    """overrides: extra `key=value` config overrides (bench gpu: model.attention=flex, ...)."""
    cfg = load_config(CONFIG_ROOT / "finetune" / f"{name}.yaml",
                      [f"model={preset}", f"data.max_source_len={args.src_len}",
                       f"data.max_target_len={args.tgt_len}", *overrides])
    return cfg, JanusObjective(cfg.objective, args.src_len, args.tgt_len, cfg.model.length_classes)


def host_batches(objective: JanusObjective, args, n: int) -> list[dict]:
    """n micro-batches of random full-length pairs (no padding), collated on the host."""
    rng = np.random.default_rng(0)
    return [objective.collate([(rng.integers(5, args.vocab, args.src_len - 2),
                                rng.integers(5, args.vocab, args.tgt_len - 2))
                               for _ in range(args.batch)], rng) for _ in range(n)]


def autocast_context(device: torch.device, dtype) -> Callable:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def run_ours(name: str, precision: str, device: torch.device, args, overrides: tuple = ()) -> dict:
    weights, amp_dtype, _ = PRECISIONS[precision]
    cfg, objective = objective_config(name, args.model, args, overrides)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=weights)
    vocab = model.padded_vocab_size
    if args.compile:
        model.compile()
    model.train()
    opt = optimizer_for(model, weights)
    host = host_batches(objective, args, args.warmup + args.steps)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host]
    amp = autocast_context(device, amp_dtype)

    def step(i: int) -> None:
        with amp():
            prep = objective.prepare(batches[i])
            loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, args.warmup, args.steps, device)
    return {"seconds": seconds, "flops": mean_flops(objective, host[args.warmup:], cfg.model, vocab)}


def bart_model(mcfg: ModelConfig, vocab: int, max_positions: int):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=vocab, d_model=mcfg.hidden_size,
                        encoder_layers=mcfg.encoder_layers, decoder_layers=mcfg.decoder_layers,
                        encoder_attention_heads=mcfg.num_heads,
                        decoder_attention_heads=mcfg.num_heads,
                        encoder_ffn_dim=mcfg.ffn_hidden_size, decoder_ffn_dim=mcfg.ffn_hidden_size,
                        max_position_embeddings=max_positions, dropout=mcfg.dropout,
                        attention_dropout=mcfg.attention_dropout, activation_dropout=0.0,
                        activation_function="gelu", pad_token_id=PAD, bos_token_id=2,
                        eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration._from_config(config, attn_implementation="sdpa")


def run_bart(precision: str, device: torch.device, args, overrides: tuple = ()) -> dict:
    weights, amp_dtype, _ = PRECISIONS[precision]
    cfg, objective = objective_config("ar", args.model, args, overrides)
    torch.manual_seed(0)
    model = bart_model(cfg.model, args.vocab, max(args.src_len, args.tgt_len))
    model.to(device=device, dtype=weights).train()
    opt = optimizer_for(model, weights)
    host = host_batches(objective, args, args.warmup + args.steps)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host]
    amp = autocast_context(device, amp_dtype)

    def step(i: int) -> None:
        src, tgt = batches[i]["src"], batches[i]["tgt"]
        labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, -100)
        with amp():
            loss = model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt[:, :-1],
                         decoder_attention_mask=tgt[:, :-1] != PAD, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_steps(step, args.warmup, args.steps, device)
    return {"seconds": seconds,
            "flops": mean_flops(objective, host[args.warmup:], cfg.model, args.vocab)}


def mean_flops(objective, host: list[dict], model: ModelConfig, vocab: int) -> float:
    """Analytic FLOPs of a timed step, averaged over the timed batches."""
    return sum(objective.flops(b, model, vocab) for b in host) / len(host)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base", help="model preset under configs/model/")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    p.add_argument("--precisions", default="fp32,bf16,autocast",
                   help="comma-separated subset of fp32, bf16, autocast")
    p.add_argument("--autocast-janus", action="store_true",
                   help="also time `janus` under autocast (left out by default to stay in 5 min)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model, as train.compile=true does (minutes of compiling)")
    p.add_argument("--no-bart", action="store_true", help="skip the HF BART rows")
    args = p.parse_args(argv)

    topo = state.initialize(1)
    device = topo.device
    tokens = args.batch * (args.src_len + args.tgt_len)
    print(f"device={device} cpu={cpu_name()!r} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} model={args.model} batch={args.batch} "
          f"src_len={args.src_len} tgt_len={args.tgt_len} vocab={args.vocab} "
          f"steps={args.warmup}+{args.steps} compile={args.compile}", flush=True)
    print(f"{'prec':<8} {'row':<6} {'ms/step':>9} {'tokens/s':>9} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'peak GF/s':>9} {'MFU':>6} {'peak MiB':>9}")
    for precision in args.precisions.split(","):
        rows = {"ar": lambda: run_ours("ar", precision, device, args)}
        if precision != "autocast" or args.autocast_janus:
            rows["janus"] = lambda: run_ours("janus", precision, device, args)
        if not args.no_bart:
            rows["bart"] = lambda: run_bart(precision, device, args)
        results = {}
        for name, run in rows.items():
            gc.collect()
            # Measured right before each row, so that a row and its peak see the same machine load.
            peak = matmul_peak(device, PRECISIONS[precision][2])
            with PeakMemory(device) as mem:
                r = run()
            gc.collect()
            results[name] = r
            achieved = r["flops"] / r["seconds"]
            print(f"{precision:<8} {name:<6} {r['seconds'] * 1000:>9.0f} "
                  f"{tokens / r['seconds']:>9.1f} {r['flops'] / 1e9:>11.1f} {achieved / 1e9:>8.1f} "
                  f"{peak / 1e9:>9.1f} {achieved / peak:>6.1%} {mem.bytes / 2**20:>9.0f}", flush=True)
        ar = results["ar"]["seconds"]
        ratios = [f"{other}/ar step time {results[other]['seconds'] / ar:.2f}x"
                  for other in ("janus", "bart") if other in results]
        print(f"{precision:<8} ratios: {'; '.join(ratios)}", flush=True)
