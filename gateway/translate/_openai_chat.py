"""Writing OpenAI chat completions and chunks, for translators whose upstream speaks another format.

``ChunkWriter`` builds the ``chat.completion.chunk`` events of one stream in the order clients
expect: the role delta first, then content / reasoning / tool-call deltas, a final chunk with
``finish_reason``, the usage chunk if the client asked for it, and ``[DONE]``.
``completion`` builds the non-stream ``chat.completion`` body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson

from ..schema.openai import ChatCompletionRequest, CompletionUsage, JSONObject, ToolCall
from .base import Usage
from .sse import DONE, encode


def usage_object(usage: Usage) -> CompletionUsage:
    out: CompletionUsage = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    return out


def wants_usage(body: ChatCompletionRequest) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class Message:
    """One choice's message while it is assembled from provider content blocks."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    refusal: str | None = None

    def as_json(self) -> JSONObject:
        # An answer that is only tool calls or reasoning has null content, as in OpenAI's
        # own responses and in what the SDKs accumulate from the equivalent stream.
        text = "".join(self.content)
        message: JSONObject = {
            "role": "assistant",
            "content": text or (None if self.tool_calls or self.reasoning else ""),
            "refusal": self.refusal,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


def completion(
    id_: str, model: str, choices: list[tuple[Message, str | None]], usage: Usage
) -> bytes:
    return orjson.dumps(
        {
            "id": id_,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": message.as_json(),
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i, (message, finish) in enumerate(choices)
            ],
            "usage": usage_object(usage),
        }
    )


class ChunkWriter:
    """The OpenAI chunks of one translated stream."""

    __slots__ = ("_head", "_include_usage", "_model", "_roles_sent", "id", "usage")

    def __init__(self, model: str, include_usage: bool, usage: Usage) -> None:
        self.id = ""
        self.usage = usage
        self._model = model
        self._include_usage = include_usage
        self._roles_sent: set[int] = set()
        self._head = b""
        self.start("")

    def start(self, id_: str) -> None:
        """Set the completion id (the provider's message id) before the first chunk."""
        self.id = id_
        # Every chunk starts with the same fields: encode them once per stream.
        self._head = orjson.dumps(
            {
                "id": id_,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self._model,
            }
        )[:-1]

    def _chunk(self, index: int, delta: JSONObject, finish: str | None = None) -> bytes:
        if index in self._roles_sent:
            return self._choice(index, delta, finish)
        # The role comes first, as OpenAI sends it: on the first tool call's delta when the
        # answer starts with a tool call, else on a chunk of its own.
        self._roles_sent.add(index)
        if "tool_calls" in delta:
            return self._choice(index, {"role": "assistant", "content": None, **delta}, finish)
        first = {"role": "assistant", "content": None if "reasoning_content" in delta else ""}
        out = self._choice(index, first, None)
        if delta or finish is not None:
            out += self._choice(index, delta, finish)
        return out

    def _choice(self, index: int, delta: JSONObject, finish: str | None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = orjson.dumps({"choices": [choice]})
        return encode(self._head + b"," + body[1:])

    def text(self, text: str, index: int = 0) -> bytes:
        if not text:
            return b""
        self.usage.streamed_chars += len(text)
        return self._chunk(index, {"content": text})

    def reasoning(self, text: str, index: int = 0) -> bytes:
        if not text:
            return b""
        self.usage.streamed_chars += len(text)
        return self._chunk(index, {"reasoning_content": text})

    def tool_call(
        self, call_index: int, call_id: str, name: str, arguments: str = "", index: int = 0
    ) -> bytes:
        """The first delta of a tool call: its id and name (and any arguments already known)."""
        self.usage.streamed_chars += len(name) + len(arguments)
        call = {
            "index": call_index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return self._chunk(index, {"tool_calls": [call]})

    def tool_arguments(self, call_index: int, fragment: str, index: int = 0) -> bytes:
        if not fragment:
            return b""
        self.usage.streamed_chars += len(fragment)
        call = {"index": call_index, "function": {"arguments": fragment}}
        return self._chunk(index, {"tool_calls": [call]})

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._chunk(index, {}, reason)

    def end(self, usage: Usage) -> bytes:
        """The usage chunk (if the client asked for it) and [DONE]."""
        if not self._include_usage:
            return DONE
        body = orjson.dumps({"choices": [], "usage": usage_object(usage)})
        return encode(self._head + b"," + body[1:]) + DONE
