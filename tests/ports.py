"""Free TCP ports for the stacks the tests start and restart, taken below the kernel's ephemeral range.

A port found by binding to port 0 comes from the ephemeral range (Linux: 32768-60999 by default), the range the
kernel also takes every outgoing connection's source port from. A stack that a test stops and starts again
(`atelier down`, then `atelier up`) leaves its ports unused in between, and any connection made meanwhile (a
client to PostgreSQL, a test's HTTP request) may be given one of them as its source port: `atelier up` then
refuses the port as taken by another program. A full suite hit that once (SeaweedFS's internal port 34620, the
stack's down-and-up test). Ports below the range are never handed out that way.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path

LOWEST = 10000  # above the well-known and most registered services


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default, and what a machine without /proc is likely to use


def _is_free(port: int) -> bool:
    with socket.socket() as sock:  # no SO_REUSEADDR: a port in any use, on any address, refuses the bind
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int, consecutive: bool = False, avoid: Iterable[int] = ()) -> list[int]:
    """`count` distinct free ports below the ephemeral range, none of `avoid` (`consecutive`: in a row, for
    servers that take a first port and the ones after it, as SeaweedFS's internal servers do)."""
    avoid = set(avoid)
    top = max(_ephemeral_start(), LOWEST + 2 * count + 1)
    picked: list[int] = []
    for _ in range(1000):
        if len(picked) == count:
            return picked
        if consecutive:
            base = random.randrange(LOWEST, top - count)
            if all(p not in avoid and _is_free(p) for p in range(base, base + count)):
                return list(range(base, base + count))
            continue
        port = random.randrange(LOWEST, top)
        if port not in picked and port not in avoid and _is_free(port):
            picked.append(port)
    raise RuntimeError(f"no {count} free ports between {LOWEST} and {top}")
