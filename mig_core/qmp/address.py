"""Monitor addresses as QEMU's ``-qmp`` takes them: ``unix:PATH`` or ``tcp:HOST:PORT``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MonitorAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def split_host_port(rest: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with a numeric port (QEMU's inet_parse errors); ValueError if bad."""
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"error parsing IPv6 address '{rest}'")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ValueError(f"error parsing address '{rest}'")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"error parsing address '{rest}'")
    return host, int(port)


def parse_monitor_address(text: str) -> MonitorAddress:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (``[v6]:PORT`` too); ValueError with a precise message."""
    if text.startswith("unix:"):
        path = text[5:].split(",", 1)[0]
        if not path:
            raise ValueError("invalid Unix socket address")
        return MonitorAddress("unix", path=path)
    if text.startswith("tcp:"):
        host, port = split_host_port(text[4:].split(",", 1)[0])
        return MonitorAddress("tcp", host=host or "0.0.0.0", port=port)
    raise ValueError(f"monitor address '{text}' must be unix:PATH or tcp:HOST:PORT")
