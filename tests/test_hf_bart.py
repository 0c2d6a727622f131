"""Hugging Face BART in and out, checked against transformers itself (issue 14).

A random BartForConditionalGeneration built from a small BartConfig, with a byte-level BPE
tokenizer trained here (nothing is downloaded), is converted with `convert from-hf`; our AR logits
(TP 1 and TP 2), greedy search and beam search must equal transformers' forward and `generate`;
from-hf then to-hf is bit-exact; a bart-flavour model trained a few steps on shards prepared with
the HF tokenizer exports to-hf and gives HF the same logits; and a converted model decodes AR and
NAR in a process where megatron-core and DeepSpeed cannot be imported.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, _train_overrides, child_env, run_killable

from janus_pretrain.checkpoint import hf
from janus_pretrain.data.padding import pad_batch
from janus_pretrain.generate.api import DecodeOptions, Generator
from janus_pretrain.tokenizer import BOS, EOS, MASK, PAD, load_tokenizer

transformers = pytest.importorskip("transformers")
# BART's special tokens at BART's ids (<s> <pad> </s> <unk> first, <mask> last): our ids differ.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MAX_LEN = 12


def train_byte_level_bpe(corpus, out_dir, vocab_size: int = 400):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<mask>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # BART's other form: vocab.json (with every special) + merges.txt.
    (out_dir / "vocab.json").write_text(json.dumps(tok.get_vocab(with_added_tokens=True)))
    tok.model.save(str(out_dir), "bpe")
    (out_dir / "bpe-merges.txt").rename(out_dir / "merges.txt")
    (out_dir / "bpe-vocab.json").unlink()
    return out_dir


@pytest.fixture(scope="module")
def hf_tokenizer_dir(corpus_file, tmp_path_factory):
    return train_byte_level_bpe(corpus_file, tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="module")
def hf_bart_dir(hf_tokenizer_dir, tmp_path_factory):
    """A random BART (init_std 0.2: outputs that depend on the source, without near-ties;
    LayerNorms and final-logits bias randomised too; EOS likely enough that some hypotheses end
    before the length limit), saved as transformers saves it."""
    tok = load_tokenizer(hf_tokenizer_dir / "tokenizer.json")
    ids = tok.hf_ids
    config = transformers.BartConfig(
        vocab_size=tok.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, scale_embedding=True, pad_token_id=int(ids[PAD]),
        bos_token_id=int(ids[BOS]), eos_token_id=int(ids[EOS]),
        decoder_start_token_id=int(ids[BOS]), forced_eos_token_id=None, init_std=0.2)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.1)
        model.final_logits_bias[0, ids[EOS]] += 1.0
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("hf_bart")
    model.save_pretrained(str(out))
    (out / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    return out


@pytest.fixture(scope="module")
def converted(hf_bart_dir, tmp_path_factory):
    return hf.from_hf(hf_bart_dir, tmp_path_factory.mktemp("converted") / "bart.safetensors")


@pytest.fixture(scope="module")
def hf_model(hf_bart_dir):
    return transformers.BartForConditionalGeneration.from_pretrained(str(hf_bart_dir)).eval()


def source_rows(seed: int, n: int = 6) -> list[np.ndarray]:
    """Random sources in our ids, framed by BOS/EOS, of different lengths."""
    rng = np.random.default_rng(seed)
    return [np.array([BOS, *rng.integers(MASK + 1, 300, size=k), EOS])
            for k in rng.integers(3, 14, size=n)]


def hf_logits(model, tok, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """HF's logits for inputs in our ids (padded with our PAD), columns in our id order."""
    ids = torch.from_numpy(tok.hf_ids)
    with torch.no_grad():
        logits = model(input_ids=ids[src], attention_mask=(src != PAD).long(),
                       decoder_input_ids=ids[prev]).logits
    return logits[..., ids]


