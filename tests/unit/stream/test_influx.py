"""The writer sends each line to its resolution's bucket, by the line's window tag."""

import asyncio

from mlpe.common.settings import load
from mlpe.stream.influx import InfluxWriter, bucket_of

SETTINGS = load({"MLPE_INFLUX_BUCKET": "b", "MLPE_INFLUX_TOKEN": "t"})


def test_bucket_of_reads_the_window_tag_of_the_series_key_only():
    assert bucket_of(SETTINGS, "gpu,node=n1,window=1s,gpu=0 util_mean=1.0 1") == "b-1s"
    assert bucket_of(SETTINGS, "host,node=n1,window=10s cpu_util_mean=1.0 1") == "b-10s"
    assert bucket_of(SETTINGS, "train,job=j,rank=0,window=1m loss_mean=1.0 1") == "b-1m"
    assert bucket_of(SETTINGS, r"gpu,node=a\ b\,c,window=1s,gpu=0 x=1.0 1") == "b-1s"
    # not a window tag: a field, a tag value, an unknown resolution, no window at all
    assert bucket_of(SETTINGS, 'alert,rule=r summary="x,window=1s y" 1') == "b"
    assert bucket_of(SETTINGS, r"alert,rule=a\,window=1s x=1.0 1") == "b"
    assert bucket_of(SETTINGS, "gpu,node=n,window=5s x=1.0 1") == "b"
    assert bucket_of(SETTINGS, "kernel,job=j,rank=0,op=o,direction=forward calls=1i 1") == "b"


class FakeWriteApi:
    def __init__(self):
        self.writes: list[tuple[str, list[str]]] = []

    async def write(self, bucket, record, write_precision):
        self.writes.append((bucket, list(record)))


def test_write_keeps_the_interface_and_routes_each_line():
    writer, api = InfluxWriter(SETTINGS), FakeWriteApi()

    async def fake_api():
        return api

    writer._api = fake_api
    lines = ["gpu,node=n,window=1s,gpu=0 x=1.0 1", "alert,rule=r x=1.0 2",
             "gpu,node=n,window=10s,gpu=0 x=1.0 3", "gpu,node=n,window=1s,gpu=1 x=1.0 4"]
    asyncio.run(writer.write(lines))
    assert sorted(api.writes) == [("b", [lines[1]]), ("b-10s", [lines[2]]),
                                  ("b-1s", [lines[0], lines[3]])]
