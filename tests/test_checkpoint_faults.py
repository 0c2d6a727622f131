"""A corrupt or truncated checkpoint file is one error line naming it, in every command that
loads weights; `select` skips it."""
from __future__ import annotations

import pytest

from janus_pretrain.errors import JanusError
from conftest import damage, write_checkpoint


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_corrupt_checkpoint_is_named_by_every_loader(tiny_model_source, tmp_path, how):
    from conftest import REPO
    from janus_pretrain.checkpoint import consolidated, weights
    from janus_pretrain.config import load_config
    from janus_pretrain.generate.api import Generator
    from janus_pretrain.model import JanusModel
    from janus_pretrain.tokenizer import PAD, load_tokenizer
    from janus_pretrain.checkpoint.init import init_weights

    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", source, model)
    single = consolidated.write(tmp_path / "model.safetensors", weights.model_tensors(model),
                                {}, load_tokenizer(source), "test")
    damaged = ckpt / "mp_rank_00_model_states.pt"
    damage(damaged, how)
    damage(single, how)
    tok = load_tokenizer(source)
    cfg = load_config(REPO / "configs" / "pretrain" / "demo.yaml", ["model=tiny"])
    loads = {  # generate, evaluate, select and distill load through Generator.from_checkpoint
        "generate": lambda: Generator.from_checkpoint(tmp_path / "run"),
        "consolidate": lambda: weights.consolidate(ckpt, tmp_path / "out.safetensors"),
        "init-from": lambda: init_weights(JanusModel(cfg.model, tok.vocab_size, PAD),
                                          str(ckpt), tok),
    }
    for command, load in loads.items():
        with pytest.raises(JanusError) as e:
            load()
        assert str(damaged) in str(e.value) and "\n" not in str(e.value), (command, e.value)
    if how == "truncated":  # a flipped byte in a safetensors file may well load (no checksum)
        with pytest.raises(JanusError, match=str(single)):
            Generator.from_consolidated(single)
        (ckpt / "COMPLETE").unlink()  # no manifest to check: torch's failure is named
        with pytest.raises(JanusError, match=f"{damaged} cannot be read: it is truncated"):
            weights.tp_rank_weights(ckpt, 0)


def test_select_skips_a_corrupt_checkpoint(tiny_model_source, tmp_path, capsys):
    from finetune.checkpoints import select_best
    from finetune.tasks import get_task

    source, model = tiny_model_source
    ckpts = tmp_path / "run" / "checkpoints"
    write_checkpoint(ckpts / "step_00000001", source, model)
    damage(write_checkpoint(ckpts / "step_00000002", source, model) / "mp_rank_00_model_states.pt",
           "truncated")
    _, scores = select_best(get_task("multi30k_ende"), tmp_path / "run", valid_size=2)
    assert list(scores) == ["step_00000001"]
    assert f"{ckpts / 'step_00000002' / 'mp_rank_00_model_states.pt'} is corrupt" in \
        capsys.readouterr().err


def test_generate_on_a_truncated_checkpoint_is_one_error_line(tiny_model_source, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, child_env

    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "step_00000001", source, model)
    damage(ckpt / "mp_rank_00_model_states.pt", "truncated")
    result = subprocess.run([sys.executable, "-m", "janus_pretrain.cli", "generate", "--checkpoint",
                             str(ckpt)], cwd=REPO, env=child_env(), input="a source\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: checkpoint: {ckpt / 'mp_rank_00_model_states.pt'} is corrupt (its sha256 differs "
        f"from the one {ckpt / 'COMPLETE'} recorded when it was written)"], result.stderr[-2000:]


def test_consolidate_to_an_unwritable_path_is_one_error(tmp_path, tokenizer_path):
    import torch

    from janus_pretrain.checkpoint import consolidated
    from janus_pretrain.tokenizer import load_tokenizer

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for target in (tmp_path, a_file / "model.safetensors"):  # a directory; under a file
        with pytest.raises(JanusError, match=f"cannot write {target}: ") as e:
            consolidated.write(target, {"w": torch.zeros(2)}, {}, load_tokenizer(tokenizer_path), "t")
        assert "\n" not in str(e.value)


def test_a_finished_run_resumed_names_its_checkpoint(tiny_model_source, tmp_path, monkeypatch):
    from janus_pretrain.checkpoint import store

    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004", source, model)
    monkeypatch.setattr(store, "load", lambda engine, path, tokenizer: {"step": 4})
    checkpointer = store.Checkpointer(None, tmp_path / "run", None, 2, 3)
    assert checkpointer.start(resume=True, fallback=False) == {"step": 4}
    assert checkpointer.last == ckpt  # what `train` reports when no step is left to run


def test_a_corrupt_checkpoint_is_set_aside_and_never_chosen_again(tiny_model_source, tmp_path,
                                                                   capsys):
    """After a fallback resume, a plain --resume (a requeue), generate and retention no longer
    meet the corrupt checkpoint; its files are kept under a name no step directory has."""
    from janus_pretrain.checkpoint import store, weights

    source, model = tiny_model_source
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(root / f"step_{step:08d}", source, model)
    damage(root / "step_00000003" / "mp_rank_00_model_states.pt", "flipped")
    assert store.find_resumable(root, fallback=True) == root / "step_00000002"
    assert "set aside as step_00000003.corrupt" in capsys.readouterr().err
    assert (root / "step_00000003.corrupt" / "mp_rank_00_model_states.pt").is_file()
    assert store.find_resumable(root, fallback=False) == root / "step_00000002"
    assert weights.resolve(tmp_path / "run") == root / "step_00000002"
    store._prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003.corrupt"]


