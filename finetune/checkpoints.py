"""After fine-tuning: average the last k checkpoints, pick the best one by a validation metric.

Both write a model-only checkpoint directory beside the step directories
(`<run>/checkpoints/averaged`, `<run>/checkpoints/best`): the model weights in DeepSpeed's file
name, janus.json and tokenizer.model of the source checkpoint, and a COMPLETE marker, which is
all `Generator.from_checkpoint` reads. Their names are not `step_*`, so resuming and pruning
never touch them. Selection decodes the first `valid_size` validation pairs with AR greedy
search (NAR mask-predict T = 10 for a model without an AR stream) and scores the task's first
metric.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import Generator, model_state
from janus_pretrain.train import checkpoint
from finetune import metrics
from finetune.tasks import TaskSpec, read_split

WEIGHTS = "mp_rank_00_model_states.pt"


def write_model_checkpoint(source: Path, state: dict, target: Path) -> Path:
    """A model-only checkpoint at `target` with `state` and `source`'s config and tokenizer."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"module": state}, tmp / WEIGHTS)
    for name in ("janus.json", "tokenizer.model"):
        shutil.copyfile(source / name, tmp / name)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
    (tmp / checkpoint.MARKER).write_text(json.dumps({"from": str(source), "sha256": sums}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def average_last(run: Path, k: int) -> Path:
    """Mean of the weights of the newest k complete checkpoints -> `<run>/checkpoints/averaged`."""
    found = checkpoint.complete(run / "checkpoints")[:k]
    if len(found) < k:
        raise JanusError(f"select: --average-last {k} needs {k} checkpoints, {run}/checkpoints "
                         f"holds {len(found)} (keep more with train.keep_checkpoints and a smaller "
                         f"train.save_interval)")
    states = [model_state(p) for p in found]
    return write_model_checkpoint(found[0], mean_state(states), run / "checkpoints" / "averaged")


def mean_state(states: list[dict]) -> dict:
    """Element-wise mean of the floating-point tensors; anything else (megatron's extra state,
    integer buffers) is taken from the newest."""
    out = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = sum(s[key].double() for s in states).div(len(states)).to(value.dtype)
        out[key] = value
    return out


def validation_score(task: TaskSpec, path: Path, valid_size: int,
                     root: Optional[str] = None) -> float:
    sources, refs = read_split(task, "valid", root)
    sources, refs = sources[:valid_size], refs[:valid_size]
    gen = Generator.from_checkpoint(path)
    if "ar" in gen.cfg.objective.weights.decoding_modes():
        options = dict(mode="ar", beam=1)
    else:
        options = dict(mode="nar", iterations=10)
    hyps = gen.generate(sources, max_len=task.decoding.max_len, **options)
    value = metrics.score(task.metrics[:1], hyps, refs)[task.metrics[0]]
    if value is None:
        raise JanusError(f"select: {task.metrics[0]} cannot be computed here to pick a checkpoint")
    return value


def select_best(task: TaskSpec, run: Path, valid_size: int = 200,
                root: Optional[str] = None) -> tuple[Path, dict[str, float]]:
    """Score every complete checkpoint (and the average, if any) on validation; copy the best to
    `<run>/checkpoints/best`. Returns its path and {checkpoint name: score}."""
    ckpts = run / "checkpoints"
    candidates = checkpoint.complete(ckpts)
    if (ckpts / "averaged" / checkpoint.MARKER).is_file():
        candidates.append(ckpts / "averaged")
    if not candidates:
        raise JanusError(f"select: no complete checkpoint under {ckpts}")
    scores = {p.name: validation_score(task, p, valid_size, root) for p in candidates}
    best = max(candidates, key=lambda p: scores[p.name])
    write_model_checkpoint(best, model_state(best), ckpts / "best")
    return ckpts / "best", scores
