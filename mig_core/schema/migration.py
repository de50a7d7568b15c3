"""Every enum and struct of the QMP migration schema, declared once.

Wire names are kebab-case (derived from the attribute names); optional members
are ``UNSET`` when absent and omitted from output; ``Unstable`` marks members
carrying QAPI's ``unstable`` feature.
"""

from __future__ import annotations

from mig_core.qapi import (
    UNSET,
    Bool,
    FlatUnion,
    Int,
    Int64,
    Number,
    QapiEnum,
    QapiStruct,
    Size,
    Str,
    UInt32,
    UInt64,
    UnsetType,
    enum_features,
)
from mig_core.schema.sockets import InetSocketAddress, SocketAddress

# ---------------------------------------------------------------------------
# enums


class MigrationStatus(QapiEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


class MigrationCapability(QapiEnum):
    XBZRLE = "xbzrle"
    RDMA_PIN_ALL = "rdma-pin-all"
    AUTO_CONVERGE = "auto-converge"
    ZERO_BLOCKS = "zero-blocks"
    EVENTS = "events"
    POSTCOPY_RAM = "postcopy-ram"
    X_COLO = "x-colo"
    RELEASE_RAM = "release-ram"
    RETURN_PATH = "return-path"
    PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"
    MULTIFD = "multifd"
    DIRTY_BITMAPS = "dirty-bitmaps"
    POSTCOPY_BLOCKTIME = "postcopy-blocktime"
    LATE_BLOCK_ACTIVATE = "late-block-activate"
    X_IGNORE_SHARED = "x-ignore-shared"
    VALIDATE_UUID = "validate-uuid"
    BACKGROUND_SNAPSHOT = "background-snapshot"
    ZERO_COPY_SEND = "zero-copy-send"
    POSTCOPY_PREEMPT = "postcopy-preempt"
    SWITCHOVER_ACK = "switchover-ack"
    DIRTY_LIMIT = "dirty-limit"
    MAPPED_RAM = "mapped-ram"
    X_CHECKSUMS = "x-checksums"  # mig's own: every section and page carries an xxh3-64 of its bytes


enum_features(MigrationCapability, x_colo=("unstable",), x_ignore_shared=("unstable",),
              x_checksums=("unstable",))


class MigrationParameter(QapiEnum):
    ANNOUNCE_INITIAL = "announce-initial"
    ANNOUNCE_MAX = "announce-max"
    ANNOUNCE_ROUNDS = "announce-rounds"
    ANNOUNCE_STEP = "announce-step"
    THROTTLE_TRIGGER_THRESHOLD = "throttle-trigger-threshold"
    CPU_THROTTLE_INITIAL = "cpu-throttle-initial"
    CPU_THROTTLE_INCREMENT = "cpu-throttle-increment"
    CPU_THROTTLE_TAILSLOW = "cpu-throttle-tailslow"
    TLS_CREDS = "tls-creds"
    TLS_HOSTNAME = "tls-hostname"
    TLS_AUTHZ = "tls-authz"
    MAX_BANDWIDTH = "max-bandwidth"
    AVAIL_SWITCHOVER_BANDWIDTH = "avail-switchover-bandwidth"
    DOWNTIME_LIMIT = "downtime-limit"
    X_CHECKPOINT_DELAY = "x-checkpoint-delay"
    X_COLO_HEARTBEAT_TIMEOUT = "x-colo-heartbeat-timeout"
    X_COLO_COMPARE_LIMIT = "x-colo-compare-limit"
    MULTIFD_CHANNELS = "multifd-channels"
    XBZRLE_CACHE_SIZE = "xbzrle-cache-size"
    MAX_POSTCOPY_BANDWIDTH = "max-postcopy-bandwidth"
    MAX_CPU_THROTTLE = "max-cpu-throttle"
    MULTIFD_COMPRESSION = "multifd-compression"
    MULTIFD_ZLIB_LEVEL = "multifd-zlib-level"
    MULTIFD_ZSTD_LEVEL = "multifd-zstd-level"
    BLOCK_BITMAP_MAPPING = "block-bitmap-mapping"
    X_VCPU_DIRTY_LIMIT_PERIOD = "x-vcpu-dirty-limit-period"
    VCPU_DIRTY_LIMIT = "vcpu-dirty-limit"
    MODE = "mode"
    ZERO_PAGE_DETECTION = "zero-page-detection"
    DIRECT_IO = "direct-io"


enum_features(MigrationParameter, x_checkpoint_delay=("unstable",), x_colo_heartbeat_timeout=("unstable",),
              x_colo_compare_limit=("unstable",), x_vcpu_dirty_limit_period=("unstable",))


class MultiFDCompression(QapiEnum):
    """QEMU's compression methods; zstd, qpl and uadk exist only when their plugin is installed."""

    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"
    QPL = "qpl"
    UADK = "uadk"


class MigMode(QapiEnum):
    NORMAL = "normal"
    CPR_REBOOT = "cpr-reboot"


class ZeroPageDetection(QapiEnum):
    NONE = "none"
    LEGACY = "legacy"
    MULTIFD = "multifd"


class COLOMessage(QapiEnum):
    CHECKPOINT_READY = "checkpoint-ready"
    CHECKPOINT_REQUEST = "checkpoint-request"
    CHECKPOINT_REPLY = "checkpoint-reply"
    VMSTATE_SEND = "vmstate-send"
    VMSTATE_SIZE = "vmstate-size"
    VMSTATE_RECEIVED = "vmstate-received"
    VMSTATE_LOADED = "vmstate-loaded"


class COLOMode(QapiEnum):
    NONE = "none"
    PRIMARY = "primary"
    SECONDARY = "secondary"


class FailoverStatus(QapiEnum):
    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"
    RELAUNCH = "relaunch"


class COLOExitReason(QapiEnum):
    NONE = "none"
    REQUEST = "request"
    ERROR = "error"
    PROCESSING = "processing"


class MigrationAddressType(QapiEnum):
    SOCKET = "socket"
    EXEC = "exec"
    RDMA = "rdma"
    FILE = "file"


class MigrationChannelType(QapiEnum):
    MAIN = "main"


class DirtyRateStatus(QapiEnum):
    UNSTARTED = "unstarted"
    MEASURING = "measuring"
    MEASURED = "measured"


class DirtyRateMeasureMode(QapiEnum):
    PAGE_SAMPLING = "page-sampling"
    DIRTY_RING = "dirty-ring"
    DIRTY_BITMAP = "dirty-bitmap"


class TimeUnit(QapiEnum):
    SECOND = "second"
    MILLISECOND = "millisecond"


# ---------------------------------------------------------------------------
# statistics


class MigrationStats(QapiStruct):
    transferred: Int
    remaining: Int
    total: Int
    duplicate: Int
    normal: Int
    normal_bytes: Int
    dirty_pages_rate: Int
    mbps: Number
    dirty_sync_count: Int
    postcopy_requests: Int
    page_size: Int
    multifd_bytes: UInt64
    pages_per_second: UInt64
    precopy_bytes: UInt64
    downtime_bytes: UInt64
    postcopy_bytes: UInt64
    dirty_sync_missed_zero_copy: UInt64


class XBZRLECacheStats(QapiStruct):
    cache_size: Size
    bytes: Int
    pages: Int
    cache_miss: Int
    cache_miss_rate: Number
    encoding_rate: Number
    overflow: Int


class CompressionStats(QapiStruct):
    pages: Int
    busy: Int
    busy_rate: Number
    compressed_size: Int
    compression_rate: Number


class VfioStats(QapiStruct):
    transferred: Int


class MigrationInfo(QapiStruct):
    """What ``query-migrate`` returns; ``compression`` is mig's documented extension."""

    status: MigrationStatus | UnsetType = UNSET
    ram: MigrationStats | UnsetType = UNSET
    vfio: VfioStats | UnsetType = UNSET
    xbzrle_cache: XBZRLECacheStats | UnsetType = UNSET
    total_time: Int | UnsetType = UNSET
    expected_downtime: Int | UnsetType = UNSET
    downtime: Int | UnsetType = UNSET
    setup_time: Int | UnsetType = UNSET
    cpu_throttle_percentage: Int | UnsetType = UNSET
    error_desc: Str | UnsetType = UNSET
    blocked_reasons: list[Str] | UnsetType = UNSET
    postcopy_blocktime: UInt32 | UnsetType = UNSET
    postcopy_vcpu_blocktime: list[UInt32] | UnsetType = UNSET
    socket_address: list[SocketAddress] | UnsetType = UNSET
    dirty_limit_throttle_time_per_round: UInt64 | UnsetType = UNSET
    dirty_limit_ring_full_time: UInt64 | UnsetType = UNSET
    compression: CompressionStats | UnsetType = UNSET


# ---------------------------------------------------------------------------
# capabilities and parameters


class MigrationCapabilityStatus(QapiStruct):
    capability: MigrationCapability
    state: Bool


class BitmapMigrationBitmapAliasTransform(QapiStruct):
    persistent: Bool | UnsetType = UNSET


class BitmapMigrationBitmapAlias(QapiStruct):
    name: Str
    alias: Str
    transform: BitmapMigrationBitmapAliasTransform | UnsetType = UNSET


class BitmapMigrationNodeAlias(QapiStruct):
    node_name: Str
    alias: Str
    bitmaps: list[BitmapMigrationBitmapAlias]


# ---------------------------------------------------------------------------
# addresses and channels


class FileMigrationArgs(QapiStruct):
    filename: Str
    offset: UInt64


class MigrationExecCommand(QapiStruct):
    args: list[Str]


class MigrationAddress(FlatUnion):
    """Where a migration stream goes, flat on ``transport``."""

    discriminator = "transport"
    tag_type = MigrationAddressType
    branches = {
        "socket": SocketAddress,
        "exec": MigrationExecCommand,
        "rdma": InetSocketAddress,
        "file": FileMigrationArgs,
    }


class MigrationChannel(QapiStruct):
    channel_type: MigrationChannelType
    addr: MigrationAddress


# ---------------------------------------------------------------------------
# replication, dirty rate, dirty limit, threads


class ReplicationStatus(QapiStruct):
    error: Bool
    desc: Str | UnsetType = UNSET


class COLOStatus(QapiStruct):
    mode: COLOMode
    last_mode: COLOMode
    reason: COLOExitReason


class DirtyRateVcpu(QapiStruct):
    id: Int
    dirty_rate: Int64


class DirtyRateInfo(QapiStruct, kw_only=True):
    dirty_rate: Int64 | UnsetType = UNSET
    status: DirtyRateStatus
    start_time: Int64
    calc_time: Int64
    calc_time_unit: TimeUnit
    sample_pages: UInt64
    mode: DirtyRateMeasureMode
    vcpu_dirty_rate: list[DirtyRateVcpu] | UnsetType = UNSET


class DirtyLimitInfo(QapiStruct):
    cpu_index: Int
    limit_rate: UInt64
    current_rate: UInt64


class MigrationThreadInfo(QapiStruct):
    name: Str
    thread_id: Int
