"""Gemini Developer API wire types (https://ai.google.dev/api/generate-content).

JSON names follow the proto3 JSON mapping of google/ai/generativelanguage/v1beta (see the
team's specs/gemini/); only what the gateway reads or writes is typed.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

JSONObject = dict[str, Any]


class Blob(TypedDict):
    mimeType: str
    data: str


class FileData(TypedDict, total=False):
    mimeType: str
    fileUri: str


class FunctionCall(TypedDict, total=False):
    id: str
    name: str
    args: JSONObject


class FunctionResponse(TypedDict, total=False):
    id: str
    name: str
    response: JSONObject


class Part(TypedDict, total=False):
    text: str
    thought: bool
    thoughtSignature: str
    inlineData: Blob
    fileData: FileData
    functionCall: FunctionCall
    functionResponse: FunctionResponse


class Content(TypedDict, total=False):
    role: Literal["user", "model"]
    parts: list[Part]


class FunctionCallingConfig(TypedDict, total=False):
    mode: Literal["AUTO", "ANY", "NONE"]
    allowedFunctionNames: list[str]


class ToolConfig(TypedDict):
    functionCallingConfig: FunctionCallingConfig


class GenerateContentRequest(TypedDict, total=False):
    contents: list[Content]
    systemInstruction: Content
    tools: list[JSONObject]
    toolConfig: ToolConfig
    generationConfig: JSONObject


class UsageMetadata(TypedDict, total=False):
    promptTokenCount: int
    cachedContentTokenCount: int
    candidatesTokenCount: int
    toolUsePromptTokenCount: int
    thoughtsTokenCount: int
    totalTokenCount: int
