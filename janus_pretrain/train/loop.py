"""The training loop shared by pretraining and fine-tuning.

Data, objective and model come from the config; the loop only moves batches, steps the
DeepSpeed engine, logs and checkpoints. One iteration of the outer loop is one optimizer step of
`train.grad_accum` micro-batches. Loss terms stay on the device between log intervals, so the
step's only host sync is one all-reduce of two flags at its last micro-batch: whether any rank
saw a non-finite loss or gradient (the update is then skipped, see nonfinite.py) and whether any
rank was asked to stop (see signals.py). At a log interval the loss terms are averaged over the
data-parallel group and written to the console, W&B and `<output_dir>/metrics.jsonl` (rank 0).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from janus_pretrain.config import RunConfig, to_dict
from janus_pretrain.data.loader import BatchLoader
from janus_pretrain.data.shards import ShardedCorpus
from janus_pretrain.errors import JanusError
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.janus import TERMS, JanusObjective
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD, Tokenizer, load_tokenizer
from janus_pretrain.train import checkpoint
from janus_pretrain.train.engine import build_engine
from janus_pretrain.train.flops import decoder_passes, matmul_peak, step_flops
from janus_pretrain.train.metrics import RunLogger
from janus_pretrain.train.nonfinite import NonFiniteGuard
from janus_pretrain.train.signals import StopRequest


def seed_everything(seed: int) -> None:
    # The same seed on every rank: identical initial weights, and Megatron's convention for the
    # default generator under tensor parallelism.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_corpus(path: str, tokenizer: Tokenizer) -> ShardedCorpus:
    """Shards whose ids were made by another tokenizer are refused, even one of the same size;
    shards prepared before meta.json recorded `tokenizer_identity` are checked by size only."""
    corpus = ShardedCorpus(path)
    if corpus.vocab_size != tokenizer.vocab_size:
        raise JanusError(f"data: {path} was tokenized with a vocabulary of "
                         f"{corpus.vocab_size}, data.tokenizer has {tokenizer.vocab_size}")
    recorded = corpus.meta.get("tokenizer_identity")
    if recorded is not None and recorded != tokenizer.identity:
        raise JanusError(f"data: {path} was tokenized with {Path(path) / 'tokenizer.model'}, "
                         f"not data.tokenizer={tokenizer.path}: same size, different pieces")
    return corpus


def open_sources(cfg: RunConfig, tokenizer: Tokenizer, targets: ShardedCorpus
                 ) -> Optional[ShardedCorpus]:
    """Fine-tuning: the source shards aligned with data.train; None when pretraining."""
    if cfg.data.source is None:
        return None
    sources = open_corpus(cfg.data.source, tokenizer)
    if len(sources) != len(targets):
        raise JanusError(f"data: data.source ({cfg.data.source}) holds {len(sources)} documents, "
                         f"data.train ({cfg.data.train}) {len(targets)}: they must be aligned pairs")
    return sources


def init_weights(model: JanusModel, path: str, tokenizer: Tokenizer) -> None:
    """Model weights only, from a (pretrained) checkpoint trained with the same tokenizer."""
    from janus_pretrain.generate.api import model_state, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    checkpoint.check_tokenizer(ckpt, tokenizer)
    try:
        model.load_state_dict(model_state(ckpt))
    except RuntimeError as e:
        raise JanusError(f"train.init_from: {ckpt} does not fit this model "
                         f"({str(e).splitlines()[0]}); set model= to the checkpoint's shape") from None


def drop_metrics_after(path: Path, step: int) -> None:
    """Steps past the checkpoint we resume from (logged before a crash) will be logged again;
    so will a line that a crash cut short."""

    def logged_step(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return float("inf")

    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and logged_step(line) <= step]
    path.write_text("".join(kept))


def agree_at_boundary(local_bad: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """The step's one collective: (any rank saw a non-finite value, any rank must stop)."""
    flags = torch.stack([local_bad, torch.tensor(float(stop_requested), device=local_bad.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    return bad > 0, stop > 0


class StepStats:
    """Loss terms and token counts accumulated on the device between log intervals."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(TERMS) + 1, device=self.device, dtype=torch.float64)
        self.step_sums = torch.zeros_like(self.sums)
        self.step_micro_batches = 0
        self.micro_batches = 0
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, total: torch.Tensor, terms: dict[str, torch.Tensor], tokens: int, flops: float):
        values = [terms[t] if t in terms else torch.zeros((), device=self.device) for t in TERMS]
        self.step_sums += torch.stack([total.detach(), *values]).double()
        self.step_micro_batches += 1
        self.tokens += tokens
        self.flops += flops

    def end_step(self, skipped: bool) -> None:
        """A skipped step's (non-finite) losses stay out of the averages."""
        if not skipped:
            self.sums += self.step_sums
            self.micro_batches += self.step_micro_batches
        self.step_sums.zero_()
        self.step_micro_batches = 0

    def reduce(self, present: set[str]) -> dict[str, float]:
        """Average over micro-batches and data-parallel ranks (a collective)."""
        counts = torch.tensor([self.tokens, self.flops], device=self.device, dtype=torch.float64)
        group = ps.get_data_parallel_group()
        dist.all_reduce(self.sums, group=group)
        dist.all_reduce(counts, group=group)
        dp = ps.get_data_parallel_world_size()
        means = (self.sums / (self.micro_batches * dp)).tolist()
        elapsed = time.perf_counter() - self.start
        out = {"train/loss": means[0]}
        out.update({f"train/{t}": v for t, v in zip(TERMS, means[1:]) if t in present})
        tokens, flops = counts.tolist()
        out["perf/tokens_per_s"] = tokens / elapsed
        out["perf/flops_per_s"] = flops / ps.get_tensor_model_parallel_world_size() / elapsed
        return out


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run (or resume) a training job; returns a summary for the CLI and tests."""
    topo = state.initialize(cfg.parallel.tensor_parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    corpus = open_corpus(cfg.data.train, tokenizer)
    sources = open_sources(cfg, tokenizer, corpus)
    objective = JanusObjective(cfg.objective, cfg.data.max_source_len, cfg.data.max_target_len,
                               cfg.model.length_classes)
    seed_everything(cfg.train.seed)
    model = JanusModel(cfg.model, tokenizer.vocab_size, PAD)
    if cfg.train.init_from and not resume:
        init_weights(model, cfg.train.init_from, tokenizer)
    if cfg.train.compile:
        model.compile()
    engine = build_engine(model, cfg)
    loader = BatchLoader(corpus, objective.collate, cfg.data.micro_batch_size, cfg.data.seed,
                         dp_rank=state.data_parallel_rank(), dp_size=state.data_parallel_size(),
                         sources=sources)

    output = Path(cfg.train.output_dir)
    ckpt_root = output / "checkpoints"
    if not resume and checkpoint.complete(ckpt_root):
        raise JanusError(f"train: {output} already holds checkpoints: pass --resume to continue, "
                         f"or choose another train.output_dir")
    start_step, bad_in_a_row = 0, 0
    found = checkpoint.find_resumable(ckpt_root, cfg.train.resume_fallback) if resume else None
    if found is not None:
        meta = checkpoint.load(engine, found, tokenizer)
        loader.load_state_dict(meta["loader"])
        start_step, bad_in_a_row = meta["step"], meta["bad_steps_in_a_row"]

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)
    peak = matmul_peak(topo.device, dtype)
    world = dist.get_world_size()
    logger = RunLogger(topo.is_main, cfg.train.steps, start_step, output,
                       cfg.train.wandb_project, cfg.train.wandb_name, to_dict(cfg))
    metrics_file = output / "metrics.jsonl"
    if topo.is_main and metrics_file.is_file():
        drop_metrics_after(metrics_file, start_step)
    stats = StepStats(topo.device)
    guard = NonFiniteGuard(engine)
    present = {t for t in TERMS if getattr(cfg.objective.weights, t) > 0}
    summary = {"start_step": start_step, "rank": topo.rank}
    vocab = model.padded_vocab_size
    engine.train()
    steps_since_log = 0
    last_step = min(cfg.train.steps, cfg.train.exit_after or cfg.train.steps)
    step, stopping, diverged = start_step, False, False
    with StopRequest() as stop_request:
        while step < last_step:
            step += 1
            for micro in range(cfg.train.grad_accum):
                host = next(loader)
                tokens = int((host["src"] != PAD).sum() + (host["tgt"] != PAD).sum())
                b, s = host["src"].shape
                length = host["tgt"].shape[1]
                passes = decoder_passes(objective.needs_ar, objective.needs_nar, length,
                                        host["masked_pos"].shape[1])
                batch = {key: v.to(topo.device, non_blocking=True) for key, v in host.items()}
                prep = objective.prepare(batch)
                outputs = engine(**prep.model_inputs)
                loss, terms = objective.loss(outputs, prep)
                guard.add_loss(loss)
                engine.backward(loss)
                if micro == cfg.train.grad_accum - 1:
                    guard.skip, stopping = agree_at_boundary(guard.local_flag(),
                                                             stop_request.requested)
                engine.step()
                stats.add(loss, terms, tokens, step_flops(cfg.model, vocab, b, s, passes))
            stats.end_step(guard.skip)
            guard.reset()
            bad_in_a_row = bad_in_a_row + 1 if guard.skip else 0
            diverged = bad_in_a_row >= cfg.train.max_bad_steps
            done = step == last_step or stopping or diverged
            steps_since_log += 1
            if step % cfg.train.log_interval == 0 or done:
                metrics = stats.reduce(present)
                metrics["train/lr"] = engine.get_lr()[0]
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    metrics["train/grad_norm"] = float(norm)
                metrics["train/skipped_steps"] = engine.skipped_steps
                metrics["perf/mfu"] = metrics.pop("perf/flops_per_s") / (peak * world)
                if topo.is_main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps({"step": step, **metrics}) + "\n")
                    summary.setdefault("first", metrics)
                    summary["last"] = metrics
                logger.log(step, metrics, steps_since_log)
                steps_since_log = 0
                stats.reset()
            if step % cfg.train.save_interval == 0 or done:
                path = checkpoint.save(engine, ckpt_root, step,
                                       {"loader": loader.state_dict(), "config": to_dict(cfg),
                                        "bad_steps_in_a_row": bad_in_a_row},
                                       tokenizer, cfg.train.keep_checkpoints)
                summary["checkpoint"] = str(path)
            if stopping or diverged:
                break
    summary["wandb_dir"] = logger.close()
    summary["step"] = step
    if stopping and step < last_step:  # a signal during the last step changes nothing
        summary["stopped_by"] = stop_request.received.name if stop_request.requested else "another rank"
    if diverged:
        raise JanusError(f"train: {bad_in_a_row} steps in a row (up to step {step}) had a non-finite "
                         f"loss or gradient and were skipped (train.max_bad_steps="
                         f"{cfg.train.max_bad_steps}); {summary['checkpoint']} holds the last good "
                         f"weights. Lower optim.lr or check the data before resuming")
    return summary
