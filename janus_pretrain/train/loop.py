"""The training loop shared by pretraining and fine-tuning.

Data, objective and model come from the config; the loop only moves batches, steps the
DeepSpeed engine, logs and checkpoints. One iteration of the outer loop is one optimizer step of
`train.grad_accum` micro-batches. Loss terms stay on the device between log intervals, so the
step's only host sync is one all-reduce of two flags at its last micro-batch: whether any rank
saw a non-finite loss or gradient (the update is then skipped, see nonfinite.py) and whether any
rank was asked to stop (see signals.py). At a log interval the loss terms are averaged over the
data-parallel group and written to the console, W&B and `<output_dir>/metrics.jsonl` (rank 0).
Every `train.eval_interval` steps the Validator (validation.py) scores the model and keeps
`checkpoints/best`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from janus_pretrain.checkpoint import finite, store
from janus_pretrain.checkpoint.init import init_weights
from janus_pretrain.config import RunConfig, to_dict
from janus_pretrain.data.corpora import open_sources, open_train, validation_loader
from janus_pretrain.data.loader import BatchLoader, build_loader
from janus_pretrain.errors import JanusError
from janus_pretrain.model import JanusModel
from janus_pretrain.model.flops import matmul_peak
from janus_pretrain.objectives.build import Objective, build_objective
from janus_pretrain.parallel import state
from janus_pretrain.tokenizer import PAD, load_tokenizer
from janus_pretrain.train import batch_size, run_lock
from janus_pretrain.train.deepspeed_json import read_deepspeed_json
from janus_pretrain.train.engine import build_engine
from janus_pretrain.train.metrics import RunLogger, StepStats
from janus_pretrain.train.nonfinite import NonFiniteGuard
from janus_pretrain.train.signals import StopRequest
from janus_pretrain.train.validation import TaskEval, Validator


def seed_everything(seed: int) -> None:
    # The same seed on every rank: identical initial weights, and Megatron's convention for the
    # default generator under tensor parallelism.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(host: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch's copy to the device (asynchronous from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in host.items()}


def must_read_flags(train_cfg, step: int, last_step: int) -> bool:
    """Steps that wait for the device anyway (a log, the last one) read their own non-finite /
    stop flags; the others learn them one step late (nonfinite.py), and a save reads them
    first (`saved_state`)."""
    return step == last_step or step % train_cfg.log_interval == 0


def saved_state(guard: NonFiniteGuard, loader: BatchLoader, cfg: RunConfig) -> dict:
    """What a checkpoint holds besides the engine's state. The step's flags are read first: a
    save waits for the device anyway, and a skipped update's held LR schedule must be the one
    saved."""
    guard.settle()
    return {"loader": loader.state_dict(), "config": to_dict(cfg),
            "bad_steps_in_a_row": guard.bad_in_a_row}


@dataclass
class TrainResult:
    """What a finished (or stopped) invocation of `train` reports to its caller."""

    rank: int
    start_step: int
    step: int
    checkpoint: Optional[str]
    wandb_dir: Optional[str] = None
    first: Optional[dict] = None   # the first and last logged metrics (rank 0 only)
    last: Optional[dict] = None
    stopped_by: Optional[str] = None  # a stop signal's name when one ended the run early


def optimizer_step(engine, objective: Objective, loader: BatchLoader, cfg: RunConfig,
                   guard: NonFiniteGuard, stats: StepStats, stop_requested: bool,
                   device: torch.device, step: Optional[int] = None) -> None:
    """One optimizer step (update `step`) of `train.grad_accum` micro-batches, without a host
    sync: whether it was skipped (non-finite on some rank) and whether a rank asked to stop
    reach `guard.bad_in_a_row` / `guard.stop` at the next step, or at `guard.settle()`."""
    for micro in range(cfg.train.grad_accum):
        host = next(loader)
        prep = objective.prepare(to_device(host, device))
        loss, terms = objective.loss(engine(**prep.model_inputs), prep, step)
        guard.add_loss(loss)
        engine.backward(loss)
        if micro == cfg.train.grad_accum - 1:
            guard.before_update(stop_requested)
        engine.step()
        stats.add(loss, terms, host, objective.flops(host, cfg.model, engine.module.padded_vocab_size))
    stats.end_step(guard.flags[0])
    guard.after_update()


def train(cfg: RunConfig, resume: bool = False, task_eval: Optional[TaskEval] = None
          ) -> TrainResult:
    """Run (or resume) a training job; `task_eval` adds a task's metric to validation."""
    cfg.check_data()  # a config that cannot work fails before any process group starts
    if cfg.train.eval_interval and cfg.data.valid is None and task_eval is None:
        raise JanusError("config: train.eval_interval: needs data.valid (validation shards) "
                         "or a fine-tuning task (janus-finetune train)")
    read_deepspeed_json(cfg)
    topo = state.initialize(cfg.parallel.tensor_parallel, cfg.parallel.timeout_minutes)
    cfg = batch_size.resolved(cfg, state.data_parallel_size())
    # bad data fails before the output directory is created (for its lock)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    corpus = open_train(cfg.data.train, tokenizer)
    with run_lock.hold(Path(cfg.train.output_dir), topo.is_main):
        return _train(cfg, resume, task_eval, topo, tokenizer, corpus)


