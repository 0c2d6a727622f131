"""Count what a training step asks of a GPU, on any device: aten ops that launch a kernel on a
GPU (views, `detach` and bare allocations do not, so they are counted apart as `free`) and host
syncs (ops whose result the host must wait for), per phase of the step.

A sync is an op that reads a *device* tensor's value on the host: `_local_scalar_dense` (`.item()`,
`float(t)`, `bool(t)`, `if t:`), `is_nonzero`, `nonzero`, `masked_select`, `unique`,
`repeat_interleave` without an output size, indexing with a boolean tensor, `.tolist()` and
`.numpy()`; plus every `synchronize()` of DeepSpeed's accelerator or of torch.cuda. On a CPU
every tensor lives in host memory, so the counter tells host tensors from device ones by origin:
the caller marks the loader's batches as host tensors (`mark_host`), anything computed only from
host tensors is host too, and everything else is a device tensor. Copying a batch to the device
must then produce new tensors (on CPU `.to("cpu")` returns the same one): `clone_to_device`.

The loop's rows run DeepSpeed's GPU branches (`deepspeed_gpu_branches`), so that its syncs on a
GPU are counted on a CPU too.

Each sync is also counted by its call site (the innermost frame of this project or DeepSpeed), so
a count points at the line that causes it.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections import Counter
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.equal.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}
SYNC_METHODS = {"tolist", "numpy"}
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.lift_fresh.default,
             aten.set_.source_Storage, aten.set_.source_Storage_storage_offset}
SITE_ROOTS = ("janus_pretrain", "deepspeed", "megatron", "finetune", "transformers")


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat, _ = tree_flatten((args, kwargs))
    return [a for a in flat if isinstance(a, torch.Tensor)]


def _site() -> str:
    """The innermost frame of this project or a library it drives (not this module)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename.replace("\\", "/")
        if name.endswith("bench/counting.py"):
            continue
        for root in SITE_ROOTS:
            marker = f"/{root}/"
            if marker in name:
                return f"{root}/{name.split(marker, 1)[1]}:{frame.lineno}"
    return "?"


class _SyncMethods(TorchFunctionMode):
    """`.tolist()` / `.numpy()` read a tensor without an aten op: seen at the torch-function level."""

    def __init__(self, counter: "StepCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            if not self.counter.is_host(args[0]):
                self.counter.add_sync(name)
        return func(*args, **(kwargs or {}))


class StepCounter(TorchDispatchMode):
    """Use as a context manager around step(s); `phase` names where the next ops are counted."""

    def __init__(self):
        super().__init__()
        self.phase = "loop"
        self.ops: Counter = Counter()
        self.free: Counter = Counter()  # views and allocations: no kernel
        self.syncs: Counter = Counter()
        self.sites: Counter = Counter()
        self._host = WeakIdKeyDictionary()
        self._stack = contextlib.ExitStack()

    # --- host / device tensors ---
    def mark_host(self, tree) -> None:
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    # --- counting ---
    def add_sync(self, what: str) -> None:
        self.syncs[self.phase] += 1
        self.sites[(self.phase, what, _site())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors(args, kwargs)
        host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if not host:
            (self.free if func.is_view or func in NO_KERNEL else self.ops)[self.phase] += 1
            if func in SYNC_OPS and not (func is aten.repeat_interleave.Tensor
                                         and kwargs.get("output_size") is not None):
                self.add_sync(str(func.overloadpacket.__name__))
            elif func in INDEX_OPS and any(t.dtype == torch.bool for t in inputs[1:]):
                self.add_sync(f"{func.overloadpacket.__name__}[bool]")
        out = func(*args, **kwargs)
        if host:
            self.mark_host(out)
        return out

    def __enter__(self):
        self._stack.enter_context(_SyncMethods(self))
        self._stack.enter_context(_counted_synchronize(self))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._stack.close()
        return out

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def totals(self, steps: int = 1) -> dict:
        """Ops and syncs per step, per phase and in all."""
        phases = sorted(set(self.ops) | set(self.syncs) | set(self.free))
        return {"ops": {p: self.ops[p] / steps for p in phases},
                "syncs": {p: self.syncs[p] / steps for p in phases},
                "ops_total": sum(self.ops.values()) / steps,
                "free_total": sum(self.free.values()) / steps,
                "syncs_total": sum(self.syncs.values()) / steps,
                "sync_sites": [f"{phase} {what} {site} x{n / steps:g}"
                               for (phase, what, site), n in self.sites.most_common()]}

    def reset(self) -> None:
        self.ops.clear()
        self.free.clear()
        self.syncs.clear()
        self.sites.clear()


@contextlib.contextmanager
def _counted_synchronize(counter: StepCounter):
    """Count DeepSpeed's accelerator synchronize and torch.cuda.synchronize as syncs."""
    patched = [(torch.cuda, torch.cuda.synchronize)]
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        patched.append((get_accelerator(), get_accelerator().synchronize))
    for obj, original in patched:
        def counted(*a, _obj=obj, _original=original, **k):
            counter.add_sync("synchronize")
            if _obj is not torch.cuda or torch.cuda.is_available():
                return _original(*a, **k)
        obj.synchronize = counted
    try:
        yield
    finally:
        for obj, original in patched:
            obj.synchronize = original


class _HostStream:
    """A stand-in for a CUDA stream on the host: ordering calls do nothing (a CPU runs in
    order), a synchronize is DeepSpeed's accelerator synchronize (which the counter counts)."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()


@contextlib.contextmanager
def deepspeed_gpu_branches(engine) -> Iterator[None]:
    """Run DeepSpeed's ZeRO-1/2 code on a CPU as it runs on a GPU. DeepSpeed takes other
    branches on a device that orders its own work (`resolves_data_dependency()`, True on a CPU):
    on a GPU, with `overlap_comm`, it reduces on a stream of its own and synchronizes the device
    where the CPU branch does nothing, so a CPU count alone would miss those syncs. Here the GPU
    branches run, with host stand-ins for the streams. On a GPU they run anyway: nothing changes."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.resolves_data_dependency():
        yield
        return
    zero = engine.optimizer if engine.zero_optimization_stage() in (1, 2) else None
    compute = _HostStream()
    record_stream = torch.Tensor.record_stream
    saved = {name: acc.__dict__.get(name)
             for name in ("resolves_data_dependency", "current_stream")}
    acc.resolves_data_dependency = lambda: False
    acc.current_stream = lambda *a, **k: compute
    torch.Tensor.record_stream = lambda t, stream: (
        None if isinstance(stream, _HostStream) else record_stream(t, stream))
    reduction = zero.reduction_stream if zero is not None else None
    if zero is not None and zero.overlap_comm:
        zero.reduction_stream = _HostStream()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(acc, name)
            else:
                setattr(acc, name, value)
        torch.Tensor.record_stream = record_stream
        if zero is not None:
            zero.reduction_stream = reduction


def clone_to_device(batch: dict, device: torch.device) -> dict:
    """The loop's host-to-device copy as the counter needs it: new tensors even where the device
    is the host (train/loop.py `to_device` does `.to(device)`, a no-op on CPU)."""
    return {k: v.to(device, non_blocking=True, copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
