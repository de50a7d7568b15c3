"""Monitor addresses as QEMU's ``-qmp`` takes them: ``unix:PATH`` or ``tcp:HOST:PORT``."""

from __future__ import annotations

from dataclasses import dataclass

from mig_core.ext.transport import split_host_port

#: The mode a monitor's unix socket is created with unless ``mode=`` says otherwise: only its owner may
#: connect (the monitor can stop, migrate and read the whole memory of the host).
DEFAULT_UNIX_MODE = 0o600


@dataclass(frozen=True)
class MonitorAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    mode: int = DEFAULT_UNIX_MODE
    #: tcp only: the id of server TLS credentials (``tls-creds=``), and of an authz object (``tls-authz=``)
    tls_creds: str = ""
    tls_authz: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def _options(text: str, kind: str) -> dict[str, str]:
    """QEMU's chardev options after the address: ``server``/``wait`` as mig always is (a listening server
    that does not wait for a client), ``mode=`` for a unix socket; anything else is refused by name."""
    out: dict[str, str] = {}
    for opt in filter(None, text.split(",")):
        key, eq, value = opt.partition("=")
        if key in ("server", "nowait", "wait"):
            if key == "nowait":
                ok = not eq
            else:
                on = value.lower() in ("on", "yes", "true") if eq else True
                ok = on if key == "server" else not on
            if not ok:
                raise ValueError(f"monitor option '{opt}' is not supported: the monitor always listens "
                                 "(server=on) and never waits for a client (wait=off)")
            continue
        if key == "mode" and kind == "unix":
            try:
                mode = int(value, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise ValueError(f"monitor option 'mode={value}': an octal file mode such as 0600 is expected")
            out["mode"] = value
            continue
        if key in ("tls-creds", "tls-authz") and kind == "tcp":
            if not value:
                raise ValueError(f"monitor option '{key}' needs an object id")
            out[key] = value
            continue
        raise ValueError(f"unknown monitor option '{opt}' (known: server, wait, nowait"
                         f"{', mode' if kind == 'unix' else ', tls-creds, tls-authz'})")
    if "tls-authz" in out and "tls-creds" not in out:
        raise ValueError("monitor option 'tls-authz' needs 'tls-creds'")
    return out


def parse_monitor_address(text: str) -> MonitorAddress:
    """Parse ``unix:PATH[,mode=OCTAL]`` or ``tcp:HOST:PORT[,tls-creds=ID[,tls-authz=ID]]`` (``[v6]:PORT``
    too), each with QEMU's ``server``/``wait`` options; ValueError with a precise message."""
    if text.startswith("unix:"):
        path, _, rest = text[5:].partition(",")
        if not path:
            raise ValueError("invalid Unix socket address")
        opts = _options(rest, "unix")
        return MonitorAddress("unix", path=path, mode=int(opts.get("mode", "600"), 8))
    if text.startswith("tcp:"):
        hostport, _, rest = text[4:].partition(",")
        host, port = split_host_port(hostport)
        opts = _options(rest, "tcp")
        return MonitorAddress("tcp", host=host or "0.0.0.0", port=port, tls_creds=opts.get("tls-creds", ""),
                              tls_authz=opts.get("tls-authz", ""))
    raise ValueError(f"monitor address '{text}' must be unix:PATH or tcp:HOST:PORT")
