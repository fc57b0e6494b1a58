from mlpe.cli import tail
from mlpe.v1.training_pb2 import JobPlacement, RankProcess


def test_placements_are_decoded():
    placement = JobPlacement(job_id="j1", node_id="n1", time_ns=5, ranks=[
        RankProcess(rank=0, local_rank=0, pid=4242), RankProcess(rank=1, local_rank=1, pid=4243)])
    d = tail.describe("mlpe.placement", b"n1/j1", placement.SerializeToString())
    assert (d["key"], d["job_id"], d["node_id"]) == ("n1/j1", "j1", "n1")
    assert [r["pid"] for r in d["ranks"]] == ["4242", "4243"]  # int64: JSON strings
    assert tail.render(d).startswith('mlpe.placement key=n1/j1 {"job_id":"j1"')


def test_a_tombstone_is_shown_not_raised():
    d = tail.describe("mlpe.placement", b"n1/j1", None)
    assert d == {"topic": "mlpe.placement", "key": "n1/j1", "tombstone": True}
