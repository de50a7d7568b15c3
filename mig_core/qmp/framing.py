"""Split a QMP byte stream into top-level JSON texts with QEMU's limits and error recovery.

Like QEMU's JSON lexer and streamer (qobject/json-lexer.c, json-streamer.c),
the input is scanned token by token: strings with their escapes, scalars,
brackets and punctuation. A value ends when its brackets balance. Each value
may hold at most 64 MiB of tokens, 2 Mi tokens and 1024 levels of nesting; a
value that goes beyond one of them is answered with QEMU's error and the rest
of it is skipped up to where its brackets balance. A byte that cannot start a
token (a NUL, 0xFF, other control characters) is answered with ``JSON parse
error, stray '…'`` and input is skipped up to the next ``{``, ``[`` or line
end, so a client recovers at its next request. The texts themselves are
parsed by the caller (``json.loads``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator

#: QEMU's per-value limits (json-streamer.c).
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

_WHITESPACE = frozenset(b" \t\r\n")
_SCALAR_START = frozenset(b"-+.0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SCALAR_RUN = re.compile(rb"[-+.0-9A-Za-z]*")
_WHITESPACE_RUN = re.compile(rb"[ \t\r\n]*")
#: inside a string: its end, an escape, or a byte no JSON string may hold raw (QEMU's lexer: control
#: characters, and 0xFE/0xFF, which are never UTF-8)
_STRING_STOP = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
#: where skipping after a stray byte stops: the start of a value, or a line end
_RESYNC = re.compile(rb"[{\[\n]")


class JsonInputError(ValueError):
    """A framing error, worded as QEMU words it; the session goes on."""


class _State(enum.Enum):
    START = 0
    STRING = 1
    SCALAR = 2
    RESYNC = 3


def _describe(byte: int) -> str:
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


class JsonStreamer:
    """Feed bytes, get each complete JSON text (bytes) or a ``JsonInputError`` in input order."""

    def __init__(self, max_token_size: int = MAX_TOKEN_SIZE, max_token_count: int = MAX_TOKEN_COUNT,
                 max_nesting: int = MAX_NESTING) -> None:
        self.max_token_size = max_token_size
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        self._text = bytearray()  # the current value (whitespace between tokens collapsed)
        self._state = _State.START
        self._depth = 0
        self._tokens = 0
        self._size = 0
        self._token_start = 0  # where the string or scalar being read began in _text
        self._escape = False
        #: after a limit error: the rest of the value is scanned (to find its end) but not kept
        self._keep = True

    def _reset(self) -> None:
        self._text.clear()
        self._depth = self._tokens = self._size = 0

    def _abandon(self, error: str, inside_token: bool) -> JsonInputError:
        """A limit broke: drop what was kept of this value; the rest of it is still scanned (to find its
        end) but not kept, unless it has ended already."""
        depth = self._depth
        self._reset()
        self._depth = depth
        self._keep = depth == 0 and not inside_token
        return JsonInputError(error)

    def _stray(self, byte: int) -> JsonInputError:
        """A byte no token holds: the value is dropped (as QEMU's streamer does) and input is skipped to
        where a new value may begin."""
        self._reset()
        self._keep = True
        self._state = _State.RESYNC
        return JsonInputError(f"JSON parse error, stray '{_describe(byte)}'")

    def _end_token(self) -> Iterator[bytes | JsonInputError]:
        """The string or scalar begun at ``_token_start`` ended."""
        self._state = _State.START
        yield from self._token(len(self._text) - self._token_start if self._keep else 0)

    def _token(self, length: int) -> Iterator[bytes | JsonInputError]:
        """Account one finished token; yield the value if it ended, or an error if a limit broke."""
        if self._keep:
            self._tokens += 1
            self._size += length
            error = None
            if self._size > self.max_token_size:
                error = "JSON token size limit exceeded"
            elif self._tokens > self.max_token_count:
                error = "JSON token count limit exceeded"
            elif self._depth > self.max_nesting:
                error = "JSON nesting depth limit exceeded"
            if error is not None:
                yield self._abandon(error, inside_token=False)
                return
        if self._depth == 0:
            if self._keep:
                text = bytes(self._text)
                self._reset()
                yield text
            else:
                self._keep = True
                self._reset()

    def _append(self, data: bytes | memoryview) -> None:
        if self._keep:
            self._text += data

    def feed(self, data: bytes) -> Iterator[bytes | JsonInputError]:
        """Yield every value completed by ``data`` and every error found in it, in order."""
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state is _State.STRING:
                if self._escape:
                    self._append(data[i:i + 1])
                    self._escape = False
                    i += 1
                    continue
                m = _STRING_STOP.search(data, i)
                end = n if m is None else m.end()
                self._append(data[i:end])
                i = end
                if self._keep and self._size + len(self._text) - self._token_start > self.max_token_size:
                    # a string growing past the limit: say so now instead of buffering all of it
                    yield self._abandon("JSON token size limit exceeded", inside_token=True)
                if m is None:
                    continue
                stop = data[m.start()]
                if stop == 0x5C:  # backslash: the next byte is escaped
                    self._escape = True
                    continue
                if stop != 0x22:
                    yield self._stray(stop)
                    continue
                yield from self._end_token()
            elif state is _State.SCALAR:
                m = _SCALAR_RUN.match(data, i)
                assert m is not None
                self._append(data[i:m.end()])
                i = m.end()
                if i < n:  # the scalar ended here (it may go on in the next chunk otherwise)
                    yield from self._end_token()
            elif state is _State.RESYNC:
                m = _RESYNC.search(data, i)
                if m is None:
                    i = n
                else:
                    i = m.start()
                    self._state = _State.START
            else:
                b = data[i]
                if b in _WHITESPACE:
                    m = _WHITESPACE_RUN.match(data, i)
                    assert m is not None
                    i = m.end()
                    if self._text:
                        self._append(b" ")
                elif b == 0x22:
                    self._state = _State.STRING
                    self._token_start = len(self._text)
                    self._append(b'"')
                    i += 1
                elif b in _SCALAR_START:
                    self._state = _State.SCALAR
                    self._token_start = len(self._text)
                elif b in b"{[":
                    self._depth += 1
                    self._append(data[i:i + 1])
                    i += 1
                    yield from self._token(1)
                elif b in b"}]":
                    i += 1
                    if self._depth == 0:
                        self._reset()
                        self._keep = True
                        yield JsonInputError(f"JSON parse error, stray '{chr(b)}'")
                        continue
                    self._depth -= 1
                    self._append(bytes([b]))
                    yield from self._token(1)
                elif b in b":,":
                    self._append(bytes([b]))
                    i += 1
                    yield from self._token(1)
                else:  # a byte no token starts with
                    i += 1
                    yield self._stray(b)
