"""For every test folder: what a test started is stopped when the session ends."""

import sys


def pytest_sessionfinish(session, exitstatus):
    # Each xdist worker runs this for what its own tests started. Not imported here: the
    # kernel package's tests run where mlpe.common (which tests.helpers needs) is absent.
    helpers = sys.modules.get("tests.helpers")
    if helpers is not None:
        helpers.stop_leftovers()


def pytest_collection_modifyitems(items):
    # The slow tests first (order otherwise kept): pytest-xdist hands tests out in this
    # order, and a minute-long test started last kept one worker busy long after the
    # others had finished.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
