"""The scaling benchmark's report and goals (the run itself is `python -m benchmarks.scaling`)."""

from __future__ import annotations

import pytest

from benchmarks.scaling import METHODS, goals, main, markdown


def report(of_individual: dict[str, dict[int, float]], size: float = 1.5) -> dict:
    rows = []
    for m, by_n in of_individual.items():
        for n, share in by_n.items():
            rows.append(
                {
                    "n_tasks": n,
                    "method": m,
                    "average": 0.8 * share,
                    "individual": 0.8,
                    "of_individual": share,
                    "tasks": [f"t{i}" for i in range(n)],
                    "args": ["merge"],
                    "merge_seconds": 1.0,
                    "peak_rss_mb": 100.0,
                    "size_vs_plain": size if m == "recommended" else 1.0,
                    "forward_vs_plain": 2.0 if m == "recommended" else 1.0,
                    "adapt_seconds_per_step": None,
                }
            )
    return {"rows": rows, "counts": [8, 20], "methods": list(of_individual), "machine": "test", "seconds": 1.0}


def test_goals_say_met_or_by_how_much_they_are_missed():
    shares = {"task-arithmetic": {8: 0.80, 20: 0.70}, "wemoe-paper": {8: 0.82, 20: 0.75}, "recommended": {8: 0.98, 20: 0.96}}
    text = "\n".join(goals(report(shares)))
    assert ">= 95% of the individual models: 96.0%, met" in text
    assert "+20.8, met" in text  # 0.8 * (0.96 - 0.70)
    assert "recommended 2.0 against task-arithmetic 10.0, wemoe-paper 7.0: met" in text
    assert "<= 1 + 0.05 x 20 = 2.00 plain checkpoints" in text and "1.50x, met" in text
    shares["recommended"] = {8: 0.98, 20: 0.90}
    text = "\n".join(goals(report(shares, size=2.3)))
    assert "90.0%, missed by 5.0 points" in text
    assert "+16.0, met" in text
    assert "recommended 8.0 against task-arithmetic 10.0, wemoe-paper 7.0: missed" in text
    assert "2.30x, missed by 0.30x" in text


def test_markdown_has_every_method_and_count():
    shares = {m: {8: 0.9, 20: 0.8} for m in METHODS}
    md = markdown(report(shares))
    for m in METHODS:
        assert METHODS[m][0] in md
    assert "| method | 8 tasks | 20 tasks |" in md and "72.0 (90.0%)" in md


@pytest.mark.parametrize(
    ("argv", "message"), [(["--counts", "8,x"], "comma-separated numbers"), (["--methods", "magic"], "choose from"), (["--counts", "1"], "at least 2")]
)
def test_bad_options_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_rows_are_carried_over_only_for_the_same_tasks_and_flags():
    from benchmarks.scaling import carried, method_flags

    row = {"n_tasks": 8, "method": "recommended", "tasks": ["a", "b"], "flags": method_flags("recommended"), "average": 0.9}
    previous = {"rows": [row]}
    assert carried(previous, 8, "recommended", ["a", "b"]) == {**row, "carried": True}
    assert carried(previous, 8, "recommended", ["a", "c"]) is None
    assert carried(previous, 14, "recommended", ["a", "b"]) is None
    assert carried({"rows": [{**row, "flags": ["--method", "wemoe"]}]}, 8, "recommended", ["a", "b"]) is None
    assert carried({"rows": [{**row, "method": "ties", "flags": None}]}, 8, "ties", ["a", "b"]) is not None  # lambda picked: no flags
    assert carried(None, 8, "recommended", ["a", "b"]) is None


def test_a_run_of_some_rows_keeps_the_others():
    from benchmarks.scaling import keep_other_rows

    old = {"rows": [{"n_tasks": 8, "method": "ties", "average": 0.7}, {"n_tasks": 20, "method": "recommended", "average": 0.8}]}
    new = {"rows": [{"n_tasks": 8, "method": "recommended", "average": 0.9}], "counts": [8], "methods": ["recommended"]}
    kept = keep_other_rows(new, old)
    assert [(r["n_tasks"], r["method"]) for r in kept["rows"]] == [(8, "recommended"), (8, "ties"), (20, "recommended")]
    assert kept["counts"] == [8, 20] and kept["methods"] == ["ties", "recommended"]
    assert keep_other_rows({"rows": [], "counts": [8], "methods": ["ties"]}, None)["rows"] == []


def test_a_missed_share_says_how_much_the_experts_and_the_routing_each_lose():
    shares = {"task-arithmetic": {8: 0.80, 20: 0.70}, "recommended": {8: 0.98, 20: 0.90}}
    r = report(shares)
    for row in r["rows"]:
        if row["method"] == "recommended":
            row["own_expert_average"] = 0.8 * (0.99 if row["n_tasks"] == 8 else 0.94)
            row["routing_accuracy"] = 0.98 if row["n_tasks"] == 8 else 0.91
            row["predicted"] = {"a": {"a": 90, "b": 10}, "b": {"a": 30, "b": 70}}
    text = "\n".join(goals(r))
    assert "Most confused (images of -> expert): b -> a 30%; a -> b 10%." in text
    assert "holds 94.0% of the individual models, so its experts lose 6.0 points and routing 4.0 more" in text
    assert "names the right task for 8 tasks 98.0%, 20 tasks 91.0% of the test images" in text
    met = {"task-arithmetic": {8: 0.80, 20: 0.70}, "recommended": {8: 0.98, 20: 0.96}}
    assert "Measured why" not in "\n".join(goals(report(met)))
