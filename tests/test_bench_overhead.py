"""bench overhead: the counter sees host syncs where they are (and not in host tensors), and the
real training loop syncs nowhere inside a step: ZeRO-0 in fp32, ZeRO-1/2 in bf16, ar and janus."""
import torch

from janus_pretrain.bench.counting import StepCounter

TINY = ["--model", "tiny", "--width", "32", "--steps", "1", "--src-len", "16", "--tgt-len", "16",
        "--batch", "2", "--no-bart"]


def test_counter_tells_device_reads_from_host_reads():
    device = torch.ones(3)
    host = torch.arange(3)
    counter = StepCounter()
    with counter:
        counter.mark_host(host)
        with counter.in_phase("loss"):
            float(device.sum())          # _local_scalar_dense
            device[device > 0].sum()     # boolean index
            (device * 2).tolist()        # tolist
            torch.nonzero(device)        # nonzero
        int(host.sum())                  # host tensors are the host's to read
        host.tolist()
    totals = counter.totals()
    assert totals["syncs"] == {"loss": 4}, totals["sync_sites"]
    assert totals["ops"]["loss"] >= 6 and "loop" not in totals["ops"]


def run(tmp_path, *extra) -> dict:
    from janus_pretrain.bench import overhead

    return overhead.main([*TINY, *extra, "--json", str(tmp_path / "overhead.json")])["rows"]


def test_training_loop_steps_without_host_syncs(single_process, tmp_path):
    # ZeRO-1 and 2 share DeepSpeed's optimizer (stage_1_and_2.py): janus at ZeRO-2 stands for both.
    # The loop rows run DeepSpeed's GPU branches: with overlap_comm, its end of backward
    # synchronized the device there (train/engine.py `_order_streams_without_sync`).
    fp32 = run(tmp_path, "--precision", "fp32", "--stages", "0")
    bf16 = run(tmp_path, "--precision", "bf16", "--stages", "2", "--objectives", "janus")
    rows = {f"{name} fp32": row for name, row in fp32.items()}
    rows.update({f"{name} bf16": row for name, row in bf16.items()})
    assert sorted(name for name in rows if name.startswith("loop")) == [
        "loop ar zero0 fp32", "loop janus zero0 fp32", "loop janus zero2 bf16"]
    for name, row in rows.items():
        assert row["syncs_total"] == 0, (name, row["sync_sites"])
        assert row["ops"]["forward"] > 0 and row["ops"]["backward"] > 0
    # ZeRO-0 adds a few kernels per step (DeepSpeed, guard, metrics), none per parameter
    for name in ("ar", "janus"):
        loop, bare = rows[f"loop {name} zero0 fp32"], rows[f"bare {name} fp32"]
        assert loop["ops_total"] - bare["ops_total"] <= 50, (loop["ops"], bare["ops"])
    # ZeRO-2's optimizer step: its gradient norm is one multi-tensor norm (DeepSpeed's took a
    # cast and a norm kernel per parameter: 2 per parameter over a fixed ~90 here)
    from janus_pretrain.config import load_config
    from janus_pretrain.model import JanusModel

    model = load_config(None, ["model=tiny", "data.max_source_len=16", "data.max_target_len=16"]).model
    params = len(list(JanusModel(model, 1000, 0).parameters()))
    assert rows["loop janus zero2 bf16"]["ops"]["optimizer"] < 1.5 * params, rows["loop janus zero2 bf16"]


def test_pretraining_plan_shapes(shards_dir, tokenizer_path):
    """`bench overhead --shapes-only --pretrain`: the pretraining run's own loader (packed blocks,
    denoising); bucketing leaves fewer distinct shapes than the run's unbucketed plan has, and
    never one that first appears in the second epoch."""
    from janus_pretrain.bench import overhead

    args = overhead.parse_args(["--shapes-only", "--pretrain", "configs/pretrain/demo.yaml",
                                "--set", f"data.train={shards_dir}",
                                f"data.tokenizer={tokenizer_path}"])
    plain, bucketed = (overhead.pretrain_shapes(args, b) for b in (False, True))
    assert plain["batches"] == bucketed["batches"] > 20
    assert 1 <= bucketed["distinct"] < plain["distinct"] and bucketed["new_after_epoch_1"] == 0
    assert bucketed["pad_fraction"] >= plain["pad_fraction"]
