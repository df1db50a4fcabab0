"""Ports for test servers that are picked first and bound later (an MLflow server, restarted on
its port after a simulated outage; ``ray start``'s GCS and dashboard; torch.distributed's master).

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` lies in the ephemeral range, where
every outgoing connection of the suite (Ray's workers, MLflow clients) also takes its local port:
one of them could hold the port by the time the server binds it. These ports come from below that
range and above Ray's worker ports (10002-19999 by default), and are free when picked."""
from __future__ import annotations

import random
import socket
from pathlib import Path

_LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port(host: str = "127.0.0.1") -> int:
    """A port of ``host`` no socket holds now, outside the ephemeral range where possible."""
    high = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200 if high - _LOW >= 1000 else 0):
        port = rng.randrange(_LOW, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a machine whose ephemeral range leaves no room below it
        s.bind((host, 0))
        return s.getsockname()[1]
