"""Slack text from alerts: escaped (no mention, no link), bounded, split within Slack's
limits; the sink's check of those limits; alerts refused at intake."""

import json

import pytest

from mlpe.notify.notifier import MAX_LABELS, check, reason_of
from mlpe.notify.slack import (
    ALERTS_PER_MESSAGE,
    MAX_BLOCKS,
    MAX_TEXT_OBJECT,
    clip,
    escape,
    format_messages,
    limits_broken,
    link,
    parse_message,
)
from mlpe.v1 import alerts_pb2 as pb

HOSTILE = "<!channel> <http://evil|click> & <@U123> <!here>"


def alert(i: int = 0, **kw) -> pb.Alert:
    base = dict(fingerprint=f"f{i}", rule="gpu_hot", severity=pb.SEVERITY_WARNING,
                state=pb.ALERT_FIRING, labels={"node": "n1", "gpu": str(i)}, value=91,
                threshold=85, starts_at_ns=1_700_000_000 * 10**9,
                summary=f"GPU {i} on n1 hot", explanation="91 °C for 30 s", detector="rule")
    base.update(kw)
    return pb.Alert(**base)


def texts(message: dict) -> list[str]:
    """Every mrkdwn string of a message: the fallback and each text object."""
    out = [message["text"]]
    for block in message["blocks"]:
        objects = [block["text"]] if "text" in block else block.get("elements", [])
        assert all(o["type"] == "mrkdwn" and o["verbatim"] is True for o in objects)
        out += [o["text"] for o in objects]
    return out


def test_escape_leaves_no_angle_bracket():
    assert escape(HOSTILE) == ("&lt;!channel&gt; &lt;http://evil|click&gt; &amp; "
                               "&lt;@U123&gt; &lt;!here&gt;")


def test_hostile_values_in_every_field_add_no_mention_nor_link():
    a = alert(summary=HOSTILE, explanation=HOSTILE, detector=HOSTILE, rule=HOSTILE,
              labels={"node": HOSTILE, "job": "<!everyone>", "device_uuid": "GPU-<x>",
                      HOSTILE: "v"})
    for state in (pb.ALERT_FIRING, pb.ALERT_RESOLVED):
        a.state = state
        [message] = format_messages([a])
        for text in texts(message):
            assert "<" not in text and ">" not in text, text
        assert limits_broken(message) is None
    assert "&lt;!channel&gt;" in message["blocks"][0]["text"]["text"]


def test_a_newline_in_a_summary_cannot_start_a_line_of_its_own():
    [message] = format_messages([alert(summary="hot\n> quoted\n*bold*")])
    first_line = message["blocks"][0]["text"]["text"].split("\n")[0]
    assert "&gt; quoted" in first_line


@pytest.mark.parametrize("size", [10_000, 1_000_000])
def test_huge_texts_are_clipped_to_a_sendable_message(size):
    a = alert(summary="s" * size, explanation="<" * size, rule="r" * size,
              labels={"node": "n" * 1000, "job": "&" * 1000})
    [message] = format_messages([a])
    assert limits_broken(message) is None
    assert max(len(t) for t in texts(message)) <= MAX_TEXT_OBJECT
    assert message["blocks"][0]["text"]["text"].count("s") <= 300
    assert "…" in message["text"]


def test_clip_never_cuts_an_entity():
    for n in range(1, 12):
        cut = clip(escape("&" * 50), 10 + n)
        assert len(cut) <= 10 + n and cut.endswith("…")
        assert cut[:-1].replace("&amp;", "") == "", cut


def test_our_own_link_is_built_from_escaped_parts():
    assert link("https://grafana/d?a=1&b=2", "node <x>|y") == \
        "<https://grafana/d?a=1&amp;b=2|node &lt;x&gt;¦y>"


def test_a_group_of_60_is_split_into_numbered_messages_within_limits():
    alerts = [alert(i) for i in range(60)]
    messages = format_messages(alerts)
    assert len(messages) == 3  # 24 + 24 + 12
    for k, message in enumerate(messages, 1):
        assert len(message["blocks"]) <= MAX_BLOCKS
        assert limits_broken(message) is None
        assert message["text"].endswith(f"({k}/3)")
        assert f"part {k} of 3 · 60 alerts" in message["blocks"][0]["elements"][0]["text"]
    got = [title for m in messages for title, *_ in parse_message(json.dumps(m))]
    assert got == [f"GPU {i} on n1 hot" for i in range(60)]
    assert len(format_messages(alerts[:ALERTS_PER_MESSAGE])) == 1


def test_parse_message_gives_back_the_unescaped_values():
    a = alert(summary="a<b & c>d", labels={"node": "n&1", "job": "<j>"}, detector="p&q")
    [(title, detector, labels, firing)] = parse_message(json.dumps(format_messages([a])[0]))
    assert (title, detector, labels, firing) == ("a<b & c>d", "p&q",
                                                 {"job": "<j>", "node": "n&1"}, True)


def test_absurd_numbers_and_times_still_format():
    a = alert(value=float("nan"), threshold=float("inf"), starts_at_ns=2**63 - 1,
              ends_at_ns=-(2**63), state=pb.ALERT_RESOLVED, severity=99)
    [message] = format_messages([a])
    context = message["blocks"][1]["elements"][0]["text"]
    assert "value nan vs inf" in context and ":white_check_mark:" in \
        message["blocks"][0]["text"]["text"]
    assert limits_broken(message) is None


@pytest.mark.parametrize(("payload", "why"), [
    ({"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}}]
      * 51}, "invalid_blocks"),
    ({"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn",
                                                          "text": "x" * 3001}}]},
     "invalid_blocks"),
    ({"text": "x", "blocks": [{"type": "context", "elements": [
        {"type": "mrkdwn", "text": "x" * 3001}]}]}, "invalid_blocks"),
    ({"text": "x" * 40_001}, "invalid_blocks"),
    ({"text": ""}, "no_text"),
    ([], "invalid_payload"),
])
def test_slack_limits_as_the_sink_checks_them(payload, why):
    assert limits_broken(payload) == why


def test_limits_hold_at_the_edges():
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3000}}
    assert limits_broken({"text": "x" * 40_000, "blocks": [section] * 50}) is None


@pytest.mark.parametrize(("changes", "reason"), [
    ({"fingerprint": ""}, "needs a fingerprint"),
    ({"state": pb.ALERT_STATE_UNSPECIFIED}, "needs a fingerprint and a state"),
    ({"fingerprint": "f" * 257}, "fingerprint has 257 characters, at most 256"),
    ({"labels": {f"k{i}": "v" for i in range(MAX_LABELS + 1)}}, "65 labels, at most 64"),
    ({"labels": {"node": "n" * 1025}}, "label 'node'"),
    ({"labels": {"k" * 129: "v"}}, "key 1-128"),
])
def test_absurd_alerts_are_refused_with_the_reason(changes, reason):
    with pytest.raises(ValueError, match=reason):
        check(alert(**changes))


def test_a_dead_letter_reason_is_one_bounded_line():
    assert reason_of(ValueError("a\nb")) == "a b"
    assert reason_of(KeyError("x")) == "KeyError: 'x'"
    assert len(reason_of(RuntimeError("y" * 10_000))) == 500
