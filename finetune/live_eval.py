"""The fine-tuning half of in-loop validation (janus_pretrain/train/validation.py, which cannot
import finetune/): the task's first metric on the first `valid_size` validation pairs, decoded
from the live model AR greedy, NAR mask-predict T = 4 and BANG's one-pass NAR (batched), in the
modes the objective trains only (ObjectiveConfig.decoding_modes). The first mode's value
is the score for `best`."""
from __future__ import annotations

from typing import Optional

from janus_pretrain.config import RunConfig
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import Generator
from janus_pretrain.tokenizer import load_tokenizer
from janus_pretrain.train.validation import TaskEval
from finetune import metrics
from finetune.tasks import TaskSpec, read_split

MODES = {"ar": ("ar_greedy", dict(mode="ar", beam=1)),
         "nar": ("nar_T4", dict(mode="nar", iterations=4)),
         "bang_nar": ("bang_nar", dict(mode="bang_nar"))}


def task_eval(task: TaskSpec, cfg: RunConfig, valid_size: int, root: Optional[str] = None) -> TaskEval:
    """-> a callable: live model -> {"eval/<task>/<metric>/<ar_greedy|nar_T4|bang_nar>": value}."""
    sources, refs = read_split(task, "valid", root)
    sources, refs = sources[:valid_size], refs[:valid_size]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    metric = task.metrics[0]

    def evaluate(module) -> dict[str, float]:
        gen = Generator(module, tokenizer, cfg, next(module.parameters()).device)
        return {f"eval/{task.name}/{metric}/{name}": first_metric(task, gen, sources, refs, options)
                for name, options in (MODES[m] for m in cfg.objective.decoding_modes())}

    return evaluate


def first_metric(task: TaskSpec, gen: Generator, sources: list[str], refs: list, options: dict
                 ) -> float:
    """The task's first metric of `gen`'s decoding of `sources` with `options` (checkpoint
    selection and in-loop validation alike)."""
    hyps = gen.generate(sources, max_len=task.decoding.max_len, **options)
    value = metrics.score(task.metrics[:1], hyps, refs)[task.metrics[0]]
    if value is None:
        raise JanusError(f"validation: {task.metrics[0]} cannot be computed here for {task.name}")
    return value
