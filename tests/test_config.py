"""Run configuration: presets, typed overrides, and one-line errors that name the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from janus_pretrain.config import CONFIG_ROOT, RunConfig, from_dict, load_config, to_dict
from janus_pretrain.errors import JanusError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def test_demo_uses_tiny_preset():
    cfg = load_config(DEMO)
    assert isinstance(cfg, RunConfig)
    tiny = yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text())
    for key, value in tiny.items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model.hidden_size == 128 and cfg.model.num_heads == 4
    demo = yaml.safe_load(DEMO.read_text())
    assert demo["model"] == "tiny"
    assert cfg.train.steps == demo["train"]["steps"]
    assert cfg.data.train == demo["data"]["train"]
    assert cfg.parallel.deepspeed_config == demo["parallel"]["deepspeed_config"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_pretrain_config_loads(path):
    """Each resolves as shipped (presets, typed keys, checks); the fine-tuning presets need a
    task's lengths first (janus-finetune train sets them)."""
    assert isinstance(load_config(path), RunConfig)


def test_overrides_apply_and_are_typed():
    cfg = load_config(DEMO, ["train.steps=7", "model.hidden_size=256", "optim.lr=0.5",
                             "train.wandb_name=null"])
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.model.hidden_size == 256 and type(cfg.model.hidden_size) is int
    assert cfg.model.num_heads == 4  # the rest of the preset stays
    assert cfg.optim.lr == 0.5 and type(cfg.optim.lr) is float
    assert cfg.train.wandb_name is None


def test_model_preset_override():
    cfg = load_config(DEMO, ["model=base", "train.steps=7"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.encoder_layers) == (768, 12, 6)
    assert cfg.train.steps == 7
    # A preset given as an override, then a field of it overridden.
    cfg = load_config(DEMO, ["model=base", "model.hidden_size=384"])
    assert cfg.model.hidden_size == 384 and cfg.model.ffn_hidden_size == 3072
    cfg = load_config(DEMO, ["model=large"])
    assert cfg.model.hidden_size == 1024 and cfg.model.num_heads == 16
    cfg = load_config(DEMO, ["model=bart_base"])
    assert (cfg.model.arch, cfg.model.hidden_size, cfg.model.activation_dropout) == ("bart", 768, 0.1)


def test_round_trip_dict():
    cfg = load_config(DEMO, ["train.steps=7"])
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("overrides,key", [
    (["model.hiden_size=3"], "model.hiden_size"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["model.hidden_size=100", "model.num_heads=12"], "model.hidden_size"),
    (["model=base", "model.hidden_size=100"], "model.hidden_size"),
    (["model=nope"], "model"),
    (["parallel.precision=fp8"], "parallel.precision"),
    (["model.arch=gpt"], "model.arch"),
    (["model.activation_dropout=1.0"], "model.activation_dropout"),
    (["optim.decay=step"], "optim.decay"),
    (["objective.masking=random"], "objective.masking"),
    (["train.steps=0"], "train.steps"),
    (["parallel.tensor_parallel=3"], "parallel.tensor_parallel"),
    (["nosuch.key=1"], "nosuch"),
    (["train.steps"], "train.steps"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(JanusError) as info:
        load_config(DEMO, overrides)
    msg = str(info.value)
    assert key in msg
    assert "\n" not in msg
    assert msg.startswith("config:")


def test_unknown_preset_lists_known():
    with pytest.raises(JanusError, match="nope") as info:
        load_config(DEMO, ["model=nope"])
    assert "tiny" in str(info.value)


def test_missing_required_values():
    # A model or objective needs no data; training does (train() checks first).
    with pytest.raises(JanusError, match="required value is missing") as info:
        load_config(None, []).check_data()
    assert "data." in str(info.value)
    with pytest.raises(JanusError, match="data.train") as info:
        load_config(None, ["data.tokenizer=tok.model"]).check_data()
    assert "missing" in str(info.value)
    cfg = load_config(None, ["data.tokenizer=tok.model", "data.train=shards"])
    cfg.check_data()
    assert cfg.data.train == "shards" and cfg.model.hidden_size == 768
    with pytest.raises(JanusError, match="data.source"):
        load_config(CONFIG_ROOT / "finetune" / "ar.yaml",
                    ["data.tokenizer=tok.model", "data.train=shards"]).check_data()


def test_missing_config_file(tmp_path):
    with pytest.raises(JanusError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("content, overrides, message", [
    ("", [], "{path} holds no settings (it is empty or only comments)"),
    ("# a comment\n\n# only\n", [], "{path} holds no settings (it is empty or only comments)"),
    ("train: 5\n", [], "train: must be a mapping of settings (train.<key>: value), not 5"),
    ("objective:\n  weights: 3\n", [],
     "objective.weights: must be a mapping of settings (objective.weights.<key>: value), not 3"),
    ("model: tiny\n", ["train=5"], "train: must be a mapping of settings (train.<key>: value), not 5"),
    ("model: base\ntrain:\n", ["data.train=x"], None),  # an empty section: no settings
])
def test_config_file_problems_name_the_file_or_key(tmp_path, content, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    if message is None:
        assert load_config(path, overrides).train.steps == 1000
        return
    with pytest.raises(JanusError) as e:
        load_config(path, overrides)
    assert str(e.value) == "config: " + message.format(path=path)


def test_a_directory_for_a_config_says_so(tmp_path):
    with pytest.raises(JanusError, match=f"^config: {tmp_path} is a directory, not a YAML file$"):
        load_config(tmp_path)


def _train_cli(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "janus_pretrain", "train", "--config", "configs/pretrain/demo.yaml",
         *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and len(lines[0]) > len("error:")
    for needle in needles:
        assert needle in lines[0]


def test_cli_unknown_key():
    _assert_one_line_error(_train_cli("model.hiden_size=3"), "model.hiden_size")


def test_cli_missing_data(tokenizer_path, tmp_path):
    out = tmp_path / "run"
    proc = _train_cli("data.train=/nonexistent/dir", f"data.tokenizer={tokenizer_path}",
                      f"train.output_dir={out}")
    _assert_one_line_error(proc, "/nonexistent/dir")
    assert not out.exists()
