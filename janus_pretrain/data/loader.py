"""Deterministic, resumable micro-batches for one data-parallel rank, sliced from a global plan.

Epoch e's plan is drawn from (seed, e) alone, whatever the number of ranks (see `batching`): a
permutation of the examples (micro-batches of `micro_batch_size` taken from it in turn), or the
epoch's token-budget batches. The loader's position is what all ranks together have consumed of
it (`position`: examples, or batches of the token-budget plan), as Megatron's samplers count
consumed samples: at each micro-step rank r of D takes the r-th of the next D micro-batches, and
the position moves past all D. So a checkpoint resumes at any DP size or micro-batch size with
the next unused example, and every example is used once per epoch across a change of layout. An
epoch holds whole optimizer steps (`accumulation` micro-batches on every rank), so with a fixed
global batch its steps are the same at any GPU count. The noise (masking) of a micro-batch is
drawn from a generator seeded by (seed, epoch, its start in the plan), so a batch is a pure
function of the position: saving it is enough to resume exactly.

With `workers` > 0, that many worker processes collate (and noise) the next batches, `prefetch`
each ahead of the step, off the training process (whose Python thread must keep launching
kernels): worker w of W computes positions w, w + W, ... of the same pure function and torch's
DataLoader hands them over in order (as numpy arrays, pinned on arrival on a GPU machine). The batches are those of
synchronous collation, and the saved position is that of the batches the caller has taken, not
of those prefetched.
"""
from __future__ import annotations

import atexit
import itertools
import signal
import weakref
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from janus_pretrain.data.batching import TokenBudget, fixed_size_plan, token_budget_plan
from janus_pretrain.data.buckets import Buckets, build_buckets
from janus_pretrain.data.packing import PackedCorpus
from janus_pretrain.data.plan import EpochPlan, PlanCache
from janus_pretrain.errors import JanusError

Collate = Callable[[list, np.random.Generator], dict]


def document_lengths(corpus) -> np.ndarray:
    """Ids per document [len(corpus)]: from the index where the corpus has one, else by reading."""
    if hasattr(corpus, "lengths"):
        return np.asarray(corpus.lengths())
    return np.array([len(doc) for doc in corpus], dtype=np.int64)


