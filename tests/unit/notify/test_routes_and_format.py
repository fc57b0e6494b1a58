import json

import pytest

from mlpe.notify.routes import RoutesError, load
from mlpe.notify.slack import format_message, parse_message
from mlpe.v1 import alerts_pb2 as pb


def alert(**kw) -> pb.Alert:
    base = dict(fingerprint="f", rule="gpu_hot", severity=pb.SEVERITY_WARNING,
                state=pb.ALERT_FIRING, labels={"node": "n1", "gpu": "3"}, value=91,
                threshold=85, starts_at_ns=1_700_000_000 * 10**9, summary="GPU 3 on n1 hot",
                explanation="91 °C for 30 s, limit 85 °C", detector="rule")
    base.update(kw)
    return pb.Alert(**base)


def test_message_has_text_fallback_and_blocks():
    msg = format_message([alert(), alert(fingerprint="g", labels={"node": "n1", "gpu": "4"})])
    assert msg["text"] == "[FIRING] GPU 3 on n1 hot (+1 more)"
    assert len(msg["blocks"]) == 4
    assert "91 °C for 30 s" in msg["blocks"][0]["text"]["text"]
    assert "gpu=3, node=n1" in msg["blocks"][1]["elements"][0]["text"]


def test_resolved_message():
    msg = format_message([alert(state=pb.ALERT_RESOLVED, ends_at_ns=1_700_000_060 * 10**9)])
    assert msg["text"].startswith("[RESOLVED]")
    assert "RESOLVED: GPU 3 on n1 hot" in msg["blocks"][0]["text"]["text"]


def test_routes_match_severity_and_labels(tmp_path):
    f = tmp_path / "routes.yaml"
    f.write_text("routes:\n"
                 "  - {name: oncall, webhook_env: ONCALL_URL, severity: critical}\n"
                 "  - {name: jobs, webhook_env: JOBS_URL, labels: {job: '*'}}\n"
                 "default_webhook_env: ALL_URL\n")
    routes = load(str(f))
    assert [r.name for r in routes.match(alert(severity=pb.SEVERITY_CRITICAL))] == ["oncall"]
    assert [r.name for r in routes.match(alert(labels={"job": "j1"}))] == ["jobs"]
    both = alert(severity=pb.SEVERITY_CRITICAL, labels={"job": "j1"})
    assert [r.name for r in routes.match(both)] == ["oncall", "jobs"]
    default = routes.match(alert())
    assert [(r.name, r.webhook_env) for r in default] == [("default", "ALL_URL")]


@pytest.mark.parametrize(("text", "message"), [
    ("routes:\n  - {name: a}\n", "line 2: a route needs 'name' and 'webhook_env'"),
    ("routes:\n  - {name: a, webhook_env: X, severity: urgent}\n", "unknown severity 'urgent'"),
    ("routes:\n  - {name: a, webhook_env: X, url: http://x}\n", "unknown key(s) url"),
    ("routes: [", "not valid YAML"),
])
def test_bad_routes_file(tmp_path, text, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(RoutesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(str(f))


def test_the_detect_bench_reads_back_what_format_message_wrote():
    alerts = [pb.Alert(rule="r", detector="peer", summary="GPU 1 on n: slow",
                               state=pb.ALERT_FIRING, labels={"node": "n", "gpu": "1"},
                               severity=pb.SEVERITY_WARNING),
              pb.Alert(rule="t", detector="training", summary="Job j: spike",
                               state=pb.ALERT_RESOLVED, labels={"job": "j"})]
    body = json.dumps(format_message(alerts))
    assert parse_message(body) == [("GPU 1 on n: slow", "peer", {"gpu": "1", "node": "n"}, True),
                                   ("Job j: spike", "training", {"job": "j"}, False)]
