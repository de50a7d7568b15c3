"""The typed schema: every type exists, kebab-case names, unstable marks, exact JSON round trips."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mig_core import schema
from mig_core.qapi import UNSET, FlatUnion, QapiEnum, QapiInputError, from_qmp, members_of, to_qmp
from mig_core.qapi.visitor import Node, type_node
from mig_core.schema import commands, parameters

ENUMS = ["MigrationStatus", "MigrationCapability", "MigrationParameter", "MultiFDCompression", "MigMode",
         "ZeroPageDetection", "COLOMessage", "COLOMode", "FailoverStatus", "COLOExitReason", "MigrationAddressType",
         "MigrationChannelType", "DirtyRateStatus", "DirtyRateMeasureMode", "TimeUnit"]
STRUCTS = ["MigrationStats", "XBZRLECacheStats", "CompressionStats", "VfioStats", "MigrationInfo",
           "MigrationCapabilityStatus", "BitmapMigrationBitmapAliasTransform", "BitmapMigrationBitmapAlias",
           "BitmapMigrationNodeAlias", "FileMigrationArgs", "MigrationExecCommand", "MigrationChannel",
           "InetSocketAddress", "ReplicationStatus", "COLOStatus", "DirtyRateVcpu", "DirtyRateInfo",
           "DirtyLimitInfo", "MigrationThreadInfo"]
UNIONS = ["MigrationAddress", "SocketAddress"]


def all_types():
    types = [getattr(schema, n) for n in STRUCTS + UNIONS]
    types += [parameters.MigrationParameters, parameters.MigrateSetParameters]
    types += [c.args for c in commands.COMMANDS.values() if c.args is not None]
    types += [e.data for e in commands.EVENTS.values() if e.data is not None]
    return types


def test_every_schema_type_is_declared():
    for name in ENUMS:
        assert issubclass(getattr(schema, name), QapiEnum)
    for name in STRUCTS:
        assert issubclass(getattr(schema, name), msgspec.Struct)
    for name in UNIONS:
        assert issubclass(getattr(schema, name), FlatUnion)
    assert len(schema.MigrationCapability) == 23 and len(schema.MigrationParameter) == 30  # mig's own too
    assert [p.name for p in parameters.PARAMETERS] == [p.value for p in schema.MigrationParameter]
    assert "postcopy-device" not in [s.value for s in schema.MigrationStatus]
    assert [m.value for m in schema.MigMode] == ["normal", "cpr-reboot"]


def test_unstable_features_marked():
    assert schema.MigrationCapability.features_of("x-colo") == ("unstable",)
    assert schema.MigrationCapability.features_of("x-ignore-shared") == ("unstable",)
    assert schema.MigrationCapability.features_of("events") == ()
    assert schema.MigrationParameter.features_of("x-checkpoint-delay") == ("unstable",)
    assert schema.MigrationParameter.features_of("x-vcpu-dirty-limit-period") == ("unstable",)
    members = {m.name: m for m in members_of(parameters.MigrateSetParameters)}
    assert members["x-checkpoint-delay"].node.features == ("unstable",)
    assert members["downtime-limit"].node.features == ()
    assert commands.COMMANDS["x-colo-lost-heartbeat"].features == ("unstable",)


def test_kebab_case_wire_names():
    names = [m.name for m in members_of(schema.MigrationStats)]
    assert names[:7] == ["transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                         "dirty-pages-rate"]
    assert to_qmp(commands.MigrationPassEventData(pass_=2)) == {"pass": 2}


# --- replies recorded from QEMU 7.2 decode and re-encode unchanged --------------------------------

QEMU_COMPLETED = {
    "status": "completed", "setup-time": 0, "downtime": 3, "total-time": 14,
    "ram": {"total": 67641344, "postcopy-requests": 0, "dirty-sync-count": 2, "multifd-bytes": 0,
            "pages-per-second": 0, "downtime-bytes": 357563, "page-size": 4096, "remaining": 0,
            "postcopy-bytes": 0, "mbps": 247.88, "transferred": 357563, "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": 0, "duplicate": 16426, "dirty-pages-rate": 0, "normal-bytes": 135168,
            "normal": 33},
}
QEMU_LISTENING = {"socket-address": [{"port": "37207", "ipv4": True, "host": "127.0.0.1", "type": "inet"}]}


@pytest.mark.parametrize("reply", [QEMU_COMPLETED, QEMU_LISTENING, {"status": "cancelled"},
                                   {"status": "failed", "error-desc": "No TLS credentials with id 'nope'"}, {}])
def test_query_migrate_replies_round_trip(reply):
    info = from_qmp(schema.MigrationInfo, reply)
    assert to_qmp(info) == reply
    assert info.xbzrle_cache is UNSET


def test_channels_round_trip_with_nested_unions():
    for addr in [
        {"transport": "socket", "type": "inet", "host": "::1", "port": "0", "ipv6": True, "keep-alive": True},
        {"transport": "socket", "type": "unix", "path": "/tmp/x", "abstract": False},
        {"transport": "socket", "type": "vsock", "cid": "3", "port": "1024"},
        {"transport": "socket", "type": "fd", "str": "mig"},
        {"transport": "exec", "args": ["cat"]},
        {"transport": "rdma", "host": "127.0.0.1", "port": "4000"},
        {"transport": "file", "filename": "/tmp/f", "offset": 4096},
    ]:
        ch = {"channel-type": "main", "addr": addr}
        assert to_qmp(from_qmp(schema.MigrationChannel, ch)) == ch


@pytest.mark.parametrize("data,desc", [
    ({"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h"}},
     "Parameter 'addr.port' is missing"),
    ({"channel-type": "main", "addr": {"type": "inet"}}, "Parameter 'addr.transport' is missing"),
    ({"channel-type": "main", "addr": {"transport": "tcp"}}, "Parameter 'transport' does not accept value 'tcp'"),
    ({"channel-type": "cpr", "addr": {"transport": "exec", "args": []}},
     "Parameter 'channel-type' does not accept value 'cpr'"),
    ({"channel-type": "main", "addr": {"transport": "exec", "args": ["a"], "x": 1}},
     "Parameter 'addr.x' is unexpected"),
    ({"channel-type": "main", "addr": {"transport": "file", "filename": "f", "offset": "0"}},
     "Parameter 'addr.offset' expects uint64"),
    ({"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h", "port": "1",
                                       "to": 70000}}, "Parameter 'to' expects uint16_t"),
    ({"channel-type": "main", "addr": []}, "Invalid parameter type for 'addr', expected: object"),
])
def test_visitor_errors(data, desc):
    with pytest.raises(QapiInputError) as e:
        from_qmp(schema.MigrationChannel, data)
    assert str(e.value) == desc


def test_number_and_int_kinds():
    ok = from_qmp(schema.DirtyRateInfo, {"status": "measured", "start-time": -5, "calc-time": 1,
                                         "calc-time-unit": "second", "sample-pages": 512,
                                         "mode": "page-sampling", "dirty-rate": 3})
    assert ok.start_time == -5 and ok.dirty_rate == 3
    with pytest.raises(QapiInputError, match="Invalid parameter type for 'start-time', expected: integer"):
        from_qmp(schema.DirtyRateInfo, {"status": "measured", "start-time": 1.5, "calc-time": 1,
                                        "calc-time-unit": "second", "sample-pages": 1, "mode": "dirty-ring"})
    with pytest.raises(QapiInputError, match="Invalid parameter type for 'busy-rate', expected: number"):
        from_qmp(schema.CompressionStats, {"pages": 1, "busy": 1, "busy-rate": "x", "compressed-size": 1,
                                           "compression-rate": 1})


# --- hypothesis: any value of any declared type survives a trip through JSON ----------------------

_SCALARS = {
    "int": st.integers(-(1 << 63), (1 << 63) - 1), "int64": st.integers(-(1 << 63), (1 << 63) - 1),
    "uint8": st.integers(0, 255), "uint16": st.integers(0, 65535), "uint32": st.integers(0, (1 << 32) - 1),
    "uint64": st.integers(0, (1 << 64) - 1), "size": st.integers(0, (1 << 64) - 1),
    "number": st.floats(allow_nan=False, allow_infinity=False), "str": st.text(max_size=12),
    "bool": st.booleans(), "StrOrNull": st.none() | st.text(max_size=8),
}


def strategy(node: Node) -> st.SearchStrategy:
    if node.kind in _SCALARS:
        return _SCALARS[node.kind]
    if node.kind == "enum":
        return st.sampled_from(list(node.py))
    if node.kind == "list":
        return st.lists(strategy(node.py), max_size=3)
    if node.kind == "union":
        cls = node.py
        return st.sampled_from(sorted(cls.branches)).flatmap(
            lambda tag: strategy(type_node(cls.branches[tag])[0]).map(lambda v: cls(tag, v)))
    fields = {}
    for m in members_of(node.py):
        s = strategy(m.node)
        fields[m.attr] = st.one_of(st.just(UNSET), s) if m.optional else s
    return st.fixed_dictionaries(fields).map(lambda kw: node.py(**kw))


@pytest.mark.parametrize("cls", all_types(), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls, data):
    node = Node("union" if issubclass(cls, FlatUnion) else "struct", cls)
    value = data.draw(strategy(node))
    wire = json.loads(json.dumps(to_qmp(value)))
    assert from_qmp(cls, wire) == value
    assert to_qmp(from_qmp(cls, wire)) == wire
    assert all("_" not in k for k in (wire if isinstance(wire, dict) else {}))