class BatchLoader:
    def __init__(self, corpus, collate: Collate, micro_batch_size: Optional[int], seed: int,
                 dp_rank: int = 0, dp_size: int = 1, sources: Optional[object] = None,
                 budget: Optional[TokenBudget] = None, prefetch: int = 0,
                 buckets: Optional[Buckets] = None, workers: int = 0,
                 pin_memory: bool = False, plans: Optional[PlanCache] = None,
                 accumulation: int = 1):
        """`corpus[i]` is a target id array; `sources[i]`, if given, the matching source ids
        (fine-tuning pairs); pretraining derives sources from targets in `collate`. With a
        `budget`, batches are filled to it and `micro_batch_size` is not used; with `buckets`,
        collated batches are padded up to a few shapes (buckets.py). `prefetch` > 0 with
        `workers` > 0 collates in worker processes (see the module docstring). With `plans`,
        epoch plans come from that cache (built once per node) where the corpus has an
        `identity`. `accumulation`: micro-batches per rank in one optimizer step."""
        self.corpus = corpus
        self.sources = sources
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.budget = budget
        self.prefetch = prefetch
        self.workers = workers if prefetch else 0
        self.pin_memory = pin_memory
        self.buckets = buckets
        self.plan_cache = plans
        self.accumulation = accumulation
        # Plan units one micro-batch takes: examples, or one batch of the token-budget plan.
        self.unit = 1 if budget is not None else micro_batch_size
        # The token-budget plan keeps each step's batches together (similar cost on every rank);
        # a resumed run keeps the grouping of the plan it resumes (load_state_dict).
        self.group = dp_size * accumulation
        self._plans: dict[int, EpochPlan] = {}
        self.epoch = 0
        self.position = 0
        if self.batches_in_epoch(0) == 0:
            size = f"{micro_batch_size}" if budget is None else f"{budget.max_tokens} tokens"
            raise JanusError(f"data: {len(corpus)} documents are fewer than one optimizer step "
                             f"of micro-batches ({size}) on {dp_size} data-parallel ranks x "
                             f"{accumulation} accumulated")
        self._ahead = None  # the workers' iterator of (position, batch), while they run

    def _epoch_corpus(self, epoch: int):
        """What epoch `epoch` draws from: a blend's examples differ by epoch (data/blend.py)."""
        return self.corpus.for_epoch(epoch) if hasattr(self.corpus, "for_epoch") else self.corpus

    def _build_plan(self, epoch: int) -> EpochPlan:
        if self.budget is None:  # the loader slices `order` itself (plan units: examples)
            return fixed_size_plan(len(self.corpus), self.micro_batch_size, self.seed, epoch, 1)
        targets = document_lengths(self._epoch_corpus(epoch))
        # A derived (denoised) source is never longer than its target.
        sources = document_lengths(self.sources) if self.sources is not None else targets
        return token_budget_plan(sources, targets, self.budget, self.seed, epoch, self.group)

    def _plan_key(self, epoch: int) -> Optional[dict]:
        """What the epoch's plan depends on; None where the corpus cannot name itself."""
        corpus = getattr(self.corpus, "identity", None)
        sources = getattr(self.sources, "identity", None)
        if corpus is None or (self.sources is not None and sources is None):
            return None
        b = self.budget
        batching = ({"micro_batch_size": self.micro_batch_size} if b is None else
                    {"budget": [b.max_tokens, b.max_source_len, b.max_target_len],
                     "buckets": list(b.buckets.lengths) if b.buckets is not None else None,
                     "group": self.group})
        return {"version": 2, "corpus": corpus, "sources": sources, "seed": self.seed,
                "epoch": epoch, **batching}

    def _plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            key = self._plan_key(epoch) if self.plan_cache is not None else None
            plan = (self._build_plan(epoch) if key is None else
                    self.plan_cache.get(key, lambda: self._build_plan(epoch)))
            # A process looks at most one epoch back (the position it normalises from).
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    @property
    def _stride(self) -> int:
        """Plan units all ranks take at one micro-step."""
        return self.dp_size * self.unit

    def _units(self, plan: EpochPlan) -> int:
        return len(plan.order) if self.budget is None else len(plan)

    def _offset(self, plan: EpochPlan, position: int) -> int:
        """Where `position` plan units start in the plan's example order."""
        return position if self.budget is None else int(plan.offsets[position])

    def epoch_length(self, epoch: int) -> int:
        """Plan units of `epoch` that whole optimizer steps use (the rest is left out)."""
        step = self._stride * self.accumulation
        return self._units(self._plan(epoch)) // step * step

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches of this rank in a whole `epoch` (with a budget, it may differ between
        epochs)."""
        return self.epoch_length(epoch) // self._stride

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def _normalised(self, epoch: int, position: int) -> tuple[int, int]:
        """The position itself, or the next epoch's start when no micro-step fits after it."""
        if position + self._stride > self.epoch_length(epoch):
            return epoch + 1, 0
        return epoch, position

    def batch_at(self, epoch: int, index: int) -> dict:
        """This rank's micro-batch `index` of `epoch` counted from the epoch's start."""
        return self.batch_from(epoch, index * self._stride)

    def batch_from(self, epoch: int, position: int) -> dict:
        """This rank's micro-batch when all ranks have consumed `position` units of `epoch`'s
        plan (a pure function of the two)."""
        start = position + self.dp_rank * self.unit
        plan = self._plan(epoch)
        corpus = self._epoch_corpus(epoch)
        members = plan.order[self._offset(plan, start):self._offset(plan, start + self.unit)]
        examples = [(self.sources[i] if self.sources is not None else None, corpus[i])
                    for i in np.asarray(members, dtype=np.int64).tolist()]
        batch = self.collate(examples, np.random.default_rng([self.seed, epoch, start]))
        return batch if self.buckets is None else self.buckets.pad(batch)

    def consumed(self) -> np.ndarray:
        """This epoch's examples that all ranks have taken so far, in plan order."""
        plan = self._plan(self.epoch)
        return plan.order[:self._offset(plan, min(self.position, self._units(plan)))]

    def __iter__(self):
        return self

    def positions(self, epoch: int, position: int):
        """Consecutive positions from (epoch, position) on, across epochs."""
        while True:
            epoch, position = self._normalised(epoch, position)
            yield epoch, position
            position += self._stride

    def __next__(self) -> dict:
        self.epoch, self.position = self._normalised(self.epoch, self.position)
        if self.workers:
            if self._ahead is None:
                _WORKING.add(self)
                self._ahead = iter(DataLoader(
                    _Ahead(self, self.epoch, self.position), batch_size=None, collate_fn=_as_is,
                    num_workers=self.workers, prefetch_factor=self.prefetch,
                    persistent_workers=False, worker_init_fn=_leave_signals_to_the_trainer,
                    # its own generator: the workers' seeds must not move the training RNG
                    # (dropout), which a resumed run restores from the checkpoint
                    generator=torch.Generator()))
            position, batch = next(self._ahead)
            if isinstance(batch, Exception):
                self.close()
                raise batch
            assert position == (self.epoch, self.position), (position, self.epoch, self.position)
            batch = {k: _from_numpy(v, self.pin_memory) for k, v in batch.items()}
        else:
            batch = self.batch_from(self.epoch, self.position)
        self.position += self._stride
        return batch

    def close(self) -> None:
        """Stop the collating workers (if any) and drop what they had prepared. A worker that
        did not stop when asked is killed: it ignores SIGTERM, so DataLoader's fallback (and
        multiprocessing's at exit) would wait on it forever."""
        if self._ahead is not None:
            workers = list(self._ahead._workers)
            self._ahead._shutdown_workers()
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join()
            self._ahead = None
        _WORKING.discard(self)

    def state_dict(self) -> dict:
        """The position (the same on every rank) and what gives its units their meaning."""
        return {"epoch": self.epoch, "consumed": self.position, "seed": self.seed,
                "max_tokens": None if self.budget is None else self.budget.max_tokens,
                "group": self.group}

    def load_state_dict(self, state: dict) -> None:
        """Resume after what the saved run consumed, at any DP size, micro-batch size or
        accumulation (with a budget, under the same data.max_tokens)."""
        if state["seed"] != self.seed:
            raise JanusError(f"data: checkpoint was written with data.seed={state['seed']}, "
                             f"this run has data.seed={self.seed}")
        if "consumed" not in state:  # written before positions were global: index per rank
            state = {**state, "consumed": int(state["index"]) * state["dp_size"] * (
                         state["micro_batch_size"] if self.budget is None else 1),
                     "max_tokens": self.budget and self.budget.max_tokens,
                     "group": state["dp_size"]}
        here = None if self.budget is None else self.budget.max_tokens
        if state["max_tokens"] != here:
            raise JanusError(f"data: the checkpoint's batches were planned with data.max_tokens="
                             f"{state['max_tokens']}; this run has {here}: resume with the same "
                             f"value")
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["consumed"])
        if self.budget is not None and state["group"] != self.group:
            self.group = int(state["group"])
            self._plans.clear()


