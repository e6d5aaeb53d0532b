"""OpenAI wire types the gateway reads or writes.

Reference: https://platform.openai.com/docs/api-reference/chat (OpenAPI 3.1 spec, schemas
``CreateChatCompletionRequest``, ``CreateChatCompletionResponse``,
``CreateChatCompletionStreamResponse``, ``CompletionUsage``, ``CreateEmbeddingRequest``).
Only the fields the gateway looks at are typed; every other field passes through untouched.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

JSONObject = dict[str, Any]


class FunctionCall(TypedDict):
    name: str
    arguments: str


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallChunk(TypedDict, total=False):
    index: int
    id: str
    type: Literal["function"]
    function: dict[str, str]


class ChatMessage(TypedDict, total=False):
    role: str
    content: str | list[JSONObject] | None
    name: str
    tool_calls: list[ToolCall]
    tool_call_id: str
    refusal: str | None


class StreamOptions(TypedDict, total=False):
    include_usage: bool


class ChatCompletionRequest(TypedDict, total=False):
    model: str
    messages: list[ChatMessage]
    stream: bool
    stream_options: StreamOptions
    max_tokens: int
    max_completion_tokens: int
    n: int
    temperature: float
    top_p: float
    stop: str | list[str] | None
    tools: list[JSONObject]
    tool_choice: str | JSONObject
    response_format: JSONObject
    user: str
    metadata: dict[str, str]


class PromptTokensDetails(TypedDict, total=False):
    cached_tokens: int
    audio_tokens: int


class CompletionTokensDetails(TypedDict, total=False):
    reasoning_tokens: int
    audio_tokens: int
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: NotRequired[PromptTokensDetails]
    completion_tokens_details: NotRequired[CompletionTokensDetails]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: JSONObject | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: NotRequired[CompletionUsage]
    system_fingerprint: NotRequired[str | None]


class ChunkDelta(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[ToolCallChunk]
    refusal: str | None


class ChunkChoice(TypedDict):
    index: int
    delta: ChunkDelta
    finish_reason: str | None
    logprobs: NotRequired[JSONObject | None]


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[CompletionUsage | None]
    system_fingerprint: NotRequired[str | None]


class EmbeddingRequest(TypedDict, total=False):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"]
    dimensions: int
    user: str


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None
