"""The training benchmark's pieces: the analytic FLOP count against torch's own FLOP counter on a
tiny model, the collator's list of masked positions against its mask, and a one-step smoke run
of `python -m janus_pretrain.bench train` that must print every row, and one on a prepared task
whose JSON table must hold every key and show token-budget batches padding less than fixed ones."""
import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from janus_pretrain.config import ModelConfig, ObjectiveConfig
from janus_pretrain.model import JanusModel
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import PAD

VOCAB = 256
CFG = ModelConfig(encoder_layers=2, decoder_layers=3, hidden_size=32, ffn_hidden_size=48,
                  num_heads=4, max_positions=64, dropout=0.0, attention_dropout=0.0)


def batch(objective, b=3, src=11, tgt=9):
    rng = np.random.default_rng(0)
    return objective.collate([(rng.integers(5, VOCAB, src - 2), rng.integers(5, VOCAB, tgt - 2))
                              for _ in range(b)], rng)


@pytest.mark.parametrize("ar,nar", [(True, False), (False, True), (True, True)])
def test_step_flops_match_torch_flop_counter(single_process, ar, nar):
    objective = JanusObjective(ObjectiveConfig(masking="span"), 16, 16, CFG.length_classes)
    objective.needs_ar, objective.needs_nar, objective.needs_length = ar, nar, False
    host = batch(objective)
    torch.manual_seed(0)
    model = JanusModel(CFG, VOCAB, PAD)
    prep = objective.prepare(host)
    # The math backend: torch's counter does not count the CPU flash-attention kernel.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**prep.model_inputs)
    # The count is of forward + backward, as 3 x forward.
    assert objective.flops(host, CFG, model.padded_vocab_size) == 3 * counter.get_total_flops()


def test_collated_masked_positions_list_the_mask():
    objective = JanusObjective(ObjectiveConfig(masking="span"), 32, 32, 256)
    rng = np.random.default_rng(1)
    host = objective.collate([(rng.integers(5, 50, 4), rng.integers(5, 50, n)) for n in (3, 17, 9)],
                             rng)
    pos = host["masked_pos"]
    assert pos.shape[1] == int(host["masked"].sum(1).max())
    for row, positions in zip(host["masked"], pos):
        expected = torch.nonzero(row).flatten().tolist()
        assert positions.tolist() == expected + [-1] * (pos.shape[1] - len(expected))


def test_bench_train_smoke(single_process, capsys):
    pytest.importorskip("transformers")
    from janus_pretrain.bench import train

    train.main(["--model", "tiny", "--batch", "2", "--src-len", "12", "--tgt-len", "12",
                "--vocab", "512", "--warmup", "0", "--steps", "1"])
    out = capsys.readouterr().out
    for precision, rows in (("fp32", ("ar", "janus", "bart")), ("bf16", ("ar", "janus", "bart")),
                            ("autocast", ("ar", "bart"))):
        for row in rows:
            assert any(line.split()[:2] == [precision, row] for line in out.splitlines()), (row, out)
        assert any(line.split()[:2] == [precision, "ratios:"] for line in out.splitlines()), out
    assert "janus/ar step time" in out and "bart/ar step time" in out


def test_bench_train_task_json(single_process, tmp_path, capsys):
    from janus_pretrain.bench import train

    from finetune.pairs import prepare_pairs
    from finetune.tasks import get_task

    data = tmp_path / "pairs"
    prepare_pairs(get_task("multi30k_ende"), data, vocab_size=800, max_pairs=1000)

    def run(*batching: str) -> dict:
        out = tmp_path / f"{'-'.join(batching)}.json"
        train.main(["--model", "tiny", "--data", str(data), "--warmup", "1",
                    "--steps", "1", "--precisions", "fp32", "--no-bart", "--json", str(out),
                    *batching])
        return json.loads(out.read_text())

    budget, fixed = run("--max-tokens", "512"), run("--batch", "32")
    assert "pad fraction: target" in capsys.readouterr().out
    for table in (budget, fixed):
        assert {"rows", "janus_over_ar", "pad_fraction", "loop_over_step"} <= table.keys()
        assert [(r["objective"], r["precision"]) for r in table["rows"]] == [("ar", "fp32"),
                                                                             ("janus", "fp32")]
        for row in table["rows"]:
            assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
        assert table["janus_over_ar"]["fp32"] > 0
        assert table["loop_over_step"].keys() == {"ar", "janus"}
        assert all(0 < r for r in table["loop_over_step"].values())
        assert all(0 <= f <= 1 for f in table["pad_fraction"].values())
    for side in ("target", "source"):
        assert budget["pad_fraction"][side] < fixed["pad_fraction"][side], (budget, fixed)


def test_rounds_pool_every_step_of_a_row():
    from janus_pretrain.bench.train import pooled

    first = {"times": [3.0, 1.0, 2.0], "seconds": 2.0, "flops": 7.0}
    both = pooled(pooled(None, first), {"times": [10.0, 11.0, 12.0], "seconds": 11.0, "flops": 7.0})
    assert both["times"] == [3.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert both["seconds"] == 6.5 and both["flops"] == 7.0
