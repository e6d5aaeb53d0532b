"""Reading an OpenAI chat request, for translators whose upstream speaks another format.

The helpers raise ``InvalidRequest`` naming the parameter, so that whatever a provider cannot
express becomes a clear 400 instead of a silent drop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import orjson

from ..errors import InvalidRequest
from ..schema.openai import ChatCompletionRequest, JSONObject

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)

# Parameters every translator understands or that carry no meaning upstream.
COMMON_PARAMETERS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "n",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "user",
        "safety_identifier",
        "store",
        "metadata",
    }
)


def check_parameters(
    body: ChatCompletionRequest, supported: Iterable[str], provider_kind: str
) -> None:
    """400 for a parameter the provider cannot honour, unless it is at its no-op value."""
    allowed = frozenset(supported)
    for name, value in body.items():
        if name in allowed or _is_default(name, value):
            continue
        raise InvalidRequest(
            f"'{name}' is not supported for {provider_kind} models.",
            param=name,
            code="unsupported_parameter",
        )
    if body.get("store") is True:
        raise InvalidRequest(
            f"'store' is not supported for {provider_kind} models.",
            param="store",
            code="unsupported_parameter",
        )


def _is_default(name: str, value: object) -> bool:
    if value is None:
        return True
    defaults: Mapping[str, object] = {
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logprobs": False,
        "logit_bias": {},
        "seed": None,
        "modalities": ["text"],
        "service_tier": "auto",
    }
    return name in defaults and value == defaults[name]


def no_conversation(provider_kind: str) -> InvalidRequest:
    """The error for messages that leave nothing to answer once system messages are set apart."""
    return InvalidRequest(
        f"'messages' must hold at least one non-empty user, assistant or tool message for "
        f"{provider_kind} models; system and developer messages alone are not a conversation.",
        param="messages",
        code="invalid_value",
    )


def integer_field(body: JSONObject, name: str, minimum: int | None = None) -> int | None:
    """An integer parameter (`top_k`, `seed`) checked before it reaches a provider."""
    value = body.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        at_least = f" of at least {minimum}" if minimum is not None else ""
        raise InvalidRequest(f"'{name}' must be an integer{at_least}.", param=name)
    return value


def max_output_tokens(body: ChatCompletionRequest) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else None


def stop_sequences(body: ChatCompletionRequest) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def content_parts(content: object, param: str) -> list[JSONObject]:
    """A message's content as a list of OpenAI parts (a string is one text part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of parts.", param=param)
    parts: list[JSONObject] = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(
                f"'{param}[{i}]' must be an object with a 'type'.", param=f"{param}[{i}]"
            )
        parts.append(part)
    return parts


def text_of(content: object, param: str) -> str:
    """The text of a message whose parts must all be text (system, tool results...)."""
    texts = []
    for i, part in enumerate(content_parts(content, param)):
        if part["type"] != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"'{param}[{i}]': only text parts are allowed here.", param=f"{param}[{i}]"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def image_source(part: JSONObject, param: str) -> tuple[str, str] | tuple[None, str]:
    """(media type, base64 data) for a data: URL, or (None, url) for an http(s) URL."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}.image_url.url' must be a string.", param=param)
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if match is None or not match.group("mime"):
            raise InvalidRequest(
                f"'{param}.image_url.url' is not a base64 data URL "
                "(data:<media type>;base64,<data>).",
                param=param,
            )
        return match.group("mime"), match.group("data")
    if url.startswith(("https://", "http://")):
        return None, url
    raise InvalidRequest(
        f"'{param}.image_url.url' must be an https URL or a data: URL.", param=param
    )


def tool_arguments(arguments: object, param: str) -> JSONObject:
    """A tool call's arguments (a JSON string) as the object the providers want."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise InvalidRequest(f"'{param}' must be a JSON string.", param=param)
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"'{param}' is not valid JSON.", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must encode a JSON object.", param=param)
    return value


def function_tools(body: ChatCompletionRequest) -> list[JSONObject]:
    """The request's function tools as their `function` objects, checked."""
    tools = body.get("tools") or []
    functions: list[JSONObject] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(
                f"'tools[{i}]': only tools of type 'function' are supported here.",
                param=f"tools[{i}]",
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(
                f"'tools[{i}].function.name' is required.", param=f"tools[{i}].function.name"
            )
        functions.append(fn)
    return functions


def tool_choice(body: ChatCompletionRequest) -> tuple[str, str | None] | None:
    """("auto" | "none" | "required" | "function", function name) or None when absent."""
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return str(choice), None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") == "function" and isinstance(name, str) and name:
            return "function", name
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
        param="tool_choice",
    )


def json_schema_format(body: ChatCompletionRequest) -> tuple[str, JSONObject | None] | None:
    """("json_object", None) or ("json_schema", schema) for response_format, else None."""
    fmt = body.get("response_format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return "json_object", None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "'response_format.json_schema.schema' must be an object.",
                param="response_format",
            )
        return "json_schema", schema
    raise InvalidRequest(
        "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
        param="response_format",
    )
