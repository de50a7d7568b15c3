"""Bounding a TLS handshake: a peer that connects and stays silent, or a cancel, ends it in time.

Shared by the in-process sessions (``mig_core.engine.tls``) and the relay's (``mig_core.engine.tls_relay``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mig_core.errors import ChannelAborted, ChannelError
from mig_core.ext.channel import Channel

#: Seconds a handshake may take before the connection is dropped.
HANDSHAKE_TIMEOUT = 30.0


def bounded(channel: Channel, run: Callable[[], Channel], abort_check: Callable[[], bool] | None,
            timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
    """``run()`` (a handshake on ``channel``), aborted after ``timeout`` seconds or once ``abort_check()``;
    ChannelError with the reason (``channel`` closed) if it fails."""
    done = threading.Event()
    decided = threading.Lock()  # the handshake's end and the watch's abort: whichever comes first counts
    why: list[str] = []

    def watch() -> None:
        waited = 0.0
        while not done.wait(0.05):
            waited += 0.05
            if abort_check is not None and abort_check():
                reason = "cancelled during the TLS handshake"
            elif waited >= timeout:
                reason = f"TLS handshake failed: no answer within {timeout:g} s"
            else:
                continue
            with decided:
                if not done.is_set():
                    why.append(reason)
                    channel.abort(reason)
            return

    threading.Thread(target=watch, name="tls-handshake-watch", daemon=True).start()
    try:
        result = run()
    except BaseException as e:
        with decided:
            done.set()
        channel.close()
        if why:  # whatever the aborted handshake raised, the reason is the abort's
            raise ChannelError(why[0]) from None
        if isinstance(e, ChannelAborted):
            raise ChannelError("the TLS handshake was aborted") from None
        raise
    with decided:
        done.set()
    if why:  # aborted just as it ended: the channel is shut, the session unusable
        channel.close()
        raise ChannelError(why[0])
    return result
