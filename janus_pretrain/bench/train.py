"""Training-step speed: our `ar` and `janus` objectives and Hugging Face BART of the same shape,
against the machine's own matmul peak, in fp32 and bf16, in one run.

    python -m janus_pretrain.bench train --model base --batch 8 --src-len 128 --tgt-len 128

A step is forward + backward + torch AdamW step on one micro-batch (single process, TP = 1, no
DeepSpeed), from device tensors: `prepare` (masks and index tensors) is inside the step, the host
collator (noise, padding) is not, as in training where the loader runs it. The figures:
    tokens/s   non-padding (source + target) tokens / median step time
    FLOPs      analytic model FLOPs of the step (JanusObjective.flops, janus_pretrain/model/flops.py)
    MFU        achieved FLOP/s / the matmul peak measured in this process in the same dtype
    peak mem   max RSS over the row (CPU; VmHWM, reset per row) or torch.cuda.max_memory_allocated
Objectives: `ar` is configs/finetune/ar.yaml (CE_AR only), `janus` configs/finetune/janus.yaml
(the fine-tuning loss of docs/method.md, section 4, span masking of 70% of the target). BART is
BartForConditionalGeneration from a BartConfig of the same layers, hidden size, heads, FFN,
vocabulary, positions and dropouts (random init, nothing downloaded), SDPA attention, AR cross
entropy on the same batch with the `ar` objective's label smoothing. `--rounds R` runs the rows R
times in turn and pools their steps, so that a drift of the machine's speed (a shared host's
neighbours) falls on every row alike.

Precisions (rows fp32, bf16, autocast):
    fp32      fp32 weights and compute
    bf16      what DeepSpeed's bf16 mode does in training: bf16 weights, activations and
              gradients, AdamW on fp32 master weights (`Bf16Master`); the losses run in fp32
    autocast  fp32 weights, torch.autocast(bf16) around forward and loss (HF's usual recipe)
Both models run every precision the same way, so each ratio is like for like. Autocast reaches our
linear layers because at TP = 1 they run as F.linear (see model/transformer.py `linear`); through
megatron-core's own autograd function it would not (fp32 bias add, fp32 backward).

With `--data DIR` (pairs prepared by `janus-finetune prepare --task T --output DIR`) the batches
are those training sees: the real loader
(data/loader.py build_loader on the run config's DataConfig; `--max-tokens N` sets data.max_tokens)
collates them, so padding, lengths and masking are real. tokens/s then counts non-padding tokens
only, and the pad fraction of those batches is printed (target and source). In fp32 the whole loop
is timed too on the same batches: DeepSpeed engine (train/engine.py), collation with prefetch, the
loop's `optimizer_step` (train/loop.py) and its per-step bookkeeping and logging; `loop/step` is
whole-loop throughput over bare-step throughput. `--json PATH` writes the table. On CPU the process
keeps freed memory for reuse (janus_pretrain/cpu_memory.py), as training does; each row's peak is
measured after handing the heap's free blocks back.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from janus_pretrain.config import CONFIG_ROOT, ModelConfig, RunConfig, load_config
from janus_pretrain.cpu_memory import release_freed_memory
from janus_pretrain.data.loader import build_loader
from janus_pretrain.model import JanusModel
from janus_pretrain.model.flops import matmul_peak
from janus_pretrain.objectives.janus import TERMS, JanusObjective
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD, load_tokenizer
from janus_pretrain.train.engine import build_engine
from janus_pretrain.data.corpora import open_corpus, open_sources, pair_overrides
from janus_pretrain.train.loop import optimizer_step
from janus_pretrain.train.metrics import RunLogger, StepStats, real_tokens
from janus_pretrain.train.nonfinite import NonFiniteGuard

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
            release_freed_memory()  # the heap keeps what earlier rows freed (cpu_memory.py)
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
               ) -> list[float]:
    """Seconds of each of `steps` calls of step(i) after `warmup` untimed ones."""
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
    return times


def device_run(name: str, doc: str, argv: list[str], shapes: dict, skipped: str):
    """The command line `bench gpu` and `bench cuda` share: --json, and --dry-run-cpu (tiny shapes
    on CPU, `skipped` left out) to check the script without a GPU; refused without CUDA otherwise.
    -> (args with the shapes and config overrides, the device after process-group start)."""
    p = argparse.ArgumentParser(prog=f"python -m janus_pretrain.bench {name}", description=doc)
    p.add_argument("--json", type=Path, help="write the results here (rewritten after each one)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help=f"tiny shapes on CPU, {skipped} skipped: checks the script without a GPU")
    args = p.parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        sys.exit(f"bench {name}: no CUDA device here (use --dry-run-cpu to check the script on CPU)")
    vars(args).update(shapes[args.dry_run_cpu], data=None)
    args.overrides = data_overrides(args)
    return args, state.initialize(1).device


def data_overrides(args) -> list[str]:
    """Config overrides for the batches: the prepared task's data and batching, or the synthetic
    lengths. Sets args.vocab to the vocabulary of the batches' ids."""
    if args.data is None:
        args.vocab = args.vocab or 32000
        return [f"data.max_source_len={args.src_len}", f"data.max_target_len={args.tgt_len}"]
    overrides = pair_overrides(args.data)  # checks pairs.json first
    args.vocab = json.loads((Path(args.data) / "pairs.json").read_text())["vocab_size"]
    budget = [] if args.max_tokens is None else [f"data.max_tokens={args.max_tokens}"]
    return [*overrides, f"data.micro_batch_size={args.batch}", *budget]


