from mlpe.common.topics import ALL_TOPICS


def test_design_topics_declared_once():
    names = [t.name for t in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert set(names) == {
        "mlpe.metrics.gpu", "mlpe.metrics.host", "mlpe.events.train",
        "mlpe.events.kernel", "mlpe.alerts", "mlpe.deadletter", "mlpe.inventory",
    }
    for topic in ALL_TOPICS:
        assert topic.partitions >= 1
        assert int(topic.config["retention.ms"]) == topic.retention_ms > 0
