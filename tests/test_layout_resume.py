"""A checkpoint written at TP = 2 x DP = 2 under ZeRO-2 resumes at other (TP, DP, ZeRO) layouts
(checkpoint/relayout.py): the continued losses, the final weights and AdamW moments, the Adam step,
the LR schedule and the data position equal those of the run continued at the original layout.

Dropout is off, so every layout consumes the same random numbers; the config fixes
train.global_batch, so DP = 1 layouts accumulate two micro-batches. What differs is the order of fp32 sums (TP
splits, DP all-reduce against accumulation): losses agree within 1e-5, gradient norms within 1e-4
relative, and every weight and moment tensor within 1e-3 of what the continued steps changed in it
(measured: at most 4e-5)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import read_metrics

from janus_pretrain.checkpoint.relayout import Layout, read
from janus_pretrain.checkpoint.slices import KEYS, SavedState
from janus_pretrain.config import from_dict
from janus_pretrain.data.batching import TokenBudget
from janus_pretrain.data.loader import BatchLoader
from janus_pretrain.errors import JanusError
from janus_pretrain.model import JanusModel
from janus_pretrain.tokenizer import PAD, load_tokenizer

STEPS, SAVED = 4, 2
SHAPE = ("model.dropout=0.0", "optim.clip_grad=0.3", f"train.steps={STEPS}",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.hidden_size=64",
         "model.ffn_hidden_size=128", "model.num_heads=2", "data.max_source_len=32",
         "data.max_target_len=32", "data.micro_batch_size=2")
SOURCE = Layout(2, 2, 2)
MICRO_BATCHES = 2  # per optimizer step, over all DP ranks


def run(launch_training, out, layout: Layout, *extra, resume=False):
    result = launch_training(
        out, nproc=layout.tensor_parallel * layout.data_parallel, resume=resume, timeout=400,
        extra=(*SHAPE, f"parallel.tensor_parallel={layout.tensor_parallel}",
               f"parallel.deepspeed_config=configs/deepspeed/zero{layout.zero_stage}.json",
               f"train.global_batch={MICRO_BATCHES * 2}", *extra))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def original(launch_training, tmp_path_factory):
    """The run at the original layout, uninterrupted (a resume at the same layout is the same run
    bit for bit: test_zero_tp.py), with checkpoints at step 2 and at the end."""
    out = tmp_path_factory.mktemp("original")
    run(launch_training, out, SOURCE, f"train.save_interval={SAVED}")
    return out


def whole_model(checkpoint):
    """The model a checkpoint was written for, at this process's TP size (1)."""
    model_cfg = from_dict(json.loads((checkpoint / "janus.json").read_text())["config"]).model
    return JanusModel(model_cfg, load_tokenizer(checkpoint / "tokenizer.model").vocab_size, PAD)


def final_state(checkpoint, layout: Layout):
    meta = json.loads((checkpoint / "janus.json").read_text())
    assert meta["layout"] == layout.as_dict()
    return read(checkpoint, layout, whole_model(checkpoint)), meta


