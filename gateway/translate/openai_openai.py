"""OpenAI wire format to an OpenAI-compatible upstream: pass-through that patches only what it must.

Request bodies keep every field the client sent; the gateway sets ``model`` to the upstream's
name and, for streams, asks for ``stream_options.include_usage`` so that it can count tokens.
Responses get the client's model id back in ``model``; the usage chunk the gateway asked for is
dropped unless the client asked for it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from ..errors import GatewayError, UpstreamError, from_upstream
from .base import (
    StreamInterrupted,
    Translator,
    UpstreamCall,
    Usage,
    json_or_none,
    load_object,
    register,
    translate_events,
)
from .sse import DONE, Event, SSEParser, encode

if TYPE_CHECKING:
    from ..router import Deployment
    from ..schema.openai import JSONObject


class _PassThrough(Translator):
    """State and helpers every OpenAI-compatible translator shares."""

    path = ""

    def __init__(self, deployment: Deployment, requested: str) -> None:
        self.upstream_model = deployment.upstream_model
        self.provider = deployment.provider.name
        self.requested = requested
        self.usage = Usage()
        self.complete = False

    def request(self, body: JSONObject) -> UpstreamCall:
        body = dict(body)
        body["model"] = self.upstream_model
        return UpstreamCall(self.path, orjson.dumps(body), False)

    def response_body(self, raw: bytes) -> bytes:
        obj = load_object(raw, self.provider)
        take_openai_usage(self.usage, obj.get("usage"))
        if obj.get("model") == self.requested:
            return raw  # nothing to patch: the body as it came
        obj["model"] = self.requested
        return orjson.dumps(obj)

    def response_chunk(self, chunk: bytes) -> bytes:
        return chunk

    def response_end(self) -> bytes:
        self.complete = True
        return b""

    def response_error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        return openai_error(status, raw, headers, self.provider)


@register("openai", "chat")
@register("demo", "chat")
class OpenAIChat(_PassThrough):
    path = "/chat/completions"

    def __init__(self, deployment: Deployment, requested: str) -> None:
        super().__init__(deployment, requested)
        self.client_wants_usage = False
        self._sse = SSEParser()
        # `"model":"<the upstream's name>"` as the first event spelled it, and what replaces
        # it; once known, plain reads go through `_scanned` instead of a parse per event
        self._model_from = b""
        self._model_to = b'"model":' + orjson.dumps(requested)

    def request(self, body: JSONObject) -> UpstreamCall:
        body = dict(body)
        body["model"] = self.upstream_model
        if body.get("stream") is not True:
            return UpstreamCall(self.path, orjson.dumps(body), False)
        options = body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        self.client_wants_usage = options.get("include_usage") is True
        if not self.client_wants_usage:
            options["include_usage"] = True
            body["stream_options"] = options
        return UpstreamCall(self.path, orjson.dumps(body), True)

    def response_chunk(self, chunk: bytes) -> bytes:
        # events (a few hundred bytes each) mostly come one or two a read: scanning pays from
        # a few on, as when a busy gateway finds several waiting
        if len(chunk) < 1024 or self._sse.pending or chunk.find(b"\r") >= 0:
            return translate_events(self._sse.feed(chunk), self._event)
        out, first = b"", 0
        if not self._model_from:  # the first event shows how the upstream spells its model
            first = chunk.find(b"\n\n") + 2
            if first < 2:
                return self._parsed(chunk)
            out = self._parsed(chunk[:first])
            if not self._model_from:
                return self._parsed(chunk[first:], out)
        # the usage chunk and [DONE] that end a stream are parsed, the events before scanned;
        # their content is not counted when the upstream's own count comes in the same read
        # (a usage object anywhere else makes the scan turn the read away)
        end = len(chunk) - len(DONE) if chunk.endswith(DONE) else len(chunk)
        last = chunk.rfind(b"\n\ndata: {", first, end)
        last = first if last < 0 else last + 2  # where the read's last event starts
        if chunk.find(b'"usage":{', last, end) >= 0:
            end = last
        counted = chunk.find(b'"completion_tokens":', end) < 0
        scanned = self._scanned(chunk[first:end], counted)
        if scanned is None:
            return self._parsed(chunk[first:], out)
        return self._parsed(chunk[end:], out + scanned) if end < len(chunk) else out + scanned

    def _parsed(self, chunk: bytes, before: bytes = b"") -> bytes:
        """`before`, then the translation of the events `chunk` completes, parsed one by one."""
        try:
            return before + translate_events(self._sse.feed(chunk), self._event)
        except StreamInterrupted as e:
            raise StreamInterrupted(before + e.partial, e.error) from e.error

    def response_end(self) -> bytes:
        out = translate_events(self._sse.close(), self._event)
        if not self.complete:
            raise UpstreamError(
                f"provider '{self.provider}' ended the stream before it was complete",
                code="upstream_stream_incomplete",
            )
        return out

    def _event(self, event: Event) -> bytes:
        # Every event of every stream passes here: kept to the few lookups it needs.
        data = event[1]
        if data == b"[DONE]":
            self.complete = True
            return DONE
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is not dict:
            obj = load_object(data, self.provider)  # raises the error
        if "error" in obj:  # an upstream error event: the stream is over
            raise openai_error(None, data, {}, self.provider)
        choices = obj.get("choices")
        if choices and type(choices) is list:
            for choice in choices:
                try:
                    content = choice["delta"]["content"]
                except (KeyError, TypeError):
                    continue
                if type(content) is str:
                    self.usage.streamed_chars += len(content)
        model = obj.get("model")
        if not self._model_from and type(model) is str:
            self._model_from = b'"model":' + orjson.dumps(model)
        if "usage" in obj:
            usage = obj["usage"]
            if usage:
                take_openai_usage(self.usage, usage)
            if not self.client_wants_usage:
                if usage and not choices:
                    return b""  # the usage chunk the gateway asked for
                del obj["usage"]
                obj["model"] = self.requested
                return encode(orjson.dumps(obj))
        if model == self.requested and data.find(b"\n") < 0:
            return b"data: " + data + b"\n\n"  # nothing to patch: the event as it came
        obj["model"] = self.requested
        return encode(orjson.dumps(obj))

    def _scanned(self, events: bytes, counted: bool = True) -> bytes | None:
        """A read of whole, plain chunk events, changed as `_event` would change them (the
        model name, the `"usage":null` that only the gateway asked for) with a few scans of
        its bytes instead of a parse and re-encode of each event (for a stream's twenty-odd
        events those cost over half of what a bare proxy spends forwarding the whole stream);
        None when anything in it needs the parse: an error, a usage object, a model name
        spelled differently, any other shape. The JSON is not checked: a client gets the
        upstream's own bytes, as from any proxy. The characters of its content are counted
        unless not `counted` (the upstream's count of the stream follows in the same read).

        In valid JSON a quote that is not escaped only delimits strings, and raw line breaks
        only stand between values, so the model's `"model":"..."`, `"content":` and the event
        framing found in the bytes are what they look like, never text inside a string.
        Counts are per read, not per event: an event missing its top-level `model` while
        another holds the model's spelling twice (or `"usage":null` twice) would be changed
        unlike the parse; no OpenAI-compatible server sends that shape.
        """
        if not events:
            return b""
        # n events: every line break is one of the n blank lines that end them (the caller
        # has turned away reads with a CR), and each but the last is followed by the next
        n = events.count(b"\n\ndata: {") + 1
        if (
            not events.startswith(b"data: {")
            or not events.endswith(b"}\n\n")
            or events.count(b"\n") != 2 * n
            or events.find(b'"error"') >= 0  # (OpenRouter's error events name the model)
        ):
            return None
        usages = events.count(b'"usage"')
        nulls = events.count(b'"usage":null') if usages else 0
        if usages != nulls:
            return None
        chars = content_chars(events) if counted else 0
        if chars < 0:
            return None
        if nulls and not self.client_wants_usage:
            if events.count(b',"usage":null') != nulls:
                return None
            events = events.replace(b',"usage":null', b"")
        # one pass finds the model's n spellings and the pieces between them
        pieces = events.split(self._model_from)
        if len(pieces) != n + 1:
            return None
        self.usage.streamed_chars += chars
        return self._model_to.join(pieces)


@register("openai", "embeddings")
@register("demo", "embeddings")
class OpenAIEmbeddings(_PassThrough):
    path = "/embeddings"


@register("openai", "images")
@register("demo", "images")
class OpenAIImages(_PassThrough):
    path = "/images/generations"

    def response_body(self, raw: bytes) -> bytes:
        # Image responses can be megabytes of base64 and carry no model field: pass them as is.
        return raw


@register("openai", "speech")
@register("demo", "speech")
class OpenAISpeech(_PassThrough):
    """Audio bytes are streamed to the client as they arrive."""

    path = "/audio/speech"

    def request(self, body: JSONObject) -> UpstreamCall:
        body = dict(body)
        body["model"] = self.upstream_model
        return UpstreamCall(self.path, orjson.dumps(body), True)


# a delta's content, its first key (after the role in a stream's first chunk): a string or null
_CONTENT = re.compile(
    rb'"delta":\{(?:"role":"assistant",)?"content":'
    rb'(?:"([^"\\]*(?:\\.[^"\\]*)*)"|null)'  # runs of plain characters between escapes
)


def content_chars(events: bytes) -> int:
    """Characters in the `delta.content` strings of chunk events' JSON bytes; -1 when any
    `"content"` is not one of those (elsewhere in the chunk, or spelled another way)."""
    texts = _CONTENT.findall(events)  # b"" for a null
    if events.count(b'"content"') != len(texts):
        return -1
    joined = b"".join(texts)
    if joined.isascii() and joined.find(b"\\") < 0:
        return len(joined)
    chars = 0
    for text in texts:
        try:
            chars += len(orjson.loads(b'"' + text + b'"'))
        except orjson.JSONDecodeError:
            return -1
    return chars


def take_openai_usage(usage: Usage, reported: object) -> None:
    """Copy an OpenAI ``CompletionUsage`` (or embeddings usage) into `usage`."""
    if not isinstance(reported, dict):
        return
    usage.prompt_tokens = _int(reported.get("prompt_tokens"))
    usage.completion_tokens = _int(reported.get("completion_tokens"))
    prompt_details = reported.get("prompt_tokens_details")
    if isinstance(prompt_details, dict):
        usage.cached_tokens = _int(prompt_details.get("cached_tokens"))
    completion_details = reported.get("completion_tokens_details")
    if isinstance(completion_details, dict):
        usage.reasoning_tokens = _int(completion_details.get("reasoning_tokens"))
    usage.reported = True


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


# OpenAI error codes and types -> HTTP status, for errors that arrive inside a stream, whose
# 200 has already been sent: the status the same error would have had before the stream.
STREAM_ERROR_STATUS = {
    "invalid_request_error": 400,
    "invalid_prompt": 400,
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "overloaded": 503,
    "overloaded_error": 503,
    "service_unavailable": 503,
    "timeout": 504,
}


def openai_error(
    status: int | None, raw: bytes, headers: Mapping[str, str], provider: str
) -> GatewayError:
    """An OpenAI-format error body (``{"error": {...}}``) from an upstream, as our error;
    `status` None for an error event inside a stream, whose code or type gives the status."""
    message, type_, code, param = "", None, None, None
    obj = json_or_none(raw)
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        m = err.get("message")
        message = m if isinstance(m, str) else ""
        type_ = err.get("type") if isinstance(err.get("type"), str) else None
        c = err.get("code")
        code = c if isinstance(c, str) else (str(c) if isinstance(c, int) else None)
        param = err.get("param") if isinstance(err.get("param"), str) else None
    elif isinstance(err, str):
        message = err
    if status is None:
        status = STREAM_ERROR_STATUS.get(code or "") or STREAM_ERROR_STATUS.get(type_ or "", 500)
    return from_upstream(
        status,
        message,
        provider=provider,
        type_=type_,
        code=code,
        param=param,
        retry_after=headers.get("Retry-After"),
    )
