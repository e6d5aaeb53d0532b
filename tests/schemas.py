"""Checks of wire bodies against each provider's published schema, as copied into fixtures/.

- OpenAI: the official OpenAPI 3.1 document (``fixtures/openai/openapi.yaml``), validated with
  jsonschema. The document marks nullable fields OpenAPI-3.0 style (``nullable: true``), which
  JSON Schema ignores; the loader turns each into ``anyOf [..., null]``, after which every real
  recording in fixtures/openai/ validates.
- Gemini: the field table derived from Google's generativelanguage v1beta protos
  (``fixtures/gemini/generativelanguage-v1beta-fields.json``): unknown keys, wrong shapes and
  unknown enum values are reported.
- Anthropic: no machine-readable schema is published; ``anthropic_request_errors`` encodes the
  request tables of the team's specs/anthropic/messages.md (from Anthropic's SDK types) plus the
  rules the real API enforces that the recordings show.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .fakes.base import FIXTURES

# --- OpenAI -------------------------------------------------------------------------------------


def _nullable_to_anyof(node: Any) -> Any:
    if isinstance(node, dict):
        for k, v in list(node.items()):
            node[k] = _nullable_to_anyof(v)
        if node.pop("nullable", False) is True:
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_anyof(x) for x in node]
    return node


@functools.cache
def _openai_registry() -> Registry:
    with open(FIXTURES / "openai/openapi.yaml", "rb") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    spec = _nullable_to_anyof(spec)
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )


@functools.cache
def _openai_validator(schema: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema}"}, registry=_openai_registry()
    )


def openai_errors(schema: str, obj: Any) -> list[str]:
    """Violations of the OpenAPI schema `schema` (e.g. "CreateChatCompletionResponse")."""
    return [
        f"{schema}{''.join(f'[{p!r}]' for p in e.absolute_path)}: {e.message[:200]}"
        for e in _openai_validator(schema).iter_errors(obj)
    ]


# --- Gemini -------------------------------------------------------------------------------------

_SCALARS = {
    "string": str,
    "bool": bool,
    "float": (int, float),
    "double": (int, float),
    "int32": int,
    "int64": (int, str),
    "bytes": str,
}


@functools.cache
def _gemini_types() -> dict[str, Any]:
    data = json.loads((FIXTURES / "gemini/generativelanguage-v1beta-fields.json").read_bytes())
    types: dict[str, Any] = data["types"]
    return types


def _gemini_type(name: str, scope: str) -> dict[str, Any] | None:
    types = _gemini_types()
    # nested types are named "Outer.Inner"; a field's type may be given relative to its message
    for candidate in (f"{scope}.{name}", name):
        if candidate in types:
            found: dict[str, Any] = types[candidate]
            return found
    return None


def gemini_errors(message: str, obj: Any, path: str = "") -> list[str]:
    """Violations of the proto-derived shape of `message` (e.g. "GenerateContentRequest")."""
    spec = _gemini_type(message, "")
    return _gemini_check(message, spec, obj, path or message)


def _gemini_check(name: str, spec: dict[str, Any] | None, obj: Any, path: str) -> list[str]:
    if name in ("google.protobuf.Struct",):
        return [] if isinstance(obj, dict) else [f"{path}: expected an object"]
    if name in ("google.protobuf.Value",):
        return []
    if name in _SCALARS:
        ok = isinstance(obj, _SCALARS[name]) and not (name != "bool" and isinstance(obj, bool))
        return [] if ok else [f"{path}: expected {name}, got {obj!r}"[:200]]
    if spec is None:
        return [f"{path}: unknown type {name}"]
    if spec["kind"] == "enum":
        values = spec.get("values") or [v["name"] for v in spec.get("fields", [])]
        names = [v["name"] if isinstance(v, dict) else v for v in values]
        return [] if obj in names else [f"{path}: {obj!r} is not a {name} value"]
    if not isinstance(obj, dict):
        return [f"{path}: expected a {name} object, got {obj!r}"[:200]]
    fields = {f["json"]: f for f in spec["fields"]}
    errors = []
    for key, value in obj.items():
        field = fields.get(key)
        if field is None:
            errors.append(f"{path}.{key}: unknown field of {name}")
            continue
        scope = name
        ftype = field["type"]
        sub = (
            None if ftype in _SCALARS or ftype.startswith("google.") else _gemini_type(ftype, scope)
        )
        if field.get("label") == "repeated":
            if not isinstance(value, list):
                errors.append(f"{path}.{key}: expected a list")
                continue
            for i, item in enumerate(value):
                errors.extend(_gemini_check(ftype, sub, item, f"{path}.{key}[{i}]"))
        else:
            errors.extend(_gemini_check(ftype, sub, value, f"{path}.{key}"))
    for field in spec["fields"]:
        # the model is a path parameter in REST, not part of the body
        in_path = name == "GenerateContentRequest" and field["json"] == "model"
        if "REQUIRED" in (field.get("behavior") or []) and field["json"] not in obj and not in_path:
            errors.append(f"{path}: missing required field {field['json']}")
    return errors


# --- Anthropic ----------------------------------------------------------------------------------

_TOP = {
    "model": str,
    "max_tokens": int,
    "messages": list,
    "system": (str, list),
    "stream": bool,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "stop_sequences": list,
    "metadata": dict,
    "tools": list,
    "tool_choice": dict,
    "thinking": dict,
    "service_tier": str,
    "output_config": dict,
    "cache_control": dict,
    "container": (str, dict),
    "inference_geo": str,
}
_BLOCK_KEYS = {
    "text": ({"text"}, {"cache_control", "citations"}),
    "image": ({"source"}, {"cache_control"}),
    "document": ({"source"}, {"cache_control", "citations", "context", "title"}),
    "tool_use": ({"id", "name", "input"}, {"cache_control", "caller"}),
    "tool_result": ({"tool_use_id"}, {"content", "is_error", "cache_control"}),
    "thinking": ({"thinking", "signature"}, set()),
    "redacted_thinking": ({"data"}, set()),
}
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


def anthropic_request_errors(body: Any) -> list[str]:
    errors: list[str] = []
    if not isinstance(body, dict):
        return ["body: expected an object"]
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            errors.append(f"missing required field {key}")
    for key, value in body.items():
        kind = _TOP.get(key)
        if kind is None:
            errors.append(f"{key}: unknown field")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            errors.append(f"{key}: wrong type {type(value).__name__}")
    if isinstance(body.get("system"), list):
        for i, block in enumerate(body["system"]):
            errors.extend(_block_errors(block, f"system[{i}]", allowed={"text"}))
    messages = body.get("messages")
    previous_tool_ids: set[str] = set()
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            path = f"messages[{i}]"
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                errors.append(f"{path}: must have exactly role and content")
                continue
            role = message["role"]
            if role not in ("user", "assistant"):
                errors.append(f"{path}.role: {role!r}")
            if i == 0 and role != "user":
                errors.append(f"{path}: the first message must use the user role")
            if i > 0 and messages[i - 1].get("role") == role:
                errors.append(f"{path}: roles must alternate")
            content = message["content"]
            if isinstance(content, str):
                if not content:
                    errors.append(f"{path}.content: must not be empty")
                previous_tool_ids = set()
                continue
            if not isinstance(content, list) or not content:
                errors.append(f"{path}.content: must be a non-empty string or list")
                continue
            allowed = (
                {"text", "image", "document", "tool_result"}
                if role == "user"
                else {"text", "tool_use", "thinking", "redacted_thinking"}
            )
            tool_ids: set[str] = set()
            for j, block in enumerate(content):
                errors.extend(_block_errors(block, f"{path}.content[{j}]", allowed))
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    tool_ids.add(str(block.get("id")))
                is_result = isinstance(block, dict) and block.get("type") == "tool_result"
                if is_result and block.get("tool_use_id") not in previous_tool_ids:
                    errors.append(
                        f"{path}.content[{j}]: tool_result without a tool_use in the "
                        "previous message"
                    )
            previous_tool_ids = tool_ids
    for i, tool in enumerate(body.get("tools") or []):
        path = f"tools[{i}]"
        if not isinstance(tool, dict) or "name" not in tool or "input_schema" not in tool:
            errors.append(f"{path}: needs name and input_schema")
            continue
        extra = set(tool) - {
            "name",
            "description",
            "input_schema",
            "type",
            "strict",
            "cache_control",
        }
        if extra:
            errors.append(f"{path}: unknown fields {sorted(extra)}")
        if (
            not isinstance(tool["input_schema"], dict)
            or tool["input_schema"].get("type") != "object"
        ):
            errors.append(f"{path}.input_schema.type must be 'object'")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            errors.append(f"tool_choice.type: {choice.get('type')!r}")
        if (choice.get("type") == "tool") != ("name" in choice):
            errors.append("tool_choice: name goes with type 'tool' only")
        if set(choice) - {"type", "name", "disable_parallel_tool_use"}:
            errors.append("tool_choice: unknown fields")
    if isinstance(body.get("metadata"), dict) and set(body["metadata"]) - {"user_id"}:
        errors.append("metadata: only user_id is allowed")
    output = body.get("output_config")
    if isinstance(output, dict):
        if set(output) - {"effort", "format"}:
            errors.append("output_config: unknown fields")
        fmt = output.get("format")
        if fmt is not None and (
            not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or "schema" not in fmt
        ):
            errors.append("output_config.format: must be {type: json_schema, schema}")
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 1:
        errors.append("temperature: must be between 0 and 1")
    return errors


def _block_errors(block: Any, path: str, allowed: set[str]) -> list[str]:
    if not isinstance(block, dict) or block.get("type") not in _BLOCK_KEYS:
        return [f"{path}: not a content block"]
    kind = block["type"]
    if kind not in allowed:
        return [f"{path}: a {kind} block is not allowed here"]
    required, optional = _BLOCK_KEYS[kind]
    keys = set(block) - {"type"}
    errors = []
    if required - keys:
        errors.append(f"{path}: missing {sorted(required - keys)}")
    if keys - required - optional:
        errors.append(f"{path}: unknown fields {sorted(keys - required - optional)}")
    if kind == "text" and not block.get("text"):
        errors.append(f"{path}.text: text content blocks must be non-empty")
    if kind == "tool_use" and not isinstance(block.get("input"), dict):
        errors.append(f"{path}.input: must be an object")
    if kind == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            errors.append(f"{path}.source: must be an object")
        elif source.get("type") == "base64":
            if source.get("media_type") not in _IMAGE_TYPES or not source.get("data"):
                errors.append(f"{path}.source: bad base64 image source")
        elif source.get("type") == "url":
            if not str(source.get("url", "")).startswith(("http://", "https://")):
                errors.append(f"{path}.source.url: must be a URL")
        else:
            errors.append(f"{path}.source.type: {source.get('type')!r}")
    return errors
