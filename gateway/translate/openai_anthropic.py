"""OpenAI chat completions to Anthropic's Messages API and back, streams included.

Request: system/developer messages become ``system``; tool results become ``tool_result``
blocks in a user turn; consecutive turns of one role are merged, as Anthropic wants strict
alternation; ``max_tokens`` is always sent (Anthropic requires it). Response: text, thinking
(as ``reasoning_content``) and ``tool_use`` blocks become one OpenAI message; each stream event
becomes OpenAI chunks as soon as it arrives. Whatever Anthropic cannot do is a 400.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import orjson

from ..errors import GatewayError, InvalidRequest, UpstreamError, from_upstream
from ..schema.anthropic import (
    ContentBlock,
    MessageCreateParams,
    MessageParam,
    TextBlock,
    ToolChoice,
    ToolParam,
)
from . import _openai_request as req
from ._openai_chat import ChunkWriter, Message, completion, wants_usage
from .base import (
    Translator,
    UpstreamCall,
    Usage,
    json_or_none,
    load_object,
    register,
    translate_events,
)
from .sse import Event, SSEParser

if TYPE_CHECKING:
    from ..router import Deployment
    from ..schema.openai import ChatCompletionRequest, JSONObject

DEFAULT_MAX_TOKENS = 4096

SUPPORTED = req.COMMON_PARAMETERS | {"top_k", "thinking", "reasoning_effort"}

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# What Anthropic allows in a tool_use id; ids made elsewhere (another provider, a client)
# that do not fit are replaced by a hash of themselves, the same for the call and its result.
TOOL_USE_ID = re.compile(r"[a-zA-Z0-9_-]+")

# Anthropic error types -> HTTP status, for errors that arrive inside a stream.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    "billing_error": 402,
}


@register("anthropic", "chat")
class OpenAIToAnthropicChat(Translator):
    def __init__(self, deployment: Deployment, requested: str) -> None:
        self.deployment = deployment
        self.requested = requested
        self.provider = deployment.provider.name
        self.usage = Usage()
        self.complete = False
        self._writer = ChunkWriter(requested, False, self.usage)
        self._sse = SSEParser()
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index

    # --- request ---------------------------------------------------------------------------

    def request(self, raw_body: JSONObject) -> UpstreamCall:
        body = cast("ChatCompletionRequest", raw_body)
        req.check_parameters(body, SUPPORTED, "anthropic")
        system, messages = _messages(raw_body["messages"])
        out: MessageCreateParams = {
            "model": self.deployment.upstream_model,
            "max_tokens": req.max_output_tokens(body)
            or self.deployment.model.max_tokens
            or DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            out["system"] = system
        n = body.get("n")
        if n is not None and n != 1:
            raise InvalidRequest(
                "'n' must be 1 for anthropic models: they return one choice.",
                param="n",
                code="unsupported_parameter",
            )
        temperature = body.get("temperature")
        if temperature is not None:
            if temperature > 1:
                raise InvalidRequest(
                    "'temperature' must be between 0 and 1 for anthropic models, "
                    f"got {temperature}.",
                    param="temperature",
                    code="invalid_value",
                )
            out["temperature"] = temperature
        top_p = body.get("top_p")
        if top_p is not None and top_p != 1:  # 1 (OpenAI's default) samples from everything
            if temperature is not None:
                # Claude models since Sonnet 4.5 / Haiku 4.5 / Opus 4.1 refuse both at once
                raise InvalidRequest(
                    "anthropic models take 'temperature' or 'top_p', not both.",
                    param="top_p",
                    code="unsupported_parameter",
                )
            out["top_p"] = top_p
        extra = raw_body
        top_k = req.integer_field(extra, "top_k", minimum=1)
        if top_k is not None:
            out["top_k"] = top_k
        thinking = extra.get("thinking")
        if thinking is not None:
            if not isinstance(thinking, dict):
                raise InvalidRequest(
                    "'thinking' must be an Anthropic thinking object, "
                    'e.g. {"type": "enabled", "budget_tokens": 2048}.',
                    param="thinking",
                )
            out["thinking"] = thinking
        stops = req.stop_sequences(body)
        if stops:
            out["stop_sequences"] = stops
        # safety_identifier is OpenAI's newer name for what `user` was for
        user_id = extra.get("safety_identifier") or body.get("user")
        if user_id:
            if not isinstance(user_id, str):
                raise InvalidRequest(
                    "'safety_identifier' must be a string.", param="safety_identifier"
                )
            out["metadata"] = {"user_id": user_id}
        output_config = _output_config(body, extra)
        if output_config:
            out["output_config"] = output_config
        tools = [_tool(fn) for fn in req.function_tools(body)]
        if tools:
            out["tools"] = tools
        choice = _tool_choice(body)
        if choice is not None:
            out["tool_choice"] = choice
        stream = body.get("stream") is True
        if stream:
            out["stream"] = True
            self._writer = ChunkWriter(self.requested, wants_usage(body), self.usage)
        return UpstreamCall("/messages", orjson.dumps(out), stream)

    # --- whole response --------------------------------------------------------------------

    def response_body(self, raw: bytes) -> bytes:
        msg = load_object(raw, self.provider)
        message = Message()
        for block in msg.get("content") or []:
            kind = block.get("type")
            if kind == "text":
                message.content.append(block.get("text", ""))
            elif kind == "thinking":
                message.reasoning.append(block.get("thinking", ""))
            elif kind == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                message.tool_calls.append(
                    {
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": arguments},
                    }
                )
        _take_usage(self.usage, msg.get("usage"))
        finish = FINISH_REASONS.get(msg.get("stop_reason") or "end_turn", "stop")
        return completion(str(msg.get("id", "")), self.requested, [(message, finish)], self.usage)

    # --- stream ----------------------------------------------------------------------------

    def response_chunk(self, chunk: bytes) -> bytes:
        return translate_events(self._sse.feed(chunk), self._event)

    def response_end(self) -> bytes:
        out = translate_events(self._sse.close(), self._event)
        if not self.complete:
            raise UpstreamError(
                f"provider '{self.provider}' ended the stream before it was complete",
                code="upstream_stream_incomplete",
            )
        return out

    def _event(self, event: Event) -> bytes:
        if event.event == "ping":
            return b""
        obj = load_object(event.data, self.provider)
        kind = obj.get("type")
        w = self._writer
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                return w.text(delta.get("text", ""))
            if dtype == "input_json_delta":
                call = self._tool_index.get(obj.get("index", -1))
                return (
                    w.tool_arguments(call, delta.get("partial_json", ""))
                    if call is not None
                    else b""
                )
            if dtype == "thinking_delta":
                return w.reasoning(delta.get("thinking", ""))
            return b""  # signature and citation deltas have no OpenAI counterpart
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype == "tool_use":
                call = len(self._tool_index)
                self._tool_index[obj.get("index", -1)] = call
                return w.tool_call(call, block.get("id", ""), block.get("name", ""))
            if btype == "text":
                return w.text(block.get("text", ""))
            if btype == "thinking":
                return w.reasoning(block.get("thinking", ""))
            return b""
        if kind == "message_start":
            message = obj.get("message") or {}
            w.start(str(message.get("id", "")))
            _take_usage(self.usage, message.get("usage"))
            return b""  # the role goes out with the first content
        if kind == "message_delta":
            _take_usage(self.usage, obj.get("usage"))
            stop = (obj.get("delta") or {}).get("stop_reason")
            return w.finish(FINISH_REASONS.get(stop or "end_turn", "stop"))
        if kind == "message_stop":
            self.complete = True
            return w.end(self.usage)
        if kind == "error":
            raise _error(None, obj, {}, self.provider)
        return b""  # content_block_stop, and event types added after this was written

    def response_error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        obj = json_or_none(raw)
        return _error(status, obj if isinstance(obj, dict) else {}, headers, self.provider)


def _take_usage(usage: Usage, reported: object) -> None:
    """Anthropic's usage (message_start, then cumulative message_delta overlays) -> ours."""
    if not isinstance(reported, dict):
        return

    def get(name: str, current: int) -> int:
        v = reported.get(name)
        return v if isinstance(v, int) else current

    uncached = get(
        "input_tokens", usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
    )
    usage.cached_tokens = get("cache_read_input_tokens", usage.cached_tokens)
    usage.cache_write_tokens = get("cache_creation_input_tokens", usage.cache_write_tokens)
    usage.prompt_tokens = uncached + usage.cached_tokens + usage.cache_write_tokens
    usage.completion_tokens = get("output_tokens", usage.completion_tokens)
    details = reported.get("output_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("thinking_tokens"), int):
        usage.reasoning_tokens = details["thinking_tokens"]
    usage.reported = True


def _error(
    status: int | None, obj: JSONObject, headers: Mapping[str, str], provider: str
) -> GatewayError:
    err = obj.get("error")
    err = err if isinstance(err, dict) else {}
    etype_raw, message_raw = err.get("type"), err.get("message")
    etype = etype_raw if isinstance(etype_raw, str) else None
    message = message_raw if isinstance(message_raw, str) else ""
    if status is None:  # an error event inside a stream
        status = ERROR_STATUS.get(etype or "", 502)
    code = None
    if status == 404 and "model" in message:
        code = "model_not_found"
    elif status == 413:
        code = "request_too_large"
    elif status == 429:
        code = "rate_limit_exceeded"
    elif etype == "overloaded_error":
        code = "service_unavailable"
    if status == 402:  # the operator's Anthropic account, not the client's problem
        billing = UpstreamError(
            f"provider '{provider}' refused the request: {message}", code="upstream_billing"
        )
        billing.retryable = False
        return billing
    return from_upstream(
        status,
        message,
        provider=provider,
        # OpenAI's error types, not Anthropic's (not_found_error, request_too_large...)
        type_=None,
        code=code,
        retry_after=headers.get("Retry-After"),
    )


# --- request pieces ----------------------------------------------------------------------------


def _messages(messages: list[JSONObject]) -> tuple[list[TextBlock], list[MessageParam]]:
    system: list[TextBlock] = []
    turns: list[tuple[str, list[ContentBlock]]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        param = f"messages[{i}]"
        if role in ("system", "developer"):
            text = req.text_of(message.get("content"), f"{param}.content")
            if text:
                system.append({"type": "text", "text": text})
            continue
        if role == "user":
            target, blocks = "user", _user_blocks(message.get("content"), f"{param}.content")
        elif role == "assistant":
            target, blocks = "assistant", _assistant_blocks(message, param)
        elif role == "tool":
            target, blocks = "user", [_tool_result(message, param)]
        else:
            raise InvalidRequest(
                f"'{param}.role': '{role}' messages are not supported for anthropic models; "
                "use 'tool'.",
                param=f"{param}.role",
            )
        if not blocks:
            continue
        if turns and turns[-1][0] == target:
            turns[-1][1].extend(blocks)
        else:
            turns.append((target, blocks))
    if not turns:
        raise req.no_conversation("anthropic")
    out: list[MessageParam] = []
    for role, content in turns:
        # a lone text block goes as a plain string, the way Anthropic's own SDK sends it
        only = content[0] if len(content) == 1 else None
        out.append(
            {
                "role": "user" if role == "user" else "assistant",
                "content": only["text"] if only is not None and only["type"] == "text" else content,
            }
        )
    return system, out


def _user_blocks(content: object, param: str) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    for i, part in enumerate(req.content_parts(content, param)):
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"'{param}[{i}].text' must be a string.", param=f"{param}[{i}]"
                )
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            media_type, data = req.image_source(part, f"{param}[{i}]")
            if media_type is None:
                blocks.append({"type": "image", "source": {"type": "url", "url": data}})
            elif media_type not in IMAGE_TYPES:
                raise InvalidRequest(
                    f"'{param}[{i}]': anthropic models accept JPEG, PNG, GIF and WebP images, "
                    f"not {media_type}.",
                    param=f"{param}[{i}]",
                )
            else:
                blocks.append(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": media_type, "data": data},
                    }
                )
        else:
            raise InvalidRequest(
                f"'{param}[{i}]': content parts of type '{kind}' are not supported for "
                "anthropic models.",
                param=f"{param}[{i}]",
            )
    return blocks


