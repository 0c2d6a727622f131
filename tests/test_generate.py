"""AR, NAR and speculative decoding: the search is exact where it must be, and it works on a
trained model."""
import math

import numpy as np
import pytest
import torch

from janus_pretrain.config import LossWeights, ModelConfig, ObjectiveConfig
from janus_pretrain.generate.ar import beam_search, greedy
from janus_pretrain.generate.nar import initial_candidates, mask_predict, remask_count
from janus_pretrain.generate.spec import NarDrafter, speculative
from janus_pretrain.generate.vocab import full_log_probs
from janus_pretrain.model import JanusModel
from janus_pretrain.data.padding import pad_batch, with_bos_eos
from janus_pretrain.objectives.janus import JanusObjective
from janus_pretrain.tokenizer import EOS, MASK, PAD

VOCAB = 30


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, hidden_size=64, ffn_hidden_size=128,
                      num_heads=4, max_positions=64, length_classes=32, dropout=0.0,
                      attention_dropout=0.0, **kw)
    return JanusModel(cfg, VOCAB, PAD)


def sources(seed, lengths):
    rng = np.random.default_rng(seed)
    return pad_batch([with_bos_eos(rng.integers(5, VOCAB, size=n)) for n in lengths])


@pytest.fixture(scope="module")
def random_model(single_process):
    # Sharpen the output layer so that random weights give peaked, varied distributions.
    model = tiny_model().eval()
    with torch.no_grad():
        model.embed.weight.mul_(20)
    return model


def test_incremental_decoding_equals_full_recompute(random_model):
    memory, mask = random_model.run_encoder(sources(0, (5, 9, 3)))
    cached = greedy(random_model, memory, mask, max_len=12)
    full = greedy(random_model, memory, mask, max_len=12, incremental=False)
    assert [h.tokens for h in cached] == [h.tokens for h in full]
    assert [h.score for h in cached] == pytest.approx([h.score for h in full], abs=1e-4)
    cached = beam_search(random_model, memory, mask, beam=4, max_len=12)
    full = beam_search(random_model, memory, mask, beam=4, max_len=12, incremental=False)
    for a, b in zip(cached, full):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_beam_one_is_greedy_and_beams_are_sorted_and_bounded(random_model):
    memory, mask = random_model.run_encoder(sources(1, (4, 7, 6, 2)))
    g = greedy(random_model, memory, mask, max_len=10)
    b1 = beam_search(random_model, memory, mask, beam=1, max_len=10, length_penalty=0.0)
    assert [h.tokens for h in g] == [h[0].tokens for h in b1]
    assert [h.log_prob for h in g] == pytest.approx([h[0].log_prob for h in b1], abs=1e-4)
    for max_len in (3, 10):
        beams = beam_search(random_model, memory, mask, beam=5, max_len=max_len)
        for hyps in beams:
            assert len(hyps) == 5
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert all(len(h.tokens) <= max_len for h in hyps)
            assert all(EOS not in h.tokens and PAD not in h.tokens for h in hyps)


def test_batch_decoding_equals_one_by_one(random_model):
    src = sources(2, (3, 8, 5))
    memory, mask = random_model.run_encoder(src)
    batched_beam = beam_search(random_model, memory, mask, beam=3, max_len=9)
    batched_nar = mask_predict(random_model, memory, mask, iterations=3, length_beam=2)
    for i in range(src.shape[0]):
        one = src[i:i + 1, : int((src[i] != PAD).sum())]
        m1, k1 = random_model.run_encoder(one)
        single = beam_search(random_model, m1, k1, beam=3, max_len=9)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched_beam[i]]
        assert mask_predict(random_model, m1, k1, 3, 2)[0].tokens == batched_nar[i].tokens


class CountingDecoder:
    """Wraps model.decode to record every decoder input (a pass counter and a re-mask probe)."""

    def __init__(self, model):
        self.model, self.inputs = model, []
        self.original = model.decode

    def __enter__(self):
        def decode(tokens, *args, **kwargs):
            self.inputs.append(tokens.clone())
            return self.original(tokens, *args, **kwargs)
        self.model.decode = decode
        return self

    def __exit__(self, *exc):
        del self.model.decode


