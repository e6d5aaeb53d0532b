"""The SSE parser against every framing the recorded provider streams use."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.translate.sse import DONE, Event, SSEParser, encode

FIXTURES = Path(__file__).parent / "fixtures"


def parse_in_pieces(raw: bytes, size: int) -> list[Event]:
    parser = SSEParser()
    events: list[Event] = []
    for i in range(0, len(raw), size):
        events.extend(parser.feed(raw[i : i + size]))
    events.extend(parser.close())
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
def test_openai_recording_in_any_split(size: int) -> None:
    raw = (FIXTURES / "openai/chat-stream-text.sse").read_bytes()
    events = parse_in_pieces(raw, size)
    assert events[-1] == Event("", b"[DONE]")
    assert len(events) == raw.count(b"\n\n")
    assert all(e.data.startswith(b"{") for e in events[:-1])


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_crlf_split_between_reads(size: int) -> None:
    raw = b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\r\n\r\n'
    assert parse_in_pieces(raw, size) == [Event("", b'{"a": 1}'), Event("", b'{"b": 2}')]


def test_named_events_comments_and_multiline_data() -> None:
    raw = b': keep-alive\n\nevent: ping\ndata: {"type": "ping"}\n\ndata: line1\ndata: line2\nid: 3\n\n'
    assert parse_in_pieces(raw, 4) == [
        Event("ping", b'{"type": "ping"}'),
        Event("", b"line1\nline2"),
    ]


def test_lone_cr_line_endings() -> None:
    assert parse_in_pieces(b"data: x\r\rdata: y\r\r", 1) == [Event("", b"x"), Event("", b"y")]


def test_last_event_without_blank_line_is_kept() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: message_stop\ndata: {}") == []
    assert parser.pending > 0
    assert parser.close() == [Event("message_stop", b"{}")]


def test_encode() -> None:
    assert encode(b"{}") == b"data: {}\n\n"
    assert encode(b"{}", "error") == b"event: error\ndata: {}\n\n"
    assert DONE == b"data: [DONE]\n\n"
