"""Monitor addresses as QEMU's ``-qmp`` takes them: ``unix:PATH`` or ``tcp:HOST:PORT``."""

from __future__ import annotations

from dataclasses import dataclass

from mig_core.ext.transport import split_host_port


@dataclass(frozen=True)
class MonitorAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


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
