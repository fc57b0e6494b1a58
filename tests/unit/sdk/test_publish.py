"""The publisher's journal: what a killed process never got settled (acknowledged or
spooled) is sent again by the next one, for the steps a restart will not redo."""

import struct

from mlpe.agent.agent import train_step_records
from mlpe.agent.spool import Spool
from mlpe.common.process import free_port
from mlpe.sdk.publish import Publisher, frame, read_journal
from mlpe.v1 import training_pb2


def steps(*numbers: int):
    return train_step_records([training_pb2.TrainStep(job_id="j", rank=0, step=n, loss=n)
                               for n in numbers])


def test_a_torn_last_record_is_dropped(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(frame(steps(1, 2)) + frame(steps(3))[:-4])
    assert [training_pb2.TrainStep.FromString(r.value).step
            for r in read_journal(path)] == [1, 2]


def test_the_unsettled_steps_up_to_the_checkpoint_are_sent_again(tmp_path):
    spool_dir = tmp_path / "rank-0"
    # What a killed process left: five steps journaled, the first two settled.
    spool_dir.with_name("rank-0.journal").write_bytes(frame(steps(1, 2, 3, 4, 5)))
    spool_dir.with_name("rank-0.settled").write_bytes(struct.pack("<Q", 2))
    publisher = Publisher(f"127.0.0.1:{free_port()}", spool_dir)  # no Kafka: spooled
    assert publisher.republish(up_to_step=4) == 2  # steps 3 and 4; 5 is done again
    publisher.close(timeout=2)
    spooled = Spool(spool_dir).peek(100)
    assert [training_pb2.TrainStep.FromString(r.value).step for r, _, _ in spooled] == [3, 4]
    # The new process journaled them and counts them settled (spooled): nothing to resend.
    again = Publisher(f"127.0.0.1:{free_port()}", spool_dir)
    assert again.unsettled == []
    again.close(timeout=2)
