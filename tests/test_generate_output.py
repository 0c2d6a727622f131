"""`generate --output`: a refusal or a failure leaves an existing file byte-identical, a
successful run replaces it, and every bad option is one line before anything loads."""
from __future__ import annotations

import argparse
import errno
import stat

import pytest

from conftest import damage, write_checkpoint
from janus_pretrain.errors import JanusError

PRECIOUS = b"PRECIOUS\nwork of a user\n"


def run_generate(monkeypatch, *argv: str) -> None:
    """`janus-pretrain generate ARGV` in this process (its process group kept for the session)."""
    from janus_pretrain.generate import cli
    from janus_pretrain.parallel import state

    monkeypatch.setattr(state, "shutdown", lambda: None)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    cli.run(parser.parse_args(["generate", *argv]))


@pytest.fixture
def setup(tiny_model_source, tmp_path):
    """(a run directory with one tiny checkpoint, sources, an --output holding PRECIOUS)."""
    source, model = tiny_model_source
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", source, model)
    sources = tmp_path / "in.txt"
    sources.write_text("a first source\nand a second one\n")
    out = tmp_path / "out.txt"
    out.write_bytes(PRECIOUS)
    out.chmod(0o640)
    return ckpt, sources, out


REFUSALS = {
    "no checkpoint": (["--checkpoint", "{tmp}/no_such_run"], "no complete checkpoint"),
    "beam 0": (["--beam", "0"], "beam"),
    "mode never trained": (["--mode", "bang_nar"], "never trained BANG_NAR"),
    "corrupt checkpoint": ([], "is corrupt"),
    "input is a directory": (["--input", "{tmp}"], "is a directory"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refusal_leaves_the_output_byte_identical(setup, tmp_path, monkeypatch, case):
    ckpt, sources, out = setup
    extra, message = REFUSALS[case]
    if case == "corrupt checkpoint":
        damage(ckpt / "mp_rank_00_model_states.pt", "flipped")
    argv = ["--checkpoint", str(tmp_path / "run"), "--input", str(sources), "--output", str(out),
            "--max-len", "4", *[a.format(tmp=tmp_path) for a in extra]]
    with pytest.raises(JanusError, match=message) as e:
        run_generate(monkeypatch, *argv)
    assert "\n" not in str(e.value)
    assert out.read_bytes() == PRECIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt", "run", "source"]


def test_a_finished_run_replaces_the_output_keeping_its_mode(setup, tmp_path, monkeypatch):
    _, sources, out = setup
    run_generate(monkeypatch, "--checkpoint", str(tmp_path / "run"), "--input", str(sources),
                 "--output", str(out), "--beam", "1", "--max-len", "4")
    assert len(out.read_text().splitlines()) == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".out.txt*"))


def test_a_full_disk_keeps_the_old_output_and_is_one_line(setup, tmp_path, monkeypatch):
    """ENOSPC while writing the lines: the temporary file is removed, the old file kept."""
    import io

    from janus_pretrain.generate import output

    class FullDisk(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "open", lambda *a, **k: FullDisk(), raising=False)
    _, sources, out = setup
    with pytest.raises(JanusError, match=f"^generate: no space left on the device to write {out}: "
                                         f"it needs more than [0-9]+ bytes, .* are free") as e:
        run_generate(monkeypatch, "--checkpoint", str(tmp_path / "run"), "--input", str(sources),
                     "--output", str(out), "--beam", "1", "--max-len", "4")
    assert "\n" not in str(e.value)
    assert out.read_bytes() == PRECIOUS
    assert not list(tmp_path.glob(".out.txt*"))


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "-1", "batch_size (--batch-size) must be at least 1, not -1"),
    ("--batch-size", "0", "batch_size (--batch-size) must be at least 1, not 0"),
    ("--length-penalty", "nan", "length_penalty (--length-penalty) must be a finite number, not nan"),
    ("--no-repeat-ngram", "-1", "no_repeat_ngram (--no-repeat-ngram) must be at least 0, not -1"),
    ("--spec-margin", "nan", "spec_margin (--spec-margin) must be a finite number, not nan"),
    ("--max-len", "0", "max_len (--max-len) must be at least 1, not 0"),
])
def test_bad_decoding_options_are_one_line_before_anything_loads(tmp_path, monkeypatch, flag,
                                                                 value, message):
    (tmp_path / "in.txt").write_text("a source\n" * 600)
    with pytest.raises(JanusError) as e:  # the checkpoint is never looked for
        run_generate(monkeypatch, "--checkpoint", str(tmp_path / "no_run"), "--input",
                     str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"), flag, value)
    assert str(e.value) == f"generate: {message}"
    assert not (tmp_path / "out.txt").exists()


def test_sigterm_keeps_the_finished_chunks(tmp_path, monkeypatch):
    """SIGTERM after the first chunk (a job's time limit): exit 143, and --output holds the
    first chunk's lines, as after Ctrl-C."""
    import os
    import signal
    import time

    from janus_pretrain.generate import api, cli

    class Stopped:
        calls = 0

        def generate(self, sources, **_):
            Stopped.calls += 1
            if Stopped.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            return [s.upper() for s in sources]

    unhandled = []  # stands for the default action, which would end pytest
    previous = signal.signal(signal.SIGTERM, lambda *a: unhandled.append(1))
    monkeypatch.setattr(api.Generator, "from_checkpoint", staticmethod(lambda path: Stopped()))
    (tmp_path / "in.txt").write_text("".join(f"line {i}\n" for i in range(3 * cli.WRITE_EVERY)))
    (tmp_path / "out.txt").write_bytes(PRECIOUS)
    try:
        with pytest.raises(SystemExit) as e:
            run_generate(monkeypatch, "--checkpoint", str(tmp_path), "--input",
                         str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt"),
                         "--batch-size", "1")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143 and unhandled == []
    assert (tmp_path / "out.txt").read_text() == "".join(f"LINE {i}\n"
                                                         for i in range(cli.WRITE_EVERY))
    assert not list(tmp_path.glob(".out.txt*"))
