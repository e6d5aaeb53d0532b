"""OpenAI chunk events are changed by scanning their bytes when a read holds several
(`OpenAIChat._scanned`), else parsed one by one (`OpenAIChat._event`). Whatever a read holds
and however the stream is cut into reads, the client must get the same events, and the
gateway must count the same usage and content, as with the parse of every event.
"""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import loads
from gateway.router import Router
from gateway.translate.base import StreamInterrupted, translate_events
from gateway.translate.openai_openai import OpenAIChat, content_chars
from gateway.translate.sse import SSEParser

FIXTURES = Path(__file__).parent / "fixtures" / "openai"
RECORDINGS = sorted(FIXTURES.glob("chat-stream-*.sse"))

CONFIG = """
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
models = [{ id = "gpt-4o" }, { id = "gpt-4o-mini", upstream = "gpt-4o-mini-2024-07-18" }]
"""
DEPLOYMENTS = Router(loads(CONFIG)).models


def translator(requested: str, wants_usage: bool, model: str = "openai/gpt-4o") -> OpenAIChat:
    t = OpenAIChat(DEPLOYMENTS[model], requested)
    options = {"include_usage": True} if wants_usage else {}
    t.request({"model": requested, "stream": True, "messages": [], "stream_options": options})
    return t


def by_parse(raw: bytes, t: OpenAIChat) -> bytes:
    """The reference: every event parsed by `_event`, never scanned."""
    parser = SSEParser()
    return translate_events(parser.feed(raw), t._event) + translate_events(parser.close(), t._event)


def by_reads(raw: bytes, t: OpenAIChat, cuts: list[int]) -> bytes:
    out = b""
    bounds = [0, *sorted(cuts), len(raw)]
    for a, b in pairwise(bounds):
        if b > a:
            out += t.response_chunk(raw[a:b])
    return out + t.response_end()


def events(out: bytes) -> list[object]:
    """The client's events, as JSON values (`[DONE]` as the string)."""
    blocks = [b for b in out.split(b"\n\n") if b]
    assert all(b.startswith(b"data: ") and b"\n" not in b for b in blocks), out
    return [b"[DONE]" if b == b"data: [DONE]" else orjson.loads(b[6:]) for b in blocks]


def assert_same(raw: bytes, requested: str, wants_usage: bool, cuts: list[int]) -> bool:
    """The reads translate as the parse does; True when some read was scanned."""
    reference, scanned = translator(requested, wants_usage), translator(requested, wants_usage)
    expected = by_parse(raw, reference) + reference.response_end()
    calls = []
    real = scanned._scanned

    def spy(data: bytes, counted: bool = True) -> bytes | None:
        result = real(data, counted)
        calls.append(result is not None)
        return result

    scanned._scanned = spy  # type: ignore[method-assign]
    got = by_reads(raw, scanned, cuts)
    assert events(got) == events(expected)
    if reference.usage.reported:  # content is not counted in the read that brings the count
        assert scanned.usage.streamed_chars <= reference.usage.streamed_chars
        scanned.usage.streamed_chars = reference.usage.streamed_chars
    assert scanned.usage == reference.usage
    assert scanned.complete and reference.complete
    return any(calls)


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("requested", ["openai/gpt-4o", "gpt-4o-2024-08-06", "my-alias"])
@pytest.mark.parametrize("wants_usage", [False, True])
def test_every_recording_whole_and_in_reads(
    recording: Path, requested: str, wants_usage: bool
) -> None:
    raw = recording.read_bytes()
    assert_same(raw, requested, wants_usage, [])  # the whole stream in one read
    ends = [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
    assert_same(raw, requested, wants_usage, ends)  # an event a read
    assert_same(raw, requested, wants_usage, ends[::4])  # four events a read
    rng = random.Random(recording.name)
    for _ in range(5):  # anywhere, also inside events and between the two line breaks
        assert_same(raw, requested, wants_usage, rng.sample(range(len(raw)), 6))


def test_plain_reads_are_scanned_and_the_rest_parsed() -> None:
    # text, with include_usage's "usage":null in each chunk and the usage chunk at the end
    raw = (FIXTURES / "chat-stream-include-usage-text-after-tool.sse").read_bytes()
    assert assert_same(raw, "openai/gpt-4o-mini", False, []) is True
    assert assert_same(raw, "openai/gpt-4o-mini", True, []) is True
    # logprobs hold "content" lists: a read whose content must be counted is parsed, one
    # that brings the upstream's count as well is scanned
    raw = (FIXTURES / "chat-stream-logprobs.sse").read_bytes()
    before_usage = raw.rindex(b"data: {")
    assert assert_same(raw, "openai/gpt-4o", False, [before_usage]) is False
    assert assert_same(raw, "openai/gpt-4o", False, []) is True


def test_content_is_counted_unless_the_same_read_brings_the_upstreams_count() -> None:
    raw = (FIXTURES / "chat-stream-include-usage-text-after-tool.sse").read_bytes()
    content = "".join(
        c["delta"].get("content") or ""
        for e in events(raw)
        if isinstance(e, dict)
        for c in e["choices"]
    )
    before_usage = raw.rindex(b"data: {")
    apart = translator("openai/gpt-4o-mini", False)
    by_reads(raw, apart, [before_usage])
    assert apart.usage.streamed_chars == len(content) > 0
    whole = translator("openai/gpt-4o-mini", False)
    by_reads(raw, whole, [])
    # the first event is parsed (it shows the model's spelling); the rest is not counted
    assert whole.usage.streamed_chars == 0
    assert (whole.usage.completion_tokens, whole.usage.reported) == (9, True)


def test_the_gateways_usage_chunk_is_dropped_and_usage_counted() -> None:
    raw = (FIXTURES / "chat-stream-include-usage-text-after-tool.sse").read_bytes()
    t = translator("openai/gpt-4o-mini", False, "openai/gpt-4o-mini")
    out = by_reads(raw, t, [])
    assert b'"usage"' not in out
    assert b'"model":"openai/gpt-4o-mini"' in out and b"2024-07-18" not in out
    assert (t.usage.prompt_tokens, t.usage.completion_tokens) == (78, 9)
    assert out.endswith(b"data: [DONE]\n\n")


CHUNK = orjson.loads(
    (FIXTURES / "chat-stream-text.sse").read_bytes().split(b"\n\n")[1].removeprefix(b"data: ")
)


def chunk_with(content: str | None, **extra: object) -> bytes:
    obj = {**CHUNK, **extra}
    obj["choices"] = [{**CHUNK["choices"][0], "delta": {"content": content}}]
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(max_size=40) | st.none(), min_size=3, max_size=12),
    st.booleans(),
    st.integers(min_value=0, max_value=2**32),
)
def test_any_content_counts_and_passes_as_the_parse_has_it(
    texts: list[str | None], wants_usage: bool, seed: int
) -> None:
    raw = b"".join(chunk_with(t, usage=None) for t in texts) + b"data: [DONE]\n\n"
    rng = random.Random(seed)
    assert_same(raw, "openai/gpt-4o", wants_usage, [])
    assert_same(raw, "openai/gpt-4o", wants_usage, rng.sample(range(len(raw)), 3))
    streamed = raw.split(b"\n\n", 1)[1]  # the first event teaches the model's spelling
    assert content_chars(streamed) == sum(len(t or "") for t in texts[1:])


