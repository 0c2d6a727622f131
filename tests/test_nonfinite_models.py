"""A diverged model is never a result: weights holding NaN or inf are refused when loaded, a
model whose weights are finite but whose log-probabilities are not (optim.lr=1e30) is one line in
every decoding mode, and neither becomes `best`, in the loop or by `select`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import write_checkpoint
from janus_pretrain.errors import JanusError, NonFiniteOutput


def blown_up(model: torch.nn.Module) -> torch.nn.Module:
    """What one update at optim.lr=1e30 leaves: finite weights of size ~1e29, NaN activations."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.sign(torch.randn_like(p)) * 2e29)
    return model


def test_nonfinite_weights_are_refused_and_recorded(tiny_model_source, tmp_path):
    from janus_pretrain.checkpoint import consolidated, finite, weights
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.tokenizer import load_tokenizer

    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "step_00000001", source, model, poison=True)
    assert finite.recorded(ckpt) is False
    assert finite.recorded(write_checkpoint(tmp_path / "step_00000002", source, model)) is True
    with pytest.raises(JanusError, match=f"^checkpoint: {ckpt} holds non-finite weights"):
        Generator.from_checkpoint(ckpt)
    tensors = weights.model_tensors(model)
    next(iter(tensors.values())).view(-1)[0] = float("nan")  # a safetensors file has no checksum
    single = consolidated.write(tmp_path / "nan.safetensors", tensors, json.loads(
        (source / "janus.json").read_text())["config"], load_tokenizer(source), "test")
    with pytest.raises(JanusError, match="holds non-finite weights"):
        Generator.from_consolidated(single)


@pytest.mark.parametrize("options", [dict(mode="ar", beam=5), dict(mode="ar", beam=1),
                                     dict(mode="nar", iterations=2), dict(mode="spec")])
def test_nan_log_probabilities_are_one_line_in_every_mode(tiny_model_source, options):
    from janus_pretrain.config import from_dict
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.tokenizer import load_tokenizer

    source, model = tiny_model_source
    cfg = from_dict(json.loads((source / "janus.json").read_text())["config"])
    gen = Generator(blown_up(model), load_tokenizer(source), cfg, torch.device("cpu"))
    with pytest.raises(NonFiniteOutput, match=r"^generate: the model's log-probabilities are NaN "
                                              r"or inf for 2 of 2 sources"):
        gen.generate(["a source", "another one"], max_len=4, **options)


def test_select_never_picks_a_diverged_checkpoint(tiny_model_source, tmp_path, capsys):
    from finetune.checkpoints import select_best
    from finetune.tasks import get_task

    source, model = tiny_model_source
    ckpts = tmp_path / "run" / "checkpoints"
    write_checkpoint(ckpts / "step_00000001", source, model)
    write_checkpoint(ckpts / "step_00000003", source, model, poison=True)
    write_checkpoint(ckpts / "step_00000002", source, blown_up(model))
    _, scores = select_best(get_task("multi30k_ende"), tmp_path / "run", valid_size=2)
    assert list(scores) == ["step_00000001"]
    err = capsys.readouterr().err
    assert "skipping step_00000002: generate: the model's log-probabilities are NaN" in err
    assert "skipping step_00000003: checkpoint: " in err


class Engine:
    """What the Validator uses of a DeepSpeed engine."""

    def __init__(self, module):
        self.module = module

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


class Logger:
    def __init__(self):
        self.lines = []

    def write_eval(self, step, metrics):
        self.lines.append((step, metrics))


@pytest.mark.parametrize("case", ["nan log-probs", "nan metric", "nan weights recorded", "finite"])
def test_in_loop_validation_never_makes_a_nonfinite_step_best(tiny_model_source, tmp_path,
                                                             capsys, case):
    from janus_pretrain.config import from_dict
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.tokenizer import load_tokenizer
    from janus_pretrain.train.validation import Validator

    source, model = tiny_model_source
    cfg = from_dict(json.loads((source / "janus.json").read_text())["config"])
    root = tmp_path / "run" / "checkpoints"
    if case == "nan log-probs":
        blown_up(model)
    ckpt = write_checkpoint(root / "step_00000002", source, model,
                            poison=case == "nan weights recorded")

    def task_eval(module):  # as finetune/live_eval.py: decode the live model, score it
        hyps = Generator(module, load_tokenizer(source), cfg, torch.device("cpu")).generate(
            ["a source"], mode="ar", beam=1, max_len=4)
        return {"eval/task/bleu/ar_greedy": float("nan") if case == "nan metric" else len(hyps)}

    validator = Validator(Engine(model), None, None, 0, 2, root, set(), torch.device("cpu"),
                          task_eval)
    validator.after_step(2, ckpt, Logger())
    if case == "finite":
        assert (root / "best" / "COMPLETE").is_file()
        assert validator.best == {"metric": "eval/task/bleu/ar_greedy", "score": 1, "step": 2}
    else:
        assert not (root / "best").exists() and validator.best is None
        assert "validation: step 2 " in capsys.readouterr().out
