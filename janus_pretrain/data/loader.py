"""Deterministic, resumable micro-batches for one data-parallel rank, sliced from a global plan.

Epoch e's plan is drawn from (seed, e) alone, whatever the number of ranks (see `batching`): a
permutation of the examples (batches of `micro_batch_size`), or the epoch's token-budget batches.
The loader's position is what all ranks together have consumed of it (`consumed`: examples, or
batches of the token-budget plan), as Megatron's samplers count consumed samples: at each
micro-step rank r of D takes the r-th of the next D micro-batches, and the position moves past
all D. So a checkpoint resumes at any DP size or micro-batch size with the next unused example,
and every example is used once per epoch across a change of layout. An epoch holds whole
optimizer steps (`accumulation` micro-batches on every rank), so with a fixed global batch its
steps are the same at any GPU count.

The noise (masking) of a micro-batch is drawn from a generator seeded by (seed, epoch, its start
in the plan), so a batch is a pure function of the position: saving it is enough to resume exactly.

With `prefetch` > 0 a background thread collates (and noises) the next batches while the step
runs; it computes the same pure function, so the batches are those of synchronous collation, and
the saved position is that of the batches the caller has taken, not of those prefetched.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

import numpy as np

from janus_pretrain.data.batching import TokenBudget, epoch_permutation, token_budget_plan
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
                 budget: Optional[TokenBudget] = None, prefetch: int = 0, accumulation: int = 1):
        """`corpus[i]` is a target id array; `sources[i]`, if given, the matching source ids
        (fine-tuning pairs); pretraining derives sources from targets in `collate`. With a
        `budget`, batches are filled to it and `micro_batch_size` is not used. `accumulation`:
        micro-batches per rank in one optimizer step."""
        self.corpus = corpus
        self.sources = sources
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.budget = budget
        self.prefetch = prefetch
        self.accumulation = accumulation
        # Plan units one micro-batch takes: examples, or one batch of the token-budget plan.
        self.unit = 1 if budget is not None else micro_batch_size
        # The token-budget plan keeps each step's batches together (similar cost on every rank);
        # a resumed run keeps the grouping of the plan it resumes (load_state_dict).
        self.group = dp_size * accumulation
        if budget is not None:
            self._target_lens = document_lengths(corpus)
            # A derived (denoised) source is never longer than its target.
            self._source_lens = (document_lengths(sources) if sources is not None
                                 else self._target_lens)
        self._plans: dict[int, object] = {}
        self._plans_lock = threading.Lock()
        self.epoch = 0
        self.consumed = 0
        if self.batches_in_epoch(0) == 0:
            size = f"{micro_batch_size}" if budget is None else f"{budget.max_tokens} tokens"
            raise JanusError(f"data: {len(corpus)} documents are fewer than one optimizer step "
                             f"of micro-batches ({size}) on {dp_size} data-parallel ranks x "
                             f"{accumulation} accumulated")
        self._worker: Optional[threading.Thread] = None

    def _plan(self, epoch: int):
        """The epoch's global plan: a permutation of the examples [N], or the token-budget
        batches (a list of example-index arrays)."""
        with self._plans_lock:
            if epoch not in self._plans:
                if self.budget is None:
                    plan = epoch_permutation(len(self.corpus), self.seed, epoch)
                else:
                    plan = token_budget_plan(self._source_lens, self._target_lens, self.budget,
                                             self.seed, epoch, self.group)
                # The caller and the prefetcher are at most one epoch apart.
                self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
                self._plans[epoch] = plan
            return self._plans[epoch]

    @property
    def _stride(self) -> int:
        """Plan units all ranks take at one micro-step."""
        return self.dp_size * self.unit

    def epoch_length(self, epoch: int) -> int:
        """Plan units of `epoch` that whole optimizer steps use (the rest is left out)."""
        step = self._stride * self.accumulation
        return len(self._plan(epoch)) // step * step

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches of this rank in a whole `epoch` (with a budget, it may differ between
        epochs)."""
        return self.epoch_length(epoch) // self._stride

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def _normalised(self, epoch: int, consumed: int) -> tuple[int, int]:
        """The position itself, or the next epoch's start when no micro-step fits after it."""
        if consumed + self._stride > self.epoch_length(epoch):
            return epoch + 1, 0
        return epoch, consumed

    def batch_at(self, epoch: int, index: int) -> dict:
        """This rank's micro-batch `index` of `epoch` counted from the epoch's start."""
        return self._batch(epoch, index * self._stride)

    def _batch(self, epoch: int, consumed: int) -> dict:
        """This rank's micro-batch when all ranks have consumed `consumed` units of `epoch`'s plan
        (a pure function of the two)."""
        start = consumed + self.dp_rank * self.unit
        plan = self._plan(epoch)
        members = plan[start:start + self.unit] if self.budget is None else plan[start]
        examples = [(self.sources[i] if self.sources is not None else None, self.corpus[i])
                    for i in members.tolist()]
        return self.collate(examples, np.random.default_rng([self.seed, epoch, start]))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.epoch, self.consumed = self._normalised(self.epoch, self.consumed)
        if self.prefetch:
            if self._worker is None:
                self._start_worker()
            position, batch = self._ready.get()
            if isinstance(batch, Exception):
                self._worker = None
                raise batch
            assert position == (self.epoch, self.consumed), (position, self.epoch, self.consumed)
        else:
            batch = self._batch(self.epoch, self.consumed)
        self.consumed += self._stride
        return batch

    def _start_worker(self) -> None:
        self._stop = threading.Event()
        self._ready = queue.Queue(maxsize=self.prefetch)
        self._worker = threading.Thread(target=self._produce, name="janus-prefetch", daemon=True,
                                        args=(self.epoch, self.consumed, self._stop, self._ready))
        self._worker.start()

    def _produce(self, epoch: int, consumed: int, stop: threading.Event,
                 ready: queue.Queue) -> None:
        """Worker thread: put (position, batch) for consecutive positions from (epoch, consumed),
        or the exception that stopped it, until told to stop."""
        while not stop.is_set():
            try:
                epoch, consumed = self._normalised(epoch, consumed)
                item = ((epoch, consumed), self._batch(epoch, consumed))
            except Exception as e:  # handed to the caller's next()
                item = ((epoch, consumed), e)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], Exception):
                return
            consumed += self._stride

    def close(self) -> None:
        """Stop the prefetch thread (if any) and drop what it had prepared."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None

    def state_dict(self) -> dict:
        """The position (the same on every rank) and what gives its units their meaning."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
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
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        if self.budget is not None and state["group"] != self.group:
            self.group = int(state["group"])
            self._plans.clear()


def build_loader(data, corpus, collate: Collate, dp_rank: int, dp_size: int,
                 sources: Optional[object] = None, accumulation: int = 1) -> BatchLoader:
    """The training loader a `DataConfig` describes: documents or packed blocks, batches of
    data.micro_batch_size examples or of data.max_tokens padded cells, prefetched or not;
    epochs of whole optimizer steps of `accumulation` micro-batches per rank."""
    if data.pack_documents:
        corpus = PackedCorpus(corpus, data.max_target_len - 2)
    budget = (TokenBudget(data.max_tokens, data.max_source_len, data.max_target_len)
              if data.max_tokens is not None else None)
    return BatchLoader(corpus, collate, data.micro_batch_size, data.seed, dp_rank=dp_rank,
                       dp_size=dp_size, sources=sources, budget=budget, prefetch=data.prefetch,
                       accumulation=accumulation)
