from google.protobuf.timestamp_pb2 import Timestamp

from mlpe.v1.deadletter_pb2 import DeadLetter


def test_dead_letter_keeps_raw_bytes():
    refused_at = Timestamp()
    refused_at.FromSeconds(1_700_000_000)
    letter = DeadLetter(source_topic="mlpe.metrics.gpu", source_partition=3, source_offset=42,
                        key=b"node-1", value=b"\x00\xffnot-protobuf", reason="bad batch",
                        refused_by="stream", refused_at=refused_at)
    again = DeadLetter.FromString(letter.SerializeToString())
    assert again == letter
    assert again.value == b"\x00\xffnot-protobuf"