def test_a_manifest_that_does_not_parse_is_a_corrupt_checkpoint(tiny_model_source, tmp_path,
                                                                 capsys):
    from janus_pretrain.checkpoint import store, weights
    from janus_pretrain.generate.api import Generator

    source, model = tiny_model_source
    root = tmp_path / "run" / "checkpoints"
    ckpt = write_checkpoint(root / "step_00000001", source, model)
    (ckpt / "COMPLETE").write_text('{"sha256": {"janus.json": ')
    states = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # weights torch would load unchecked
    states.write_bytes(bytes(data))
    with pytest.raises(JanusError, match=f"^checkpoint: {ckpt / 'COMPLETE'} is corrupt .*"
                                         f"cannot be verified"):
        Generator.from_checkpoint(tmp_path / "run")
    with pytest.raises(JanusError, match=f"^checkpoint: {ckpt / 'COMPLETE'} is corrupt"):
        store.find_resumable(root, fallback=False)

    # A newer step directory without its marker is named, not skipped without a word.
    write_checkpoint(root / "step_00000000", source, model)
    (root / "step_00000001" / "COMPLETE").unlink()
    capsys.readouterr()
    assert weights.resolve(tmp_path / "run") == root / "step_00000000"
    assert capsys.readouterr().err == (f"warning: checkpoint: ignoring {root / 'step_00000001'}: "
                                       f"no COMPLETE marker (its save was interrupted)\n")
    with pytest.raises(JanusError, match="step_00000001 has no COMPLETE marker: its save was "
                                         "interrupted"):
        weights.resolve(root / "step_00000001")


@pytest.mark.parametrize("error", ["ENOSPC", "iostream"])
def test_a_full_disk_while_saving_is_one_line_and_frees_the_partial_save(tiny_model_source,
                                                                          tmp_path, monkeypatch,
                                                                          error):
    """torch's writer reports a full disk without an errno ("basic_ios::clear: iostream
    error"): then the free space decides."""
    import errno

    from janus_pretrain import disk_space
    from janus_pretrain.checkpoint import store

    source, model = tiny_model_source
    root = tmp_path / "run" / "checkpoints"
    previous = write_checkpoint(root / "step_00000002", source, model)

    def fills_the_disk(engine, root_, step, *args, **kwargs):  # a save cut short by the disk
        partial = root / f".tmp-step_{step:08d}"
        partial.mkdir()
        (partial / "mp_rank_00_model_states.pt").write_bytes(bytes(1000))
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(disk_space, "free_bytes", lambda path: 500)
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(store, "save", fills_the_disk)
    checkpointer = store.Checkpointer(None, tmp_path / "run", None, 2, 3)
    with pytest.raises(JanusError) as e:
        checkpointer.after_step(4, False, dict)
    needed = disk_space.size(disk_space.bytes_under(previous))
    assert str(e.value).startswith(f"checkpoint: no space left on the device to write "
                                   f"{root / 'step_00000004'}: it needs about {needed}, ")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=64", "model.hidden_size=128, this run has model.hidden_size=64"),
    ("model.decoder_layers=3", "model.decoder_layers=2, this run has model.decoder_layers=3"),
    ("objective.kind=bang", "objective.kind=janus, this run has objective.kind=bang"),
    ("model.dropout=0.3", None),  # regularisation may change on resume
    ("data.train=/other/shards", "warning"),
])
def test_a_resume_names_the_first_model_or_objective_key_it_changes(
        tiny_model_source, tmp_path, monkeypatch, capsys, override, message):
    import json

    from conftest import REPO
    from janus_pretrain.checkpoint import store
    from janus_pretrain.config import load_config, to_dict

    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004", source, model)
    saved = json.loads((ckpt / "janus.json").read_text())["config"]
    assert (saved["model"]["hidden_size"], saved["model"]["decoder_layers"]) == (128, 2)
    run = to_dict(load_config(REPO / "configs" / "pretrain" / "demo.yaml", [
        "model=tiny", "data.max_source_len=32", "data.max_target_len=32", override]))
    monkeypatch.setattr(store, "load", lambda engine, path, tokenizer: {"step": 4})
    checkpointer = store.Checkpointer(None, tmp_path / "run", None, 2, 3)
    if message in (None, "warning"):
        assert checkpointer.start(resume=True, fallback=False, config=run) == {"step": 4}
        err = capsys.readouterr().err
        assert err == ("" if message is None else
                       f"warning: checkpoint: {ckpt} was trained on data.train={saved['data']['train']}, "
                       f"this run reads /other/shards: the loader continues at its saved epoch "
                       f"and batch index in the new data\n")
        return
    with pytest.raises(JanusError, match=f"^checkpoint: {ckpt} was trained with {message}: resume "
                                         f"with the saved value, or start a new train.output_dir"):
        checkpointer.start(resume=True, fallback=False, config=run)
