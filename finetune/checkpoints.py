"""After fine-tuning: average the last k checkpoints, pick the best one by a validation metric.

Both are model-only checkpoints beside the step directories (`<run>/checkpoints/averaged`,
`<run>/checkpoints/best`), written by janus_pretrain.checkpoint.weights. Their names are not
`step_*`, so resuming and pruning never touch them. Selection decodes the first `valid_size`
validation pairs with AR greedy search (for a model without an AR stream NAR mask-predict T = 10,
or BANG's one-pass NAR) and scores the task's first metric.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

from janus_pretrain.checkpoint import store, weights
from janus_pretrain.checkpoint.files import AVERAGED, BEST, CHECKPOINTS, MARKER
from janus_pretrain.errors import JanusError, NonFiniteOutput
from janus_pretrain.generate.api import Generator
from finetune.live_eval import first_metric
from finetune.tasks import TaskSpec, read_split


def average_last(run: Path, k: int) -> Path:
    """Mean of the weights of the newest k complete checkpoints -> `<run>/checkpoints/averaged`."""
    found = store.complete(run / CHECKPOINTS)[:k]
    if len(found) < k:
        raise JanusError(f"select: --average-last {k} needs {k} checkpoints, {run}/checkpoints "
                         f"holds {len(found)} (keep more with train.keep_checkpoints and a smaller "
                         f"train.save_interval)")
    return weights.average(found, run / CHECKPOINTS / AVERAGED)


def validation_score(task: TaskSpec, path: Path, valid_size: int,
                     root: Optional[str] = None) -> float:
    sources, refs = read_split(task, "valid", root)
    sources, refs = sources[:valid_size], refs[:valid_size]
    # A corrupt file or non-finite weights (weights.load_into) are refused by loading, a model
    # whose weights are finite but whose log-probabilities are not (diverged) by decoding: the
    # other checkpoints may still serve.
    try:
        gen = Generator.from_checkpoint(path)
    except JanusError as e:
        return _skipped(path, e)
    modes = gen.cfg.objective.decoding_modes()
    if "ar" in modes:
        options = dict(mode="ar", beam=1)
    elif "nar" in modes:
        options = dict(mode="nar", iterations=10)
    else:
        options = dict(mode="bang_nar")
    try:
        return first_metric(task, gen, sources, refs, options)
    except NonFiniteOutput as e:
        return _skipped(path, e)


def _skipped(path: Path, why: JanusError) -> float:
    print(f"select: warning: skipping {path.name}: {why}", file=sys.stderr, flush=True)
    return float("-inf")


def select_best(task: TaskSpec, run: Path, valid_size: int = 200,
                root: Optional[str] = None) -> tuple[Path, dict[str, float]]:
    """Score every complete checkpoint (and the average, if any) on validation; copy the best to
    `<run>/checkpoints/best`. Returns its path and {checkpoint name: score}."""
    ckpts = run / CHECKPOINTS
    candidates = store.complete(ckpts)
    if (ckpts / AVERAGED / MARKER).is_file():
        candidates.append(ckpts / AVERAGED)
    if not candidates:
        raise JanusError(f"select: no complete checkpoint under {ckpts}")
    scores = {p.name: validation_score(task, p, valid_size, root) for p in candidates}
    finite = [p for p in candidates if math.isfinite(scores[p.name])]
    scores = {p.name: scores[p.name] for p in finite}
    if not finite:
        raise JanusError(f"select: no checkpoint under {ckpts} is usable: each is corrupt or has "
                         f"non-finite weights (diverged: lower optim.lr)")
    best = max(finite, key=lambda p: scores[p.name])
    weights.copy_model(best, ckpts / BEST)
    return ckpts / BEST, scores