@pytest.mark.parametrize("target", [Layout(1, 2, 1), Layout(1, 1, 0), Layout(2, 1, 3)], ids=str)
def test_resume_at_another_layout_continues_the_same_run(original, launch_training, tmp_path,
                                                         single_process, target):
    step = f"step_{SAVED:08d}"
    shutil.copytree(original / "checkpoints" / step, tmp_path / "checkpoints" / step)
    resumed = run(launch_training, tmp_path, target, resume=True)
    assert f"written at {SOURCE}, at {target}" in resumed.stdout
    assert "global batch" not in resumed.stderr  # kept: micro-batches x accumulation x DP

    ref, got = read_metrics(original), read_metrics(tmp_path)
    assert [m["step"] for m in got] == list(range(SAVED + 1, STEPS + 1))
    for a, b in zip(got, ref[SAVED:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5), (a, b)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4), (a, b)
        assert a["train/lr"] == b["train/lr"]

    last = f"checkpoints/step_{STEPS:08d}"
    (want, want_meta), (have, have_meta) = final_state(original / last, SOURCE), \
        final_state(tmp_path / last, target)
    before, _ = final_state(original / "checkpoints" / step, SOURCE)
    assert have.step == want.step == STEPS
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        a, b, start = getattr(have, key), getattr(want, key), getattr(before, key)
        assert a.keys() == b.keys()
        for name in a:
            off, moved = (a[name] - b[name]).abs().max(), (b[name] - start[name]).abs().max()
            assert off <= 1e-3 * moved, (key, name, float(off), float(moved))
    assert have.engine["lr_scheduler"] == want.engine["lr_scheduler"]
    assert have.engine["global_steps"] == want.engine["global_steps"] == STEPS
    # The data position: the same examples of the same epoch consumed.
    consumed = [(m["loader"]["epoch"], m["loader"]["consumed"]) for m in (have_meta, want_meta)]
    assert consumed[0] == consumed[1] == (0, STEPS * MICRO_BATCHES * 2)
    # train.global_batch: accumulation derived per layout.
    assert have_meta["config"]["train"]["grad_accum"] == MICRO_BATCHES // target.data_parallel


def test_slices_of_any_tp_layout_equal_the_whole_state(original, single_process):
    """What a resuming rank reads (checkpoint/slices.py): for every parameter and tensor, a range
    of the TP-local tensor of rank r of 1, 2 or 4, starting and ending inside rows, equals that
    range of the whole state's chunk."""
    checkpoint = original / "checkpoints" / f"step_{SAVED:08d}"
    whole, _ = final_state(checkpoint, SOURCE)
    saved = SavedState(checkpoint, SOURCE.zero_stage, whole_model(checkpoint))
    rng = np.random.default_rng(0)
    checked = 0
    for key in KEYS:
        for name, full in getattr(whole, key).items():
            dim = saved.dims.get(name)
            for world in (1, 2, 4):
                if dim is not None and full.shape[dim] % world:
                    continue
                for rank in range(world):
                    flat = (full if dim is None else full.chunk(world, dim)[rank]).reshape(-1)
                    for lo, hi in ((0, flat.numel()), sorted(rng.integers(0, flat.numel() + 1, 2))):
                        got = saved.region(name, key, rank, world, int(lo), int(hi))
                        assert torch.equal(got, flat[lo:hi]), (key, name, world, rank, lo, hi)
                        checked += 1
    assert checked > 200 and any(d == 1 for d in saved.dims.values())  # row-parallel ones too


def _corpus(n=64):
    return [np.array([i] + list(range(3 + i % 5))) for i in range(n)]


def _collate(examples, rng):
    return [int(t[0]) for _, t in examples]  # the example ids of the micro-batch


def _loaders(dp_size, budget=None, size=2, accumulation=1, corpus=None):
    corpus = _corpus() if corpus is None else corpus
    return [BatchLoader(corpus, _collate, size, seed=3, dp_rank=r, dp_size=dp_size, budget=budget,
                        accumulation=accumulation) for r in range(dp_size)]


def _steps(loaders, micro_steps):
    """The example ids the ranks take in `micro_steps` micro-steps, in plan order (rank 0 first)."""
    return [i for _ in range(micro_steps) for loader in loaders for i in next(loader)]