@pytest.mark.parametrize("iterations", [1, 4, 10])
def test_mask_predict_passes_and_remask_schedule(random_model, iterations):
    memory, mask = random_model.run_encoder(sources(3, (6, 4)))
    lengths = torch.tensor([7, 12])
    with CountingDecoder(random_model) as probe:
        hyps = mask_predict(random_model, memory, mask, iterations=iterations, lengths=lengths)
    assert len(probe.inputs) == iterations
    for t, tokens in enumerate(probe.inputs):
        expected = lengths if t == 0 else remask_count(lengths, t, iterations)
        assert (tokens == MASK).sum(1).tolist() == expected.tolist()
    assert [len(h.tokens) for h in hyps] == lengths.tolist()


def test_mask_predict_length_beam_passes(random_model):
    memory, mask = random_model.run_encoder(sources(4, (6, 4, 5)))
    with CountingDecoder(random_model) as probe:
        mask_predict(random_model, memory, mask, iterations=4, length_beam=3)
    # T passes in all, each over every source x length candidate.
    assert len(probe.inputs) == 4 and all(x.shape[0] == 9 for x in probe.inputs)


def test_single_pass_nar_is_argmax(random_model):
    memory, mask = random_model.run_encoder(sources(5, (6, 4)))
    lengths = torch.tensor([5, 9])
    hyps = mask_predict(random_model, memory, mask, iterations=1, lengths=lengths)
    cand = initial_candidates(lengths)
    h = random_model.decode(cand.tokens, None, memory, mask,
                            self_mask=(cand.tokens != PAD)[:, None, :])
    best = full_log_probs(random_model.output_logits(h), VOCAB, allow_eos=False).argmax(-1)
    for i, n in enumerate(lengths.tolist()):
        assert hyps[i].tokens == best[i, 1:1 + n].tolist()


def copy_batch(rng, size):
    lengths = rng.integers(3, 9, size=size)
    src = [rng.integers(5, VOCAB, size=n) for n in lengths]
    return src


