"""Finding the verbs provider's device: which devices exist and are ACTIVE, the one the route
to a peer goes through (``route_device``, asked of librdmacm), its IPv4 address (from the
GID table), its on-demand-paging capabilities, and ``probe()``: None when a usable device
exists, else why not in one line (tests skip on it; ``selftest`` and the CLI print it).

A CM id bound to a wildcard address has no device; ``route_device`` never resolves one.
"""

from __future__ import annotations

import os

from shm.errors import TransportError, TransportUnsupported
from stages.verbs.rdmacore_base import errors, load


def no_device_message(exc: Exception) -> str:
    if not os.path.isdir("/sys/class/infiniband"):
        return (f"no RDMA device: this kernel has no InfiniBand/RDMA support (libibverbs: "
                f"{exc}, ENOSYS)")
    return f"no RDMA device: libibverbs cannot list devices ({exc})"


def odp_write(v, ctx) -> bool:
    """Whether the device pages RC writes on demand (its ODP capabilities)."""
    try:
        caps = ctx.query_device_ex().odp_caps
    except (v.Error, AttributeError):
        return False
    return bool(caps.general_caps & v.e.IBV_ODP_SUPPORT
                and caps.rc_odp_caps & v.e.IBV_ODP_SUPPORT_WRITE)


def device_address(context) -> str | None:
    """The first IPv4 address in the GID table of ``context``'s ACTIVE ports (RoCE v2 GIDs
    carry the netdev's addresses, IPv4-mapped), or None."""
    import ipaddress

    v, ctx = context.v, context.ctx
    for port in active_ports(v, ctx):
        with errors("cannot query the device"):
            count = ctx.query_port(port).gid_tbl_len
        for index in range(count):
            try:
                gid = ipaddress.IPv6Address(str(ctx.query_gid(port, index)))
            except (v.Error, ValueError):
                continue
            if gid.ipv4_mapped is not None:
                return str(gid.ipv4_mapped)
    return None


def route_device(v, host: str) -> str | None:
    """The device librdmacm resolves ``host`` through (None if it cannot tell)."""
    from stages.verbs.rdmacore_cm import Channel, wait_cm_event

    if host.strip("[]") in ("", "0.0.0.0", "::"):
        return None             # a wildcard address has no device
    holder = Channel(v)
    cmid = None
    try:
        with errors(f"cannot resolve {host}"):
            cmid = v.cm.CMID(creator=holder.channel, port_space=v.ce.RDMA_PS_TCP)
            cmid.resolve_addr(v.cm.AddrInfo(dst=host, dst_service="1",
                                            port_space=v.ce.RDMA_PS_TCP), 2000)
        wait_cm_event(v, holder.channel, holder.fd, v.ce.RDMA_CM_EVENT_ADDR_RESOLVED,
                      3.0).ack_cm_event()
        with errors(f"cannot resolve {host}"):
            return cmid.dev_name
    except TransportError:
        return None
    finally:
        if cmid is not None:
            cmid.close()
        holder.close()


def has_active_port(v, name: str) -> bool:
    try:
        ctx = v.device.Context(name=name)
    except v.Error:
        return False
    try:
        return bool(active_ports(v, ctx))
    except TransportError:
        return False
    finally:
        ctx.close()


def active_ports(v, ctx) -> list[int]:
    """Port numbers of ``ctx`` in state ACTIVE."""
    with errors("cannot query the device"):
        count = ctx.query_device().phys_port_cnt
        return [port for port in range(1, count + 1)
                if ctx.query_port(port).state == v.e.IBV_PORT_ACTIVE]


def probe() -> str | None:
    """None when pyverbs sees a device with an ACTIVE port; otherwise why not, in one line.

    Tests skip on this (pyverbs missing, the ``get_device_list`` error of kernels without
    InfiniBand, no device, no ACTIVE port); the CLI can print it.
    """
    try:
        v = load()
    except TransportUnsupported as exc:
        return str(exc)
    try:
        devices = v.device.get_device_list()
    except v.RDMAError as exc:
        return no_device_message(exc)
    if not devices:
        return "no RDMA device: libibverbs lists none"
    for device in devices:
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        try:
            ctx = v.device.Context(name=name)
        except v.Error:
            continue
        try:
            if active_ports(v, ctx):
                return None
        except TransportError:
            continue
        finally:
            ctx.close()
    return "no RDMA device has an ACTIVE port"