def test_content_outside_the_delta_is_not_counted() -> None:
    # text-generation-webui's OpenAI API sends each chunk's text in "message" and "delta"
    def both(text: str) -> bytes:
        obj = {**CHUNK}
        choice = {**CHUNK["choices"][0], "delta": {"content": text}, "message": {"content": text}}
        obj["choices"] = [choice]
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    raw = b"".join(both(f"word {i} ") for i in range(8)) + b"data: [DONE]\n\n"
    assert_same(raw, "openai/gpt-4o", False, [])
    t = translator("openai/gpt-4o", False)
    by_reads(raw, t, [])
    assert t.usage.streamed_chars == sum(len(f"word {i} ") for i in range(8))


def test_an_error_event_among_plain_ones_is_parsed_and_keeps_what_came_before() -> None:
    error = b'data: {"error":{"message":"overloaded","type":"server_error","code":null}}\n\n'
    raw = b"".join(chunk_with(f"word {i}") for i in range(6)) + error
    t = translator("openai/gpt-4o", False)
    with pytest.raises(StreamInterrupted) as caught:
        t.response_chunk(raw)
    assert len(events(caught.value.partial)) == 6
    assert (caught.value.error.status, caught.value.error.message) == (502, "overloaded")


def test_an_error_event_that_names_the_model_is_parsed_too() -> None:
    # OpenRouter ends a stream whose provider failed with a chunk that has the model and an
    # error: it must end the stream as an error, not pass as one more chunk
    error = chunk_with("", error={"code": "server_error", "message": "Provider disconnected"})
    raw = b"".join(chunk_with(f"word {i}") for i in range(6)) + error + b"data: [DONE]\n\n"
    t = translator("openai/gpt-4o", False)
    with pytest.raises(StreamInterrupted) as caught:
        t.response_chunk(raw)
    assert len(events(caught.value.partial)) == 6
    e = caught.value.error
    assert (e.status, e.type, e.code, e.message) == (
        502,
        "server_error",
        "server_error",
        "Provider disconnected",
    )


def test_content_chars_refuses_what_it_cannot_read() -> None:
    assert content_chars(b'{"delta":{"content":"h\\u00e9\\n\\"x\\""}}') == 6
    assert content_chars('{"delta":{"content":"日本語"}}'.encode()) == 3
    assert content_chars(b'{"delta":{"content":null}}') == 0
    assert content_chars(b'{"logprobs":{"content":[]}}') == -1
    assert content_chars(b'{"message":{"content":"x"},"delta":{"content":"x"}}') == -1
    assert content_chars(b'{"delta":{"content": "spaced"}}') == -1


@pytest.mark.parametrize(
    "between",
    [
        b": ping\n\n",
        b"event: chunk\n",
        b"id: 7\n",
        b"\n",
        b"retry: 10\n\n",
        b"x" + chunk_with("not data"),  # a field no client reads: the event has no data
    ],
    ids=["comment", "event-field", "id-field", "extra-blank", "retry", "unknown-field"],
)
def test_other_sse_lines_among_plain_events_go_to_the_parse(between: bytes) -> None:
    # only reads of nothing but `data: {...}` events and their blank lines are scanned
    plain = [chunk_with(f"word {i} ") for i in range(6)]
    raw = plain[0] + b"".join(plain[1:3]) + between + b"".join(plain[3:]) + b"data: [DONE]\n\n"
    assert assert_same(raw, "openai/gpt-4o", False, [len(plain[0])]) is False
