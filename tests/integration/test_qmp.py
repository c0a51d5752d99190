"""Both monitors driven by QEMU's own client, qemu.qmp: ``rdma-pipeline vm --qmp`` migrating to
``rdma-pipeline incoming --qmp``, and the same monitor checks against QEMU 7.2 itself
(``-M none``, monitor over ``tcp:``) where they apply: that is how we know the behaviour is
QEMU's.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from qmp_helpers import (
    QEMU,
    Monitored,
    client,
    events_until,
    free_port,
    next_event,
    quit_monitor,
)

qmp = pytest.importorskip("qemu.qmp")
pytestmark = pytest.mark.slow

QEMU_RAM_KEYS = {
    "transferred", "remaining", "total", "duplicate", "skipped", "normal", "normal-bytes",
    "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests", "page-size",
    "multifd-bytes", "pages-per-second", "precopy-bytes", "downtime-bytes", "postcopy-bytes",
    "dirty-sync-missed-zero-copy"}
VM = ["vm", "--ram", "64M", "--dirty-rate", "5"]
IMPLEMENTATIONS = ["rdma-pipeline", pytest.param("qemu", marks=pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed"))]


def run(coro, timeout: float = 240.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def monitored(impl: str) -> Monitored:
    return Monitored([], qemu=True) if impl == "qemu" else Monitored(VM)


def incoming(uri: str) -> Monitored:
    return Monitored(["incoming", uri])


async def execute_error(c, cmd: str, args: dict | None = None):
    with pytest.raises(qmp.ExecuteError) as info:
        await c.execute(cmd, args)
    return info.value


# -- the wire, byte for byte ------------------------------------------------------------------
def read_json(f) -> dict:
    return json.loads(f.readline())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_greeting_negotiation_and_errors_on_the_wire(impl):
    with monitored(impl) as mon, mon.sock() as s:
        s.settimeout(60)
        f = s.makefile("rwb")
        greeting = read_json(f)["QMP"]
        assert set(greeting["version"]["qemu"]) == {"major", "minor", "micro"}
        assert "package" in greeting["version"] and isinstance(greeting["capabilities"], list)

        def send(text: bytes) -> dict:
            f.write(text + b"\n")
            f.flush()
            return read_json(f)

        early = send(b'{"execute": "query-status", "id": "x1"}')
        assert early == {"id": "x1", "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
        assert send(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        again = send(b'{"execute": "qmp_capabilities"}')
        assert again["error"]["class"] == "CommandNotFound"
        assert send(b'{"execute": "nosuch", "id": 5}') == {"id": 5, "error": {
            "class": "CommandNotFound", "desc": "The command nosuch has not been found"}}
        assert send(b'{"bad": 1}')["error"] == {
            "class": "GenericError", "desc": "QMP input member 'bad' is unexpected"}
        assert send(b'[1]')["error"]["desc"] == "QMP input must be a JSON object"
        assert send(b'garbage')["error"]["desc"].startswith("JSON parse error")
        assert send(b'{"execute": "query-status", "arguments": {"x": 1}}')["error"] == {
            "class": "GenericError", "desc": "Parameter 'x' is unexpected"}
        status = send(b'{"execute": "query-status", "id": {"a": 1}}')
        assert status == {"return": {"status": "running", "singlestep": False,
                                     "running": True}, "id": {"a": 1}}
        # one object split over two writes, and two in one
        f.write(b'{"execute": "query-')
        f.flush()
        f.write(b'migrate"}\n{"execute": "query-migrate", "id": 2}\n')
        f.flush()
        assert read_json(f) == {"return": {}}
        assert read_json(f) == {"return": {}, "id": 2}


# -- the monitor commands, through qemu.qmp ---------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_monitor_commands_as_qemu_answers_them(impl):
    async def body(mon):
        c = await client(mon, impl)
        assert await c.execute("query-migrate") == {}
        await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True},
            {"capability": "rdma-pin-all", "state": True}]})
        caps = {x["capability"]: x["state"]
                for x in await c.execute("query-migrate-capabilities")}
        assert caps["events"] and caps["rdma-pin-all"] and not caps["auto-converge"]
        await c.execute("migrate-set-parameters", {"downtime-limit": 500})
        params = await c.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 500
        assert {"max-bandwidth", "cpu-throttle-initial", "cpu-throttle-increment",
                "max-cpu-throttle"} <= set(params)
        err = await execute_error(c, "migrate-set-parameters", {"downtime-limit": "abc"})
        assert (err.error_class, str(err)) == (
            "GenericError", "Parameter 'downtime-limit' expects uint64")
        err = await execute_error(c, "migrate-set-parameters", {"nosuch": 1})
        assert str(err) == "Parameter 'nosuch' is unexpected"
        err = await execute_error(c, "migrate-set-capabilities", {"capabilities": [
            {"capability": "nosuch", "state": True}]})
        assert str(err) == "Parameter 'capability' does not accept value 'nosuch'"
        err = await execute_error(c, "nosuch")
        assert err.error_class == "CommandNotFound"

        await c.execute("stop")
        stop = await next_event(c, "STOP")
        assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        assert (await c.execute("query-status"))["status"] == "paused"
        assert await c.execute("human-monitor-command", {"command-line": "info status"}) \
            == "VM status: paused\r\n"
        await c.execute("cont")
        await next_event(c, "RESUME")
        assert await c.execute("query-status") == {"status": "running", "singlestep": False,
                                                   "running": True}
        assert await c.execute("human-monitor-command", {"command-line": "info status"}) \
            == "VM status: running\r\n"

        # a destination that is not there: migrate returns, the migration fails
        assert await c.execute("migrate", {"uri": f"tcp:127.0.0.1:{free_port()}"}) == {}
        seen = await events_until(c)
        assert [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"][-1] == "failed"
        info = await c.execute("query-migrate")
        assert info["status"] == "failed" and info["error-desc"]
        assert (await c.execute("query-status"))["status"] == "running"
        text = await c.execute("human-monitor-command", {"command-line": "info migrate"})
        assert "Migration status: failed" in text
        await c.execute("migrate_cancel")            # nothing to cancel: still answered

        await quit_monitor(c)
        assert mon.wait() == 0

    with monitored(impl) as mon:
        run(body(mon))


# -- a whole migration, our two processes ----------------------------------------------------
def test_migration_driven_by_qemu_qmp_completes():
    port = free_port()

    async def body(src_mon, dst_mon):
        dst = await client(dst_mon, "dst")
        src = await client(src_mon, "src")
        listening = await dst.execute("query-migrate")
        assert listening["status"] == "setup"
        assert listening["socket-address"][0]["port"] == str(port)
        await dst.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True},
            {"capability": "rdma-pin-all", "state": True}]})
        await src.execute("migrate-set-parameters", {"downtime-limit": 500})
        assert await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"}) == {}
        early = await src.execute("query-migrate")
        assert early["status"] in ("setup", "active", "completed")
        seen = await events_until(src)
        statuses = [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"]
        assert statuses[0] == "setup" and "active" in statuses
        assert statuses[-1] == "completed", await src.execute("query-migrate")
        assert [e["event"] for e in seen].count("STOP") == 1
        passes = [e["data"]["pass"] for e in seen if e["event"] == "MIGRATION_PASS"]
        assert passes and passes == sorted(passes) and passes[0] == 1

        info = await src.execute("query-migrate")
        assert info["status"] == "completed"
        assert {"total-time", "setup-time", "downtime", "ram"} <= set(info)
        assert "expected-downtime" not in info
        assert set(info["ram"]) == QEMU_RAM_KEYS
        assert info["ram"]["total"] >= 64 << 20 and info["ram"]["remaining"] == 0
        assert info["ram"]["transferred"] > 0 and info["ram"]["mbps"] > 0
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        assert await src.execute("human-monitor-command", {"command-line": "info status"}) \
            == "VM status: paused (postmigrate)\r\n"

        await next_event(dst, "MIGRATION", status="completed")
        assert await dst.execute("query-migrate") == {"status": "completed"}
        assert (await dst.execute("query-status"))["status"] == "running"
        await dst.execute("stop")                   # the migrated guest pauses and resumes
        await next_event(dst, "STOP")
        assert (await dst.execute("query-status"))["status"] == "paused"
        await dst.execute("cont")
        await next_event(dst, "RESUME")
        await src.execute("cont")                   # postmigrate -> running, as in QEMU
        await next_event(src, "RESUME")
        assert (await src.execute("query-status"))["status"] == "running"
        await quit_monitor(src)
        await quit_monitor(dst)
        assert src_mon.wait() == 0 and dst_mon.wait() == 0

    with incoming(f"rdma:127.0.0.1:{port}") as dst_mon, Monitored(VM) as src_mon:
        run(body(src_mon, dst_mon))


def test_migration_to_a_dead_port_fails_and_the_source_runs():
    async def body(mon):
        c = await client(mon, "src")
        await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await c.execute("migrate", {"uri": f"rdma:127.0.0.1:{free_port()}"})
        await next_event(c, "MIGRATION", status="failed")
        info = await c.execute("query-migrate")
        assert info["status"] == "failed" and info["error-desc"]
        assert (await c.execute("query-status"))["status"] == "running"
        await quit_monitor(c)
        assert mon.wait() == 0

    with Monitored(VM) as mon:
        run(body(mon))


async def slow_migration(src_mon, port: int):
    """The source's client once its migration is active: events on, 64 MiB at 2 MiB/s, so it
    is still running when the test acts on it."""
    src = await client(src_mon, "src")
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}]})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 2 << 20})
    await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
    await next_event(src, "MIGRATION", status="active")
    return src


def test_migrate_cancel_mid_way_leaves_the_source_running():
    port = free_port()

    async def body(src_mon, dst_mon):
        src = await slow_migration(src_mon, port)
        info = await src.execute("query-migrate")
        assert info["status"] == "active" and "downtime" not in info
        assert {"total-time", "setup-time", "expected-downtime"} <= set(info)
        assert set(info["ram"]) == QEMU_RAM_KEYS and isinstance(info["ram"]["mbps"], float)
        err = await execute_error(src, "migrate", {"uri": f"rdma:127.0.0.1:{port}"})
        assert str(err) == "There's a migration process in progress"
        await src.execute("migrate_cancel")
        seen = await events_until(src)
        assert seen[-1]["data"]["status"] == "cancelled"
        assert (await src.execute("query-migrate")) == {"status": "cancelled"}
        assert (await src.execute("query-status"))["status"] == "running"
        await quit_monitor(src)
        assert src_mon.wait() == 0
        assert dst_mon.wait() == 1          # as QEMU's: a destination without a guest ends

    with incoming(f"rdma:127.0.0.1:{port}") as dst_mon, Monitored(VM) as src_mon:
        run(body(src_mon, dst_mon))


def test_deferred_incoming_starts_at_migrate_incoming():
    port = free_port()

    async def body(mon):
        c = await client(mon, "dst")
        assert (await c.execute("query-status"))["status"] == "inmigrate"
        assert await c.execute("query-migrate") == {}
        await c.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        assert "listening on" in mon.stderr_line()
        err = await execute_error(c, "migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        assert str(err) == "The incoming migration has already been started"
        await quit_monitor(c)

    with Monitored(["incoming", "defer"]) as mon:
        run(body(mon))


def test_quit_during_a_migration_ends_both_and_leaves_nothing():
    port = free_port()

    async def body(src_mon, dst_mon):
        src = await slow_migration(src_mon, port)
        await quit_monitor(src)                     # cancels the migration, then ends
        assert src_mon.wait() == 0
        assert dst_mon.wait() == 1

    with incoming(f"rdma:127.0.0.1:{port}") as dst_mon, Monitored(VM) as src_mon:
        run(body(src_mon, dst_mon))


def test_a_second_migration_after_cont():
    ports = free_port(), free_port()

    async def body(src_mon, dst_mons):
        src = await client(src_mon, "src")
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        for port, dst_mon in zip(ports, dst_mons, strict=True):
            await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
            seen = await events_until(src)
            assert seen[-1]["data"]["status"] == "completed"
            assert (await src.execute("query-status"))["status"] == "postmigrate"
            err = await execute_error(src, "migrate", {"uri": f"rdma:127.0.0.1:{port}"})
            assert "cont first" in str(err)
            await src.execute("cont")
            dst = await client(dst_mon, "dst")
            await quit_monitor(dst)
            assert dst_mon.wait() == 0
        await quit_monitor(src)
        assert src_mon.wait() == 0

    with incoming(f"rdma:127.0.0.1:{ports[0]}") as d1, \
            incoming(f"rdma:127.0.0.1:{ports[1]}") as d2, Monitored(VM) as src_mon:
        run(body(src_mon, (d1, d2)))


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_the_same_checks_hold_for_qemu_migrating_to_qemu():
    """What the tests above expect of our monitors, QEMU 7.2 does itself: the MIGRATION events,
    query-migrate's fields once completed (the very key set we answer), postmigrate; and a
    migrate_cancel mid-way (a 1 kB/s bandwidth limit keeps it running) gives cancelled and a
    running source."""
    ports = free_port(), free_port()

    async def body(src_mon, dst_mons):
        # A destination QEMU listens on its -incoming port before its monitor answers: wait
        # for that answer, or a loaded machine migrates before anyone listens (refused).
        for n, mon in enumerate(dst_mons):
            dst = await client(mon, f"qemu-dst{n}")
            assert (await dst.execute("query-status"))["status"] == "inmigrate"
            await dst.disconnect()
        src = await client(src_mon, "qemu-src")
        await src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        await src.execute("migrate-set-parameters", {"downtime-limit": 500})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{ports[0]}"})
        seen = await events_until(src)
        statuses = [e["data"]["status"] for e in seen if e["event"] == "MIGRATION"]
        info = await src.execute("query-migrate")
        assert statuses[0] == "setup" and statuses[-1] == "completed", info
        assert "STOP" in [e["event"] for e in seen]
        assert any(e["event"] == "MIGRATION_PASS" and e["data"]["pass"] == 1 for e in seen)
        assert {"total-time", "setup-time", "downtime", "ram"} <= set(info)
        assert "expected-downtime" not in info
        assert set(info["ram"]) == QEMU_RAM_KEYS
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        await src.execute("cont")
        await next_event(src, "RESUME")

        await src.execute("migrate-set-parameters", {"max-bandwidth": 1000})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{ports[1]}"})
        await next_event(src, "MIGRATION", status="active")
        info = await src.execute("query-migrate")
        assert "expected-downtime" in info and set(info["ram"]) == QEMU_RAM_KEYS
        await src.execute("migrate_cancel")
        await next_event(src, "MIGRATION", status="cancelled")
        assert await src.execute("query-migrate") == {"status": "cancelled"}
        assert (await src.execute("query-status"))["status"] == "running"
        await quit_monitor(src)
        assert src_mon.wait() == 0

    with Monitored(["-incoming", f"tcp:127.0.0.1:{ports[0]}"], qemu=True) as dst0, \
            Monitored(["-incoming", f"tcp:127.0.0.1:{ports[1]}"], qemu=True) as dst1, \
            Monitored([], qemu=True) as src_mon:
        run(body(src_mon, (dst0, dst1)))
