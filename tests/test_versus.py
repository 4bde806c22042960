"""cliplab.report.versus: the seed-level comparison behind docs/RESULTS.md's verdicts, checked
against a float64 Welch interval computed here from its textbook formula."""

import math
from pathlib import Path

import pytest

from cliplab.report import versus, versus_table

# t quantiles (0.975) from a printed table, so the reference does not call scipy as the code does
T975 = {2: 4.302653, 4: 2.776445}


def _rows(name, xs):
    return [{"objective.name": name, "m": x} for x in xs]


def test_the_interval_is_welchs_and_the_verdict_follows_its_sign():
    clip, worse, better, noisy = (0.040, 0.050, 0.045), (0.020, 0.025, 0.030), (0.080, 0.090, 0.085), (0.01, 0.09, 0.05)
    rows = _rows("clip", clip) + _rows("worse", worse) + _rows("better", better) + _rows("noisy", noisy)
    out = {r["objective.name"]: r for r in versus(rows, by="objective.name", baseline="clip", metric="m")}
    assert out["clip"]["n"] == 3 and "verdict" not in out["clip"]
    for name, xs in (("worse", worse), ("better", better)):
        # equal variances and n: Welch's df is 2(n-1) = 4
        diff = sum(xs) / 3 - sum(clip) / 3
        var = lambda v: sum((x - sum(v) / 3) ** 2 for x in v) / 2  # noqa: E731
        half = T975[4] * math.sqrt(var(xs) / 3 + var(clip) / 3)
        assert out[name]["diff"] == pytest.approx(diff, abs=1e-12)
        assert (out[name]["low"], out[name]["high"]) == pytest.approx((diff - half, diff + half), abs=1e-6)
    assert out["worse"]["verdict"] == "does not hold at this scale"
    assert out["better"]["verdict"] == "holds"
    assert out["noisy"]["verdict"] == "inconclusive" and out["noisy"]["low"] < 0 < out["noisy"]["high"]


def test_one_seed_a_side_is_inconclusive_and_missing_metrics_are_left_out():
    rows = _rows("clip", (0.04, 0.05)) + _rows("one", (0.9,)) + [{"objective.name": "one", "m": None}]
    out = {r["objective.name"]: r for r in versus(rows, by="objective.name", baseline="clip", metric="m")}
    assert out["one"]["n"] == 1 and out["one"]["verdict"] == "inconclusive" and "diff" not in out["one"]
    table = versus_table(rows, by="objective.name", baseline="clip", metrics={"R@1": "m"})
    assert "(baseline)" in table and "inconclusive" in table


def test_an_undefined_value_is_left_out_like_a_missing_one():
    """A lens with nothing to measure reports NaN (a traversal precision with no traversal that
    reached an ancestor); statistics.stdev raised AttributeError on it and lost a sweep's summary."""
    rows = _rows("clip", (0.04, 0.05, float("nan"))) + _rows("x", (0.9, 0.8, float("inf")))
    out = {r["objective.name"]: r for r in versus(rows, by="objective.name", baseline="clip", metric="m")}
    assert (out["clip"]["n"], out["x"]["n"]) == (2, 2)
    assert out["clip"]["mean"] == pytest.approx(0.045) and out["x"]["mean"] == pytest.approx(0.85)


def test_versus_clip_writes_its_verdicts_into_results_md(tmp_path):
    from pathlib import Path

    from cliplab.tune.report import write_results
    from cliplab.tune.sweep import load_sweep

    sweep = load_sweep(Path(__file__).parents[1] / "sweeps" / "versus_clip.py", [])
    assert sweep.num_trials == 9 and sweep.base.model.lock_text and sweep.base.objective.lr_scale == 1.0
    rows = [{"trial": f"t{i}", "objective.name": name, "train.seed": seed, "val/image_to_text_R1": r,
             "val/text_to_image_R1": r, "val/zeroshot_top1": 0.2, "val/retrieval_chance_R1": 1 / 189,
             "val/num_samples": 189.0, "val/zeroshot_num_classes": 9.0}
            for i, (name, seed, r) in enumerate([(n, s, base + 0.01 * s) for n, base in
                                                 (("clip", 0.08), ("cloob", 0.02), ("siglip", 0.03)) for s in range(3)])]
    files = write_results(sweep, rows, {}, tmp_path)
    text = files["md"].read_text()
    assert text.count("does not hold at this scale") == 4  # cloob and siglip, R@1 both ways
    assert text.count("inconclusive") == 2  # zero-shot: identical everywhere, zero-width intervals
    assert "chance: R@1 = 0.0053 (189 val pairs), zero-shot = 0.1111 (9 classes)" in text
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())


def test_a_sweeps_summary_given_once_is_not_computed_again(tmp_path):
    """A summary may evaluate every trial's checkpoint (sweeps/meru_entailment.py): run_sweep
    computes it once for results.md and the terminal; before, both called summarize."""
    import dataclasses

    from cliplab.tune.report import outcome_text, summary_text, write_results
    from cliplab.tune.sweep import SweepOutcome, load_sweep

    calls = []
    sweep = load_sweep(Path(__file__).parents[1] / "sweeps" / "versus_clip.py", [])
    sweep = dataclasses.replace(sweep, summarize=lambda rows: calls.append(len(rows)) or "THE SUMMARY")
    rows = [{"trial": "t0", "objective.name": "clip", "train.seed": 0, "val/image_to_text_R1": 0.1}]
    summary = summary_text(sweep, rows)
    files = write_results(sweep, rows, {}, tmp_path, summary)
    text = outcome_text(sweep, SweepOutcome(rows, rows[0], summary=summary))
    assert calls == [1]
    assert "THE SUMMARY" in files["md"].read_text() and "THE SUMMARY" in text.splitlines()
