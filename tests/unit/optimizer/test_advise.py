"""AdviseJob's rules on evidence as the InfluxDB queries return it."""

from mlpe.optimizer.advise import Evidence, recommend


def gpu(util=95.0, used=60_000.0, total=81_920.0, **more):
    return {"util_mean": util, "mem_used_mean": used, "mem_total_mean": total,
            "sm_clock_mean": 1980.0, "sm_clock_max_mean": 1980.0, "temp_max": 70.0, **more}


def test_no_telemetry_says_so():
    (only,) = recommend(Evidence("job-x", 300))
    assert only.severity == "warning" and "job-x" in only.evidence


def test_input_bound_node_is_named_with_its_figures():
    ev = Evidence("j", 300, gpus={("node-3", "0"): gpu(util=41), ("node-3", "1"): gpu(util=41),
                                  ("node-1", "0"): gpu()},
                  hosts={"node-3": {"cpu_util": 97.0}, "node-1": {"cpu_util": 30.0}})
    (first, *_) = recommend(ev)
    assert first.title.startswith("Input-bound")
    assert first.evidence == "GPU util 41% while the CPU is 97% busy on node-3"


def test_thermal_before_headroom_and_headroom_carries_the_predicted_gain():
    ev = Evidence("j", 300, gpus={("n1", "2"): gpu(used=20_000, throttle=64, temp_max=91),
                                  ("n1", "3"): gpu(used=30_000)})
    recs = recommend(ev, micro_batch_gain_pct=18.0, micro_batch=4)
    assert recs[0].severity == "critical" and "n1 GPU 2" in recs[0].title
    headroom = next(r for r in recs if r.title.startswith("Memory headroom"))
    assert "micro-batch 4 → 8 fits" in headroom.title
    assert "51 GiB free" in headroom.evidence and "+18% tokens/s" in headroom.evidence
    assert headroom.expected_gain_pct == 18.0


def test_alerts_become_recommendations():
    ev = Evidence("j", 300, gpus={("n1", "0"): gpu()}, alerts=[
        {"rule": "gpu_straggler", "node": "n7", "gpu": "5"},
        {"rule": "training_loss_spike", "node": "", "gpu": ""}])
    titles = [r.title for r in recommend(ev)]
    assert any("Straggler: node n7 gpu 5" in t for t in titles)
    assert any(t.startswith("Loss instability") for t in titles)


def test_a_healthy_job_gets_nothing_to_change():
    ev = Evidence("j", 300, gpus={("n1", "0"): gpu()}, hosts={"n1": {"cpu_util": 20}},
                  steps={"step_time_s_mean": 1.0, "step_time_s_max": 1.1})
    (only,) = recommend(ev)
    assert only.title == "Nothing to change"


def test_uneven_step_times_are_pointed_out():
    ev = Evidence("j", 300, gpus={("n1", "0"): gpu()},
                  steps={"step_time_s_mean": 1.0, "step_time_s_max": 2.4})
    assert any(r.title.startswith("Uneven step times") for r in recommend(ev))
