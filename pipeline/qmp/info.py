"""What ``query-migrate``, ``query-status`` and the human monitor's ``info migrate`` and
``info status`` answer, in QEMU 7.2's shapes, from our figures (``MigrationStats.snapshot``).

QEMU's rules kept here: no migration yet answers ``{}``; ``setup``, ``cancelling`` and
``cancelled`` carry only the status, ``failed`` the status and ``error-desc``; ``active`` and
``completed`` carry the times and the ``ram`` object, ``expected-downtime`` while running and
``downtime`` once completed. Times are whole milliseconds, ``mbps`` a float. A destination
reports its status (and, while it listens, ``socket-address``), nothing more.
"""

from __future__ import annotations

FULL = ("active", "device", "completed")
RUNNING_STATES = ("running",)


def source_query_migrate(status: str, snap: dict | None, error: str = "") -> dict:
    """The source's ``query-migrate`` for ``status`` (ours: ``device`` reads ``active``, as
    QEMU stays ``active`` while the guest is paused for the last pass)."""
    if status == "none" or snap is None:
        return {}
    out: dict = {"status": "active" if status == "device" else status}
    if status == "failed":
        out["error-desc"] = error or snap.get("error-desc") or "migration failed"
    if status not in FULL:
        return out
    out["total-time"] = int(snap["total-time"])
    out["setup-time"] = int(snap["setup-time"])
    if status == "completed":
        out["downtime"] = int(round(snap.get("downtime") or 0))
    else:
        out["expected-downtime"] = int(round(snap["expected-downtime"]))
    ram = snap["ram"]
    page = ram["page-size"]
    out["ram"] = {
        "transferred": ram["transferred"], "remaining": ram["remaining"],
        "total": ram["total"], "duplicate": ram["duplicate"], "skipped": 0,
        "normal": ram["normal"], "normal-bytes": ram["normal-bytes"],
        "dirty-pages-rate": ram["dirty-pages-rate"], "mbps": float(ram["mbps"]),
        "dirty-sync-count": ram["dirty-sync-count"], "postcopy-requests": 0,
        "page-size": page, "multifd-bytes": 0,
        "pages-per-second": int(ram["mbps"] * 1e6 / 8 / page),
        "precopy-bytes": ram["transferred"], "downtime-bytes": 0, "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    }
    if snap.get("cpu-throttle-percentage"):       # QEMU: only while auto-converge throttles
        out["cpu-throttle-percentage"] = snap["cpu-throttle-percentage"]
    return out


def destination_query_migrate(status: str, listening: str = "") -> dict:
    if status == "none":
        return {}
    out: dict = {"status": status}
    if status == "setup" and listening:
        scheme, _, rest = listening.partition(":")
        host, _, port = rest.rpartition(":")
        out["socket-address"] = [{"port": port, "ipv4": ":" not in host,
                                  "host": host.strip("[]"), "type": "inet"}]
    return out


def query_status(runstate: str) -> dict:
    return {"status": runstate, "singlestep": False, "running": runstate in RUNNING_STATES}


def hmp_info_status(runstate: str) -> str:
    if runstate in RUNNING_STATES:
        return "VM status: running\r\n"
    return "VM status: paused" + ("" if runstate == "paused" else f" ({runstate})") + "\r\n"


def hmp_info_migrate(info: dict, listening: str = "") -> str:
    """``info migrate`` from a ``query-migrate`` answer, line for line as QEMU prints it."""
    lines = []
    if listening:
        lines += ["socket address: [", f"\t{listening}", "]"]
    if "status" in info:
        head = f"Migration status: {info['status']}"
        if info["status"] == "failed" and info.get("error-desc"):
            head += f" ({info['error-desc']})"
        lines.append(head)
        lines.append(f"total time: {info.get('total-time', 0)} ms")
        if "expected-downtime" in info:
            lines.append(f"expected downtime: {info['expected-downtime']} ms")
        if "downtime" in info:
            lines.append(f"downtime: {info['downtime']} ms")
        if "setup-time" in info:
            lines.append(f"setup: {info['setup-time']} ms")
    ram = info.get("ram")
    if ram:
        lines += [
            f"transferred ram: {ram['transferred'] >> 10} kbytes",
            f"throughput: {ram['mbps']:0.2f} mbps",
            f"remaining ram: {ram['remaining'] >> 10} kbytes",
            f"total ram: {ram['total'] >> 10} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"skipped: {ram['skipped']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
        if ram["dirty-pages-rate"]:
            lines.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram["precopy-bytes"]:
            lines.append(f"precopy ram: {ram['precopy-bytes'] >> 10} kbytes")
    return "".join(line + "\r\n" for line in lines)
