"""Split a QMP byte stream into complete top-level JSON texts, as QEMU's JSON streamer does.

Objects may span lines or share one; only nesting and string state are tracked,
the parse itself is ``json.loads`` on each complete text.
"""

from __future__ import annotations

from collections.abc import Iterator


class JsonTooLarge(ValueError):
    """A single JSON text grew beyond the limit."""


class JsonSplitter:
    """Feed bytes, get complete JSON texts; stray closers and oversized texts are reported as errors."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._scanned = 0
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[bytes | Exception]:
        """Yield each complete text (bytes) or an exception describing a framing error."""
        for b in data:
            if self._discarding:
                # After an oversized text, drop input until the next newline at top level.
                if b == 0x0A:
                    self._discarding = False
                continue
            if not self._buf and self._depth == 0 and b in b" \t\r\n":
                continue
            self._buf.append(b)
            if len(self._buf) > self.limit:
                self._reset()
                self._discarding = True
                yield JsonTooLarge(f"JSON parse error, message exceeds {self.limit} bytes")
                continue
            if self._in_str:
                if self._escape:
                    self._escape = False
                elif b == 0x5C:
                    self._escape = True
                elif b == 0x22:
                    self._in_str = False
                continue
            if b == 0x22:
                self._in_str = True
            elif b in b"{[":
                self._depth += 1
            elif b in b"}]":
                self._depth -= 1
                if self._depth < 0:
                    self._reset()
                    yield ValueError("JSON parse error, stray '" + chr(b) + "'")
                    continue
                if self._depth == 0:
                    text = bytes(self._buf)
                    self._reset()
                    yield text
            elif self._depth == 0 and b in b" \t\r\n":
                # A top-level scalar ends at whitespace.
                text = bytes(self._buf[:-1])
                self._reset()
                yield text

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_str = False
        self._escape = False
