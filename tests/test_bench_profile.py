"""`python -m janus_pretrain.bench profile`: one profiled step of each system at tiny shapes, whose
category shares must cover the op time exactly once, and the category map's enclosing rule."""
import json
from types import SimpleNamespace

import pytest


def test_bench_profile_tiny(single_process, tmp_path, capsys):
    pytest.importorskip("transformers")
    from janus_pretrain.bench import profile

    out = tmp_path / "profile.json"
    profile.main(["--model", "tiny", "--batch", "2", "--src-len", "16", "--tgt-len", "16",
                  "--warmup", "1", "--steps", "1", "--top", "5", "--json", str(out)])
    systems = json.loads(out.read_text())["systems"]
    assert list(systems) == ["ar", "janus", "bart"]
    for name, r in systems.items():
        assert abs(sum(r["shares"].values()) - 1) < 1e-6, (name, r["shares"])
        assert r["shares"]["matmul"] > 0, (name, r["shares"])
        # Every op's self time is in exactly one category.
        assert r["op_ms_per_step"] == pytest.approx(sum(r["ops_ms_per_step"].values()), rel=1e-9)
        assert 0 < r["op_ms_per_step"] <= r["wall_ms_per_step"] * 1.01, (name, r)
    printed = capsys.readouterr().out
    assert "| op (self ms/step) | ar | janus | bart |" in printed
    assert sum(line.startswith("| `") for line in printed.splitlines()) == 5


def test_category_enclosing_rule():
    from janus_pretrain.bench.profile import category

    def chain(*names):  # outermost first -> the innermost event
        event = None
        for name in names:
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    assert category(chain("aten::scaled_dot_product_attention", "aten::_softmax")) == "attention"
    assert category(chain("_VocabTermsBackward", "aten::mul")) == "loss"
    assert category(chain("aten::cross_entropy_loss", "aten::_log_softmax")) == "loss"
    assert category(chain("Optimizer.step#AdamW.step", "aten::_fused_adamw_")) == "optimizer"
    assert category(chain("aten::linear", "aten::addmm")) == "matmul"
    assert category(chain("aten::gelu_backward")) == "elementwise"
    assert category(chain("aten::zeros", "aten::zero_", "aten::fill_")) == "copies"
    assert category(chain("aten::view")) == "other"
    assert category(chain("aten::addmm")) == "matmul"
    assert category(chain("aten::add_")) == "elementwise"
    assert category(chain("aten::expand")) == "other"
