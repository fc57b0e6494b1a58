"""The disk spool: order, the bound and its counted loss, surviving a restart or a torn write."""

from mlpe.agent.spool import Record, Spool


def records(start: int, n: int, size: int = 100) -> list[Record]:
    return [Record("mlpe.metrics.gpu", f"node-{i % 3}".encode(), i.to_bytes(8, "big") * (size // 8))
            for i in range(start, start + n)]


def drain(spool: Spool, chunk: int = 7) -> list[Record]:
    out = []
    while len(spool):
        got = spool.peek(chunk)
        out += [r for r, _, _ in got]
        spool.ack(got)
    return out


def test_fifo_across_segments(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    sent = records(0, 50)
    spool.append(sent[:20])
    spool.append(sent[20:])
    assert len(spool) == 50
    assert len(list(tmp_path.glob("*.spool"))) > 3
    assert drain(spool) == sent
    assert len(spool) == 0 and spool.lost == 0
    assert not list(tmp_path.glob("*.spool"))


def test_interleaved_append_and_ack_keeps_order(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=700)
    expected, got = records(0, 100), []
    for i in range(0, 100, 10):
        spool.append(expected[i:i + 10])
        chunk = spool.peek(6)
        spool.ack(chunk)
        got += [r for r, _, _ in chunk]
    got += drain(spool)
    assert got == expected


def test_bound_drops_oldest_and_counts_it(tmp_path):
    spool = Spool(tmp_path, max_bytes=4000, segment_bytes=1000)
    sent = records(0, 100)  # ~11 KB of frames into a 4 KB bound
    spool.append(sent)
    kept = drain(spool)
    assert spool.lost > 0
    assert spool.lost + len(kept) == 100
    assert kept == sent[-len(kept):]  # the newest survive, still in order


def test_restart_replays_exactly_the_unacknowledged(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    sent = records(0, 40)
    spool.append(sent)
    spool.ack(spool.peek(15))
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    assert len(again) == 25
    assert drain(again) == sent[15:]


def test_torn_last_record_is_dropped_not_fatal(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    sent = records(0, 5)
    spool.append(sent)
    spool.close()
    segment = next(tmp_path.glob("*.spool"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-30])  # the agent died mid-write
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert drain(again) == sent[:4]
