"""`mlpe run`'s summary, built from canned webhook deliveries (formatted by `mlpe notify`'s
own format_message) and scored against run.yaml's faults; and printed."""

from run_inputs import FLEET, JOB, RECOVERY, summary_of

from mlpe.run.summary import format_summary, read_webhook_records


def test_fleet_alerts_are_matched_to_faults_with_their_delays(summary):
    assert [(a["rule"], a["fault"], a["delay_s"]) for a in summary["alerts"]] == [
        ("power spike on GPU 1", None, None),                  # no fault then: false alarm
        ("thermal throttle on GPU 3", "thermal_throttle", 2.5),
        ("xid 79 on GPU 5", "xid", 1.2)]
    assert summary["alerts"][1]["labels"] == {"node": f"{FLEET}-00", "gpu": "3"}
    assert summary["fault_recall"] == 0.667 and summary["false_alarms"] == 1
    assert [(f["kind"], f["node"], f["at_s"], f["caught_after_s"]) for f in summary["faults"]] \
        == [("thermal_throttle", f"{FLEET}-00", 25.0, 2.5), ("xid", f"{FLEET}-01", 40.0, 1.2),
            ("straggler", f"{FLEET}-01", 55.0, None)]


def test_the_jobs_own_alerts_are_kept_apart_and_timed_from_the_kill(summary):
    assert summary["job_alerts"] == [
        {"alert": "slow steps on j-42", "firing": False, "s_after_kill": -1.5},
        {"alert": "loss spike on j-42", "firing": True, "s_after_kill": 3.0}]


def test_the_rest_is_carried_as_given(summary):
    assert summary["run"] == "abc123" and summary["values_ingested"] == 123_456
    assert summary["webhook_deliveries"] == 6  # every delivery, scored or not
    assert summary["job"] == {"id": JOB, "state": "completed", "steps": 120, "loss": 4.2121,
                              "restarts": 1, **RECOVERY}
    assert summary["plan"]["best"] and list(summary["advice"]) == [JOB, f"{FLEET}-job"]


def test_faults_after_a_short_fleet_are_not_counted():
    summary = summary_of(duration_s=20.0, records=[])  # the first fault is at 25 s
    assert summary["faults"] == [] and summary["fault_recall"] is None
    assert "faults caught n/a, none injected" in format_summary(summary)


def test_printed_summary_reads_as_before(summary):
    lines = format_summary(summary).splitlines()
    assert lines[:4] == ["", "== mlpe run: summary ==", "values ingested: 123456",
                         "alerts: 3 (faults caught 67%, false alarms 1), webhook messages 6"]
    assert "  - power spike on GPU 1" in lines
    assert "  - thermal throttle on GPU 3 after 2.5 s" in lines
    assert f"alerts on the training job {JOB} (not scored): 2" in lines
    assert "  - resolved: slow steps on j-42 (1.5 s before the kill)" in lines
    assert "  - loss spike on j-42 (3.0 s after the kill)" in lines
    assert "plan: llama3-8b on 2x8xH100: tp 8 · pp 1 · dp 2" in lines
    assert (f"job {JOB}: completed at step 120, loss 4.212, restarts 1, recovered in 6.4 s"
            in lines)
    assert lines[-2:] == [f"advice for {FLEET}-job:", "  (advice unavailable: no data)"]


def test_webhook_record_is_read_line_by_line(tmp_path):
    record = tmp_path / "webhook.jsonl"
    assert read_webhook_records(record) == []  # alerts went to a real Slack: no record
    record.write_text('{"received_at": 1.0, "body": "{}"}\n{"received_at": 2.0, "body": "{}"}\n')
    assert [r["received_at"] for r in read_webhook_records(record)] == [1.0, 2.0]
