"""ZeRO stages (optimizer offload included) and ZeRO x TP against dense references: equal trajectories, not just falling loss.

Dropout is off so that runs with different layouts consume the same random numbers; clipping is
set low enough to be active on every step."""
import pytest
from conftest import read_metrics

pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = ("model.dropout=0.0", "optim.clip_grad=0.3", f"train.steps={STEPS}")


def train(launch_training, out, nproc, *extra):
    result = launch_training(out, nproc=nproc, extra=(*COMMON, *extra), timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(out)


def assert_same_trajectory(got, ref, loss_tol=1e-5, norm_rel=1e-4):
    assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=loss_tol), (a, b)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=norm_rel), (a, b)
    assert all(m["train/grad_norm"] > 0.3 for m in ref), "clipping was not active"
    assert ref[-1]["train/loss"] < ref[0]["train/loss"]


@pytest.fixture(scope="module")
def dense(launch_training, tmp_path_factory):
    """One process, TP = 1, the global batch as two accumulated micro-batches."""
    return train(launch_training, tmp_path_factory.mktemp("dense"), 1, "train.grad_accum=2",
                 "parallel.deepspeed_config=configs/deepspeed/zero0.json")


@pytest.mark.parametrize("ds_config", ["zero1", "zero3", "zero2_offload"])
def test_zero_stage_equals_dense(dense, launch_training, tmp_path, ds_config):
    got = train(launch_training, tmp_path, 2, f"parallel.deepspeed_config=configs/deepspeed/{ds_config}.json")
    assert_same_trajectory(got, dense)


TP2_DP2 = ("parallel.tensor_parallel=2", "parallel.deepspeed_config=configs/deepspeed/zero2.json")


@pytest.fixture(scope="module")
def tp2_dp2(launch_training, tmp_path_factory):
    return train(launch_training, tmp_path_factory.mktemp("tp2dp2"), 4, *TP2_DP2)


def test_zero2_times_tp2_equals_dense(dense, tp2_dp2):
    assert_same_trajectory(tp2_dp2, dense)


def test_tp2_dp2_checkpoint_round_trip(tp2_dp2, launch_training, tmp_path):
    """Stop at step 2 with a TP x DP x ZeRO-2 checkpoint, resume: the same run, bit for bit."""
    first = launch_training(tmp_path, nproc=4, extra=(*COMMON, *TP2_DP2, "train.exit_after=2"),
                            timeout=400)
    assert first.returncode == 0, first.stderr[-4000:]
    assert len(list((tmp_path / "checkpoints" / "step_00000002").glob("*optim_states.pt"))) == 4
    resumed = launch_training(tmp_path, nproc=4, extra=(*COMMON, *TP2_DP2), resume=True,
                              timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = read_metrics(tmp_path)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, tp2_dp2):
        assert a["train/loss"] == b["train/loss"] and a["train/grad_norm"] == b["train/grad_norm"]
