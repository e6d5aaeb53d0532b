"""Checks of client request bodies, before anything is sent upstream.

Only what the gateway relies on, or what would otherwise come back as an unhelpful upstream
error, is checked: each failure is a 400 naming the parameter. Fields the gateway does not know
pass through untouched for the upstream to judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import orjson

from .errors import InvalidRequest
from .schema.openai import ChatCompletionRequest, EmbeddingRequest, JSONObject

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_json_object(raw: bytes) -> JSONObject:
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"The request body is not valid JSON ({_reason(e)}).", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return obj


def _reason(e: orjson.JSONDecodeError) -> str:
    msg = str(e.msg) if hasattr(e, "msg") else str(e)
    return f"{msg} at position {e.pos}" if getattr(e, "pos", None) is not None else msg


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _type_error(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)}.",
        param=param,
        code="invalid_type",
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _model(body: JSONObject) -> str:
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if not model:
        raise InvalidRequest("'model' must not be empty.", param="model")
    return model


def _optional(body: JSONObject, name: str, kind: type | tuple[type, ...], expected: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _type_error(name, expected, value)
    if not isinstance(value, kind):
        raise _type_error(name, expected, value)
    return value


def _positive_int(body: JSONObject, name: str) -> None:
    value = _optional(body, name, int, "an integer")
    if value is not None and value < 1:
        raise InvalidRequest(
            f"'{name}' must be at least 1, got {value}.", param=name, code="invalid_value"
        )


def _number_in(body: JSONObject, name: str, low: float, high: float) -> None:
    value = _optional(body, name, (int, float), "a number")
    if value is not None and not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}, got {value}.",
            param=name,
            code="invalid_value",
        )


def chat_request(body: JSONObject) -> ChatCompletionRequest:
    _model(body)
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    for i, message in enumerate(messages):
        # the common case, checked first and cheaply
        # (a role that is a list or an object cannot be looked up in a set: the slow path)
        role = message.get("role") if type(message) is dict else None
        if type(role) is str and role in MESSAGE_ROLES:
            content = message.get("content")
            if content is None or type(content) is str or type(content) is list:
                continue
        _check_message(message, i)
    for name in body:
        check = _CHAT_CHECKS.get(name)
        if check is not None:
            check(body, name)
    if "stream_options" in body and body["stream_options"] is not None:
        if body.get("stream") is not True:
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true.",
                param="stream_options",
                code="invalid_value",
            )
        _optional(body["stream_options"], "include_usage", bool, "a boolean")
    return cast(ChatCompletionRequest, body)


def _check_message(message: object, i: int) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _type_error(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    if not isinstance(role, str):
        raise _type_error(f"{param}.role", "a string", role)
    if role not in MESSAGE_ROLES:
        raise InvalidRequest(
            f"Invalid value for '{param}.role': '{role[:40]}'. Supported values are: "
            "'system', 'developer', 'user', 'assistant', 'tool' and 'function'.",
            param=f"{param}.role",
            code="invalid_value",
        )
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise _type_error(f"{param}.content", "a string or an array of parts", content)


def _stop(body: JSONObject, name: str) -> None:
    stop = body[name]
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _type_error(name, "a string or an array of strings", stop)


def _typed(kind: type | tuple[type, ...], expected: str) -> Callable[[JSONObject, str], None]:
    def check(body: JSONObject, name: str) -> None:
        _optional(body, name, kind, expected)

    return check


def _between(low: float, high: float) -> Callable[[JSONObject, str], None]:
    def check(body: JSONObject, name: str) -> None:
        _number_in(body, name, low, high)

    return check


# Checks of the chat parameters the gateway relies on, run only for those present.
_CHAT_CHECKS: dict[str, Callable[[JSONObject, str], None]] = {
    "stream": _typed(bool, "a boolean"),
    "stream_options": _typed(dict, "an object"),
    "max_tokens": _positive_int,
    "max_completion_tokens": _positive_int,
    "n": _positive_int,
    "temperature": _between(0, 2),
    "top_p": _between(0, 1),
    "presence_penalty": _between(-2, 2),
    "frequency_penalty": _between(-2, 2),
    "stop": _stop,
    "tools": _typed(list, "an array"),
    "tool_choice": _typed((str, dict), "a string or an object"),
    "response_format": _typed(dict, "an object"),
    "user": _typed(str, "a string"),
}


def embedding_request(body: JSONObject) -> EmbeddingRequest:
    _model(body)
    value = body.get("input")
    if value is None:
        raise _missing("input")
    ok = isinstance(value, str) or (
        isinstance(value, list)
        and bool(value)
        and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
        )
    )
    if not ok:
        raise InvalidRequest(
            "'input' must be a string, an array of strings, or an array of token arrays, "
            "and must not be empty.",
            param="input",
            code="invalid_value",
        )
    _positive_int(body, "dimensions")
    fmt = _optional(body, "encoding_format", str, "a string")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )
    return cast(EmbeddingRequest, body)


def image_request(body: JSONObject) -> JSONObject:
    _model(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string", prompt)
    _positive_int(body, "n")
    return body


def speech_request(body: JSONObject) -> JSONObject:
    _model(body)
    text = body.get("input")
    if text is None:
        raise _missing("input")
    if not isinstance(text, str):
        raise _type_error("input", "a string", text)
    _optional(body, "voice", (str, dict), "a string or an object")
    return body
