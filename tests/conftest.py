"""For every test folder: what a test started is stopped when the session ends."""

import sys


def pytest_sessionfinish(session, exitstatus):
    # Each xdist worker runs this for what its own tests started. Not imported here: the
    # kernel package's tests run where mlpe.common (which tests.helpers needs) is absent.
    helpers = sys.modules.get("tests.helpers")
    if helpers is not None:
        helpers.stop_leftovers()
