"""Saves off the critical path (checkpoint/background.py) and the time-based save interval: host
copies that later training cannot change, buffers reused from save to save, one save in flight,
a writer's error raised in the training thread, a rank's failure reaching rank 0's publisher, and
saves planned about every train.save_interval_minutes at steps every rank agrees on. (A kill
during a background write: tests/test_fault_tolerance.py.)"""
from __future__ import annotations

import threading

import pytest
import torch

from janus_pretrain.checkpoint import background, store
from janus_pretrain.errors import JanusError


def test_host_copies_are_snapshots_in_reused_buffers():
    live = {"w": torch.ones(3), "opt": [{"m": torch.zeros(2)}], "step": 4}
    buffers = {}
    first = background.copy_to_host(live, buffers, ("f.pt",))
    live["w"].add_(1)  # training goes on
    assert first["w"].tolist() == [1, 1, 1] and first["step"] == 4
    assert first["opt"][0]["m"] is buffers[("f.pt", "opt", 0, "m")]
    again = background.copy_to_host(live, buffers, ("f.pt",))
    assert again["w"] is first["w"] and again["w"].tolist() == [2, 2, 2]  # same buffer: no faults


def test_one_job_in_flight_and_its_error_reaches_the_next_wait():
    writer = background.Writer(background=True)
    release, order = threading.Event(), []

    def slow():
        release.wait(10)
        order.append("first")

    assert writer.run(slow) is False  # started in the background
    threading.Timer(0.2, release.set).start()
    writer.run(lambda: order.append("second"))  # waits for the first
    writer.wait()
    assert order == ["first", "second"]

    def failing():
        raise OSError(28, "No space left on device")

    writer.run(failing)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # raised once
    assert writer.run(lambda: order.append("inline"), inline=True) is True and order[-1] == "inline"


def test_a_rank_that_failed_to_write_is_named_by_rank_0(tmp_path):
    background.report_written(tmp_path, 0, {"a": "1"})
    background.report_failed(tmp_path, 1, OSError(28, "No space left on device"))
    with pytest.raises(JanusError, match=r"failed on rank 1: OSError: \[Errno 28\]"):
        background.gather_written(tmp_path, 2)
    background.report_written(tmp_path, 1, {"b": "2"})
    (tmp_path / f"{background.FAILED}00001").unlink()
    assert background.gather_written(tmp_path, 2) == {"a": "1", "b": "2"}
    assert not list(tmp_path.iterdir())  # the reports are gone before the marker lists files


def test_time_based_saves_follow_the_measured_step_time(single_process, monkeypatch, tmp_path):
    """0.25 s steps and a 1 s interval: timed over the first 10 steps, then a save every 4 steps,
    re-planned at each save (step saves every 1000 and the last step's save besides)."""
    now = [0.0]
    monkeypatch.setattr(store.time, "monotonic", lambda: now[0])
    saved = []
    monkeypatch.setattr(store, "save", lambda engine, root, step, *a, **k: saved.append(step))
    checkpointer = store.Checkpointer(None, tmp_path, None, 1000, 3, interval_minutes=1 / 60)
    for step in range(1, 31):
        now[0] += 0.25
        checkpointer.after_step(step, step == 30, dict)
    assert saved == [15, 19, 23, 27, 30]
