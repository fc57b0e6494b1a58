from mlpe.common.topics import ALL_TOPICS


def test_design_topics_declared_once():
    names = [t.name for t in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert set(names) == {
        "mlpe.metrics.gpu", "mlpe.metrics.host", "mlpe.events.train",
        "mlpe.events.kernel", "mlpe.alerts", "mlpe.deadletter", "mlpe.inventory", "mlpe.placement",
    }
    for topic in ALL_TOPICS:
        assert topic.partitions >= 1
        assert int(topic.config["retention.ms"]) == topic.retention_ms > 0


def test_an_apps_own_topic_keeps_the_shape_and_takes_the_app_id():
    from mlpe.common.topics import GPU_SECONDS, of_app

    own = of_app(GPU_SECONDS, "run-1")
    assert own.name == "run-1-gpu-seconds"
    assert (own.partitions, own.retention_ms) == (GPU_SECONDS.partitions, GPU_SECONDS.retention_ms)
