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


def signals_main(config, link):
    """Report how this stage sees SIGINT, then wait to be stopped."""
    import signal

    link.ready(sigint_ignored=signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
               blocked=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    while True:
        time.sleep(1)


def ring_wait_main(config, link):
    """Wait on a ring nobody writes to (a scanner between rounds)."""
    from shm.ring import CONSUMER, Ring

    with Ring.attach(config["ring"], "<u8", role=CONSUMER) as ring:
        link.ready()
        ring.pop(1)
    return 0


def owner_main(config, link):
    """Own a ring, start a child stage that names it, and hang (until killed)."""
    from shm.naming import segment_name
    from shm.ring import Ring
    from stages.harness import StageProcess

    with Ring.create(segment_name(config["run_id"], "orphan"), "<u8", 16) as ring:
        child = StageProcess("grandchild", config["child"], {"ring": ring.name})
        child.start()
        child.wait_ready(30)
        link.ready(ring=ring.name, child=child.pid)
        while True:
            time.sleep(1)
