"""The report's figures: a colour per system (distinct however many systems a report has), a
panel per experiment and a line style per decoding mode in the validation curves."""
import pytest

from finetune.compare import MODE_STYLES, curve_panels, latency_series, system_colours


def test_validation_curves_one_colour_per_system_and_a_panel_per_experiment():
    curve = [{"step": 250, "bleu/ar_greedy": 1.0, "bleu/nar_T4": 0.5}]
    results = [{"system": f"s{i}", "validation_curve": curve,
                "provenance": {"experiment": "a" if i < 12 else "b"}} for i in range(17)]
    results.append({"system": "old", "validation_curve": curve})  # no provenance
    results.append({"system": "flat", "validation_curve": []})   # no curve: not drawn
    panels = curve_panels(results)
    assert list(panels) == ["a", "b", "other"] and len(panels["a"]) == 12
    for runs in panels.values():
        colours = system_colours([r["system"] for r in runs])
        assert len(set(colours.values())) == len(runs)
    assert len(set(MODE_STYLES.values())) == len(MODE_STYLES)


@pytest.mark.parametrize("n", [3, 11, 15, 25])
def test_system_colours_are_distinct_for_any_number_of_systems(n):
    colours = system_colours([f"s{i}" for i in range(n)] + ["s0"])  # a repeat is one system
    assert len(colours) == n and len(set(colours.values())) == n


def test_quality_vs_latency_lines_one_colour_per_system():
    """15 systems, as multi30k_ende's report has: no two lines share a colour (a 10-colour
    cycle gave the 11th system the first's)."""
    rows = [{"system": f"s{i}", "setting": s, "bleu": float(i) if s != "nar_T1" or i else None,
             "latency_ms": 10.0 * (k + 1)}
            for i in range(15) for k, s in enumerate(["ar_beam5", "nar_T1", "nar_T4"])]
    lines = latency_series("bleu", rows)
    assert [line["system"] for line in lines] == [f"s{i}" for i in range(15)]
    assert len({line["colour"] for line in lines}) == 15
    assert lines[0]["settings"] == ["ar_beam5", "nar_T4"]  # the unscored setting is left out
    assert lines[1]["latency_ms"] == [10.0, 20.0, 30.0] and lines[1]["score"] == [1.0] * 3