def objective_config(name: str, args, overrides: tuple = ()) -> tuple:
    """overrides: extra `key=value` config overrides (bench gpu: model.attention=flex, ...)."""
    cfg = load_config(CONFIG_ROOT / "finetune" / f"{name}.yaml",
                      [f"model={args.model}", *args.overrides, *overrides])
    return cfg, JanusObjective(cfg.objective, cfg.data.max_source_len, cfg.data.max_target_len,
                               cfg.model.length_classes)


def task_loader(cfg, objective: JanusObjective, prefetch: int):
    """The training loader of the run config (one rank), as train() builds it."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    corpus = open_corpus(cfg.data.train, tokenizer)
    return build_loader(dataclasses.replace(cfg.data, prefetch=prefetch), corpus, objective.collate,
                        0, 1, open_sources(cfg.data.source, tokenizer, corpus))


def host_batches(cfg, objective: JanusObjective, args, n: int) -> list[dict]:
    """n micro-batches collated on the host: the task loader's first n, or random full-length
    pairs (no padding)."""
    if args.data is not None:
        loader = task_loader(cfg, objective, prefetch=0)
        return [next(loader) for _ in range(n)]
    rng = np.random.default_rng(0)
    return [objective.collate([(rng.integers(5, args.vocab, args.src_len - 2),
                                rng.integers(5, args.vocab, args.tgt_len - 2))
                               for _ in range(args.batch)], rng) for _ in range(n)]


def pad_fraction(host: list[dict]) -> dict[str, float]:
    """Padded cells / all cells of the batches, per side."""
    return {side: 1.0 - sum(int((b[key] != PAD).sum()) for b in host)
            / sum(b[key].numel() for b in host)
            for side, key in (("target", "tgt"), ("source", "src"))}


def measured(times: list[float], objective: JanusObjective, host: list[dict], cfg, vocab: int
             ) -> dict:
    """A row's figures from its step times and the batches they ran (warm-up ones first)."""
    timed = host[-len(times):]
    return {"seconds": statistics.median(times), "times": times,
            "tokens": sum(map(real_tokens, timed)) / len(timed),
            "flops": mean_flops(objective, timed, cfg.model, vocab), "pad": pad_fraction(host)}


def autocast_context(device: torch.device, dtype) -> Callable:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


