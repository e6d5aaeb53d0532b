"""The one server-sent-events parser and encoder (https://html.spec.whatwg.org/#server-sent-events).

Upstreams frame events differently: OpenAI with ``\\n\\n``, Anthropic with ``event:`` lines,
Gemini with ``\\r\\n\\r\\n``. The parser accepts every line ending the spec allows, including a
CRLF split across two network reads, and keeps partial events until they complete.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple


class Event(NamedTuple):
    event: str  # "" when the event has no `event:` field
    data: bytes


# Event(...) goes through a Python-level __new__; this is the same tuple, built in C
_new_event = partial(tuple.__new__, Event)


class SSEParser:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by this chunk, in order."""
        buf = self._buf + chunk if self._buf else chunk
        # (bytes.find, not `in`: `in` first tries its argument as an int and formats the
        # TypeError it then discards, on every call)
        if buf.find(b"\r") >= 0:
            # a trailing CR may be the first half of a CRLF: wait for the next read
            tail = b"\r" if buf.endswith(b"\r") else b""
            if tail:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        events: list[Event] = []
        for block in blocks:
            if block[:6] == b"data: " and block.find(b"\n") < 0:  # the common case, inline
                events.append(_new_event(("", block[6:])))
            elif (event := _parse_block(block)) is not None:
                events.append(event)
        return events

    def close(self) -> list[Event]:
        """Events left at the end of the body; the spec drops an unterminated last event,
        but Anthropic's recorded streams end without the final blank line, so keep it."""
        rest, self._buf = self._buf.rstrip(b"\r\n"), b""
        if not rest:
            return []
        event = _parse_block(rest.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        return [event] if event is not None else []

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete event."""
        return len(self._buf)


def _parse_block(block: bytes) -> Event | None:
    name = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        fname, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if fname == b"data":
            data.append(value)
        elif fname == b"event":
            name = value.decode("utf-8", "replace")
        # id: and retry: carry nothing a gateway needs
    if not data:
        return None
    return Event(name, b"\n".join(data))


def encode(data: bytes, event: str = "") -> bytes:
    """One SSE event; `data` must not contain a newline (JSON from orjson never does)."""
    if event:
        return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
