"""Sharp edges a new user hits (issue 17): another tokenizer of the same size, decoding a mode
the checkpoint never trained, bad text on generate's input, long and empty sources, and errors
that must be the only line printed."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env
from janus_pretrain.config import load_config
from janus_pretrain.errors import JanusError
from janus_pretrain.generate.api import Generator
from janus_pretrain.generate.cli import read_sources
from janus_pretrain.model import JanusModel
from janus_pretrain.tokenizer import PAD, load_tokenizer, train_tokenizer
from janus_pretrain.checkpoint.store import check_tokenizer
from janus_pretrain.data.corpora import open_corpus

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


@pytest.fixture(scope="module")
def other_tokenizer(corpus_file, tokenizer_path, tmp_path_factory):
    """Trained on the same text to the same size as the session's, but BPE: other pieces."""
    size = load_tokenizer(tokenizer_path).vocab_size
    return train_tokenizer([corpus_file], tmp_path_factory.mktemp("bpe") / "bpe.model", size,
                           model_type="bpe")


def test_shards_refuse_another_tokenizer_of_the_same_size(shards_dir, tokenizer_path,
                                                          other_tokenizer, tmp_path):
    ours = load_tokenizer(tokenizer_path)
    assert other_tokenizer.vocab_size == ours.vocab_size
    open_corpus(str(shards_dir), ours)
    with pytest.raises(JanusError, match="same size, different pieces") as e:
        open_corpus(str(shards_dir), other_tokenizer)
    assert str(shards_dir / "tokenizer.model") in str(e.value)
    assert str(other_tokenizer.path) in str(e.value)
    # Shards prepared before meta.json recorded the identity keep the size check only.
    legacy = tmp_path / "legacy"
    shutil.copytree(shards_dir, legacy)
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["tokenizer_identity"]
    (legacy / "meta.json").write_text(json.dumps(meta))
    open_corpus(str(legacy), other_tokenizer)


def test_checkpoint_tokenizer_is_compared_by_pieces(tokenizer_path, other_tokenizer, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    shutil.copyfile(tokenizer_path, ckpt / "tokenizer.model")
    with pytest.raises(JanusError) as e:
        check_tokenizer(ckpt, other_tokenizer)
    assert str(ckpt / "tokenizer.model") in str(e.value)
    assert str(other_tokenizer.path) in str(e.value)
    # The same pieces in a file that records other trainer options: the same tokenizer.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    proto.trainer_spec.input_sentence_size += 1
    rewritten = tmp_path / "rewritten.model"
    rewritten.write_bytes(proto.SerializeToString())
    assert rewritten.read_bytes() != Path(tokenizer_path).read_bytes()
    check_tokenizer(ckpt, load_tokenizer(rewritten))


def generator(tokenizer_path, *weights: str) -> Generator:
    """A randomly initialised tiny model behind a Generator whose config has these weights."""
    cfg = load_config(DEMO, ["model=tiny", "data.max_source_len=16",
                             *(f"objective.weights.{w}" for w in weights)])
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    return Generator(JanusModel(cfg.model, tok.vocab_size, PAD), tok, cfg, torch.device("cpu"))


@pytest.mark.parametrize("weights, untrained, trained", [
    (("ce_nar=0",), "nar", "ar"),  # the `ar` ablation
    (("ce_ar=0",), "ar", "nar"),  # `cmlm`
])
def test_generate_refuses_a_mode_never_trained(single_process, tokenizer_path, weights,
                                                 untrained, trained):
    from finetune.evaluate import settings
    from finetune.tasks import get_task

    gen = generator(tokenizer_path, *weights)
    options = dict(beam=1, iterations=1, length_beam=1, max_len=4)
    with pytest.raises(JanusError, match=rf"objective\.weights\.{weights[0]}\.0.*--force-mode"):
        gen.generate(["a source"], mode=untrained, **options)
    assert len(gen.generate(["a source"], mode=untrained, force=True, **options)) == 1
    assert len(gen.generate(["a source"], mode=trained, **options)) == 1
    # spec drafts with the NAR stream and verifies with the AR stream: it needs both
    with pytest.raises(JanusError, match=rf"objective\.weights\.{weights[0]}\.0.*--force-mode"):
        gen.generate(["a source"], mode="spec", **options)
    # evaluate decides the modes with the same function
    assert {s.split("_")[0] for s in settings(get_task("multi30k_ende"), gen)} == {trained}


def test_long_sources_are_counted_and_empty_ones_stay_empty(single_process, tokenizer_path,
                                                            capsys, monkeypatch):
    gen = generator(tokenizer_path)
    decoded = []
    real = gen.decode_ids
    monkeypatch.setattr(gen, "decode_ids",
                        lambda src, opts: decoded.extend(map(len, src)) or real(src, opts))
    hyps = gen.generate(["word " * 100, "", "a short one", "   "], beam=1, max_len=4)
    assert len(hyps) == 4 and hyps[1] == hyps[3] == ""
    assert sorted(decoded)[0] > 2  # no source of BOS and EOS alone reached the model
    assert "1 of 4 sources were longer than 14 tokens and were cut to their first 14" in \
        capsys.readouterr().err


def test_invalid_utf8_lines_are_replaced_and_numbered():
    texts, bad = read_sources(io.BytesIO(b"\xff\xfe x\nok\n\n\xc3\n"))
    assert texts == ["\ufffd\ufffd x", "ok", "", "\ufffd"]
    assert bad == [1, 4]


def test_known_third_party_warnings_are_silenced(single_process):
    import warnings

    import torch.distributed as dist

    from janus_pretrain.quiet import silence_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_third_party()
        dist.all_gather_into_tensor(torch.zeros(1), torch.ones(1))  # as DeepSpeed's ZeRO does
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        optimizer.step = lambda: None  # DeepSpeed wraps the optimizer after the scheduler exists
        scheduler.step()
    assert [str(w.message) for w in caught] == []


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    # Strict UTF-8 on stdio, as on most terminals: undecodable input must not be a traceback.
    env = {**child_env(), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "janus_pretrain.cli", *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, timeout=120)


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    text = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()]