def _assistant_blocks(message: JSONObject, param: str) -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    content = message.get("content")
    for i, part in enumerate(req.content_parts(content, f"{param}.content")):
        if part["type"] == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif part["type"] != "refusal":
            raise InvalidRequest(
                f"'{param}.content[{i}]': assistant content must be text.",
                param=f"{param}.content[{i}]",
            )
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{param}.tool_calls' must be an array.", param=f"{param}.tool_calls")
    for j, call in enumerate(calls):
        cparam = f"{param}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise InvalidRequest(f"'{cparam}' needs an 'id' and a 'function'.", param=cparam)
        blocks.append(
            {
                "type": "tool_use",
                "id": _tool_use_id(call["id"]),
                "name": str(fn.get("name", "")),
                "input": req.tool_arguments(fn.get("arguments"), f"{cparam}.function.arguments"),
            }
        )
    return blocks


def _tool_result(message: JSONObject, param: str) -> ContentBlock:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(
            f"'{param}.tool_call_id' is required for tool messages.", param=f"{param}.tool_call_id"
        )
    return {
        "type": "tool_result",
        "tool_use_id": _tool_use_id(call_id),
        "content": req.text_of(message.get("content"), f"{param}.content"),
    }


def _tool_use_id(call_id: str) -> str:
    if TOOL_USE_ID.fullmatch(call_id):
        return call_id
    return "toolu_gw" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def _tool(fn: JSONObject) -> ToolParam:
    schema = fn.get("parameters")
    if not isinstance(schema, dict):
        schema = {"type": "object", "properties": {}}
    tool: ToolParam = {"name": fn["name"], "input_schema": schema}
    if isinstance(fn.get("description"), str):
        tool["description"] = fn["description"]
    if fn.get("strict") is True:
        tool["strict"] = True
    return tool


