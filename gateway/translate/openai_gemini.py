"""OpenAI chat completions and embeddings to the Gemini API (generateContent,
streamGenerateContent with ``alt=sse``, batchEmbedContents) and back.

Gemini has no tool-call ids and wants each function call's ``thoughtSignature`` sent back
unchanged on the next turn. The gateway keeps both in the OpenAI tool-call id it hands out:
``call_<hash>`` (or Gemini's own id when it sends one), plus ``__`` and the signature in the
URL-safe base64 alphabet when there is one, so that the id is made of ``[A-Za-z0-9_-]`` only
and the same conversation can go on with an Anthropic model (which allows nothing else in a
``tool_use`` id). The client returns the id with the tool result and the gateway restores both.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import orjson

from ..errors import GatewayError, InvalidRequest, UpstreamError, from_upstream
from ..schema.gemini import Content, GenerateContentRequest, Part, ToolConfig
from ..tokens import count_tokens
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

SUPPORTED = req.COMMON_PARAMETERS | {
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "reasoning_effort",
}

# reasoning_effort -> thinking budget in tokens
THINKING_BUDGET = {"low": 1024, "medium": 8192, "high": 24576}

# Candidate.FinishReason (v1beta proto, plus Vertex's MODEL_ARMOR) -> OpenAI's finish_reason.
# A function call ends with STOP, so STOP is "tool_calls" when the answer has calls. Reasons
# not listed (OTHER, NO_IMAGE, TOO_MANY_TOOL_CALLS...) are "stop".
FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    **dict.fromkeys(
        (
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_RECITATION",
            "LANGUAGE",
            "MODEL_ARMOR",
        ),
        "content_filter",
    ),
}

# The model tried to call a function and produced a call that cannot be used: OpenAI has no
# finish_reason for that and an empty "stop" would hide it, so it is an upstream error (502),
# which the SDKs retry; a retry usually gets a well-formed call.
FAILED_CALLS = frozenset({"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "MALFORMED_RESPONSE"})

# google.rpc.Code names -> the status a Gemini error inside a stream stands for
STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

SIGNATURE_MARK = "__"
OLD_SIGNATURE_MARK = "~"  # ids handed out before the mark changed, standard base64 after it
# Gemini's own call id is kept when the whole tool-call id stays [A-Za-z0-9_-] and splits back
_PLAIN_ID = re.compile(r"[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*")

AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mp3"}

_EXTENSION_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
}


def _model_path(deployment: Deployment) -> str:
    return "/models/" + deployment.upstream_model.removeprefix("models/")


def finish_reason(reason: str, has_tool_calls: bool, provider: str) -> str:
    if reason in FAILED_CALLS:
        raise UpstreamError(
            f"provider '{provider}' ended the answer with {reason}: the model produced a "
            "function call that could not be used",
            code="upstream_invalid_function_call",
        )
    mapped = FINISH_REASONS.get(reason, "stop")
    return "tool_calls" if mapped == "stop" and has_tool_calls else mapped


@register("gemini", "chat")
class OpenAIToGeminiChat(Translator):
    def __init__(self, deployment: Deployment, requested: str) -> None:
        self.deployment = deployment
        self.requested = requested
        self.provider = deployment.provider.name
        self.usage = Usage()
        self.complete = False
        self._writer = ChunkWriter(requested, False, self.usage)
        self._sse = SSEParser()
        self._started = False
        self._calls: dict[int, int] = {}  # candidate index -> tool calls sent so far
        self._open: set[int] = set()  # candidates seen without a finish reason yet
        self._id = ""

    # --- request ---------------------------------------------------------------------------

    def request(self, raw_body: JSONObject) -> UpstreamCall:
        body = cast("ChatCompletionRequest", raw_body)
        req.check_parameters(body, SUPPORTED, "gemini")
        system, contents = _contents(raw_body["messages"])
        out: GenerateContentRequest = {"contents": contents}
        if system:
            out["systemInstruction"] = {"parts": [{"text": text} for text in system]}
        config = _generation_config(body, raw_body)
        if config:
            out["generationConfig"] = config
        functions = req.function_tools(body)
        if functions:
            out["tools"] = [{"functionDeclarations": [_declaration(fn) for fn in functions]}]
        tool_config = _tool_config(body)
        if tool_config is not None:
            out["toolConfig"] = tool_config
        stream = body.get("stream") is True
        path = _model_path(self.deployment)
        if stream:
            self._writer = ChunkWriter(self.requested, wants_usage(body), self.usage)
            return UpstreamCall(path + ":streamGenerateContent?alt=sse", orjson.dumps(out), True)
        return UpstreamCall(path + ":generateContent", orjson.dumps(out), False)

    # --- whole response --------------------------------------------------------------------

    def response_body(self, raw: bytes) -> bytes:
        obj = load_object(raw, self.provider)
        if "error" in obj:
            raise _error(None, obj, {}, self.provider)
        response_id = _response_id(obj)
        _take_usage(self.usage, obj.get("usageMetadata"))  # counted even if the answer fails
        choices: list[tuple[Message, str | None]] = []
        for i, candidate in enumerate(obj.get("candidates") or []):
            message = Message()
            for part in _parts(candidate):
                if "functionCall" in part:
                    call = part["functionCall"]
                    position = len(message.tool_calls)
                    message.tool_calls.append(
                        {
                            "id": _call_id(response_id, i, position, part),
                            "type": "function",
                            "function": {
                                "name": str(call.get("name", "")),
                                "arguments": orjson.dumps(call.get("args") or {}).decode(),
                            },
                        }
                    )
                elif isinstance(part.get("text"), str):
                    (message.reasoning if part.get("thought") else message.content).append(
                        part["text"]
                    )
            reason = str(candidate.get("finishReason") or "STOP")
            choices.append(
                (message, finish_reason(reason, bool(message.tool_calls), self.provider))
            )
        if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
            choices.append((Message(), "content_filter"))
        return completion(response_id, self.requested, choices, self.usage)

    # --- stream ----------------------------------------------------------------------------

    def response_chunk(self, chunk: bytes) -> bytes:
        return translate_events(self._sse.feed(chunk), self._event)

    def response_end(self) -> bytes:
        out = translate_events(self._sse.close(), self._event)
        if not self._started or self._open:
            raise UpstreamError(
                f"provider '{self.provider}' ended the stream before it was complete",
                code="upstream_stream_incomplete",
            )
        self.complete = True
        return out + self._writer.end(self.usage)

    def _event(self, event: Event) -> bytes:
        obj = load_object(event.data, self.provider)
        if "error" in obj:
            raise _error(None, obj, {}, self.provider)
        w = self._writer
        if not self._started:
            self._started = True
            self._id = _response_id(obj)
            w.start(self._id)
        _take_usage(self.usage, obj.get("usageMetadata"))
        out: list[bytes] = []
        candidates = obj.get("candidates") or []
        for candidate in candidates:
            index = candidate.get("index", 0) if isinstance(candidate.get("index"), int) else 0
            self._open.add(index)
            for part in _parts(candidate):
                if "functionCall" in part:
                    call = part["functionCall"]
                    n = self._calls.get(index, 0)
                    self._calls[index] = n + 1
                    out.append(
                        w.tool_call(
                            n,
                            _call_id(self._id, index, n, part),
                            str(call.get("name", "")),
                            orjson.dumps(call.get("args") or {}).decode(),
                            index,
                        )
                    )
                elif isinstance(part.get("text"), str):
                    if part.get("thought"):
                        out.append(w.reasoning(part["text"], index))
                    else:
                        out.append(w.text(part["text"], index))
            reason = candidate.get("finishReason")
            if reason:
                self._open.discard(index)
                finish = finish_reason(str(reason), index in self._calls, self.provider)
                out.append(w.finish(finish, index))
        feedback = obj.get("promptFeedback")
        if not candidates and isinstance(feedback, dict) and feedback.get("blockReason"):
            out.append(w.finish("content_filter"))
        return b"".join(out)

    def response_error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        obj = json_or_none(raw)
        if isinstance(obj, list) and obj and isinstance(obj[0], dict):
            obj = obj[0]  # some Google front ends wrap the status in a list
        return _error(status, obj if isinstance(obj, dict) else {}, headers, self.provider)


# batchEmbedContents takes at most this many requests in one call
MAX_EMBEDDING_BATCH = 100
# OpenAI's own limit on inputs per request, which also bounds the calls one request makes
MAX_EMBEDDING_INPUTS = 2048


@register("gemini", "embeddings")
class OpenAIToGeminiEmbeddings(Translator):
    """OpenAI embeddings to batchEmbedContents, which takes at most MAX_EMBEDDING_BATCH
    inputs: more are sent in several calls, one after another, and joined in order."""

    def __init__(self, deployment: Deployment, requested: str) -> None:
        self.deployment = deployment
        self.requested = requested
        self.provider = deployment.provider.name
        self.usage = Usage()
        self.complete = False
        self._inputs: list[str] = []
        self._base64 = False
        self._calls: list[UpstreamCall] = []  # the batches still to send
        self._data: list[JSONObject] = []  # the embeddings of the batches answered so far

    def request(self, body: JSONObject) -> UpstreamCall:
        raw = body["input"]
        inputs = [raw] if isinstance(raw, str) else raw
        if not all(isinstance(t, str) for t in inputs):
            raise InvalidRequest(
                "'input' must be text for gemini models: token arrays are not supported.",
                param="input",
                code="unsupported_parameter",
            )
        req.check_parameters(
            cast("ChatCompletionRequest", body),
            {"model", "input", "encoding_format", "dimensions", "user"},
            "gemini",
        )
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts, got {len(inputs)}.",
                param="input",
                code="invalid_value",
            )
        self._inputs = inputs
        self._base64 = body.get("encoding_format") == "base64"
        model = "models/" + self.deployment.upstream_model.removeprefix("models/")
        requests = []
        for text in inputs:
            item: JSONObject = {"model": model, "content": {"parts": [{"text": text}]}}
            if isinstance(body.get("dimensions"), int):
                item["outputDimensionality"] = body["dimensions"]
            requests.append(item)
        path = _model_path(self.deployment) + ":batchEmbedContents"
        n = MAX_EMBEDDING_BATCH
        self._calls = [
            UpstreamCall(path, orjson.dumps({"requests": requests[i : i + n]}), False)
            for i in range(0, len(requests), n)
        ]
        return self._calls.pop(0)

    def next_call(self) -> UpstreamCall | None:
        return self._calls.pop(0) if self._calls else None

    def response_body(self, raw: bytes) -> bytes:
        """The whole OpenAI answer once the last batch is in; b"" before."""
        obj = load_object(raw, self.provider)
        batch = self._inputs[len(self._data) : len(self._data) + MAX_EMBEDDING_BATCH]
        embeddings = obj.get("embeddings")
        if not isinstance(embeddings, list) or len(embeddings) != len(batch):
            raise UpstreamError(
                f"provider '{self.provider}' did not send one embedding for each input",
                code="upstream_invalid_response",
            )
        for item in embeddings:
            values = item.get("values") or [] if isinstance(item, dict) else []
            vector: list[float] | str = values
            if self._base64:
                vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            self._data.append(
                {"object": "embedding", "index": len(self._data), "embedding": vector}
            )
        # The embedding API reports no token counts: count them the gateway's way.
        self.usage.prompt_tokens += sum(count_tokens(t) for t in batch)
        if self._calls:
            return b""
        tokens = self.usage.prompt_tokens
        return orjson.dumps(
            {
                "object": "list",
                "data": self._data,
                "model": self.requested,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def response_chunk(self, chunk: bytes) -> bytes:
        return chunk

    def response_end(self) -> bytes:
        self.complete = True
        return b""

    def response_error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> GatewayError:
        obj = json_or_none(raw)
        return _error(status, obj if isinstance(obj, dict) else {}, headers, self.provider)


# --- response pieces ---------------------------------------------------------------------------


def _parts(candidate: JSONObject) -> list[JSONObject]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _response_id(obj: JSONObject) -> str:
    rid = obj.get("responseId")
    if isinstance(rid, str) and rid:
        return rid
    return "chatcmpl-" + secrets.token_hex(12)


def _call_id(response_id: str, candidate: int, position: int, part: JSONObject) -> str:
    """A stable OpenAI tool-call id carrying Gemini's id and thought signature, if any.

    `position` counts the function calls of the candidate, so that a stream and the same
    answer unstreamed give the same ids.
    """
    call = part["functionCall"]
    given = call.get("id") if isinstance(call, dict) else None
    if isinstance(given, str) and _PLAIN_ID.fullmatch(given):
        base = given
    else:
        seed = f"{response_id}/{candidate}/{position}".encode()
        base = "call_" + hashlib.sha256(seed).hexdigest()[:24]
    signature = part.get("thoughtSignature")
    if not isinstance(signature, str) or not signature:
        return base
    urlsafe = signature.rstrip("=").replace("+", "-").replace("/", "_")
    return f"{base}{SIGNATURE_MARK}{urlsafe}"


def _split_call_id(call_id: str) -> tuple[str, str]:
    """(Gemini's call id, thought signature as Gemini sent it) from an id the gateway handed
    out; the signature is "" when there is none."""
    base, mark, signature = call_id.partition(SIGNATURE_MARK)
    if mark:
        standard = signature.replace("-", "+").replace("_", "/")
        return base, standard + "=" * (-len(standard) % 4)
    base, _, signature = call_id.partition(OLD_SIGNATURE_MARK)
    return base, signature


def _take_usage(usage: Usage, reported: object) -> None:
    if not isinstance(reported, dict):
        return

    def get(name: str) -> int:
        v = reported.get(name)
        return v if isinstance(v, int) else 0

    usage.prompt_tokens = get("promptTokenCount") + get("toolUsePromptTokenCount")
    usage.cached_tokens = get("cachedContentTokenCount")
    usage.reasoning_tokens = get("thoughtsTokenCount")
    usage.completion_tokens = get("candidatesTokenCount") + usage.reasoning_tokens
    usage.reported = True


def _error(
    status: int | None, obj: JSONObject, headers: Mapping[str, str], provider: str
) -> GatewayError:
    err = obj.get("error")
    err = err if isinstance(err, dict) else {}
    message = err.get("message") if isinstance(err.get("message"), str) else ""
    rpc_status = err.get("status") if isinstance(err.get("status"), str) else ""
    if status is None:
        status = STATUS_CODES.get(str(rpc_status), 502)
    raw_details = err.get("details")
    details: list[object] = raw_details if isinstance(raw_details, list) else []
    reasons = {d.get("reason") for d in details if isinstance(d, dict)}
    if "API_KEY_INVALID" in reasons:
        status = 401  # the gateway's provider key, never the client's
    retry_after = headers.get("Retry-After") or _retry_delay(details)
    code = None
    if status == 404:
        code = "model_not_found"
    elif status == 429:
        code = "rate_limit_exceeded"
    elif status == 503:
        code = "service_unavailable"
    return from_upstream(
        status,
        str(message),
        provider=provider,
        type_="invalid_request_error" if status == 400 else None,
        code=code,
        retry_after=retry_after,
    )


def _retry_delay(details: list[object]) -> str | None:
    """Seconds from a google.rpc.RetryInfo detail ("retryDelay": "30s"), as Retry-After."""
    for detail in details:
        if isinstance(detail, dict) and isinstance(detail.get("retryDelay"), str):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)s", detail["retryDelay"])
            if match:
                return str(max(1, round(float(match.group(1)))))
    return None


# --- request pieces ----------------------------------------------------------------------------


def _contents(messages: list[JSONObject]) -> tuple[list[str], list[Content]]:
    system: list[str] = []
    turns: list[Content] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the tool results
    for i, message in enumerate(messages):
        role = message["role"]
        param = f"messages[{i}]"
        parts: list[Part]
        if role in ("system", "developer"):
            text = req.text_of(message.get("content"), f"{param}.content")
            if text:
                system.append(text)
            continue
        if role == "user":
            target, parts = "user", _user_parts(message.get("content"), f"{param}.content")
        elif role == "assistant":
            target, parts = "model", _model_parts(message, param, names)
        elif role == "tool":
            target, parts = "user", [_function_response(message, param, names)]
        else:
            raise InvalidRequest(
                f"'{param}.role': '{role}' messages are not supported for gemini models; "
                "use 'tool'.",
                param=f"{param}.role",
            )
        if not parts:
            continue
        if turns and turns[-1]["role"] == target:
            turns[-1]["parts"].extend(parts)
        else:
            turns.append({"role": "user" if target == "user" else "model", "parts": parts})
    if not turns:
        raise req.no_conversation("gemini")
    return system, turns


def _user_parts(content: object, param: str) -> list[Part]:
    parts: list[Part] = []
    for i, part in enumerate(req.content_parts(content, param)):
        kind = part["type"]
        where = f"{param}[{i}]"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"'{where}.text' must be a string.", param=where)
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            media_type, data = req.image_source(part, where)
            if media_type is None:
                guessed = _EXTENSION_TYPES.get(data.rsplit(".", 1)[-1].lower().split("?")[0])
                file: JSONObject = {"fileUri": data}
                if guessed:
                    file["mimeType"] = guessed
                parts.append({"fileData": cast("dict[str, str]", file)})  # type: ignore[typeddict-item]
            else:
                parts.append({"inlineData": {"mimeType": media_type, "data": data}})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            fmt = audio.get("format") if isinstance(audio, dict) else None
            if not isinstance(audio, dict) or fmt not in AUDIO_FORMATS or not audio.get("data"):
                raise InvalidRequest(
                    f"'{where}.input_audio' needs base64 'data' and a format 'wav' or 'mp3'.",
                    param=where,
                )
            parts.append({"inlineData": {"mimeType": AUDIO_FORMATS[fmt], "data": audio["data"]}})
        elif kind == "file":
            file_part = part.get("file")
            data_url = file_part.get("file_data") if isinstance(file_part, dict) else None
            match = isinstance(data_url, str) and re.match(
                r"^data:([\w.+-]+/[\w.+-]+);base64,(.*)$", data_url, re.S
            )
            if not match:
                raise InvalidRequest(
                    f"'{where}.file.file_data' must be a base64 data: URL for gemini models.",
                    param=where,
                )
            parts.append({"inlineData": {"mimeType": match.group(1), "data": match.group(2)}})
        else:
            raise InvalidRequest(
                f"'{where}': content parts of type '{kind}' are not supported for gemini models.",
                param=where,
            )
    return parts


def _model_parts(message: JSONObject, param: str, names: dict[str, str]) -> list[Part]:
    parts: list[Part] = []
    for i, part in enumerate(req.content_parts(message.get("content"), f"{param}.content")):
        if part["type"] == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                parts.append({"text": part["text"]})
        elif part["type"] != "refusal":
            raise InvalidRequest(
                f"'{param}.content[{i}]': assistant content must be text.",
                param=f"{param}.content[{i}]",
            )
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{param}.tool_calls' must be an array.", param=f"{param}.tool_calls")
    for j, call in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise InvalidRequest(f"'{where}' needs an 'id' and a 'function'.", param=where)
        names[call["id"]] = str(fn.get("name", ""))
        call_id, signature = _split_call_id(call["id"])
        piece: Part = {
            "functionCall": {
                "id": call_id,
                "name": str(fn.get("name", "")),
                "args": req.tool_arguments(fn.get("arguments"), f"{where}.function.arguments"),
            }
        }
        if signature:
            piece["thoughtSignature"] = signature
        parts.append(piece)
    return parts


def _function_response(message: JSONObject, param: str, names: dict[str, str]) -> Part:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or call_id not in names:
        raise InvalidRequest(
            f"'{param}.tool_call_id' must name a tool call of an earlier assistant message.",
            param=f"{param}.tool_call_id",
        )
    text = req.text_of(message.get("content"), f"{param}.content")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    response = value if isinstance(value, dict) else {"result": text}
    return {
        "functionResponse": {
            "id": _split_call_id(call_id)[0],
            "name": names[call_id],
            "response": response,
        }
    }


def _generation_config(body: ChatCompletionRequest, extra: JSONObject) -> JSONObject:
    config: JSONObject = {}
    max_tokens = req.max_output_tokens(body)
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    top_k = req.integer_field(extra, "top_k", minimum=1)
    if top_k is not None:
        config["topK"] = top_k
    seed = req.integer_field(extra, "seed")
    if seed is not None:
        config["seed"] = seed
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if extra.get(ours) is not None:
            config[theirs] = extra[ours]
    n = body.get("n")
    if n is not None and n != 1:
        config["candidateCount"] = n
    stops = req.stop_sequences(body)
    if stops:
        if len(stops) > 5:
            raise InvalidRequest(
                "gemini models accept at most 5 stop sequences.", param="stop", code="invalid_value"
            )
        config["stopSequences"] = stops
    fmt = req.json_schema_format(body)
    if fmt is not None:
        kind, schema = fmt
        config["responseMimeType"] = "application/json"
        if kind == "json_schema":
            config["responseJsonSchema"] = schema
    effort = extra.get("reasoning_effort")
    if effort is not None:
        if effort not in THINKING_BUDGET:
            raise InvalidRequest(
                "'reasoning_effort' must be 'low', 'medium' or 'high'.", param="reasoning_effort"
            )
        config["thinkingConfig"] = {"thinkingBudget": THINKING_BUDGET[effort]}
    return config


def _declaration(fn: JSONObject) -> JSONObject:
    # `description` is REQUIRED in the v1beta proto; proto3 cannot tell "" from absent, and
    # the real API takes "" (a recorded request sends it), so a tool without one sends "".
    description = fn.get("description")
    declaration: JSONObject = {
        "name": fn["name"],
        "description": description if isinstance(description, str) else "",
    }
    if isinstance(fn.get("parameters"), dict):
        # parametersJsonSchema takes plain JSON Schema, unlike `parameters` (an OpenAPI
        # subset): `additionalProperties` and the rest pass as they are (the spec's own example
        # has it). Only the `$schema` meta keyword goes: it says nothing about the arguments.
        declaration["parametersJsonSchema"] = {
            k: v for k, v in fn["parameters"].items() if k != "$schema"
        }
    return declaration


def _tool_config(body: ChatCompletionRequest) -> ToolConfig | None:
    if body.get("parallel_tool_calls") is False:
        raise InvalidRequest(
            "'parallel_tool_calls': false is not supported for gemini models.",
            param="parallel_tool_calls",
            code="unsupported_parameter",
        )
    choice = req.tool_choice(body)
    if choice is None:
        return None
    kind, name = choice
    if kind == "function":
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name or ""]}}
    if kind == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    return {"functionCallingConfig": {"mode": "ANY" if kind == "required" else "AUTO"}}