def our_logits(gen: Generator, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = gen.model(src.to(gen.device), ar_tokens=prev.to(gen.device))["ar"]
    return logits[..., :gen.model.vocab_size].cpu()


def decoder_inputs(seed: int, rows: int, length: int = 9) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    prev = torch.from_numpy(rng.integers(MASK + 1, 300, size=(rows, length)))
    prev[:, 0] = BOS
    return prev


def test_tokenizer_forms_agree_with_transformers(hf_tokenizer_dir, corpus_file):
    json_tok = load_tokenizer(hf_tokenizer_dir / "tokenizer.json")
    (hf_tokenizer_dir / "tokenizer.json").rename(hf_tokenizer_dir / "tokenizer.json.off")
    try:
        bart_tok = load_tokenizer(hf_tokenizer_dir)  # vocab.json + merges.txt
    finally:
        (hf_tokenizer_dir / "tokenizer.json.off").rename(hf_tokenizer_dir / "tokenizer.json")
    # Our special ids hold BART's special tokens; every other token keeps BART's order.
    names = [json_tok.hf.id_to_token(int(i)) for i in json_tok.hf_ids[:5]]
    assert names == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert (bart_tok.hf_ids == json_tok.hf_ids).all()
    assert (np.diff(json_tok.hf_ids[5:]) > 0).all()
    texts = corpus_file.read_text(encoding="utf-8").splitlines()[:40:3] + ["a <mask> b  c\té"]
    ours = json_tok.encode(texts)
    assert bart_tok.encode(texts) == ours
    reference = transformers.BartTokenizer(vocab=str(hf_tokenizer_dir / "vocab.json"),
                                           merges=str(hf_tokenizer_dir / "merges.txt"))
    assert [json_tok.hf_ids[x].tolist() for x in ours] == [
        reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert MASK in ours[-1]
    assert [json_tok.decode(x) for x in ours[:-1]] == texts[:-1]


def test_ar_logits_equal_hf(converted, hf_model):
    gen = Generator.from_consolidated(converted)
    src = pad_batch(source_rows(0))
    prev = decoder_inputs(1, src.shape[0])
    reference = hf_logits(hf_model, gen.tokenizer, src, prev)
    assert reference.std() > 1.0  # not a degenerate model
    torch.testing.assert_close(our_logits(gen, src, prev), reference, rtol=0, atol=1e-5)


@pytest.mark.distributed
def test_tp2_logits_equal_hf(converted, hf_model, tmp_path):
    from test_tensor_parallel import run_probe

    probe = run_probe(2, tmp_path / "tp2.pt", f"file:{converted}")
    inputs = probe["inputs"]
    reference = hf_logits(hf_model, load_tokenizer(hf_model.name_or_path),
                          inputs["src_tokens"], inputs["ar_tokens"])
    torch.testing.assert_close(probe["ar_logits"], reference, rtol=0, atol=1e-5)


class CloseAtMaxLength(transformers.LogitsProcessor):
    """fairseq's rule at the length limit, which our search follows: only EOS may come next, at
    its own log-probability. (HF's forced_eos_token_id gives it log-probability 0 instead, the
    one scoring difference between the two searches.)"""

    def __init__(self, length: int, eos: int):
        self.length, self.eos = length, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.length:
            return scores
        closed = torch.full_like(scores, float("-inf"))
        closed[:, self.eos] = scores[:, self.eos]
        return closed


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def test_greedy_and_beam_search_equal_hf_generate(converted, hf_model):
    gen = Generator.from_consolidated(converted)
    ids = torch.from_numpy(gen.tokenizer.hf_ids)
    rows = source_rows(2, n=8)
    src = pad_batch(rows)
    common = dict(input_ids=ids[src], attention_mask=(src != PAD).long(), do_sample=False,
                  max_length=MAX_LEN + 2, min_length=0, forced_eos_token_id=None,
                  suppress_tokens=ids[[PAD, BOS, MASK]].tolist(),
                  logits_processor=transformers.LogitsProcessorList(
                      [CloseAtMaxLength(MAX_LEN + 1, int(ids[EOS]))]))
    searches = {
        "greedy": (DecodeOptions(beam=1, max_len=MAX_LEN), dict(num_beams=1)),
        "beam": (DecodeOptions(beam=5, length_penalty=1.5, no_repeat_ngram=2, max_len=MAX_LEN),
                 dict(num_beams=5, length_penalty=1.5, no_repeat_ngram_size=2,
                      early_stopping=True)),
    }
    lengths = {}
    for name, (ours_opts, hf_opts) in searches.items():
        with torch.no_grad():
            theirs = hf_model.generate(**common, **hf_opts)
        theirs = [until_eos(seq[1:], int(ids[EOS])) for seq in theirs.tolist()]
        ours = [ids[h.tokens].tolist() for h in gen.decode_ids(rows, ours_opts)]
        assert ours == theirs, name
        assert len({tuple(t) for t in ours}) > 1, name  # the outputs depend on the source
        lengths[name] = [len(t) for t in ours]
    # Both ways of ending occur: EOS chosen before the limit, and closing at the limit.
    assert min(lengths["beam"]) < MAX_LEN and max(lengths["beam"]) == MAX_LEN, lengths


def test_from_hf_then_to_hf_is_bit_exact(hf_bart_dir, converted, tmp_path):
    from safetensors.torch import load_file

    out = hf.export(converted, tmp_path / "hf")
    original, exported = (load_file(str(d / "model.safetensors")) for d in (hf_bart_dir, out))
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    # transformers' tokenizer from the export frames a text as BART's does: <s> text </s>.
    tok = load_tokenizer(out)
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "The river flows north."
    [ids] = tok.encode([text])
    assert auto(text)["input_ids"] == tok.hf_ids[[BOS, *ids, EOS]].tolist()
    # from-hf reads the JANUS-only weights and the run config back from janus.safetensors.
    again, first = hf.load(out), hf.load(hf_bart_dir)
    assert again.config == first.config
    assert again.weights.keys() == first.weights.keys()
    assert all(torch.equal(again.weights[k], first.weights[k]) for k in first.weights)


def test_janus_flavour_has_no_hf_form(hf_tokenizer_dir):
    from janus_pretrain.config import ModelConfig
    from janus_pretrain.errors import JanusError

    with pytest.raises(JanusError, match="model.arch=bart"):
        hf.hf_config(ModelConfig(arch="janus"), load_tokenizer(hf_tokenizer_dir))


def test_trained_bart_flavour_exports_to_hf(launch_training, single_process, hf_bart_dir,
                                            hf_tokenizer_dir, corpus_file, tmp_path):
    """Shards prepared with the HF tokenizer, a bart-flavour model trained from the HF BART
    directory (train.init_from, ZeRO-2) for a few steps, then `convert to-hf`: transformers gives
    the trained model's logits."""
    from safetensors.torch import load_file

    from janus_pretrain.data.prepare import prepare

    tokenizer = hf_tokenizer_dir / "tokenizer.json"
    shards, run, out = tmp_path / "shards", tmp_path / "run", tmp_path / "hf"
    prepare([str(corpus_file)], str(tokenizer), shards, num_workers=1, max_docs=400)
    assert (shards / "tokenizer.json").is_file()
    result = launch_training(run, base=False, extra=(
        *_train_overrides(shards, tokenizer, run), "model.arch=bart", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "model.max_positions=64", "model.scale_embedding=true",
        "model.dropout=0.0", f"train.init_from={hf_bart_dir}", "train.steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000003" / "tokenizer.json").is_file()
    cli = run_killable([sys.executable, "-m", "janus_pretrain.cli", "convert", "to-hf", str(run),
                        "--output", str(out)], 300, "convert to-hf")
    assert cli.returncode == 0, cli.stderr[-3000:]
    # Trained from the HF weights: three Adam steps of lr <= 1e-3 away from them, not equal.
    start, trained = (load_file(str(d / "model.safetensors"))["model.shared.weight"]
                      for d in (hf_bart_dir, out))
    assert 0 < (trained - start).abs().max() < 0.01
    gen = Generator.from_checkpoint(run)
    hf_model = transformers.BartForConditionalGeneration.from_pretrained(str(out)).eval()
    src = pad_batch(source_rows(3))
    prev = decoder_inputs(4, src.shape[0])
    torch.testing.assert_close(our_logits(gen, src, prev),
                               hf_logits(hf_model, gen.tokenizer, src, prev), rtol=0, atol=1e-5)


BLOCKER = """
import json, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron", "deepspeed"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Blocked())
from janus_pretrain.generate.api import Generator

gen = Generator.from_consolidated(sys.argv[1])
texts = json.loads(sys.argv[2])
out = {"ar": gen.generate(texts, mode="ar", beam=3, max_len=10),
       "nar": gen.generate(texts, mode="nar", iterations=3, max_len=10, force=True)}
assert not [m for m in sys.modules if m.split(".")[0] in ("megatron", "deepspeed")]
print(json.dumps(out))
"""


def test_converted_model_decodes_without_megatron_or_deepspeed(converted):
    texts = ["The river flows north.", "A small town in the valley."]
    result = subprocess.run([sys.executable, "-c", BLOCKER, str(converted), json.dumps(texts)],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    isolated = json.loads(result.stdout.splitlines()[-1])
    gen = Generator.from_consolidated(converted)
    assert isolated == {"ar": gen.generate(texts, mode="ar", beam=3, max_len=10),
                        "nar": gen.generate(texts, mode="nar", iterations=3, max_len=10,
                                            force=True)}
    assert all(isolated["ar"]) and all(isolated["nar"])
