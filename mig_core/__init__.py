"""mig: live migration, checkpointing and replication of a running program's state.

The public surface for embedders and plugin authors. An embedder builds a ``Machine`` (RAM blocks,
devices, vCPU threads), hands it to a ``MigrationManager`` and serves QMP with a ``QMPServer``; a plugin
subclasses one of the extension base classes (each extension point's module in ``mig_core.ext`` has its
group name and ``load``). Everything else in the package is internal and may change.
"""

from mig_core.control.manager import MigrationManager
from mig_core.errors import MigError
from mig_core.ext.channel import Channel
from mig_core.ext.channel_security import ChannelSecurity
from mig_core.ext.compressor import Compressor
from mig_core.ext.dirty_tracker import DirtyTracker
from mig_core.ext.replication import Replication
from mig_core.ext.snapshot_backend import SnapshotBackend
from mig_core.ext.transport import Transport
from mig_core.logconfig import configure_logging
from mig_core.machine.device import Device, PendingState
from mig_core.machine.machine import Machine
from mig_core.machine.vcpu import Vcpu
from mig_core.memory.ram import RAMBlock
from mig_core.plugin.hookspecs import hookimpl
from mig_core.plugin.registry import PluginRegistry
from mig_core.qmp.server import QMPServer
from mig_core.version import __version__

__all__ = [
    "Channel", "ChannelSecurity", "Compressor", "Device", "DirtyTracker", "MigError", "Machine",
    "MigrationManager", "PendingState", "PluginRegistry", "QMPServer", "RAMBlock", "Replication",
    "SnapshotBackend", "Transport", "Vcpu", "__version__", "configure_logging", "hookimpl",
]
