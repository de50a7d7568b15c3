"""The reference host's output (``mig run --output``): messages whose contents follow from the machine's
state, so two copies of the same state emit the same messages (what COLO compares).

Message n is ``n HASH`` with HASH = blake2b-128(previous HASH, n). With ``diverge=P`` each message mixes
in random bytes with probability P, so the two sides' states part and the next messages differ until a
checkpoint makes them one again. The sequence number and the hash live in a device's state.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from mig_core.machine.device import Device


class OutputStateV1(msgspec.Struct, forbid_unknown_fields=True):
    """What a version-1 ``mig-run-output`` section holds."""

    seq: Annotated[int, msgspec.Meta(ge=0)]
    digest: bytes


@dataclass(frozen=True)
class OutputSpec:
    path: str
    rate: float = 100.0
    diverge: float = 0.0


def parse_output(text: str) -> OutputSpec:
    """``PATH[,rate=N][,diverge=P]``: messages per second (default 100), share of them that diverge."""
    path, *rest = text.split(",")
    if not path:
        raise ValueError("--output needs a file to append released messages to")
    values = {"rate": 100.0, "diverge": 0.0}
    for item in rest:
        key, eq, text = item.partition("=")
        if key not in values or not eq:
            raise ValueError(f"unknown --output option '{item}' (known: rate=N, diverge=P)")
        try:
            values[key] = float(text)
        except ValueError:
            values[key] = float("nan")  # refused below, with the others out of range
    rate, diverge = values["rate"], values["diverge"]
    if not (0 < rate <= 100000 and 0 <= diverge <= 1):
        raise ValueError(f"--output {','.join(rest)}: rate must be in (0, 100000], diverge in [0, 1]")
    return OutputSpec(path, rate, diverge)


class OutputDevice(Device):
    """The message generator: its sequence and hash are device state, so a checkpoint carries them."""

    id = "mig-run-output"
    version = 1
    state_type = OutputStateV1

    def __init__(self, rate: float, diverge: float) -> None:
        self.rate = rate
        self.diverge = diverge
        self.seq = 0
        self.digest = b"\0" * 16
        self._owed = 0.0
        self._lock = threading.Lock()

    def step(self, seconds: float) -> list[bytes]:
        """The messages owed for ``seconds`` of running (called by vCPU 0 between its safe points)."""
        out = []
        with self._lock:
            self._owed = min(self._owed + self.rate * seconds, 1000.0)
            while self._owed >= 1:
                self._owed -= 1
                self.seq += 1
                h = hashlib.blake2b(self.digest + self.seq.to_bytes(8, "little"), digest_size=16)
                if self.diverge and random.random() < self.diverge:  # noqa: S311 - a test workload's coin
                    h.update(os.urandom(8))
                self.digest = h.digest()
                out.append(f"{self.seq} {self.digest.hex()}".encode())
        return out

    def save_state(self) -> Any:
        with self._lock:
            return {"seq": self.seq, "digest": self.digest}

    def load_state(self, state: OutputStateV1, version: int) -> None:
        with self._lock:
            self.seq, self.digest = state.seq, bytes(state.digest)


class LineSink:
    """Released messages appended to a file, one per line, flushed at once (another process reads it)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - open for the host's lifetime

    def __call__(self, packet: bytes) -> None:
        self._file.write(packet + b"\n")

    def close(self) -> None:
        self._file.close()
