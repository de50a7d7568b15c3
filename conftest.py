"""Shared fixtures: real ``mig run`` host processes and real QMP clients."""

from __future__ import annotations

import ast
import gc
import sys

import pytest
import pytest_asyncio

from mig_core.testing import Host, RawQMP, connect

if sys.version_info < (3, 11, 8):
    # CPython before 3.11.8 keeps the AST constructor's recursion depth in per-interpreter state
    # (python/cpython#106905): a garbage collection during ast.parse that runs finalizers lets another
    # thread convert an AST too, and the parse fails with "AST constructor recursion depth mismatch".
    # pytest parses test sources with ast to show a failure, so one failing test while mig's threads
    # run aborted the whole session (INTERNALERROR). No collection, no finalizers, no interleaving.
    _parse = ast.parse

    def _parse_without_gc(*args, **kwargs):  # type: ignore[no-untyped-def]
        enabled = gc.isenabled()
        gc.disable()
        try:
            return _parse(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    ast.parse = _parse_without_gc


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