def _tool_choice(body: ChatCompletionRequest) -> ToolChoice | None:
    choice = req.tool_choice(body)
    no_parallel = body.get("parallel_tool_calls") is False
    if choice is None:
        return {"type": "auto", "disable_parallel_tool_use": True} if no_parallel else None
    kind, name = choice
    out: ToolChoice
    if kind == "none":
        return {"type": "none"}
    if kind == "function":
        out = {"type": "tool", "name": name or ""}
    else:
        out = {"type": "any" if kind == "required" else "auto"}
    if no_parallel:
        out["disable_parallel_tool_use"] = True
    return out


def _output_config(body: ChatCompletionRequest, extra: JSONObject) -> JSONObject:
    config: JSONObject = {}
    fmt = req.json_schema_format(body)
    if fmt is not None:
        kind, schema = fmt
        if kind == "json_object":
            raise InvalidRequest(
                "response_format 'json_object' is not supported for anthropic models; "
                "use 'json_schema' with a schema.",
                param="response_format",
                code="unsupported_parameter",
            )
        config["format"] = {"type": "json_schema", "schema": schema}
    effort = extra.get("reasoning_effort")
    if effort is not None:
        if effort not in ("low", "medium", "high"):
            raise InvalidRequest(
                "'reasoning_effort' must be 'low', 'medium' or 'high'.", param="reasoning_effort"
            )
        config["effort"] = effort
    return config