_WORKING: "weakref.WeakSet[BatchLoader]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's exit hook, so it runs before it
def _close_open_loaders() -> None:
    """Stop the workers of loaders still open at exit (a run that ended by an exception, a
    loader held by a traceback): multiprocessing would otherwise join them forever."""
    for loader in list(_WORKING):
        loader.close()


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A preemption signal reaches the whole process group (Slurm, Ctrl-C, `kill -- -PGID`):
    the training process turns it into a checkpoint and an exit (train/signals.py) and then stops
    its workers; a worker that died of it first would crash the trainer instead."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(item):
    return item


def _from_numpy(value, pin: bool):
    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.from_numpy(value)
    return tensor.pin_memory() if pin else tensor


class _Ahead(IterableDataset):
    """(position, batch) for consecutive positions from a start: worker w of W takes every W-th,
    so that the DataLoader, reading its workers in turn, yields them in order."""

    def __init__(self, loader: BatchLoader, epoch: int, position: int):
        self.loader, self.start = loader, (epoch, position)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for position in itertools.islice(self.loader.positions(*self.start), w, None, n):
            try:
                # numpy, sent by value: for batches this small, ~3x faster to receive than
                # torch's shared-memory tensors (a file descriptor and a mapping per tensor)
                yield position, {k: v.numpy() if isinstance(v, torch.Tensor) else v
                                 for k, v in self.loader.batch_from(*position).items()}
            except Exception as e:  # raised by the caller's next(), as its own one line
                yield position, e
                return


def build_loader(data, corpus, collate: Collate, dp_rank: int, dp_size: int,
                 sources: Optional[object] = None, plan_dir: Optional[Path] = None,
                 accumulation: int = 1) -> BatchLoader:
    """The training loader a `DataConfig` describes: documents or packed blocks, batches of
    data.micro_batch_size examples or of data.max_tokens padded cells, prefetched or not;
    epoch plans cached under `plan_dir` if given; epochs of whole optimizer steps of
    `accumulation` micro-batches per rank."""
    if data.pack_documents:
        pack = lambda c: PackedCorpus(c, data.max_target_len - 2)  # noqa: E731
        corpus = corpus.map_members(pack) if hasattr(corpus, "map_members") else pack(corpus)
    buckets = build_buckets(data)
    budget = (TokenBudget(data.max_tokens, data.max_source_len, data.max_target_len, buckets)
              if data.max_tokens is not None else None)
    return BatchLoader(corpus, collate, data.micro_batch_size, data.seed, dp_rank=dp_rank,
                       dp_size=dp_size, sources=sources, budget=budget, prefetch=data.prefetch,
                       buckets=buckets, workers=data.workers,
                       pin_memory=torch.cuda.is_available(),
                       plans=PlanCache(plan_dir) if plan_dir is not None else None,
                       accumulation=accumulation)
