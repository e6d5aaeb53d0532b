"""The request bodies the bench sends: what an app using the OpenAI SDK would send."""

from __future__ import annotations

import orjson

from .gateway_config import CLIENT_KEY
from .loadgen import Load

CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
LARGE_PROMPT_BYTES = 100_000

_SENTENCE = (
    "The quarterly report shows steady growth in every region, with the strongest gains in "
    "the north, where new customers doubled and churn fell to its lowest level in years. "
)


def chat_body(model: str, stream: bool = False) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def large_body(model: str, size: int = LARGE_PROMPT_BYTES) -> bytes:
    """A conversation of about `size` bytes: many long user and assistant turns."""
    turn = _SENTENCE * 12  # about 2 KB
    messages: list[dict[str, str]] = [{"role": "system", "content": "Summarise the thread."}]
    while sum(len(m["content"]) for m in messages) < size:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": turn})
    return orjson.dumps({"model": model, "messages": messages, "max_tokens": 256})


def chat_load(port: int, model: str, *, path: str = CHAT_PATH, stream: bool = False) -> Load:
    return Load(port, path, chat_body(model, stream), HEADERS)
