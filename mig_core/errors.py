"""mig's errors: one hierarchy rooted in ``MigError``.

Every error mig raises on purpose derives from ``MigError`` (and, where the
meaning fits, from the builtin a caller would expect: a channel error is a
``ConnectionError``, a bad stream a ``ValueError``). A ``MigError`` is an
expected failure with a message fit for a user; anything else that escapes
is a bug, reported as an internal error with its traceback in the log.
``QMPError`` is what the QMP boundary turns into ``{"error": {"class", "desc"}}``.
"""

from __future__ import annotations


class MigError(Exception):
    """Base of every error mig raises on purpose; ``str()`` says what went wrong."""


class QMPError(MigError):
    """A command failure; ``desc`` is the text QEMU would give, ``error_class`` its QAPI class."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


def command_not_found(desc: str) -> QMPError:
    return QMPError(desc, "CommandNotFound")


# -- moving bytes ------------------------------------------------------------------


class ChannelError(MigError, ConnectionError):
    """The channel failed; the message says how."""


class ChannelAborted(ChannelError):
    """The channel was aborted (``abort()``) while or before it was used."""


class ChannelEOF(ChannelError):
    """The peer closed the channel before the expected bytes arrived."""


class StreamError(MigError, ValueError):
    """The incoming stream is not one this host can load; the message says exactly why."""


class MultifdError(StreamError):
    """A multifd channel carried something this host cannot accept; the message says what."""


class DeviceStateError(MigError, ValueError):
    """Device state that cannot be saved or loaded here; the message names the device and the reason."""


# -- the machine -----------------------------------------------------------------------


class BackingError(MigError, ValueError):
    """A feature needs a backing this RAM block does not have."""


class VcpuStopTimeout(MigError, RuntimeError):
    """Some vCPUs did not reach a safe point in time; the message names them."""


# -- plugins ---------------------------------------------------------------------------


class PluginNotFound(MigError, LookupError):
    """No usable plugin of that name in that group; the message names the group and lists what is installed."""


# -- the engine ---------------------------------------------------------------------------


class MigrationFailed(MigError):
    """Ends an outgoing migration as failed, with ``error-desc`` = the message."""