def test_bad_config_value_is_the_only_line():
    result = cli("train", "--config", str(DEMO), "train.steps=abc")
    assert result.returncode == 2
    lines = output_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: config: train.steps"), lines


def test_generate_invalid_utf8_on_stdin_is_no_traceback(tmp_path):
    result = cli("generate", "--checkpoint", str(tmp_path / "nowhere"), stdin=b"\xff\xfe x\nok\n")
    assert result.returncode == 2
    lines = output_lines(result)
    assert lines == ["generate: warning: 1 input line(s) were not valid UTF-8 (first: line 1); "
                     "their bad bytes were decoded as U+FFFD",
                     f"error: checkpoint: no complete checkpoint at {tmp_path / 'nowhere'}"], lines


class _Payload:
    """Unpickling this calls Path.touch on `marker`: proof that the file ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("kind", ["model_states", "consolidated", "rng", "zero_shard"])
def test_crafted_pickle_in_a_model_file_is_refused_unrun(tmp_path, kind):
    import torch

    from janus_pretrain.checkpoint import consolidated, relayout, store, weights
    from janus_pretrain.checkpoint.files import model_states_file, rng_file

    marker = tmp_path / "pwned"
    payload = _Payload(marker)
    if kind == "model_states":
        torch.save({"module": payload}, tmp_path / model_states_file(0))
        load = lambda: weights.tp_rank_weights(tmp_path, 0)  # noqa: E731
    elif kind == "consolidated":  # a torch pickle where a safetensors file belongs
        torch.save({"model": payload}, tmp_path / "model.safetensors")
        load = lambda: consolidated.read(tmp_path / "model.safetensors")  # noqa: E731
    elif kind == "rng":
        torch.save({**store.rng_state(), "torch": payload}, tmp_path / rng_file(0))
        load = lambda: store.read_rng_file(tmp_path / rng_file(0))  # noqa: E731
    else:  # a ZeRO-2 optimizer shard, read when resuming at another layout
        torch.save({"param_shapes": [{}]}, tmp_path / model_states_file(0))
        torch.save({"optimizer_state_dict": payload},
                   tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        load = lambda: relayout.read(tmp_path, relayout.Layout(1, 1, 2),  # noqa: E731
                                     torch.nn.Linear(2, 2))
    with pytest.raises(JanusError, match="refused without running it"):
        load()
    assert not marker.exists()
    # Without the guard the file does run code: the test can fail.
    crafted = max(tmp_path.glob("*.*"), key=lambda p: "optim" in p.name)
    torch.load(io.BytesIO(crafted.read_bytes()), weights_only=False)
    assert marker.exists()