@pytest.mark.parametrize("budget", [None, TokenBudget(24, 8, 8)], ids=["fixed", "max_tokens"])
def test_resume_at_any_dp_size_uses_every_example_once(budget):
    """Saved at DP 4, resumed at 3, 2, 1 and back at 4 (none of which divides what the previous
    layout consumed into whole micro-steps of the next): the ids taken are the global plan's, in
    its order, each once, up to the epoch's end; only a tail shorter than one step is left out."""
    corpus = _corpus(200)
    loaders = _loaders(4, budget, corpus=corpus)
    plan = loaders[0]._plan(0)
    order = np.asarray(plan.order).tolist()
    taken = _steps(loaders, 3)
    for dp_size in (3, 2, 1, 4):
        state = json.loads(json.dumps(loaders[0].state_dict()))
        loaders = _loaders(dp_size, budget, corpus=corpus)
        for loader in loaders:
            loader.load_state_dict(state)
        taken += _steps(loaders, 2)
    while loaders[0].epoch == 0 and loaders[0]._normalised(0, loaders[0].position)[0] == 0:
        taken += _steps(loaders, 1)
    assert taken == order[:len(taken)]
    assert len(set(taken)) == len(taken)
    left = len(order) - len(taken)
    assert 0 <= left < (4 * 2 if budget is None else 4 * max(map(len, plan)))


@pytest.mark.parametrize("dp_size,size", [(1, 2), (4, 2), (1, 4), (2, 1), (3, 2)])
def test_position_moves_to_another_dp_size_as_examples_consumed(dp_size, size):
    """Two ranks took 4 micro-batches of 2 (16 examples): the resumed ranks, however many and
    however large their micro-batches, go on with the 17th example of the same plan."""
    before = _loaders(2)
    for loader in before:
        for _ in range(4):
            next(loader)
    state = json.loads(json.dumps(before[0].state_dict()))
    after = _loaders(dp_size, size=size)
    for loader in after:
        loader.load_state_dict(state)
    assert [loader.position for loader in after] == [16] * dp_size
    plan = np.asarray(before[0]._plan(0).order).tolist()
    assert [i for loader in after for i in next(loader)] == plan[16:16 + dp_size * size]


def test_epochs_hold_whole_steps_of_a_fixed_global_batch():
    """With the same global batch (16 sequences) at DP 1, 2 and 4, an epoch has the same steps:
    the same examples in the same order, the same ones left out at its end."""
    epochs = []
    for dp_size in (1, 2, 4):
        loaders = _loaders(dp_size, size=2, accumulation=8 // dp_size, corpus=_corpus(70))
        per_step = 8 // dp_size
        steps = loaders[0].batches_per_epoch // per_step
        epochs.append(_steps(loaders, steps * per_step))
        assert loaders[0].position == 64 and loaders[0]._normalised(0, 64) == (1, 0)
    assert epochs[0] == epochs[1] == epochs[2]


def test_token_budget_plan_is_the_same_at_any_dp_size():
    """The token-budget plan groups a step's batches (global batch / max_tokens of them), not the
    DP size: with tokens fixed per step, DP 1 x 4 and DP 4 x 1 take the same batches."""
    budget = TokenBudget(24, 8, 8)
    one, four = _loaders(1, budget, accumulation=4), _loaders(4, budget, accumulation=1)
    assert [b.tolist() for b in one[0]._plan(0)] == [b.tolist() for b in four[0]._plan(0)]
    assert _steps(one, 8) == _steps(four, 2)


def test_position_under_another_token_budget_is_one_error():
    state = _loaders(2, TokenBudget(20, 8, 8))[0].state_dict()
    for budget in (TokenBudget(24, 8, 8), None):
        with pytest.raises(JanusError, match="data.max_tokens=20; this run has") as info:
            _loaders(1, budget)[0].load_state_dict(state)
        assert "\n" not in str(info.value)


def test_checkpoint_of_another_shape_is_one_error(original, single_process):
    checkpoint = original / "checkpoints" / f"step_{SAVED:08d}"
    config = from_dict(json.loads((checkpoint / "janus.json").read_text())["config"]).model
    deeper = dataclasses.replace(config, encoder_layers=config.encoder_layers + 1)
    with pytest.raises(JanusError, match="does not fit this model") as info:
        read(checkpoint, SOURCE, JanusModel(deeper, 1000, PAD))
    assert "\n" not in str(info.value)
