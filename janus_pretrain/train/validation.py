"""Validation inside the training loop, every `train.eval_interval` steps.

Two parts, both optional: every loss term on the validation shards (data.valid, data.valid_source),
in eval mode without gradients, on the same batches each time (the first `train.eval_batches`
micro-batches of epoch 0 of each data-parallel rank, or all of them if fewer), averaged over the
data-parallel group -> `eval/loss`, `eval/ce_ar`, ...; and whatever the caller's `task_eval`
measures on the live model (fine-tuning: a task's metric decoded AR and NAR, built by finetune/,
which no module of train/ imports) -> `eval/<task>/<metric>/<mode>`.

The score is the first value `task_eval` returns (higher is better) or, without one, -eval/loss.
A step is a candidate only if its weights are finite (recorded when its checkpoint was saved,
checkpoint/finite.py), every validation value is finite and its decoding is (NonFiniteOutput).
When it beats the best so far, rank 0 copies the step's checkpoint (saved just before; eval_interval
is a multiple of save_interval) to `checkpoints/best`, atomically (checkpoint/atomic.py), with
{"metric", "score", "step"} under "best" in its janus.json, so a resumed run compares against it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from janus_pretrain.checkpoint import finite, weights
from janus_pretrain.checkpoint.files import BEST, MARKER, META, step_name
from janus_pretrain.data.loader import BatchLoader
from janus_pretrain.errors import NonFiniteOutput
from janus_pretrain.objectives.build import Objective
from janus_pretrain.train.metrics import StepStats

# The live module -> {"eval/<task>/<metric>/<mode>": value}, the score first; every rank calls it.
TaskEval = Callable[[torch.nn.Module], dict[str, float]]


def read_best(path: Path) -> Optional[dict]:
    """The "best" record of a complete best/ directory, or None when there is none yet."""
    if not (path / MARKER).is_file():
        return None
    return json.loads((path / META).read_text()).get("best")


def publish_best(checkpoint: Path, target: Path, record: dict) -> Path:
    """`checkpoint`'s weights as the model-only `target`, its janus.json carrying `record`."""
    return weights.copy_model(checkpoint, target, best=record)


class Validator:
    """Decides when to validate and keeps checkpoints/best; every rank calls `after_step`."""

    def __init__(self, engine, objective: Objective, loader: Optional[BatchLoader],
                 batches: int, interval: Optional[int], root: Path, present: set[str],
                 device: torch.device, task_eval: Optional[TaskEval] = None):
        self.engine, self.objective, self.loader, self.task_eval = engine, objective, loader, task_eval
        self.batches, self.interval, self.present, self.device = batches, interval, present, device
        self.best_dir = root / BEST
        self.best = read_best(self.best_dir)
        self.host: Optional[list[dict]] = None

    def after_step(self, step: int, checkpoint: Optional[Path], logger) -> None:
        """Collective. `checkpoint` is the newest saved step directory (this step's)."""
        if self.interval is None or step % self.interval:
            return
        assert checkpoint is not None and checkpoint.name == step_name(step), (checkpoint, step)
        if finite.recorded(checkpoint) is False:  # checked once, when it was saved
            return self._no_candidate(step, "has non-finite weights")
        self.engine.eval()
        with torch.no_grad():
            try:
                task = self.task_eval(self.engine.module) if self.task_eval is not None else {}
            except NonFiniteOutput:
                task = None
            metrics = {**(self.losses() if self.loader is not None else {}), **(task or {})}
        self.engine.train()
        logger.write_eval(step, metrics)
        if task is None:
            return self._no_candidate(step, "decodes NaN log-probabilities")
        bad = next((k for k, v in metrics.items() if not math.isfinite(v)), None)
        if bad is not None:
            return self._no_candidate(step, f"has {bad} = {metrics[bad]}")
        metric = next(iter(task)) if task else "eval/loss"
        score = metrics[metric] if task else -metrics[metric]
        if self.best is not None and score <= self.best["score"]:
            return
        self.best = {"metric": metric, "score": score, "step": step}
        if dist.get_rank() == 0:
            publish_best(checkpoint, self.best_dir, self.best)
        dist.barrier()

    @staticmethod
    def _no_candidate(step: int, why: str) -> None:
        print(f"validation: step {step} {why}: never a candidate for best", flush=True)

    def losses(self) -> dict[str, float]:
        """Every loss term, averaged over the validation micro-batches and data-parallel ranks.
        The batches are collated once: the same ones every time (noise included)."""
        if self.host is None:
            count = min(self.batches, self.loader.batches_in_epoch(0))
            self.host = [self.loader.batch_at(0, index) for index in range(count)]
        stats = StepStats(self.device, self.present)
        for host in self.host:
            prep = self.objective.prepare({k: v.to(self.device) for k, v in host.items()})
            loss, terms = self.objective.loss(self.engine(**prep.model_inputs), prep)
            stats.add(loss, terms, host, 0.0)
        stats.end_step(skipped=False)
        return {k: v for k, v in stats.reduce("eval").items() if k.startswith("eval/")}