@dataclasses.dataclass
class Step:
    """One training step ready to run: run(i) steps on batch i of `host` (on the device);
    the rest is what `measured` needs to turn its times into a row."""
    run: Callable[[int], None]
    objective: JanusObjective
    host: list[dict]
    cfg: RunConfig
    vocab: int
    compiled: bool = False

    def timed(self, args, device: torch.device) -> dict:
        """`measured` of args.steps timed steps after args.warmup untimed ones. A compiled step
        first runs every batch once: torch.compile compiles again for each new shape until it
        marks the sizes dynamic, and in a long run those compilations are behind it, so the
        timed steps are steady state and what the first pass took is `compile_s`."""
        compile_s = None
        if self.compiled:
            start = time.perf_counter()
            for i in range(args.warmup + args.steps):
                self.run(i)
            compile_s = time.perf_counter() - start
        times = time_steps(self.run, args.warmup, args.steps, device)
        return {**measured(times, self.objective, self.host, self.cfg, self.vocab),
                "compile_s": compile_s}


def ours_step(name: str, precision: str, device: torch.device, args, overrides: tuple = ()
              ) -> Step:
    """Our model's step under objective `name` (configs/finetune/NAME.yaml)."""
    weights, amp_dtype, _ = PRECISIONS[precision]
    cfg, objective = objective_config(name, args, overrides)
    torch.manual_seed(0)
    model = JanusModel(cfg.model, args.vocab, PAD).to(device=device, dtype=weights)
    if args.compile:
        model.compile()
    model.train()
    opt = optimizer_for(model, weights)
    host = host_batches(cfg, objective, args, args.warmup + args.steps)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host]
    amp = autocast_context(device, amp_dtype)

    def step(i: int) -> None:
        with amp():
            prep = objective.prepare(batches[i])
            loss, _ = objective.loss(model(**prep.model_inputs), prep)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Step(step, objective, host, cfg, model.padded_vocab_size, compiled=args.compile)


def run_ours(name: str, precision: str, device: torch.device, args, overrides: tuple = ()) -> dict:
    return ours_step(name, precision, device, args, overrides).timed(args, device)


def run_loop(name: str, device: torch.device, args) -> list[float]:
    """Step times of the training loop (fp32) on the batches the bare step ran: engine, loader
    with prefetch, `optimizer_step` and the loop's logging, as train() runs them. The logger
    averages and reduces the metrics as in training but writes nothing (no W&B service
    competing for the cores); checkpointing is left out, it is not a per-step cost."""
    cfg, objective = objective_config(name, args)
    total = args.warmup + args.steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=total))
    torch.manual_seed(0)
    engine = build_engine(JanusModel(cfg.model, args.vocab, PAD), cfg)
    loader = task_loader(cfg, objective, prefetch=cfg.data.prefetch)
    stats = StepStats(device, {t for t in TERMS if getattr(cfg.objective.weights, t) > 0})
    guard = NonFiniteGuard(engine)
    # Peak FLOP/s only scales the MFU it would write.
    logger = RunLogger(False, Path(cfg.train.output_dir), total, 0, cfg.train.log_interval, 1.0,
                       cfg.train.wandb_project, None, {})
    engine.train()

    def step(i: int) -> None:
        optimizer_step(engine, objective, loader, cfg, guard, stats, False, device)
        logger.after_step(i + 1, i + 1 == total, stats, engine)

    try:
        return time_steps(step, args.warmup, args.steps, device)
    finally:
        loader.close()


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


