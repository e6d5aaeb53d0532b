"""The translator interface and the registry of translators by (provider kind, endpoint).

A translator is a fresh object per request. It turns the client's OpenAI request into the
upstream's request, and the upstream's response (whole body or stream chunks) back into
OpenAI's wire format, keeping whatever stream state it needs and the usage it saw.
Upstream authentication is not its business (see ``upstream.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import orjson

from ..errors import GatewayError, UpstreamError
from .sse import Event

if TYPE_CHECKING:
    from ..router import Deployment
    from ..schema.openai import JSONObject

Endpoint = Literal["chat", "embeddings", "images", "speech"]


class UpstreamCall(NamedTuple):
    """What to send: a path under the provider's base URL and a JSON body."""

    path: str
    body: bytes
    stream: bool  # the upstream answers with server-sent events


@dataclass(slots=True)
class Usage:
    """Token counts of one request in one model for every provider.

    ``prompt_tokens`` counts every input token, including cache reads and writes;
    ``completion_tokens`` every output token, including reasoning.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # input tokens read from a prompt cache
    cache_write_tokens: int = 0  # input tokens written to a prompt cache
    reasoning_tokens: int = 0
    reported: bool = False  # the upstream reported these numbers (else they are estimates)
    # Characters of content streamed so far, to estimate output tokens before (or without)
    # the upstream's own count: a stream cut short never gets one.
    streamed_chars: int = 0

    def estimate_output(self) -> int:
        """Output tokens so far: the upstream's count, or one per 4 characters streamed if
        that is more (a count sent mid-stream, as in Anthropic's message_start or Gemini's
        early chunks, is partial)."""
        return max(self.completion_tokens, (self.streamed_chars + 3) // 4)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Translator(Protocol):
    """What every translator does; translators subclass it for the defaults (`next_call`)."""

    usage: Usage
    # True once a stream reached its proper end (OpenAI's [DONE], Anthropic's message_stop...)
    complete: bool

    def request(self, body: JSONObject) -> UpstreamCall: ...

    def response_body(self, raw: bytes) -> bytes: ...

    def response_chunk(self, chunk: bytes) -> bytes: ...

    def response_end(self) -> bytes: ...

    def response_error(
        self, status: int, raw: bytes, headers: Mapping[str, str]
    ) -> GatewayError: ...

    def next_call(self) -> UpstreamCall | None:
        """The next upstream call of a request the upstream takes in parts, once the body of
        the one before has gone through `response_body`; None when the request is done."""
        return None


class StreamInterrupted(Exception):
    """A stream failed part-way through a chunk: `partial` was translated before `error`."""

    def __init__(self, partial: bytes, error: GatewayError) -> None:
        super().__init__(error.message)
        self.partial = partial
        self.error = error


def translate_events(events: list[Event], convert: Callable[[Event], bytes]) -> bytes:
    """The translation of each event, joined; stops at the first failing event without losing
    what the events before it produced."""
    out: list[bytes] = []
    try:
        for event in events:
            out.append(convert(event))
    except GatewayError as e:
        raise StreamInterrupted(b"".join(out), e) from e
    return out[0] if len(out) == 1 else b"".join(out)


def json_or_none(raw: bytes) -> object:
    """`raw` parsed, or None when it is not JSON (an upstream's error body may be anything)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def load_object(raw: bytes, provider: str) -> JSONObject:
    """An upstream's response body or event, which must be a JSON object."""
    obj = json_or_none(raw)
    if not isinstance(obj, dict):
        raise UpstreamError(
            f"provider '{provider}' sent a response that is not a JSON object",
            code="upstream_invalid_response",
        )
    return obj


TranslatorFactory = Callable[["Deployment", str], Translator]

_REGISTRY: dict[tuple[str, str], TranslatorFactory] = {}


def register(kind: str, endpoint: Endpoint) -> Callable[[TranslatorFactory], TranslatorFactory]:
    def add(factory: TranslatorFactory) -> TranslatorFactory:
        _REGISTRY[(kind, endpoint)] = factory
        return factory

    return add


def translator_for(deployment: Deployment, endpoint: Endpoint, requested: str) -> Translator:
    """A fresh translator for one request to `deployment`, answering as model `requested`."""
    factory = _REGISTRY.get((deployment.provider.kind, endpoint))
    if factory is None:
        from ..errors import InvalidRequest

        raise InvalidRequest(
            f"Provider '{deployment.provider.name}' ({deployment.provider.kind}) "
            f"does not offer the {endpoint} endpoint.",
            param="model",
            code="model_not_supported",
        )
    return factory(deployment, requested)
