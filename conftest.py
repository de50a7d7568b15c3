"""Shared fixtures: real ``mig run`` host processes and real QMP clients."""

from __future__ import annotations

import pytest
import pytest_asyncio

from mig_core.testing import Host, RawQMP, connect


@pytest.fixture
def start_host(tmp_path):
    hosts: list[Host] = []

    def start(*args: str, name: str = "host", env: dict[str, str] | None = None) -> Host:
        h = Host(tmp_path, *args, name=f"{name}{len(hosts)}", env=env)
        hosts.append(h)
        return h

    yield start
    for h in hosts:
        h.stop()


@pytest.fixture
def host(start_host) -> Host:
    return start_host()


@pytest_asyncio.fixture
async def qmp(host):
    client = await connect(host.sock)
    yield client
    await client.disconnect()


@pytest.fixture
def raw(host):
    conns: list[RawQMP] = []

    def open_raw() -> RawQMP:
        c = RawQMP(host.sock)
        conns.append(c)
        return c

    yield open_raw
    for c in conns:
        c.close()