def bart_step(precision: str, device: torch.device, args, overrides: tuple = ()) -> Step:
    """HF BART's step: AR cross entropy on the batches of our `ar` objective, label-smoothed as
    that objective is, in torch's fused cross entropy on BART's logits (what HF's Trainer does
    with label_smoothing_factor, in one kernel)."""
    weights, amp_dtype, _ = PRECISIONS[precision]
    cfg, objective = objective_config("ar", args, overrides)
    torch.manual_seed(0)
    model = bart_model(cfg.model, args.vocab, max(cfg.data.max_source_len, cfg.data.max_target_len))
    model.to(device=device, dtype=weights).train()
    opt = optimizer_for(model, weights)
    host = host_batches(cfg, objective, args, args.warmup + args.steps)
    batches = [{k: v.to(device) for k, v in b.items()} for b in host]
    amp = autocast_context(device, amp_dtype)

    def step(i: int) -> None:
        src, tgt = batches[i]["src"], batches[i]["tgt"]
        labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == PAD, -100)
        with amp():
            logits = model(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt[:, :-1],
                           decoder_attention_mask=tgt[:, :-1] != PAD).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                   label_smoothing=cfg.objective.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Step(step, objective, host, cfg, args.vocab)


def run_bart(precision: str, device: torch.device, args, overrides: tuple = ()) -> dict:
    return bart_step(precision, device, args, overrides).timed(args, device)


def mean_flops(objective, host: list[dict], model: ModelConfig, vocab: int) -> float:
    """Analytic FLOPs of a timed step, averaged over the timed batches."""
    return sum(objective.flops(b, model, vocab) for b in host) / len(host)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def add_shape_arguments(p: argparse.ArgumentParser, model: str) -> None:
    """The batches' options `bench train` and `bench profile` share: random full-length pairs of
    --batch x (--src-len + --tgt-len), or a prepared task's real batches (--data)."""
    p.add_argument("--model", default=model, help="model preset under configs/model/")
    p.add_argument("--batch", type=int, default=8,
                   help="pairs per batch (with --data: data.micro_batch_size, unless --max-tokens)")
    p.add_argument("--src-len", type=int, default=128, help="synthetic mode only")
    p.add_argument("--tgt-len", type=int, default=128, help="synthetic mode only")
    p.add_argument("--data", help="use the real batches of these prepared pairs "
                   "(`janus-finetune prepare --task T --output DIR`) instead of random ones")
    p.add_argument("--max-tokens", type=int, help="with --data: data.max_tokens (token budget)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m janus_pretrain.bench train",
                                description=__doc__.splitlines()[0])
    add_shape_arguments(p, model="base")
    p.add_argument("--vocab", type=int, help="vocabulary size of the random batches (default 32000)")
    p.add_argument("--json", help="also write the table to this JSON file")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the rows this many times in turn (ar, janus, bart, ar, ...), their "
                   "steps pooled: a drift in the machine's speed then falls on every row alike")
    p.add_argument("--precisions", default="fp32,bf16,autocast",
                   help="comma-separated subset of fp32, bf16, autocast")
    p.add_argument("--autocast-janus", action="store_true",
                   help="also time `janus` under autocast (left out by default to stay in 5 min)")
    p.add_argument("--compile", action="store_true",
                   help="also time our steps torch.compiled, as train.compile=true runs them, "
                   "beside the eager ones (minutes of compiling)")
    p.add_argument("--no-bart", action="store_true", help="skip the HF BART rows")
    return checked_shape(p, p.parse_args(argv))


