"""`mlpe run`'s HTML report from the canned summary and synthetic series: its tables,
its named plots, escaped text, and the JSON kept out of the way."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from run_inputs import FLEET, JOB

from mlpe.run.report import ReportData, fleet_figure, training_figure, write_html_report


class Page(HTMLParser):
    """The tables (rows of cell texts), the images, the body's text in and outside
    <details>."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict] = []
        self.outside, self.folded = [], []
        self.open = {"details": 0, "head": 0, "td": 0, "th": 0}  # how deep inside each
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.open[tag] = self.open.get(tag, 0) + 1
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        self.open[tag] = self.open.get(tag, 0) - 1

    def handle_data(self, data):
        if self.open["head"]:
            return
        (self.folded if self.open["details"] else self.outside).append(data)
        if self.open["td"] or self.open["th"]:
            self.tables[-1][-1][-1] += data

    def table_with(self, header: str) -> list[list[str]]:
        return next(t for t in self.tables if header in t[0])


def test_counts_of_drawn_series_are_the_summarys_report_series(report):
    assert report[1] == {"util_mean": 16, "power_mean": 16, "temp_mean": 16, "alert_markers": 2,
                     "loss_mean": 2, "tokens_per_s_mean": 2, "step_time_s_mean": 2}


def test_the_summary_is_tables_a_person_reads(report):
    page = Page(report[0].read_text())
    alerts = page.table_with("delay (s)")
    assert alerts[1:] == [
        ["power spike on GPU 1", "rule", f"node {FLEET}-01, gpu 1", "none: a false alarm", "—"],
        ["thermal throttle on GPU 3", "rule", f"node {FLEET}-00, gpu 3", "thermal_throttle",
         "2.5"],
        ["xid 79 on GPU 5", "rule", f"node {FLEET}-01, gpu 5", "xid", "1.2"]]
    faults = page.table_with("caught after (s)")
    assert [row[0] + " " + row[-1] for row in faults[1:]] == [
        "thermal_throttle 2.5", "xid 1.2", "straggler missed"]
    assert page.table_with("values ingested")[1] == ["123456", "67%", "1", "6"]
    assert page.table_with("best layout")[1] == ["llama3-8b", "2x8xH100", "tp 8 · pp 1 · dp 2"]
    assert ["kill to first step (s)", "6.4"] in page.table_with("rank 1 killed at step")
    assert ["state", "completed"] in page.table_with("job")
    assert page.table_with("when")[1:] == [
        ["slow steps on j-42", "resolved", "1.5 s before the kill"],
        ["loss spike on j-42", "firing", "3.0 s after the kill"]]


def test_plots_are_images_and_the_json_is_folded_away(report, summary):
    text = report[0].read_text()
    page = Page(text)
    # tests/integration/test_run.py counts the plots by this very prefix.
    assert text.count("<img src='data:image/png;base64,") == 2
    assert [i["alt"] for i in page.images] == ["GPUs", f"training job {JOB}"]
    visible = "".join(page.outside)
    assert '"values_ingested"' not in visible and "{" not in visible
    folded = "".join(page.folded)
    assert json.loads(folded[folded.index("{"):]) == summary


def test_every_text_is_escaped(report):
    text = report[0].read_text()
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    advice = "".join(Page(text).outside)
    assert "raise the micro batch — <script>alert(1)</script> at 40 % util" in advice


def test_fleet_plots_name_their_series(series):
    fig = fleet_figure(series)
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(names) == 17 and names[0] == "node 00 GPU 0" and names[-1] == "alert"
        assert "node 01 GPU 7" in names
    assert [ax.get_legend() is not None for ax in training_figure(series).axes] == [True] * 3


def test_an_empty_run_still_makes_a_page(tmp_path, summary):
    path = tmp_path / "report.html"
    drawn = write_html_report(path, {**summary, "alerts": [], "job_alerts": []}, ReportData())
    text = path.read_text()
    assert set(drawn.values()) == {0}
    assert "no alert" in text and text.count("<img src='data:image/png;base64,") == 2
