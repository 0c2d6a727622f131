"""train.global_batch: accumulation derived per data-parallel size, one-line errors naming the
nearest layouts that divide it, the presets at BART's batch (train/batch_size.py)."""
from __future__ import annotations

import pytest

from janus_pretrain.config import load_config
from janus_pretrain.errors import JanusError
from janus_pretrain.train.batch_size import accumulation, resolved


def _cfg(*overrides):
    return load_config(None, ["model=tiny", "data.max_source_len=64", "data.max_target_len=64",
                              *overrides])


@pytest.mark.parametrize("dp,accum", [(1, 32), (2, 16), (4, 8), (32, 1)])
def test_accumulation_keeps_the_global_batch(dp, accum):
    cfg = _cfg("train.global_batch=256", "data.micro_batch_size=8")
    assert accumulation(cfg, dp) == accum
    assert resolved(cfg, dp).train.grad_accum * 8 * dp == 256


def test_global_batch_in_tokens_with_max_tokens():
    cfg = _cfg("train.global_batch=65536", "data.max_tokens=4096")
    assert [accumulation(cfg, dp) for dp in (1, 4, 16)] == [16, 4, 1]
    with pytest.raises(JanusError, match="not a multiple of one micro-batch of 4096 tokens"):
        accumulation(_cfg("train.global_batch=65000", "data.max_tokens=4096"), 1)


def test_without_global_batch_grad_accum_is_per_rank():
    assert accumulation(_cfg(), 8) == 1
    assert accumulation(_cfg("train.grad_accum=4"), 8) == 4


def test_a_layout_that_cannot_divide_names_the_nearest_that_can():
    cfg = _cfg("train.global_batch=8192", "data.micro_batch_size=16", "parallel.tensor_parallel=2")
    with pytest.raises(JanusError) as info:
        accumulation(cfg, 252, gpus_per_node=8)  # 63 nodes of 8 GPUs at TP 2: 512 / 252
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config: train.global_batch: 8192 sequences = 512 micro-batches")
    assert "data-parallel sizes 128 or 256 (32 or 64 nodes of 8 GPUs" in message


def test_grad_accum_beside_global_batch_must_agree():
    cfg = _cfg("train.global_batch=64", "data.micro_batch_size=8", "train.grad_accum=2")
    assert accumulation(cfg, 4) == 2  # a saved (resolved) config holds both
    with pytest.raises(JanusError, match="train.grad_accum: 2 disagrees") as info:
        accumulation(cfg, 2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("preset", ["base", "bang_base"])
def test_paper_presets_train_on_barts_batch_at_any_gpu_count(preset):
    from conftest import REPO

    cfg = load_config(REPO / "configs" / "pretrain" / f"{preset}.yaml")
    for gpus in (16, 64, 128, 512):
        accum = accumulation(cfg, gpus)
        assert accum * cfg.data.micro_batch_size * gpus == 8192
