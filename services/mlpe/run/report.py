"""The main job's HTML report: the summary as tables a person reads, and plots of the
fleet's GPUs and of the training job, from series read back from InfluxDB.

Reading (read_series) is apart from drawing (fleet_figure, training_figure) and from the
page (render_html), so that the drawing and the page are tested with synthetic
series and no InfluxDB. The summary's machine-readable JSON is kept at the end of the
page, folded away.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mlpe.common.settings import Settings
from mlpe.run.summary import relative_to_kill

Points = tuple[list[datetime], list[float]]          # times, values of one series
GPU_FIELDS = ("util_mean", "power_mean", "temp_mean")
GPU_UNITS = ("GPU util %", "power W", "temperature °C")
TRAIN_FIELDS = ("loss_mean", "tokens_per_s_mean", "step_time_s_mean")
BLANK = "—"  # an empty cell
GAP_S = 2.5  # a longer pause between 1 s windows (the kill, the restart) is drawn as a gap


@dataclass
class ReportData:
    """What the plots draw: plain series, keyed by what names them."""
    # field -> (node, gpu) -> points
    gpus: dict[str, dict[tuple[str, str], Points]] = field(default_factory=dict)
    # the firing alerts on the fleet
    alerts: list[datetime] = field(default_factory=list)
    # field -> rank -> points
    train: dict[str, dict[str, Points]] = field(default_factory=dict)
    # when rank 1 was killed
    killed: datetime | None = None

    def drawn(self) -> dict[str, int]:
        """How many series (or alert markers) each plot draws: the summary's
        report_series."""
        return {**{f: len(self.gpus.get(f, {})) for f in GPU_FIELDS},
                "alert_markers": len(self.alerts),
                **{f: len(self.train.get(f, {})) for f in TRAIN_FIELDS}}


# -- reading -----------------------------------------------------------------------------
def read_series(settings: Settings, fleet: str, job_id: str,
                killed_wall: float = 0.0) -> ReportData:
    """The last 30 minutes of the fleet's GPU windows and alerts, and the job's
    training windows, from InfluxDB."""
    from influxdb_client import InfluxDBClient

    from mlpe.common.tokens import influx_token

    bucket = settings.influx_bucket_of("1s")
    gpu_flux = f'''import "strings"
        from(bucket: "{bucket}") |> range(start: -30m)
          |> filter(fn: (r) => r._measurement == "gpu" and r.window == "1s" and
              (r._field == "util_mean" or r._field == "power_mean" or r._field == "temp_mean"))
          |> filter(fn: (r) => strings.hasPrefix(v: r.node, prefix: "{fleet}"))'''
    alert_flux = f'''from(bucket: "{settings.influx_bucket}") |> range(start: -30m)
          |> filter(fn: (r) => r._measurement == "alert" and r._field == "state" and
              r._value == "firing")'''
    train_flux = f'''from(bucket: "{bucket}") |> range(start: -30m)
          |> filter(fn: (r) => r._measurement == "train" and r.window == "1s" and
              r.job == "{job_id}" and (r._field == "loss_mean" or
              r._field == "tokens_per_s_mean" or r._field == "step_time_s_mean"))'''
    data = ReportData(killed=datetime.fromtimestamp(killed_wall, UTC) if killed_wall else None)
    with InfluxDBClient(url=settings.influx_url, token=influx_token(settings),
                        org=settings.influx_org) as db:
        query = db.query_api().query
        for r in (r for table in query(gpu_flux) for r in table.records):
            key = (str(r.values.get("node")), str(r.values.get("gpu")))
            _append(data.gpus.setdefault(r.get_field(), {}), key, r)
        # Only the fleet's: the training job's alerts carry a job, not a node.
        data.alerts = [r.get_time() for table in query(alert_flux) for r in table.records
                       if str(r.values.get("node", "")).startswith(fleet)]
        for r in (r for table in query(train_flux) for r in table.records):
            _append(data.train.setdefault(r.get_field(), {}), str(r.values.get("rank")), r)
    return data


def _append(series: dict, key, record) -> None:
    times, values = series.setdefault(key, ([], []))
    times.append(record.get_time())
    values.append(record.get_value())


# -- drawing -----------------------------------------------------------------------------
def fleet_figure(data: ReportData):
    """The fleet's GPUs, one panel per field, alerts as red lines (a matplotlib figure)."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(13, 8.5), sharex=True)
    colours = plt.get_cmap("tab20").colors  # 20 distinct: two nodes of 8 GPUs each differ
    for ax, name, unit in zip(axes, GPU_FIELDS, GPU_UNITS, strict=True):
        for i, ((node, gpu), (ts, vs)) in enumerate(sorted(data.gpus.get(name, {}).items())):
            ax.plot(ts, vs, lw=0.7, color=colours[i % len(colours)],
                    label=f"node {node[-2:]} GPU {gpu}")
        for i, at in enumerate(data.alerts):
            ax.axvline(at, color="red", lw=0.8, alpha=0.6, label="alert" if i == 0 else None)
        ax.set_ylabel(unit)
        if ax.get_legend_handles_labels()[0]:  # outside the axes, two columns: 16 GPUs fit
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), ncols=2, fontsize=7,
                      frameon=False)
    axes[0].set_title("simulated fleet (red lines: alerts)")
    return fig


