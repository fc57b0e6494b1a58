import json

from mlpe.common.logs import configure, register_secret


def test_json_lines_with_service_and_masked_secrets(capsys):
    log = configure("stream", "info", "json")
    register_secret("tok-abcdef123456")
    log.info("connected", url="http://x", influx_token="tok-abcdef123456", webhook_url="https://h")
    log.warning("retrying with tok-abcdef123456 in the message")
    log.debug("hidden at info level")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == [
        "connected", "retrying with *** in the message"]
    first = lines[0]
    assert first["service"] == "stream" and first["level"] == "info"
    assert first["influx_token"] == "***" and first["webhook_url"] == "***"
    assert first["url"] == "http://x"
