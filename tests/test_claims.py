"""The claims table of a results report: figures computed from measured rows, missing rows skipped."""
from finetune.claims import GLGE, NMT, Claim, check
from finetune.compare import markdown


def _row(system, setting, bleu, latency_ms=10.0):
    return {"system": system, "setting": setting, "bleu": bleu, "latency_ms": latency_ms}


ROWS = [_row("ar", "ar_beam5", 31.0, 40.0), _row("janus", "ar_beam5", 31.5, 50.0),
        _row("janus", "nar_T1", 20.0, 5.0), _row("janus", "nar_T4", 29.0, 20.0),
        _row("janus", "nar_T10", 30.0, 45.0), _row("cmlm", "nar_T10", 28.5, 45.0)]


def test_nmt_claims_are_computed_from_the_rows():
    got = {c["figure"]: c for c in check(NMT, ROWS, "bleu")}
    assert got["`ar` ar, bleu"]["measured"] == 31.0 and got["`ar` ar, bleu"]["holds"]
    gain = got["`janus` ar minus `ar` ar, bleu"]
    assert gain["measured"] == 0.5 and not gain["holds"] and gain["target"] == ">= +1"
    assert got["`janus` nar_T10 minus `cmlm` nar_T10, bleu"]["holds"]
    speed = got["`janus` nar_T4: speed-up over `janus` ar, batch 1"]
    assert speed["measured"] == 2.5 and speed["holds"]
    assert got["`janus` nar_T4 minus `janus` ar, bleu"]["measured"] == -2.5
    # no cmlm_kd, janus_selfkd or janus_2x rows: those claims are left out, not failed
    assert not any(s in f for f in got for s in ("cmlm_kd", "janus_selfkd", "janus_2x"))
    twice = check(NMT, ROWS + [_row("janus_2x", "ar_beam5", 32.5)], "bleu")
    assert [c["measured"] for c in twice if "janus_2x" in c["figure"]] == [1.5]


def test_best_nar_row_and_strict_targets():
    rows = [_row("janus", "nar_T1", 10.0), _row("janus", "nar_T10", 12.0),
            _row("bang", "bang_nar", 12.0), _row("scratch", "nar_T4", 11.0)]
    got = {c["figure"]: c for c in check(GLGE, rows, "bleu")}
    versus_bang = got["`janus` nar minus `bang` nar, bleu"]
    assert versus_bang["measured"] == 0.0 and not versus_bang["holds"]  # a tie is not > 0
    assert versus_bang["rows"] == ["janus nar_T10", "bang bang_nar"]
    assert got["`bang` nar minus `scratch` nar, bleu"]["holds"]


def test_markdown_marks_failed_claims():
    claims = check([Claim(("ar", "ar"), op="score", at_least=30.0),
                    Claim(("janus", "ar"), ("ar", "ar"), at_least=1.0)], ROWS, "bleu")
    md = markdown("multi30k_ende", ["bleu"], [], [], {}, "x.png", claims=claims)
    assert "| `ar` ar, bleu | >= 30 | 31.00 | yes |" in md
    assert "| `janus` ar minus `ar` ar, bleu | >= +1 | 0.50 | **no** |" in md


def test_a_family_claim_takes_the_variant_best_on_validation_not_on_test():
    rows = [dict(_row("ar_cont", "ar_beam5", 24.0), valid=22.0),
            dict(_row("janus_from_ar", "ar_beam5", 19.0), valid=18.0),
            dict(_row("janus_from_ar_onesided", "ar_beam5", 21.0), valid=20.5),
            dict(_row("janus_from_ar_2pass", "ar_beam5", 23.0), valid=19.0)]  # best on test only
    got = {c["figure"]: c for c in check(NMT, rows, "bleu")}
    claim = got["`janus_from_ar*` ar minus `ar_cont` ar, bleu"]
    assert claim["rows"] == ["janus_from_ar_onesided ar_beam5", "ar_cont ar_beam5"]
    assert claim["measured"] == -3.0 and not claim["holds"]