def checked_shape(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.data is None and args.max_tokens:
        p.error("--max-tokens needs --data")
    return args


def pooled(before: dict | None, r: dict) -> dict:
    """A row's figures over its rounds: every round's step times, their median."""
    if before is None:
        return r
    times = before["times"] + r["times"]
    return {**before, "times": times, "seconds": statistics.median(times)}


def run_precision(precision: str, device: torch.device, args, table: dict) -> None:
    """Time and print every row of one precision (and, in task mode at fp32, the loop)."""
    eager = argparse.Namespace(**{**vars(args), "compile": False})
    ours = ["ar"] + (["janus"] if precision != "autocast" or args.autocast_janus else [])
    rows = {name: functools.partial(run_ours, name, precision, device, eager) for name in ours}
    if args.compile:
        rows.update({f"{name}-c": functools.partial(run_ours, name, precision, device, args)
                     for name in ours})
    if not args.no_bart:
        rows["bart"] = lambda: run_bart(precision, device, args)
    results, peaks, mem_bytes = {}, {name: [] for name in rows}, dict.fromkeys(rows, 0)
    for _ in range(args.rounds):
        for name, run in rows.items():
            gc.collect()
            # Measured right before each row, so that a row and its peak see the same load.
            peaks[name].append(matmul_peak(device, PRECISIONS[precision][2]))
            with PeakMemory(device) as mem:
                r = run()
            gc.collect()
            mem_bytes[name] = max(mem_bytes[name], mem.bytes)
            results[name] = pooled(results.get(name), r)
    for name, r in results.items():
        peak = statistics.median(peaks[name])
        achieved = r["flops"] / r["seconds"]
        table["rows"].append({"objective": name, "precision": precision,
                              "ms_per_step": r["seconds"] * 1000,
                              "tokens_per_s": r["tokens"] / r["seconds"],
                              "gflop_per_step": r["flops"] / 1e9, "mfu": achieved / peak,
                              "peak_mib": mem_bytes[name] / 2**20})
        print(f"{precision:<8} {name:<7} {r['seconds'] * 1000:>9.0f} "
              f"{r['tokens'] / r['seconds']:>9.1f} {r['flops'] / 1e9:>11.1f} {achieved / 1e9:>8.1f} "
              f"{peak / 1e9:>9.1f} {achieved / peak:>6.1%} {mem_bytes[name] / 2**20:>9.0f}",
              flush=True)
        if table["pad_fraction"] is None:
            table["pad_fraction"] = r["pad"]
            print(f"pad fraction: target {r['pad']['target']:.1%}, "
                  f"source {r['pad']['source']:.1%}", flush=True)
    ar = results["ar"]["seconds"]
    if "janus" in results:
        table["janus_over_ar"][precision] = results["janus"]["seconds"] / ar
    ratios = [f"{other}/ar step time {results[other]['seconds'] / ar:.2f}x"
              for other in ("janus", "bart") if other in results]
    for name in ours:
        if f"{name}-c" in results:
            c = results[f"{name}-c"]
            ratio = c["seconds"] / results[name]["seconds"]
            table["compiled_over_eager"][f"{precision} {name}"] = ratio
            ratios.append(f"{name} compiled/eager step time {ratio:.2f}x "
                          f"(first pass over the batches, compiling: {c['compile_s']:.0f} s)")
    if args.data is not None and precision == "fp32":
        for name in ("ar", "janus"):
            if name in results:
                loop = run_loop(name, device, args)
                # The same batches (each round runs them all), so throughput ratio = time ratio.
                table["loop_over_step"][name] = (statistics.fmean(results[name]["times"])
                                                 / statistics.fmean(loop))
                ratios.append(f"{name} loop/step throughput {table['loop_over_step'][name]:.2f} "
                              f"({statistics.median(loop) * 1000:.0f} ms/step in the loop)")
    print(f"{precision:<8} ratios: {'; '.join(ratios)}", flush=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    topo = state.initialize(1)
    device = topo.device
    args.overrides = data_overrides(args)
    shape = (f"data={args.data} max_tokens={args.max_tokens}"
             if args.data else f"src_len={args.src_len} tgt_len={args.tgt_len}")
    print(f"device={device} cpu={cpu_name()!r} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} model={args.model} batch={args.batch} {shape} "
          f"vocab={args.vocab} steps={args.warmup}+{args.steps} compile={args.compile}", flush=True)
    print(f"{'prec':<8} {'row':<7} {'ms/step':>9} {'tokens/s':>9} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'peak GF/s':>9} {'MFU':>6} {'peak MiB':>9}")
    table = {"rows": [], "janus_over_ar": {}, "pad_fraction": None, "loop_over_step": {},
             "compiled_over_eager": {},
             "settings": {k: v for k, v in vars(args).items() if k != "overrides"}}
    for precision in args.precisions.split(","):
        run_precision(precision, device, args, table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
