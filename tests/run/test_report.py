"""The run report's screen-sized summaries (the full page is checked on a real run in test_pipeline)."""

from __future__ import annotations

from phiforge.run.report import _by_rule, _counts, _status


def test_many_topics_become_top_and_bottom_tables_with_a_histogram() -> None:
    counts = {f"topic {i:03d}": i % 7 + 1 for i in range(300)}
    page = _counts(counts, "per topic")
    assert "20 most used" in page and "20 least used" in page and page.count("<img") == 1
    assert page.count("<tr>") == 21  # header + 20 rows, not one bar per topic
    assert _counts({"a": 1, "b": 2}, "per format").count("<img") == 1  # few names: one bar chart


def test_no_stage_is_shown_running() -> None:
    assert _status("report", {"status": "running"}) == "done (this page)"
    assert _status("pretrain", {"status": "running"}).startswith("interrupted")
    assert _status("pretrain", {"status": "done"}) == "done"


def test_rejections_are_grouped_by_rule() -> None:
    reasons = {"too short: 18 words < filter.min_words 40": 2, "too short: 7 words < filter.min_words 40": 1,
               "repetition: 0.4 of lines repeated": 1}
    assert _by_rule(reasons) == {"too short": 3, "repetition": 1}


def test_redteam_section_shows_counts_per_mode_and_agreement(tmp_path) -> None:  # noqa: ANN001
    from phiforge.eval.redteam import summarize
    from phiforge.run.report import _redteam_section

    records = [{"id": f"x-{i}", "category": "groups", "mode": m, "completion": f"c{i}", "grade": g,
                **({"hand_grade": h} if h else {})}
               for i, (m, g, h) in enumerate([("completion", "pass", "pass"), ("chat", "fail", "pass"),
                                              ("chat", "unparseable", "")])]
    section = summarize({"judge": {"kind": "local"}, "records": records})
    (tmp_path / "results.redteam.html").write_text("page")
    page = _redteam_section(section, tmp_path)
    assert "<td>all</td><td>2</td><td>0</td><td>0</td><td>1</td>" in page  # hand grades override the judge
    assert "<td>chat</td><td>1</td><td>0</td><td>0</td><td>1</td>" in page
    assert "<td>hand grades applied to this run</td><td>2</td><td>0.5" in page
    assert 'href="results.redteam.html"' in page and _redteam_section(None, tmp_path) == ""
