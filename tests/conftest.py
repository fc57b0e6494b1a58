"""For every test folder: what a test started is stopped when the session ends."""

from tests.helpers import stop_leftovers


def pytest_sessionfinish(session, exitstatus):
    stop_leftovers()  # each xdist worker runs this for what its own tests started