def training_figure(data: ReportData):
    """The job's loss and throughput per rank, the kill, its step times (a figure)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name, ax in zip(TRAIN_FIELDS[:2], axes[:2], strict=True):
        for rank, (ts, vs) in sorted(data.train.get(name, {}).items()):
            ax.plot(*_gapped(ts, vs), ".-", lw=0.8, ms=3, label=f"rank {rank}")
    for rank, (_, vs) in sorted(data.train.get("step_time_s_mean", {}).items()):
        axes[2].hist(vs, bins=30, alpha=0.6, label=f"rank {rank}")
    if data.killed:
        for ax in axes[:2]:
            ax.axvline(data.killed, color="red", lw=0.8, label="rank 1 killed")
    for ax, title in zip(axes, ("loss", "tokens/s per rank", "step time (s) distribution"),
                         strict=True):
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return fig


def _gapped(ts: list[datetime], vs: list[float]) -> Points:
    """The points with a NaN in each pause longer than GAP_S, so the line breaks there."""
    times, values = [], []
    for i, (t, v) in enumerate(zip(ts, vs, strict=True)):
        if i and (t - ts[i - 1]).total_seconds() > GAP_S:
            times.append(t)
            values.append(float("nan"))
        times.append(t)
        values.append(v)
    return times, values


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """The figure as a base64 PNG; closes it."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")  # keeps outside legends
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


