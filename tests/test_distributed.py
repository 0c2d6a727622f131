"""Multi-process training on gloo: ZeRO-2 follows the ZeRO-0 trajectory, a resumed run equals an
uninterrupted one bit for bit, and a checkpoint refuses a foreign tokenizer."""
import pytest
from conftest import read_metrics

pytestmark = pytest.mark.distributed

STEPS = 5
EXACT = ("train/loss", "train/ce_ar", "train/ce_nar", "train/ce_aux", "train/kl_ar_aux",
         "train/kl_nar_aux", "train/lr", "train/grad_norm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {}


def trained(runs, launch_training, tmp_path_factory, name, *extra):
    """Each distinct run once per module (the tests share them)."""
    if name not in runs:
        out = tmp_path_factory.mktemp(name)
        result = launch_training(out, nproc=2, extra=(f"train.steps={STEPS}", *extra))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = out
    return runs[name]


def test_zero2_loss_trajectory_equals_zero0(runs, launch_training, tmp_path_factory):
    z0 = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero0",
                              "parallel.deepspeed_config=configs/deepspeed/zero0.json"))
    z2 = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero2",
                              "parallel.deepspeed_config=configs/deepspeed/zero2.json"))
    assert [m["step"] for m in z0] == list(range(1, STEPS + 1)) == [m["step"] for m in z2]
    for a, b in zip(z0, z2):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5), (a, b)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    # The runs trained: the loss moved (a trajectory, not a constant).
    assert z0[-1]["train/loss"] < z0[0]["train/loss"]


def test_resume_equals_uninterrupted_run(runs, launch_training, tmp_path_factory):
    full = read_metrics(trained(runs, launch_training, tmp_path_factory, "zero2",
                                "parallel.deepspeed_config=configs/deepspeed/zero2.json"))
    out = tmp_path_factory.mktemp("resumed")
    common = (f"train.steps={STEPS}", "parallel.deepspeed_config=configs/deepspeed/zero2.json")
    first = launch_training(out, nproc=2, extra=(*common, "train.exit_after=2"))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    second = launch_training(out, nproc=2, extra=common, resume=True)
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        for key in EXACT:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    runs["resumed"] = out


def test_checkpoint_rejects_another_tokenizer(runs, launch_training, tmp_path_factory,
                                              corpus_file):
    from janus_pretrain.data.prepare import prepare
    from janus_pretrain.tokenizer import train_tokenizer

    out = trained(runs, launch_training, tmp_path_factory, "zero0",
                  "parallel.deepspeed_config=configs/deepspeed/zero0.json")
    other = tmp_path_factory.mktemp("other_tok")
    train_tokenizer([corpus_file], other / "tok.model", vocab_size=900)
    prepare([str(corpus_file)], str(other / "tok.model"), other / "shards", num_workers=1)
    result = launch_training(out, nproc=1, resume=True, extra=(
        f"train.steps={STEPS + 1}", f"data.tokenizer={other / 'tok.model'}",
        f"data.train={other / 'shards'}"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint:"), result.stderr[-3000:]
    assert "tokenizer" in lines[0]
