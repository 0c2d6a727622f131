"""The training loop shared by pretraining and fine-tuning.

Data, objective and model come from the config; the loop only moves batches, steps the
DeepSpeed engine, logs and checkpoints. One iteration of the outer loop is one optimizer step of
`train.grad_accum` micro-batches. Loss terms stay on the device between log intervals, so the
step has no host sync; at a log interval they are averaged over the data-parallel group and
written to the console, W&B and `<output_dir>/metrics.jsonl` (rank 0).
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
from janus_pretrain.train.flops import matmul_peak, step_flops
from janus_pretrain.train.metrics import RunLogger


def seed_everything(seed: int) -> None:
    # The same seed on every rank: identical initial weights, and Megatron's convention for the
    # default generator under tensor parallelism.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_corpus(cfg: RunConfig, tokenizer: Tokenizer) -> ShardedCorpus:
    corpus = ShardedCorpus(cfg.data.train)
    if corpus.vocab_size != tokenizer.vocab_size:
        raise JanusError(f"data: {cfg.data.train} was tokenized with a vocabulary of "
                         f"{corpus.vocab_size}, data.tokenizer has {tokenizer.vocab_size}")
    return corpus


class StepStats:
    """Loss terms and token counts accumulated on the device between log intervals."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(TERMS) + 1, device=self.device, dtype=torch.float64)
        self.micro_batches = 0
        self.tokens = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, total: torch.Tensor, terms: dict[str, torch.Tensor], tokens: int, flops: float):
        values = [terms[t] if t in terms else torch.zeros((), device=self.device) for t in TERMS]
        self.sums += torch.stack([total.detach(), *values]).double()
        self.micro_batches += 1
        self.tokens += tokens
        self.flops += flops

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
    corpus = open_corpus(cfg, tokenizer)
    objective = JanusObjective(cfg.objective, cfg.data.max_source_len, cfg.data.max_target_len,
                               cfg.model.length_classes)
    seed_everything(cfg.train.seed)
    model = JanusModel(cfg.model, tokenizer.vocab_size, PAD)
    engine = build_engine(model, cfg)
    loader = BatchLoader(corpus, objective.collate, cfg.data.micro_batch_size, cfg.data.seed,
                         dp_rank=state.data_parallel_rank(), dp_size=state.data_parallel_size())

    output = Path(cfg.train.output_dir)
    ckpt_root = output / "checkpoints"
    start_step = 0
    found = checkpoint.latest(ckpt_root)
    if found is not None and not resume:
        raise JanusError(f"train: {output} already holds checkpoints: pass --resume to continue, "
                         f"or choose another train.output_dir")
    if found is not None:
        meta = checkpoint.load(engine, found, tokenizer)
        loader.load_state_dict(meta["loader"])
        start_step = meta["step"]

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)
    peak = matmul_peak(topo.device, dtype)
    world = dist.get_world_size()
    logger = RunLogger(topo.is_main, cfg.train.steps, start_step, output,
                       cfg.train.wandb_project, cfg.train.wandb_name, to_dict(cfg))
    metrics_file = output / "metrics.jsonl"
    stats = StepStats(topo.device)
    present = {t for t in TERMS if getattr(cfg.objective.weights, t) > 0}
    summary = {"start_step": start_step, "rank": topo.rank}
    vocab = model.padded_vocab_size
    engine.train()
    steps_since_log = 0
    last_step = min(cfg.train.steps, cfg.train.exit_after or cfg.train.steps)
    for step in range(start_step + 1, last_step + 1):
        for _ in range(cfg.train.grad_accum):
            host = next(loader)
            tokens = int((host["src"] != PAD).sum() + (host["tgt"] != PAD).sum())
            b, s = host["src"].shape
            length = host["tgt"].shape[1]
            k = int(host["masked"].sum(1).max())
            passes = []
            if objective.needs_ar:
                passes.append((length - 1, length - 1))
            if objective.needs_nar:
                passes.append((length + 2 * k, 2 * k))
            batch = {key: v.to(topo.device, non_blocking=True) for key, v in host.items()}
            prep = objective.prepare(batch)
            outputs = engine(**prep.model_inputs)
            loss, terms = objective.loss(outputs, prep)
            engine.backward(loss)
            engine.step()
            stats.add(loss, terms, tokens, step_flops(cfg.model, vocab, b, s, passes))
        steps_since_log += 1
        if step % cfg.train.log_interval == 0 or step == last_step:
            metrics = stats.reduce(present)
            metrics["train/lr"] = engine.get_lr()[0]
            norm = engine.get_global_grad_norm()
            if norm is not None:
                metrics["train/grad_norm"] = float(norm)
            metrics["perf/mfu"] = metrics.pop("perf/flops_per_s") / (peak * world)
            if topo.is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
                summary.setdefault("first", metrics)
                summary["last"] = metrics
            logger.log(step, metrics, steps_since_log)
            steps_since_log = 0
            stats.reset()
        if step % cfg.train.save_interval == 0 or step == last_step:
            path = checkpoint.save(engine, ckpt_root, step,
                                   {"loader": loader.state_dict(), "config": to_dict(cfg)},
                                   tokenizer)
            summary["checkpoint"] = str(path)
    summary["wandb_dir"] = logger.close()
    summary["step"] = last_step
    return summary