def _train(cfg: RunConfig, resume: bool, task_eval: Optional[TaskEval], topo: state.Topology,
           tokenizer, corpus) -> TrainResult:
    """`train` once the process group is up, the data open and this run owns its output
    directory."""
    objective = build_objective(cfg)
    seed_everything(cfg.train.seed)
    model = JanusModel(cfg.model, tokenizer.vocab_size, PAD, mask_vector=cfg.objective.is_bang)
    if cfg.train.init_from and not resume:
        init_weights(model, cfg.train.init_from, tokenizer)
    if cfg.train.compile:
        model.compile()
    engine = build_engine(model, cfg)
    output = Path(cfg.train.output_dir)
    loader = build_loader(cfg.data, corpus, objective.collate, state.data_parallel_rank(),
                          state.data_parallel_size(), open_sources(cfg.data.source, tokenizer, corpus),
                          plan_dir=output / "data_plans", accumulation=cfg.train.grad_accum)
    checkpointer = store.Checkpointer(engine, output, tokenizer, cfg.train.save_interval,
                                      cfg.train.keep_checkpoints, cfg.train.save_interval_minutes,
                                      cfg.train.async_save, cfg.train.eval_interval)
    meta = checkpointer.start(resume, cfg.train.resume_fallback, to_dict(cfg)) or {
        "step": 0, "bad_steps_in_a_row": 0, "loader": loader.state_dict()}
    loader.load_state_dict(meta["loader"])
    start_step, bad_in_a_row = meta["step"], meta["bad_steps_in_a_row"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)
    logger = RunLogger(topo.is_main, output, cfg.train.steps, start_step, cfg.train.log_interval,
                       matmul_peak(topo.device, dtype) * dist.get_world_size(),
                       cfg.train.wandb_project, cfg.train.wandb_name, to_dict(cfg))
    stats = StepStats(topo.device, objective.terms)
    valid = validation_loader(cfg, tokenizer, objective.collate, state.data_parallel_rank(),
                              state.data_parallel_size())
    validator = Validator(engine, objective, valid, cfg.train.eval_batches,
                          cfg.train.eval_interval, checkpointer.root, objective.terms, topo.device,
                          task_eval)
    guard = NonFiniteGuard(engine)
    guard.bad_in_a_row = bad_in_a_row
    last_step = min(cfg.train.steps, cfg.train.exit_after or cfg.train.steps)
    step, stopping, diverged = start_step, False, False
    engine.train()
    try:
        with StopRequest() as stop_request:
            while step < last_step and not (stopping or diverged):
                step += 1
                optimizer_step(engine, objective, loader, cfg, guard, stats, stop_request.requested,
                               topo.device, step)
                if must_read_flags(cfg.train, step, last_step):
                    guard.settle()
                bad_in_a_row, stopping = guard.bad_in_a_row, guard.stop
                diverged = bad_in_a_row >= cfg.train.max_bad_steps
                done = step == last_step or stopping or diverged
                logger.after_step(step, done, stats, engine)
                if topo.is_main and hasattr(loader.corpus, "mixture") and (
                        done or not step % cfg.train.log_interval):  # a blend's realised shares
                    logger.write_eval(step, loader.corpus.mixture(loader.epoch, loader.consumed()))
                checkpointer.after_step(step, done, lambda: saved_state(guard, loader, cfg))
                validator.after_step(step, checkpointer.last, logger)
    finally:  # its workers, also when the run ends by an exception
        loader.close()
    result = TrainResult(topo.rank, start_step, step, checkpointer.last and str(checkpointer.last),
                         logger.close(),
                         logger.first, logger.last)
    if stopping and step < last_step:  # a signal during the last step changes nothing
        result.stopped_by = stop_request.received.name if stop_request.requested else "another rank"
    if diverged:
        good = finite.newest(store.complete(checkpointer.root))
        raise JanusError(f"train: {bad_in_a_row} steps in a row (up to step {step}) had a non-finite "
                         f"loss or gradient and were skipped (train.max_bad_steps="
                         f"{cfg.train.max_bad_steps}); " +
                         (f"{good} is the newest checkpoint with finite weights" if good else
                          "no checkpoint holds finite weights") +
                         ". Lower optim.lr or check the data before resuming")
    return result
