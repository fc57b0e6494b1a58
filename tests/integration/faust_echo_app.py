"""A tiny Faust app for the smoke test: upper-cases each value from one topic into another.

Configured by environment so each test run uses its own topics and app id.
"""

import os

import faust

app = faust.App(
    os.environ["ECHO_APP_ID"],
    broker=f"kafka://{os.environ['ECHO_BOOTSTRAP']}",
    value_serializer="raw",
    topic_partitions=1,
    web_enabled=False,
    datadir=os.environ["ECHO_DATADIR"],
    consumer_auto_offset_reset="earliest",
)
source = app.topic(os.environ["ECHO_IN"], value_type=bytes, value_serializer="raw")
sink = app.topic(os.environ["ECHO_OUT"], value_type=bytes, value_serializer="raw")


@app.agent(source)
async def echo(stream):
    async for value in stream:
        await sink.send(value=value.upper())
