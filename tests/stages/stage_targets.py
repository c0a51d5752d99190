"""Stage functions for the harness tests (imported by spawned children through sys.path)."""

import time

from shm.errors import ShmError


def ok_main(config, link):
    link.ready(echo=config["x"])
    link.send("hello", 1)
    return 0


def fail_main(config, link):
    link.ready()
    raise ShmError("ring /x went away\nsecond line")


def hang_main(config, link):
    link.ready()
    while True:
        time.sleep(1)