# -- the page ----------------------------------------------------------------------------
def write_html_report(path: Path, summary: dict, data: ReportData) -> dict[str, int]:
    """Draw the plots, write the page; how many series each plot drew."""
    figures = [("GPUs", png(fleet_figure(data))),
               (f"training job {summary['job']['id']}", png(training_figure(data)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(summary, figures))
    return data.drawn()


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1250px}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f2f2f2}
td.n{text-align:right}img{max-width:100%}.muted{color:#666}"""


def render_html(summary: dict, figures: list[tuple[str, str]]) -> str:
    """The page: the summary's tables and the (title, base64 PNG) figures, the fleet's
    first, then the job's, each beside its tables."""
    gpu_figures, job_figures = figures[:1], figures[1:]
    parts = [f"<h1>mlpe run {_e(summary['run'])}</h1>",
             _overview(summary), _alerts_section(summary), _figures(gpu_figures),
             _job_section(summary), _figures(job_figures), _advice_section(summary),
             "<details><summary>the summary as JSON (as <code>mlpe run</code> prints it last)"
             f"</summary><pre>{_e(json.dumps(summary, indent=1))}</pre></details>"]
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>mlpe run {_e(summary['run'])}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def _overview(s: dict) -> str:
    recall = "n/a (no fault injected)" if s["fault_recall"] is None \
        else f"{s['fault_recall']:.0%}"
    return _table(["values ingested", "faults caught", "false alarms", "webhook messages"],
                  [[s["values_ingested"], recall, s["false_alarms"], s["webhook_deliveries"]]])


def _alerts_section(s: dict) -> str:
    faults = [[f["kind"], f"node {f['node']}" if f["node"] else "the training job",
               f["at_s"], "missed" if f["caught_after_s"] is None else f["caught_after_s"]]
              for f in s.get("faults", [])]
    alerts = [[a["rule"], a.get("detector"), _where(a.get("labels", {})),
               a.get("fault") or "none: a false alarm",
               BLANK if a["delay_s"] is None else a["delay_s"]] for a in s["alerts"]]
    return ("<h2>Faults injected into the fleet</h2>"
            + _table(["fault", "where", "at (s after the fleet started)", "caught after (s)"],
                     faults, empty="no fault happened within the fleet's run")
            + "<h2>Alerts on the fleet</h2>"
            + _table(["alert", "detector", "where", "fault it caught", "delay (s)"], alerts,
                     empty="no alert"))


def _where(labels: dict) -> str:
    named = [f"{k} {labels[k]}" for k in ("node", "gpu", "job", "rank") if k in labels]
    return ", ".join(named) or BLANK


def _job_section(s: dict) -> str:
    job, plan = s["job"], s["plan"]
    result = [["job", job["id"]], ["state", job["state"]], ["steps", job["steps"]],
              ["loss", job["loss"]], ["restarts", job["restarts"]]]
    recovery = [["rank 1 killed at step", job.get("killed_at_step")],
                ["resumed from the checkpoint of step", job.get("resumed_from")],
                ["kill to first step (s)", job.get("kill_to_first_step_s")]]
    own = [[a["alert"], "firing" if a["firing"] else "resolved",
            relative_to_kill(a["s_after_kill"]) or BLANK] for a in s["job_alerts"]]
    return ("<h2>The training job</h2><h3>Plan from the optimizer</h3>"
            + _table(["model", "cluster", "best layout"],
                     [[plan["model"], plan["cluster"], plan["best"]]])
            + "<h3>Result</h3>" + _pairs(result)
            + "<h3>Recovery from the kill</h3>"
            + (_pairs(recovery) if "kill_to_first_step_s" in job
               else "<p class='muted'>no recovery was seen</p>")
            + "<h3>Its own alerts (not scored)</h3>"
            + _table(["alert", "state", "when"], own, empty="none"))


def _advice_section(s: dict) -> str:
    parts = ["<h2>The optimizer's advice</h2>"]
    for who, lines in s["advice"].items():
        items = "".join(f"<li>{_e(line)}</li>" for line in lines) or "<li>none</li>"
        parts.append(f"<h3>for {_e(who)}</h3><ul>{items}</ul>")
    return "".join(parts)


def _figures(figures: list[tuple[str, str]]) -> str:
    return "".join(f"<h2>{_e(title)}</h2><img src='data:image/png;base64,{png}' "
                   f"alt='{_e(title)}'>" for title, png in figures)


def _table(headers: list[str], rows: list[list], *, empty: str = "") -> str:
    if not rows:
        return f"<p class='muted'>{_e(empty)}</p>"
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(map(_cell, row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _pairs(rows: list[list]) -> str:
    """A two-column table of (name, value) rows."""
    return "<table>" + "".join(f"<tr><th>{_e(name)}</th>{_cell(value)}</tr>"
                               for name, value in rows) + "</table>"


def _cell(value) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<td class='n'>{_e(value)}</td>"
    return f"<td>{_e(BLANK if value is None else value)}</td>"


def _e(value) -> str:
    return html.escape(str(value))
