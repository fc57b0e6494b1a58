import pytest

from mlpe.common.topics import ALL_TOPICS


def test_design_topics_declared_once():
    names = [t.name for t in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert set(names) == {
        "mlpe.metrics.gpu", "mlpe.metrics.host", "mlpe.events.train",
        "mlpe.events.kernel", "mlpe.events.cost", "mlpe.alerts", "mlpe.deadletter",
        "mlpe.inventory", "mlpe.placement",
    }
    for topic in ALL_TOPICS:
        assert topic.partitions >= 1
        assert int(topic.config["retention.ms"]) == topic.retention_ms > 0


def test_an_apps_own_topic_keeps_the_shape_and_takes_the_app_id():
    from mlpe.common.topics import GPU_SECONDS, of_app

    own = of_app(GPU_SECONDS, "run-1")
    assert own.name == "run-1-gpu-seconds"
    assert (own.partitions, own.retention_ms) == (GPU_SECONDS.partitions, GPU_SECONDS.retention_ms)


def test_metric_partition_counts_are_settings():
    from mlpe.common.settings import SettingsError, load
    from mlpe.common.topics import GPU_METRICS, HOST_METRICS, configured

    counts = {t.name: t.partitions for t in configured(load({
        "MLPE_GPU_METRICS_PARTITIONS": "48", "MLPE_HOST_METRICS_PARTITIONS": "2"}))}
    assert (counts[GPU_METRICS.name], counts[HOST_METRICS.name]) == (48, 2)
    assert {t.name: t.partitions for t in configured(load({}))}[GPU_METRICS.name] == 24
    with pytest.raises(SettingsError, match=r"MLPE_GPU_METRICS_PARTITIONS='0': expected a "
                                            "whole number from 1 to 1024"):
        load({"MLPE_GPU_METRICS_PARTITIONS": "0"})
