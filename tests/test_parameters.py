"""migrate-set-parameters / query-migrate-parameters over QMP: every bound, every type, all-or-nothing."""

from __future__ import annotations

import pytest
from qemu.qmp import ExecuteError

from mig_core.schema.parameters import PARAMETERS, SPECS

DEFAULTS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    "max-bandwidth": 134217728, "avail-switchover-bandwidth": 0, "downtime-limit": 300,
    "x-checkpoint-delay": 20000, "x-colo-heartbeat-timeout": 800, "x-colo-compare-limit": 4096,
    "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-zstd-level": 1, "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1, "mode": "normal", "zero-page-detection": "multifd", "direct-io": False,
}

# (parameter, lowest accepted, highest accepted, QEMU's error text)
BOUNDS = [
    ("announce-initial", 0, 100000, "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ("announce-max", 0, 100000, "Parameter 'announce_max' expects a value between 0 and 100000"),
    ("announce-rounds", 0, 1000, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ("announce-step", 1, 10000, "Parameter 'announce_step' expects a value between 0 and 10000"),
    ("throttle-trigger-threshold", 1, 100,
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ("cpu-throttle-initial", 1, 99, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ("cpu-throttle-increment", 1, 99,
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ("downtime-limit", 0, 2000000,
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ("multifd-channels", 1, 255, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("multifd-zlib-level", 0, 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ("multifd-zstd-level", 0, 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ("x-vcpu-dirty-limit-period", 1, 1000,
     "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    ("vcpu-dirty-limit", 1, (1 << 64) - 1, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
    ("x-colo-heartbeat-timeout", 0, 60000, "Parameter 'x-colo-heartbeat-timeout' expects a value between 0 and 60000"),
    ("x-colo-compare-limit", 1, 1048576, "Parameter 'x-colo-compare-limit' expects a value between 1 and 1048576"),
    ("max-cpu-throttle", 20, 99,
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ("max-bandwidth", 0, (1 << 64) - 1, None),
    ("avail-switchover-bandwidth", 0, (1 << 64) - 1, None),
    ("max-postcopy-bandwidth", 0, (1 << 64) - 1, None),
    ("x-checkpoint-delay", 0, (1 << 32) - 1, None),
]

TYPE_LIMIT = {"uint8": (1 << 8) - 1, "uint32": (1 << 32) - 1, "uint64": (1 << 64) - 1, "size": (1 << 64) - 1}
C_NAME = {"uint8": "uint8_t", "uint32": "uint32_t"}


async def set_params(qmp, **kw):
    return await qmp.execute("migrate-set-parameters", {k.replace("_", "-"): v for k, v in kw.items()})


async def expect_error(qmp, args, desc):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("migrate-set-parameters", args)
    assert e.value.error.error.desc == desc
    assert e.value.error.error.class_ == "GenericError"


async def test_defaults_and_every_member(qmp):
    params = await qmp.execute("query-migrate-parameters")
    assert params == DEFAULTS
    assert len(PARAMETERS) == 30
    await qmp.execute("migrate-set-parameters", {"block-bitmap-mapping": []})
    params = await qmp.execute("query-migrate-parameters")
    assert params["block-bitmap-mapping"] == [] and len(params) == 30


@pytest.mark.parametrize("name,lo,hi,error", BOUNDS, ids=[b[0] for b in BOUNDS])
async def test_both_edges_of_every_bound(qmp, name, lo, hi, error):
    qtype = SPECS[name].qapi_type
    for ok in (lo, hi):
        await qmp.execute("migrate-set-parameters", {name: ok})
        assert (await qmp.execute("query-migrate-parameters"))[name] == ok
    before = await qmp.execute("query-migrate-parameters")
    if lo > 0:
        await expect_error(qmp, {name: lo - 1}, error)
    if hi < TYPE_LIMIT[qtype]:
        await expect_error(qmp, {name: hi + 1}, error)
    # one past the type's own range is a type error, before any range check
    above = TYPE_LIMIT[qtype] + 1
    type_error = (f"Parameter '{name}' expects {C_NAME[qtype]}" if qtype in C_NAME
                  else f"Parameter '{name}' expects uint64")
    await expect_error(qmp, {name: above}, type_error)
    assert await qmp.execute("query-migrate-parameters") == before


async def test_type_errors_use_qemu_wording(qmp):
    await expect_error(qmp, {"downtime-limit": "abc"}, "Parameter 'downtime-limit' expects uint64")
    await expect_error(qmp, {"downtime-limit": 1.5}, "Parameter 'downtime-limit' expects uint64")
    await expect_error(qmp, {"cpu-throttle-initial": -1}, "Parameter 'cpu-throttle-initial' expects uint8_t")
    await expect_error(qmp, {"cpu-throttle-initial": "1"}, "Parameter 'cpu-throttle-initial' expects uint64")
    await expect_error(qmp, {"cpu-throttle-tailslow": 1},
                       "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean")
    await expect_error(qmp, {"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull")
    await expect_error(qmp, {"mode": "cpr-transfer"}, "Parameter 'mode' does not accept value 'cpr-transfer'")
    await expect_error(qmp, {"mode": 1}, "Invalid parameter type for 'mode', expected: string")
    await expect_error(qmp, {"zero-page-detection": "bogus"},
                       "Parameter 'zero-page-detection' does not accept value 'bogus'")
    await expect_error(qmp, {"foo": 1}, "Parameter 'foo' is unexpected")
    await expect_error(qmp, {"block-bitmap-mapping": {}},
                       "Invalid parameter type for 'block-bitmap-mapping', expected: array")
    await expect_error(qmp, {"block-bitmap-mapping": [{"node-name": "a", "alias": "b"}]},
                       "Parameter 'block-bitmap-mapping[0].bitmaps' is missing")


async def test_negative_sizes_wrap_like_qemu(qmp):
    await set_params(qmp, max_bandwidth=-1)
    assert (await qmp.execute("query-migrate-parameters"))["max-bandwidth"] == (1 << 64) - 1
    await expect_error(qmp, {"downtime-limit": -1},
                       "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")


async def test_all_or_nothing(qmp):
    await expect_error(qmp, {"downtime-limit": 777, "multifd-channels": 0},
                       "Parameter 'multifd_channels' expects a value between 1 and 255")
    assert (await qmp.execute("query-migrate-parameters"))["downtime-limit"] == 300
    # the merged set is checked: raising the initial throttle above the maximum fails on the maximum
    await set_params(qmp, max_cpu_throttle=40)
    await expect_error(qmp, {"cpu-throttle-initial": 50},
                       "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99")
    await expect_error(qmp, {"cpu-throttle-initial": 50, "max-cpu-throttle": 40},
                       "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99")
    await set_params(qmp, cpu_throttle_initial=50, max_cpu_throttle=60)
    p = await qmp.execute("query-migrate-parameters")
    assert (p["cpu-throttle-initial"], p["max-cpu-throttle"]) == (50, 60)


async def test_xbzrle_cache_size_rule(qmp):
    text = "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"
    for bad in (0, 1000, 2048, 4097, 3 * 4096):
        await expect_error(qmp, {"xbzrle-cache-size": bad}, text)
    for good in (4096, 1 << 30):
        await set_params(qmp, xbzrle_cache_size=good)


async def test_tls_strings_accept_null(qmp):
    await set_params(qmp, tls_creds="nope", tls_hostname="example", tls_authz="a")
    p = await qmp.execute("query-migrate-parameters")
    assert (p["tls-creds"], p["tls-hostname"], p["tls-authz"]) == ("nope", "example", "a")
    await qmp.execute("migrate-set-parameters", {"tls-creds": None, "tls-hostname": None, "tls-authz": None})
    p = await qmp.execute("query-migrate-parameters")
    assert (p["tls-creds"], p["tls-hostname"], p["tls-authz"]) == ("", "", "")


async def test_multifd_compression_names(qmp):
    await expect_error(qmp, {"multifd-compression": "bogus"},
                       "Parameter 'multifd-compression' does not accept value 'bogus'")
    for name in ("zlib", "zstd", "qpl", "uadk", "none"):  # provided by core and the installed plugins
        await set_params(qmp, multifd_compression=name)
        assert (await qmp.execute("query-migrate-parameters"))["multifd-compression"] == name


async def test_missing_compressor_plugin_is_named(start_host):
    """A host without the qpl plugin (hidden with MIG_DISABLED_PLUGINS) names the plugin to install."""
    from mig_core.testing import connect

    client = await connect(start_host(env={"MIG_DISABLED_PLUGINS": "mig-compress-qpl"}).sock)
    await expect_error(client, {"multifd-compression": "qpl"},
                       "Compression method 'qpl' is not available: install the mig-compress-qpl plugin "
                       "(pip install mig-compress-qpl)")
    await client.disconnect()


async def test_capability_dependent_parameter_rules(qmp):
    zc = "Zero copy only available for non-compressed non-TLS multifd migration"
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "multifd", "state": True}, {"capability": "zero-copy-send", "state": True}]})
    await expect_error(qmp, {"multifd-compression": "zlib"}, zc)
    await expect_error(qmp, {"tls-creds": "x"}, zc)
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "zero-copy-send", "state": False}, {"capability": "mapped-ram", "state": True}]})
    # QEMU checks mapped-ram against the values from before the call; mig checks the merged values
    # (docs/differences.md), so the bad change itself is refused and later calls keep working.
    mr = "Mapped-ram only available for non-compressed non-TLS multifd migration"
    await expect_error(qmp, {"multifd-compression": "zlib"}, mr)
    await expect_error(qmp, {"tls-creds": "x"}, mr)
    await set_params(qmp, downtime_limit=10)


async def test_block_bitmap_mapping_rules(qmp):
    prefix = "Invalid mapping given for block-bitmap-mapping: "

    def node(name, alias, bitmaps=()):
        return {"node-name": name, "alias": alias, "bitmaps": [{"name": n, "alias": a} for n, a in bitmaps]}

    cases = [
        ([node("n", "1bad")], "The node alias '1bad' is not well-formed"),
        ([node("n", "a" * 256)], f"The node alias '{'a' * 256}' is longer than 255 bytes"),
        ([node("n" * 32, "a")], f"The node name '{'n' * 32}' is longer than 31 bytes"),
        ([node("n", "a"), node("n", "b")], "The node name 'n' is mapped twice"),
        ([node("n", "a"), node("m", "a")], "The node alias 'a' is used twice"),
        ([node("n", "a", [("b", "x" * 256)])], f"The bitmap alias '{'x' * 256}' is longer than 255 bytes"),
        ([node("n", "a", [("b" * 1024, "x")])], f"The bitmap name '{'b' * 1024}' is longer than 1023 bytes"),
        ([node("n", "a", [("b", "x"), ("b", "y")])], "The bitmap 'n'/'b' is mapped twice"),
        ([node("n", "a", [("b", "x"), ("c", "x")])], "The bitmap alias 'a'/'x' is used twice"),
    ]
    for mapping, text in cases:
        await expect_error(qmp, {"block-bitmap-mapping": mapping}, prefix + text)
    good = [node("n", "a", [("b", "x")])]
    good[0]["bitmaps"][0]["transform"] = {"persistent": True}
    await qmp.execute("migrate-set-parameters", {"block-bitmap-mapping": good})
    assert (await qmp.execute("query-migrate-parameters"))["block-bitmap-mapping"] == good
