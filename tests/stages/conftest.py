"""Start multiprocessing's resource tracker once, before any test counts child processes.

``spawn`` launches the tracker with the first child and keeps it for the life of the test
process; started inside a test it would look like a leaked child.
"""

import multiprocessing.resource_tracker

import pytest


@pytest.fixture(scope="session", autouse=True)
def resource_tracker_running():
    multiprocessing.resource_tracker.ensure_running()
    yield
