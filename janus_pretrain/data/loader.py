"""Deterministic, resumable micro-batches for one data-parallel rank.

Epoch e's global micro-batches come from a plan drawn from (seed, e) (see `batching`: a fixed
number of examples each, or a token budget); data-parallel rank r of D takes global batch
g = i*D + r as its i-th micro-batch. The noise (masking) of a micro-batch is drawn from a
generator seeded by (seed, e, g), so a batch is a pure function of the position (epoch, i): saving
those two numbers (the same on every rank) is enough to resume exactly. A run at another DP size
or micro-batch size resumes after the same i * D * micro_batch_size examples of the epoch
(`BatchLoader._rescaled`).

With `workers` > 0, that many worker processes collate (and noise) the next batches, `prefetch`
each ahead of the step, off the training process (whose Python thread must keep launching
kernels): worker w of W computes positions w, w + W, ... of the same pure function and torch's
DataLoader hands them over in order (as numpy arrays, pinned on arrival on a GPU machine). The batches are those of
synchronous collation, and the saved position is that of the batches the caller has taken, not
of those prefetched.
"""
from __future__ import annotations

import itertools
import signal
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from janus_pretrain.data.batching import TokenBudget, fixed_size_plan, token_budget_plan
from janus_pretrain.data.buckets import Buckets, build_buckets
from janus_pretrain.data.packing import PackedCorpus
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
                 pin_memory: bool = False):
        """`corpus[i]` is a target id array; `sources[i]`, if given, the matching source ids
        (fine-tuning pairs); pretraining derives sources from targets in `collate`. With a
        `budget`, batches are filled to it and `micro_batch_size` is not used; with `buckets`,
        collated batches are padded up to a few shapes (buckets.py). `prefetch` > 0 with
        `workers` > 0 collates in worker processes (see the module docstring)."""
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
        if budget is not None:
            self._target_lens = document_lengths(corpus)
            # A derived (denoised) source is never longer than its target.
            self._source_lens = (document_lengths(sources) if sources is not None
                                 else self._target_lens)
        self._plans: dict[int, list[np.ndarray]] = {}
        self.epoch = 0
        self.index = 0
        if self.batches_in_epoch(0) == 0:
            size = f"{micro_batch_size}" if budget is None else f"{budget.max_tokens} tokens"
            raise JanusError(f"data: {len(corpus)} documents are fewer than one micro-batch "
                             f"({size}) per data-parallel rank ({dp_size} ranks)")
        self._ahead = None  # the workers' iterator of (position, batch), while they run

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            if self.budget is None:
                plan = fixed_size_plan(len(self.corpus), self.micro_batch_size, self.seed,
                                       epoch, self.dp_size)
            else:
                plan = token_budget_plan(self._source_lens, self._target_lens, self.budget,
                                         self.seed, epoch, self.dp_size)
            # A process looks at most one epoch back (the position it normalises from).
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches of this rank in `epoch` (with a budget, it may differ between epochs)."""
        return len(self._plan(epoch)) // self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def _normalised(self, epoch: int, index: int) -> tuple[int, int]:
        return (epoch + 1, 0) if index >= self.batches_in_epoch(epoch) else (epoch, index)

    def batch_at(self, epoch: int, index: int) -> dict:
        """This rank's micro-batch `index` of `epoch` (a pure function of the two)."""
        g = index * self.dp_size + self.dp_rank
        examples = [(self.sources[i] if self.sources is not None else None, self.corpus[i])
                    for i in self._plan(epoch)[g].tolist()]
        batch = self.collate(examples, np.random.default_rng([self.seed, epoch, g]))
        return batch if self.buckets is None else self.buckets.pad(batch)

    def __iter__(self):
        return self

    def positions(self, epoch: int, index: int):
        """Consecutive positions from (epoch, index) on, across epochs."""
        while True:
            epoch, index = self._normalised(epoch, index)
            yield epoch, index
            index += 1

    def __next__(self) -> dict:
        self.epoch, self.index = self._normalised(self.epoch, self.index)
        if self.workers:
            if self._ahead is None:
                self._ahead = iter(DataLoader(
                    _Ahead(self, self.epoch, self.index), batch_size=None, collate_fn=_as_is,
                    num_workers=self.workers, prefetch_factor=self.prefetch,
                    persistent_workers=False, worker_init_fn=_leave_signals_to_the_trainer,
                    # its own generator: the workers' seeds must not move the training RNG
                    # (dropout), which a resumed run restores from the checkpoint
                    generator=torch.Generator()))
            position, batch = next(self._ahead)
            if isinstance(batch, Exception):
                self.close()
                raise batch
            assert position == (self.epoch, self.index), (position, self.epoch, self.index)
            batch = {k: _from_numpy(v, self.pin_memory) for k, v in batch.items()}
        else:
            batch = self.batch_at(self.epoch, self.index)
        self.index += 1
        return batch

    def close(self) -> None:
        """Stop the collating workers (if any) and drop what they had prepared."""
        if self._ahead is not None:
            self._ahead._shutdown_workers()
            self._ahead = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position; one saved at another DP size or micro-batch size resumes after
        the same examples of the epoch (`_rescaled`)."""
        if state["seed"] != self.seed:
            raise JanusError(f"data: checkpoint was written with data.seed={state['seed']}, "
                             f"this run has data.seed={self.seed}")
        self.close()
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        dp_size = state.get("dp_size", self.dp_size)
        micro_batch_size = state.get("micro_batch_size", self.micro_batch_size)
        resized = self.budget is None and micro_batch_size != self.micro_batch_size
        if dp_size != self.dp_size or resized:
            self.index = self._rescaled(dp_size, micro_batch_size)

    def _rescaled(self, dp_size: int, micro_batch_size: Optional[int]) -> int:
        """This rank's index after the examples that `dp_size` ranks of `micro_batch_size`
        consumed in the epoch: global micro-batch g holds the plan's examples
        [g * size, (g + 1) * size) whatever the DP size, so the position is examples consumed.
        (Only the epoch's last, incomplete global batch depends on the DP size.)"""
        if self.budget is not None:
            raise JanusError(f"data: a checkpoint written at {dp_size} data-parallel ranks resumes "
                             f"with data.max_tokens at {dp_size} ranks only (its batches are "
                             f"planned per DP size); this run has {self.dp_size}")
        consumed = self.index * dp_size * micro_batch_size
        size = self.dp_size * self.micro_batch_size
        if consumed % size:
            raise JanusError(f"data: the checkpoint consumed {consumed} examples of epoch "
                             f"{self.epoch}, not a whole number of global micro-batches of {size} "
                             f"(data.micro_batch_size {self.micro_batch_size} x {self.dp_size} ranks)")
        return consumed // size


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

    def __init__(self, loader: BatchLoader, epoch: int, index: int):
        self.loader, self.start = loader, (epoch, index)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for position in itertools.islice(self.loader.positions(*self.start), w, None, n):
            try:
                # numpy, sent by value: for batches this small, ~3x faster to receive than
                # torch's shared-memory tensors (a file descriptor and a mapping per tensor)
                yield position, {k: v.numpy() if isinstance(v, torch.Tensor) else v
                                 for k, v in self.loader.batch_at(*position).items()}
            except Exception as e:  # raised by the caller's next(), as its own one line
                yield position, e
                return


def build_loader(data, corpus, collate: Collate, dp_rank: int, dp_size: int,
                 sources: Optional[object] = None) -> BatchLoader:
    """The training loader a `DataConfig` describes: documents or packed blocks, batches of
    data.micro_batch_size examples or of data.max_tokens padded cells, prefetched or not."""
    if data.pack_documents:
        corpus = PackedCorpus(corpus, data.max_target_len - 2)
    buckets = build_buckets(data)
    budget = (TokenBudget(data.max_tokens, data.max_source_len, data.max_target_len, buckets)
              if data.max_tokens is not None else None)
    return BatchLoader(corpus, collate, data.micro_batch_size, data.seed, dp_rank=dp_rank,
                       dp_size=dp_size, sources=sources, budget=budget, prefetch=data.prefetch,
                       buckets=buckets, workers=data.workers,
                       pin_memory=torch.cuda.is_available())