@pytest.fixture(scope="module")
def copy_model(single_process):
    """A tiny model trained in the test to copy its input (~25 s on one CPU thread).

    Only the two cross-entropy terms and the length loss: this checks decoding, and the KL terms
    only slow a model trained from scratch down (they are tested in test_losses.py)."""
    model = tiny_model(seed=1)
    weights = LossWeights(ce_ar=1.0, ce_nar=1.0, ce_aux=0.0, kl_ar_nar=0.0, kl_ar_aux=0.0,
                          kl_nar_aux=0.0, length=0.5)
    obj = JanusObjective(ObjectiveConfig(masking="uniform", weights=weights), 16, 16, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(400):
        src = copy_batch(rng, 64)
        prep = obj.prepare(obj.collate([(s, s) for s in src], rng))
        loss, _ = obj.loss(model(**prep.model_inputs), prep)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
    return model.eval()


def exact_match(hyps, src):
    return np.mean([h.tokens == s.tolist() for h, s in zip(hyps, src)])


def test_trained_model_copies_with_ar_and_nar(copy_model):
    rng = np.random.default_rng(123)
    src = copy_batch(rng, 64)
    memory, mask = copy_model.run_encoder(pad_batch([with_bos_eos(s) for s in src]))
    ar = [b[0] for b in beam_search(copy_model, memory, mask, beam=4, max_len=16)]
    assert exact_match(ar, src) >= 0.9
    assert exact_match(greedy(copy_model, memory, mask, max_len=16), src) >= 0.9
    # Refinement is what makes NAR good: single pass a little worse than four passes.
    for iterations, floor in ((1, 0.75), (4, 0.9)):
        nar = mask_predict(copy_model, memory, mask, iterations=iterations, length_beam=1)
        assert exact_match(nar, src) >= floor, iterations
    # Several length candidates, the AR stream of the same model choosing among them.
    reranked = mask_predict(copy_model, memory, mask, iterations=4, length_beam=3, rerank=True)
    assert exact_match(reranked, src) >= 0.9


def reference_drafter(hyps, shift: bool):
    """A test drafter that drafts greedy's own next tokens (`shift` False: all right) or a token
    next to each of them (True: all wrong); past greedy's end it drafts token 5."""
    width = max(len(h.tokens) for h in hyps) + 64
    ref = torch.full((len(hyps), width), 5)
    for i, h in enumerate(hyps):
        ref[i, :len(h.tokens)] = torch.tensor(h.tokens, dtype=torch.long)
    if shift:
        ref = 5 + (ref - 5 + 1) % (VOCAB - 5)

    def draft(req):
        cols = req.accepted[:, None] + torch.arange(req.count)
        return ref.index_select(0, req.rows).gather(1, cols)
    return draft


@pytest.mark.parametrize("lengths", [(7,), (5, 9, 3, 7, 2, 8, 6, 4)])
def test_spec_exact_is_greedy_on_a_random_model(random_model, lengths):
    """Random weights never pick EOS: every sentence ends at max_len (a forced EOS)."""
    memory, mask = random_model.run_encoder(sources(6, lengths))
    g = greedy(random_model, memory, mask, max_len=9)
    assert all(len(h.tokens) == 9 for h in g)
    for block in (1, 3, 12):
        s, stats = speculative(random_model, memory, mask, max_len=9, block=block)
        assert [h.tokens for h in s] == [h.tokens for h in g], block
        assert [h.score for h in s] == pytest.approx([h.score for h in g], abs=1e-4)
        assert stats.emitted == [10] * len(lengths)


@pytest.mark.parametrize("block", [1, 3])
def test_spec_forced_drafts_all_wrong_and_all_right(copy_model, block):
    """All-wrong drafts emit one token per iteration, all-right ones block + 1: greedy's output
    either way, in exactly that many iterations."""
    rng = np.random.default_rng(7)
    src = pad_batch([with_bos_eos(s) for s in copy_batch(rng, 8)])
    memory, mask = copy_model.run_encoder(src)
    g = greedy(copy_model, memory, mask, max_len=6)  # some copies are cut at max_len
    n = [len(h.tokens) + 1 for h in g]  # EOS included
    assert 6 + 1 in n and min(n) < 6 + 1
    for shift, iterations in ((True, n), (False, [math.ceil(x / (block + 1)) for x in n])):
        s, stats = speculative(copy_model, memory, mask, max_len=6, block=block,
                               drafter=reference_drafter(g, shift))
        assert [h.tokens for h in s] == [h.tokens for h in g]
        assert stats.iterations == iterations and stats.emitted == n
        assert stats.accepted == [e - i for e, i in zip(n, iterations)]


def test_spec_on_a_trained_model(copy_model):
    """The NAR stream's drafts are accepted; exact is greedy at batch 1 and 8, relaxed accepts
    at least as much."""
    rng = np.random.default_rng(8)
    src = pad_batch([with_bos_eos(s) for s in copy_batch(rng, 16)])
    memory, mask = copy_model.run_encoder(src)
    g = greedy(copy_model, memory, mask, max_len=16)
    exact, stats = speculative(copy_model, memory, mask, max_len=16, block=4)
    assert [h.tokens for h in exact] == [h.tokens for h in g]
    per_iteration = sum(stats.emitted) / sum(stats.iterations)
    assert per_iteration > 2.0
    for i in range(2):  # batch 1: the same output as in the batch
        one, _ = speculative(copy_model, memory[i:i + 1], mask[i:i + 1], max_len=16, block=4)
        assert one[0].tokens == g[i].tokens
    _, relaxed = speculative(copy_model, memory, mask, max_len=16, block=4, accept="relaxed",
                             top=3, margin=3.0)
    assert sum(relaxed.emitted) / sum(relaxed.iterations) >= per_iteration


def test_spec_cache_rollback_equals_a_cache_built_from_scratch(copy_model, monkeypatch):
    """Before every draft, each row's kept keys/values equal a causal pass over its accepted
    prefix from scratch, while rows accept different numbers of tokens."""
    rng = np.random.default_rng(9)
    src = pad_batch([with_bos_eos(s) for s in copy_batch(rng, 6)])
    memory, mask = copy_model.run_encoder(src)
    caches = []
    new_cache = copy_model.new_cache
    monkeypatch.setattr(copy_model, "new_cache", lambda: caches.append(new_cache()) or caches[-1])
    nar = NarDrafter(copy_model, torch.full((6,), 8))
    checked = []

    def drafter(req):
        cache = caches[0]
        for i, (r, a) in enumerate(zip(req.rows.tolist(), req.accepted.tolist())):
            if a == 0:
                continue
            fresh = new_cache()
            copy_model.decode(req.prefix[i:i + 1, :a], None, memory[r:r + 1], mask[r:r + 1],
                              causal=True, cache=fresh)
            for kept, built in zip(cache, fresh):
                for key in ("k", "v"):
                    torch.testing.assert_close(kept["self"][key][i:i + 1, :, :a],
                                               built["self"][key], atol=1e-5, rtol=0)
            checked.append(a)
        # Spoil one draft token per row, at a place that varies: rows accept 0..k-1 tokens.
        drafts = nar(req)
        spoil = (req.rows + req.accepted) % (req.count + 1)
        hit = spoil[:, None] == torch.arange(req.count)
        return torch.where(hit, 5 + (drafts - 5 + 1) % (VOCAB - 5), drafts)

    _, stats = speculative(copy_model, memory, mask, max_len=12, block=3, drafter=drafter)
    assert len(set(checked)) > 5 and len(set(stats.accepted)) > 1


def test_generate_cli_both_modes(trained_run, tmp_path, corpus_file):
    import subprocess
    import sys

    from conftest import REPO

    run = trained_run
    lines = corpus_file.read_text().splitlines()[:3]
    src = tmp_path / "src.txt"
    src.write_text("\n".join(lines) + "\n")
    for mode in ("ar", "nar", "spec"):
        out = subprocess.run([sys.executable, "-m", "janus_pretrain.cli", "generate", "--checkpoint",
                              str(run), "--mode", mode, "--input", str(src), "--max-len", "8",
                              "--beam", "2", "--iterations", "2"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(out.stdout.splitlines()) == 3, out.stdout
    missing = subprocess.run([sys.executable, "-m", "janus_pretrain.cli", "generate", "--checkpoint",
                              str(tmp_path / "nowhere"), "--input", str(src)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert [line for line in missing.stderr.splitlines() if line.strip()][-1].startswith("error:")


def test_generate_cli_untrained_mode_and_bad_lines(trained_run, tmp_path):
    """`--mode nar` on a checkpoint whose objective has no NAR term is one line of error unless
    --force-mode; then non-UTF-8 and empty lines keep the output aligned (issue 17)."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import REPO
    from janus_pretrain.checkpoint.weights import resolve as resolve_checkpoint

    ar_only = tmp_path / resolve_checkpoint(trained_run).name
    shutil.copytree(resolve_checkpoint(trained_run), ar_only)
    meta = json.loads((ar_only / "janus.json").read_text())
    meta["config"]["objective"]["weights"]["ce_nar"] = 0.0
    (ar_only / "janus.json").write_text(json.dumps(meta))
    src = tmp_path / "src.bin"
    src.write_bytes(b"a first line\n\xff\xfe x\n\nthe last line\n")
    cmd = [sys.executable, "-m", "janus_pretrain.cli", "generate", "--checkpoint", str(ar_only),
           "--mode", "nar", "--input", str(src), "--max-len", "4", "--iterations", "1"]
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert len(lines) == 2 and "objective.weights.ce_nar=0.0" in lines[-1], lines
    assert lines[0].startswith("generate: warning: 1 input line(s) were not valid UTF-8"), lines
    forced = subprocess.run([*cmd, "--force-mode"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert len(forced.stdout.split("\n")) == 5 and forced.stdout.split("\n")[2] == "", forced.stdout
