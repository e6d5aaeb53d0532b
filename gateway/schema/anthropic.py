"""Anthropic Messages API wire types (https://docs.anthropic.com/en/api/messages).

Field names follow Anthropic's SDK types (see the team's specs/anthropic/messages.md);
only what the gateway reads or writes is typed.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

JSONObject = dict[str, Any]


class TextBlock(TypedDict):
    type: Literal["text"]
    text: str


class ImageSource(TypedDict, total=False):
    type: Literal["base64", "url"]
    media_type: str
    data: str
    url: str


class ImageBlock(TypedDict):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: JSONObject


class ToolResultBlock(TypedDict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock]
    is_error: NotRequired[bool]


ContentBlock = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock


class MessageParam(TypedDict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(TypedDict):
    name: str
    description: NotRequired[str]
    input_schema: JSONObject
    strict: NotRequired[bool]


class ToolChoice(TypedDict, total=False):
    type: Literal["auto", "any", "tool", "none"]
    name: str
    disable_parallel_tool_use: bool


class MessageCreateParams(TypedDict, total=False):
    model: str
    max_tokens: int
    messages: list[MessageParam]
    system: list[TextBlock]
    stream: bool
    temperature: float
    top_p: float
    top_k: int
    stop_sequences: list[str]
    metadata: dict[str, str]
    tools: list[ToolParam]
    tool_choice: ToolChoice
    thinking: JSONObject
    output_config: JSONObject
    service_tier: str


class Usage(TypedDict, total=False):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
